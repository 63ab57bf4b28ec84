"""dla_fast: Deep Layer Aggregation networks, exact and fast.

    import dla_fast
    model = dla_fast.create_model("dla34")            # eager reference, timm-compatible weights
    dla_fast.load_checkpoint(model, "dla34.pth")      # timm / ucbdrive / CenterNet / training checkpoints
    dla_fast.accelerate(model)                         # fused kernels in place; dla_fast.restore(model) undoes
    dla_fast.CUDAGraphInference(model.eval().cuda())   # small batches: replay one captured CUDA graph per call
    dla_fast.CUDAGraphTraining(model.train().cuda())   # the same for a training step's forward and backward
    dla_fast.detect(model, images)                     # CenterNet/FairMOT/CenterTrack: images -> boxes (dla_fast.detection)
"""
from .backend import BackendUnavailable, available_backends, get_backend, set_backend, use_backend
from .models import CheckpointMismatch, create_model, list_models, load_checkpoint
from .nn import CUDAGraphInference, CUDAGraphTraining, accelerate, accelerated_modules, clear_weight_caches, restore
from .detection import Detector, detect
from .version import __version__

__all__ = [
    "BackendUnavailable", "CUDAGraphInference", "CUDAGraphTraining", "CheckpointMismatch", "Detector", "__version__", "accelerate", "accelerated_modules",
    "available_backends", "clear_weight_caches", "create_model", "detect", "get_backend", "list_models", "load_checkpoint", "restore",
    "set_backend", "use_backend",
]
