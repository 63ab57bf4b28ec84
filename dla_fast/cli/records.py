"""The benchmark record format shared by `python -m dla_fast bench` and the scripts under benchmarks/.

One record is one measurement: an op (a fused kernel, or a whole model) run by one provider (eager,
torch.compile, dla_fast's Triton kernels, ...) in one mode, dtype and shape. A results file holds the
records of one run, so speedups computed inside one file compare measurements taken together:

    {"format": "dla_fast-bench/1", "records": [
        {"op": "dla34", "provider": "eager", "mode": "inference", "dtype": "bf16", "shape": [32, 3, 224, 224],
         "ms_p20": 9.71, "ms_p50": 9.80, "ms_p80": 9.92, "timing": "cuda events, 50 iterations",
         "min_bytes": null, "gbps": null, "min_flops": 195842801664, "tflops": 19.98, "baseline": true,
         "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0",
         "git_commit": "2f84219...", "date": "2025-11-22T19:30:00+00:00", "extra": {"images_per_s": 3265.3}}]}

`min_bytes` and `min_flops` are the minimum traffic and work of the op (the roofline floors), so `gbps` and
`tflops` say how close a provider comes to the hardware limits; either may be null when not counted.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from typing import Any, Dict, List, Optional, Sequence

import torch

RECORD_FORMAT = "dla_fast-bench/1"


@dataclasses.dataclass
class BenchRecord:
    """One measurement. Times in milliseconds; `shape` is the input shape (or a dict of named shapes)."""

    op: str
    provider: str
    mode: str
    dtype: str
    shape: Any
    ms_p20: float
    ms_p50: float
    ms_p80: float
    timing: str
    min_bytes: Optional[int]
    gbps: Optional[float]
    min_flops: Optional[int]
    tflops: Optional[float]
    baseline: bool
    device: str
    torch: str
    triton: Optional[str]
    git_commit: Optional[str]
    date: str
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "BenchRecord":
        """Inverse of `to_dict`; raises ValueError naming the missing fields."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data and n != "extra"]
        if missing:
            raise ValueError(f"benchmark record lacks the fields {', '.join(missing)}")
        return cls(**{n: data[n] for n in names if n in data})


def package_version(name: str) -> Optional[str]:
    """Installed version of a distribution/module without importing it when metadata exists; None if absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # e.g. triton shipped as the `pytorch-triton` distribution
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """GPU name for a CUDA device ('NVIDIA H100 80GB HBM3'), 'CPU: <model>' for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU: {cpu_name()}"
    return device.type


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': a folder name for a device."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


@functools.lru_cache(maxsize=None)
def git_commit() -> Optional[str]:
    """Commit of the dla_fast checkout, with '-dirty' when tracked files differ from it; None for an installed
    copy (whose folder may sit inside some other repository, whose commit would mean nothing here)."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(checkout, ".git")):
        return None

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "--no-optional-locks", "-C", checkout, *args], capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if changes else "")


def environment(device: torch.device) -> Dict[str, Any]:
    """The record fields that describe where and when a measurement ran."""
    return dict(device=device_name(device), torch=torch.__version__, triton=package_version("triton"),
                git_commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def make_record(op: str, provider: str, mode: str, dtype: str, shape: Any, timing, device: torch.device, *,
                min_bytes: Optional[int] = None, min_flops: Optional[int] = None, baseline: bool = False,
                extra: Optional[Dict[str, Any]] = None) -> BenchRecord:
    """A record from a `dla_fast.cli.timing.Timing`, with GB/s and TFLOP/s from the minimum bytes/FLOPs.

    `baseline` marks providers a user would pick without dla_fast (eager, torch.compile): the report
    gives every other row's speedup against each of them.
    """
    seconds = timing.ms_p50 / 1e3
    gbps = min_bytes / seconds / 1e9 if min_bytes is not None and seconds > 0 else None
    tflops = min_flops / seconds / 1e12 if min_flops is not None and seconds > 0 else None
    return BenchRecord(op=op, provider=provider, mode=mode, dtype=dtype, shape=shape, ms_p20=timing.ms_p20,
                       ms_p50=timing.ms_p50, ms_p80=timing.ms_p80, timing=timing.method, min_bytes=min_bytes,
                       gbps=gbps, min_flops=min_flops, tflops=tflops, baseline=baseline, **environment(device),
                       extra=dict(extra or {}))


def write_records(path: str, records: Sequence[BenchRecord]) -> None:
    """Write the records of one run as JSON (creating the parent folder)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"format": RECORD_FORMAT, "records": [r.to_dict() for r in records]}, f, indent=1)
        f.write("\n")


def read_records(path: str) -> List[BenchRecord]:
    """Read a file written by `write_records`; ValueError if it is something else."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path} is not a dla_fast benchmark file (expected \"format\": \"{RECORD_FORMAT}\")")
    return [BenchRecord.from_dict(r) for r in data["records"]]


def significant(value: Optional[float], digits: int = 3) -> str:
    """`value` with at least `digits` significant digits and no exponent: 3265.3 -> '3265', 12.34 -> '12.3',
    0.01234 -> '0.0123' (a slow step's images/s stays readable instead of '0.0'); None -> 'n/a'."""
    if value is None:
        return "n/a"
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(digits - 1 - math.floor(math.log10(abs(value))), 0)
    return f"{value:.{decimals}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right_align: Sequence[bool] = ()) -> str:
    """A GitHub markdown table with padded columns, readable as plain text too.

    `right_align[i]` right-aligns column i (numbers); missing entries mean left.
    """
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    right = [i < len(right_align) and right_align[i] for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])
