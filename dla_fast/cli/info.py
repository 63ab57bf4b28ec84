"""Show versions, the GPU, which dla_fast backends can run here and which one is in force.

    python -m dla_fast info

Paste its output into bug reports.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Tuple

import torch

import dla_fast
from dla_fast.backend import ENV_VAR, available_backends, extension_status, get_backend

from .records import package_version

PACKAGES = ("torch", "triton", "timm", "numpy")


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
    return _versions() + _gpus() + _backends()


def run(args: argparse.Namespace) -> int:
    lines = collect()
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name.ljust(width)}  {value}")
    return 0
