"""Timing and peak-memory measurement for `python -m dla_fast bench` and the scripts under benchmarks/.

- `time_iterations`: a fixed number of warm-up and timed calls, each timed alone (CUDA events on the GPU,
  `time.perf_counter` on the CPU). For whole-model steps, where a progress bar per call is useful.
- `time_cuda_kernel`: `triton.testing.do_bench` (L2 flushed before every call) or its CUDA-graph replay
  variant for launches so short that the CPU launch cost would dominate.
- `PeakMemory`: peak memory over a block of code.

Every timer returns a `Timing`: the 20th, 50th and 80th percentiles in milliseconds. `Ratio` compares two
timings taken in one run: the ratio of the medians, its range over the p20-p80 ranges, and whether the
difference is within noise.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

QUANTILES = (0.2, 0.5, 0.8)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Percentiles of the time of one call, in milliseconds, and how they were taken."""

    ms_p20: float
    ms_p50: float
    ms_p80: float
    method: str

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], method: str) -> "Timing":
        """Percentiles (linear interpolation, as numpy and torch.quantile) of per-call times."""
        if not samples_ms:
            raise ValueError("no timed samples")
        values = torch.tensor(list(samples_ms), dtype=torch.float64)
        p20, p50, p80 = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        return cls(p20, p50, p80, method)


@dataclasses.dataclass(frozen=True)
class Ratio:
    """Speed of a row against a reference row measured in the same run: `median` = reference p50 / row p50
    (> 1: the row is faster); `low`-`high` = the ratio's range over the two p20-p80 ranges (reference p20 /
    row p80 to reference p80 / row p20); `within_noise` when the two p20-p80 ranges overlap. Under
    `MIN_SAMPLES` timed calls the percentiles say nothing about the spread, and the verdict says so."""

    median: float
    low: float
    high: float
    within_noise: bool
    judged: bool = True

    MIN_SAMPLES = 5

    @classmethod
    def of(cls, row, reference, samples: Optional[int] = None) -> "Ratio":
        """`row` and `reference`: anything with ms_p20, ms_p50, ms_p80 (a Timing or a benchmark record);
        `samples`: the fewer timed calls of the two, when known."""
        overlap = row.ms_p20 <= reference.ms_p80 and reference.ms_p20 <= row.ms_p80
        return cls(reference.ms_p50 / row.ms_p50, reference.ms_p20 / row.ms_p80, reference.ms_p80 / row.ms_p20,
                   overlap, judged=samples is None or samples >= cls.MIN_SAMPLES)

    @property
    def verdict(self) -> str:
        if not self.judged:
            return f"noise not judged (under {self.MIN_SAMPLES} timed calls)"
        if self.within_noise:
            return "within noise"
        return "faster" if self.median > 1 else "slower"

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f}) {self.verdict}"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(fn: Callable[[], object], device: torch.device, warmup: int, iters: int,
                    on_step: Optional[Callable[[str], None]] = None) -> Timing:
    """Call `fn` `warmup` times, then time `iters` calls one by one.

    On CUDA a pair of events brackets each call (GPU time from the first kernel launched by the call to
    the last one finishing, launch gaps included); the queue is not drained between calls. On the CPU
    each call is timed with `time.perf_counter`. `on_step(phase)` runs after every call, with phase
    'warm-up' or 'timed' (to drive a progress bar); it is outside the timed region.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0; got iters={iters}, warmup={warmup}")
    device = torch.device(device)
    notify = on_step or (lambda phase: None)
    for _ in range(warmup):
        fn()
        notify("warm-up")
    synchronize(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            for start, end in zip(starts, ends):
                start.record()
                fn()
                end.record()
                notify("timed")
            torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in zip(starts, ends)]
        return Timing.from_samples(samples, f"cuda events, {iters} iterations after {warmup} warm-up")
    samples = []
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
        notify("timed")
    return Timing.from_samples(samples, f"perf_counter, {iters} iterations after {warmup} warm-up")


def time_cuda_kernel(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100, cuda_graph: bool = False,
                     grad_to_none: Optional[Iterable[torch.Tensor]] = None) -> Timing:
    """Time a GPU op with Triton's benchmarker: percentiles 20/50/80 of per-call times.

    `triton.testing.do_bench` runs `fn` for about `warmup_ms`, then for about `rep_ms` with the L2 cache
    flushed before each call. With `cuda_graph=True`, `do_bench_cudagraph` captures the calls in a CUDA
    graph and replays it (no launch overhead, no L2 flush: rotate inputs larger than L2 yourself, see
    benchmarks/common.py). `grad_to_none` tensors get `.grad = None` before each call.
    """
    import triton.testing

    grads = list(grad_to_none) if grad_to_none is not None else None
    if cuda_graph:
        p20, p50, p80 = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, grad_to_none=grads,
                                                          quantiles=list(QUANTILES))
        return Timing(p20, p50, p80, "triton do_bench_cudagraph")
    p20, p50, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads,
                                            quantiles=list(QUANTILES))
    return Timing(p20, p50, p80, "triton do_bench (L2 flushed)")


class PeakMemory:
    """Context manager measuring peak memory in the block; read `mb` (None when unknown) and `kind`.

    CUDA: `torch.cuda.max_memory_allocated` after resetting the peak, so everything torch holds on the
    device counts (weights, activations, optimizer state). CPU: growth of the process's peak resident set
    (Linux VmHWM, reset through /proc/self/clear_refs) over the resident set at entry; 'n/a' where the
    peak cannot be reset.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.mb: Optional[float] = None
        self.kind = "n/a"
        self._rss_at_entry_kb: Optional[int] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            self._rss_at_entry_kb = _reset_cpu_peak_rss()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.kind = "torch.cuda.max_memory_allocated"
        elif self._rss_at_entry_kb is not None:
            peak_kb = _proc_status_kb("VmHWM")
            if peak_kb is not None:
                self.mb = max(peak_kb - self._rss_at_entry_kb, 0) / 1024
                self.kind = "peak RSS growth"
        if self.mb is None:
            self.kind = "n/a (peak RSS cannot be reset on this system)" if self.device.type == "cpu" else "n/a"


def _proc_status_kb(field: str) -> Optional[int]:
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM), None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_cpu_peak_rss() -> Optional[int]:
    """Reset the peak resident set (VmHWM) to the current one and return that, in kB; None if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_kb("VmRSS")
