"""Show versions, the optional packages missing here (and what they would enable), the GPU, which dla_fast
backends can run here and which one is in force.

    python -m dla_fast info

Paste its output into bug reports.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import List, Tuple

import torch

import dla_fast
from dla_fast.backend import ENV_VAR, available_backends, extension_status, get_backend

from .records import package_version

PACKAGES = ("torch", "numpy")
# Optional packages: what dla_fast does without each, and how to get it.
OPTIONAL = {
    "triton": ("the fused Triton kernels: backend 'auto' runs every op as eager PyTorch, backend 'triton' is "
               "unavailable; PyPI ships triton for Linux x86_64 and aarch64 only (pip install triton)"),
    "torchvision": ("CenterNet / CenterTrack with dcn=True (their default: the deformable conv's eager path) and "
                    "torchvision's DeformConv2d: build them with dcn=False, or pip install 'dla_fast[dcn]'"),
    "timm": "timm's own DLA models and its data transforms, beside dla_fast's (pip install timm)",
    "safetensors": "reading .safetensors weight files with load_checkpoint (pip install safetensors)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`info` takes no options."""


def _versions() -> List[Tuple[str, str]]:
    rows = [("dla_fast", f"{dla_fast.__version__} ({os.path.dirname(os.path.abspath(dla_fast.__file__))})"),
            ("python", f"{platform.python_version()} ({sys.executable})"),
            ("platform", platform.platform())]
    for name in PACKAGES:
        version = torch.__version__ if name == "torch" else package_version(name)
        if name == "torch":
            version += f" (CUDA {torch.version.cuda} build)" if torch.version.cuda else " (CPU-only build)"
        rows.append((name, version or "not installed"))
    return rows


def _import_error(name: str) -> str:
    """Why `import name` fails here ('' when it imports)."""
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install raising anything while importing
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return ""


def _optional() -> List[Tuple[str, str]]:
    """One row per optional package: its version, or MISSING with what is lost without it."""
    rows = []
    for name, without in OPTIONAL.items():
        error = _import_error(name)
        rows.append((name, f"MISSING ({error}); without it: {without}" if error else
                     package_version(name) or "unknown version"))
    return rows


def _gpus() -> List[Tuple[str, str]]:
    if not torch.cuda.is_available():
        return [("CUDA available", "no")]
    rows = [("CUDA available", f"yes, {torch.cuda.device_count()} device(s)")]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        rows.append((f"cuda:{index}", f"{props.name}, compute capability {props.major}.{props.minor}, "
                                      f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"))
    return rows


def _backends() -> List[Tuple[str, str]]:
    rows = [(f"backend {name}", "OK" if reason is None else f"unavailable: {reason}")
            for name, reason in available_backends().items()]
    rows.append(("extension dla_fast._C", extension_status()[1]))
    env_value = os.environ.get(ENV_VAR)
    source = f"{ENV_VAR}={env_value}" if env_value is not None else f"{ENV_VAR} unset"
    try:
        rows.append(("backend in force", f"{get_backend()} ({source})"))
    except ValueError as e:
        rows.append(("backend in force", f"invalid: {e}"))
    rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")))
    return rows


def collect() -> List[Tuple[str, str]]:
    """(name, value) lines: versions, GPUs, backends."""
    return _versions() + _optional() + _gpus() + _backends()


def run(args: argparse.Namespace) -> int:
    lines = collect()
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name.ljust(width)}  {value}")
    return 0
