"""Host (Python) time per call of the fused ops, outside graphs: what one call costs before any kernel runs.

On a machine without a GPU the Triton kernels run in the interpreter, whose cost would swamp everything else, so
by default (--stub, implied without CUDA) every Triton launch is replaced by a no-op: what is timed is dla_fast's
own host code per call (argument checks, backend choice, allocations, views, casts, the autograd.Function) on tiny
CPU tensors, i.e. everything but Triton's launcher and the kernels. On a GPU without --stub it times real calls
(host + launch; the kernels of these tiny shapes take a few microseconds).

    python benchmarks/profile_host_calls.py [--calls 200] [--timer cpu] [--profile aggregate_train]

Prints per-call medians (of 5 repeats) for each case, an eager PyTorch sequence of the same ops on the same tiny
tensors for scale, and optionally a cProfile of one case (top functions by own time). --timer cpu counts this
process's CPU time instead of wall time: on a shared machine it leaves out the time other processes hold the
cores (with stubbed launches nothing waits on a device, so it is the host time per call).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import dla_fast  # noqa: E402
from dla_fast.ops.aggregate import aggregate  # noqa: E402
from dla_fast.ops.batchnorm_act import batchnorm_act  # noqa: E402
from dla_fast.ops.upsample_merge import upsample_merge  # noqa: E402


def stub_triton_launches() -> None:
    """Every Triton kernel launch returns at once (interpreter on CPU, the JIT launcher on GPU)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for cls in (InterpretedFunction, JITFunction):
        cls.run = lambda self, *args, **kwargs: None


def make_cases(device: torch.device):
    """name -> (dla_fast call, eager PyTorch call of the same ops); tiny shapes (level2.root of DLA-34, 2x8x8)."""
    g = dict(device=device)
    a, b = torch.randn(2, 64, 8, 8, **g), torch.randn(2, 64, 8, 8, **g)
    a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    weight = torch.randn(64, 128, 1, 1, **g).contiguous(memory_format=torch.channels_last).requires_grad_()
    gamma, beta = (torch.rand(64, **g) + 0.5).requires_grad_(), torch.randn(64, **g).requires_grad_()
    mean, var, tracked = torch.zeros(64, **g), torch.ones(64, **g), torch.zeros((), dtype=torch.long, **g)
    a16, b16 = a.half(), b.half()
    low = torch.randn(2, 64, 4, 4, **g).contiguous(memory_format=torch.channels_last)
    up_weight = torch.randn(64, 1, 4, 4, **g)
    low16, a16_leaf = low.half().requires_grad_(), a.half()
    up_weight_param = up_weight.clone().requires_grad_()

    def root_eval():
        with torch.no_grad():
            aggregate([a, b], weight, gamma, beta, mean, var, tracked, False)

    def root_eval_eager():
        with torch.no_grad():
            F.relu(F.batch_norm(F.conv2d(torch.cat([a, b], 1), weight), mean, var, gamma, beta, False))

    def root_train(x0=a, x1=b):
        aggregate([x0, x1], weight, gamma, beta, mean, var, tracked, True).sum().backward()

    def root_train_eager(x0=a, x1=b):
        w = weight.to(x0.dtype)
        F.relu(F.batch_norm(F.conv2d(torch.cat([x0, x1], 1), w), mean, var, gamma, beta, True)).sum().backward()

    def bn_train():
        batchnorm_act(a, gamma, beta, mean, var, tracked, True).sum().backward()

    def bn_train_eager():
        F.relu(F.batch_norm(a, mean, var, gamma, beta, True)).sum().backward()

    def merge_eval():
        with torch.no_grad():
            upsample_merge(low, up_weight, a, 2, "add")

    def merge_eval_eager():
        with torch.no_grad():
            F.conv_transpose2d(low, up_weight, stride=2, padding=1, groups=64) + a

    def merge_train_amp():  # autocast's parameters: fp32 weight, 16-bit activations
        upsample_merge(low16, up_weight_param, a16_leaf, 2, "add").sum().backward()

    def merge_train_amp_eager():
        up = F.conv_transpose2d(low16, up_weight_param.half(), stride=2, padding=1, groups=64)
        (up + a16_leaf).sum().backward()

    return {
        "aggregate_eval": (root_eval, root_eval_eager),
        "aggregate_train": (root_train, root_train_eager),
        "aggregate_train_fp16_acts_fp32_weight": (lambda: root_train(a16, b16), lambda: root_train_eager(a16, b16)),
        "batchnorm_act_train": (bn_train, bn_train_eager),
        "upsample_merge_eval": (merge_eval, merge_eval_eager),
        "upsample_merge_train_fp16_acts_fp32_weight": (merge_train_amp, merge_train_amp_eager),
    }


def per_call_us(fn, calls: int, device: torch.device, clock=time.perf_counter) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((clock() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--stub", action="store_true", help="no-op Triton launches (implied without CUDA)")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: this process's CPU time (time.process_time)")
    parser.add_argument("--profile", help="cProfile this case (top 12 functions by own time)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stubbed = args.stub or device.type != "cuda"
    if stubbed:
        stub_triton_launches()
    torch.set_num_threads(1)
    cases = make_cases(device)
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    print(f"device {device}, torch {torch.__version__}, Triton launches {'stubbed' if stubbed else 'real'}, "
          f"{args.calls} calls x 5 repeats, median per call, {args.timer} time, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| case | dla_fast us/call | eager torch us/call |\n|---|---:|---:|")
    with dla_fast.use_backend("triton"):
        for name, (fused, eager) in cases.items():
            print(f"| {name} | {per_call_us(fused, args.calls, device, clock):.1f} | "
                  f"{per_call_us(eager, args.calls, device, clock):.1f} |")
        if args.profile:
            fused = cases[args.profile][0]
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                fused()
            profiler.disable()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(12)
            print(stream.getvalue())


if __name__ == "__main__":
    main()
