"""Model registry: `create_model(name, **kwargs)` and `list_models()`."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Dict, List

import torch.nn as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> List[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model with random weights.

    Backbones take `num_classes`, `in_chans`, `features_only`, `out_indices` (see `dla_fast.models.DLA`).
    Unknown names raise ValueError with the list of known ones (and the closest, whatever their case).
    """
    if not isinstance(name, str):
        raise TypeError(f"create_model: the model name must be a str such as 'dla34'; got {name!r}")
    if name not in _MODELS:
        close = difflib.get_close_matches(name.strip().lower(), list(_MODELS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
