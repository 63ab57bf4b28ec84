"""dla_fast: Deep Layer Aggregation networks, exact and fast.

    import dla_fast
    model = dla_fast.create_model("dla34")            # eager reference, timm-compatible weights
    dla_fast.load_checkpoint(model, "dla34.pth")      # timm / ucbdrive / CenterNet / training checkpoints
"""
from .backend import BackendUnavailable, available_backends, get_backend, set_backend, use_backend
from .models import CheckpointMismatch, create_model, list_models, load_checkpoint
from .version import __version__

__all__ = [
    "BackendUnavailable", "CheckpointMismatch", "__version__", "available_backends", "create_model",
    "get_backend", "list_models", "load_checkpoint", "set_backend", "use_backend",
]
