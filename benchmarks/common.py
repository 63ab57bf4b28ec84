"""Shared helpers of the benchmark scripts in this folder (run them as `python benchmarks/<script>.py`).

The record format and the timers live in the installed package (dla_fast.cli.records, dla_fast.cli.timing),
which `python -m dla_fast bench` uses too; this module adds what only the scripts need:

- `results_dir()`: benchmarks/results/<gpu-name-slug>/, where a run's JSON goes;
- `time_op(fn, device)`: Triton's do_bench on CUDA (optionally CUDA-graph replay), perf_counter on CPU;
- `RotatingInputs`: several copies of an op's inputs, together larger than L2, used in turn;
- `bench_op(...)`: time one provider on one case and return its record.

A script collects its records and calls `save_records(records, args.out, device, "<op>.json")`;
`python benchmarks/report.py benchmarks/results/<gpu>` turns the folder into a table and a plot.
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from dla_fast.cli.records import (RECORD_FORMAT, BenchRecord, device_name, environment, make_record,
                                  markdown_table, read_records, slugify, write_records)
from dla_fast.cli.timing import QUANTILES, PeakMemory, Timing, time_cuda_kernel, time_iterations

__all__ = [
    "QUANTILES", "RECORD_FORMAT", "BenchRecord", "PeakMemory", "RotatingInputs", "Timing", "bench_op",
    "default_device", "device_name", "environment", "l2_cache_bytes", "make_record", "markdown_table",
    "read_records", "results_dir", "save_records", "slugify", "tensor_bytes", "time_cuda_kernel", "time_iterations", "time_op",
    "timed_step", "write_records",
]

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
# Used when torch cannot tell the L2 size: the H100's 50 MB.
FALLBACK_L2_BYTES = 50 * 2**20


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_records(records: Sequence[BenchRecord], out: Optional[str], device: torch.device, name: str) -> str:
    """Write a run's records to `out`, or to results_dir(device)/name when no path was given; say where."""
    path = out or os.path.join(results_dir(device), name)
    write_records(path, records)
    print(f"wrote {len(records)} records to {path}")
    return path


def results_dir(device: Optional[torch.device] = None, create: bool = True) -> str:
    """benchmarks/results/<slug of the device name>/, e.g. benchmarks/results/nvidia-h100-80gb-hbm3/."""
    path = os.path.join(BENCHMARKS_DIR, "results", slugify(device_name(device or default_device())))
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def l2_cache_bytes(device: torch.device) -> int:
    """L2 size of a CUDA device in bytes (0 for the CPU, where nothing is rotated)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return size or FALLBACK_L2_BYTES


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the given tensors' elements: add up what an op must read and write for its minimum traffic."""
    return sum(t.numel() * t.element_size() for t in tensors)


class RotatingInputs:
    """Copies of one input set, together at least `min_total_bytes` (default twice the L2), used in turn.

    Each call returns the next copy, so that a timed op reads its inputs from HBM rather than from an L2
    warmed by the previous call. Needed with CUDA-graph replay and with `time_iterations`;
    `triton.testing.do_bench` already flushes L2 before each call.

        inputs = RotatingInputs(lambda: (torch.randn(n, c, h, w, device="cuda"),), device)
        timing = time_op(lambda: op(*inputs()), device, cuda_graph=True)
    """

    def __init__(self, make_inputs: Callable[[], Sequence[Any]], device: torch.device,
                 min_total_bytes: Optional[int] = None):
        first = tuple(make_inputs())
        size = tensor_bytes(*(x for x in first if isinstance(x, torch.Tensor)))
        target = 2 * l2_cache_bytes(device) if min_total_bytes is None else min_total_bytes
        count = max(1, math.ceil(target / size)) if size else 1
        self.sets = [first] + [tuple(make_inputs()) for _ in range(count - 1)]
        self._cycle = itertools.cycle(self.sets)

    def __len__(self) -> int:
        return len(self.sets)

    def __call__(self) -> tuple:
        return next(self._cycle)


def timed_step(forward: Callable[[], torch.Tensor], training: bool, params: Sequence[torch.Tensor],
               warmup: int = 3) -> Callable[[], None]:
    """The call a benchmark times: `forward()`, and in training its backward with a fixed random gradient.

    Runs `warmup` times first (the first run also gives the gradient its shape), so Triton and inductor
    compile outside the timed region. `step.params` are the tensors whose `.grad` the timer resets before each
    call.
    """
    with torch.set_grad_enabled(training):
        out = forward()
    grad = torch.randn_like(out) if training else None

    def step() -> None:
        with torch.set_grad_enabled(training):
            out = forward()
            if training:
                out.backward(grad)

    if training:
        out.backward(grad)
    for _ in range(warmup - 1):
        step()
    step.params = list(params)
    return step


def time_op(fn: Callable[[], object], device: torch.device, cuda_graph: bool = False,
            grad_to_none: Optional[Sequence[torch.Tensor]] = None, cpu_warmup: int = 3, cpu_iters: int = 20) -> Timing:
    """Time `fn`: `time_cuda_kernel` (do_bench, or CUDA-graph replay) on CUDA, `time_iterations` on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return time_cuda_kernel(fn, cuda_graph=cuda_graph, grad_to_none=grad_to_none)

    def call() -> None:
        for t in grad_to_none or ():
            t.grad = None
        fn()

    return time_iterations(call, device, cpu_warmup, cpu_iters)


def bench_op(op: str, provider: str, mode: str, dtype: str, shape: Any, fn: Callable[[], object],
             device: torch.device, *, min_bytes: Optional[int] = None, min_flops: Optional[int] = None,
             baseline: bool = False, cuda_graph: bool = False, grad_to_none: Optional[Sequence[torch.Tensor]] = None,
             extra: Optional[Dict[str, Any]] = None, cpu_iters: int = 20, cpu_warmup: int = 3) -> BenchRecord:
    """Time `fn` with `time_op` and return its record (GB/s and TFLOP/s from `min_bytes` / `min_flops`);
    cpu_iters / cpu_warmup: timed / untimed calls on the CPU."""
    timing = time_op(fn, device, cuda_graph=cuda_graph, grad_to_none=grad_to_none, cpu_warmup=cpu_warmup,
                     cpu_iters=cpu_iters)
    return make_record(op, provider, mode, dtype, shape, timing, device, min_bytes=min_bytes, min_flops=min_flops,
                       baseline=baseline, extra=extra)
