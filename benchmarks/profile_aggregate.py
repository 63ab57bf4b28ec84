"""Where the aggregation node's time goes on the GPU: host overhead vs GPU kernels, kernel by kernel.

For each case prints: do_bench time (L2 flushed; host overhead shows when the GPU starves), CUDA-graph
replay time (GPU only), host time per call (enqueue, no sync), and the GPU time of every kernel from
torch.profiler. Used for benchmarks/NOTES.md.

    python benchmarks/profile_aggregate.py --cases level2.root@256,level5.root@256 --dtype bf16
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_aggregate import DLA34_ROOTS, DTYPES, make_root, provider_step  # noqa: E402


def host_ms(step, calls=20) -> float:
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        step()
    host = (time.perf_counter() - begin) / calls * 1e3
    torch.cuda.synchronize()
    return host


def kernel_table(step, calls=5) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA or getattr(event, "self_device_time_total", 0):
            total = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
            if total > 0:
                rows.append((total / calls / 1e3, event.count // calls, event.key[:70]))
    rows.sort(reverse=True)
    return "\n".join(f"      {ms:8.4f} ms x{count:<3d} {name}" for ms, count, name in rows)


def host_profile(step, calls=50, top=18) -> str:
    """cProfile of `calls` warm calls: where the host time of one call goes (per-call ms, cumulative)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats
    rows = sorted(((v[3] / calls * 1e3, v[1] / calls, f"{os.path.basename(k[0])}:{k[2]}") for k, v in stats.items()),
                  reverse=True)
    return "\n".join(f"      host {ms:7.4f} ms  x{n:<5.1f} {name}" for ms, n, name in rows[:top])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="level2.root@256,level5.root@256")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--providers", default="eager_cl,triton")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    for case in args.cases.split(","):
        name, batch = case.split("@")
        channels, cout, stride, residual = DLA34_ROOTS[name]
        side = args.size // stride
        for mode in args.modes.split(","):
            for provider in args.providers.split(","):
                torch.manual_seed(0)
                root = make_root(channels, cout, residual, "cuda")
                children = [torch.randn(int(batch), c, side, side, device="cuda", dtype=dtype) for c in channels]
                step = provider_step(provider, root, children, mode, dtype)
                grads = step.params if mode == "training" else None
                bench = triton.testing.do_bench(step, grad_to_none=grads, quantiles=[0.5])
                try:
                    graph = triton.testing.do_bench_cudagraph(step, grad_to_none=grads, quantiles=[0.5])
                except Exception as e:  # noqa: BLE001 - report and go on
                    graph = float("nan")
                    print(f"    cuda graph failed: {type(e).__name__}: {str(e)[:100]}")
                print(f"{name}@{batch} {args.dtype} {mode:9s} {provider:9s} do_bench {bench:7.3f} ms  "
                      f"graph {graph:7.3f} ms  host {host_ms(step):7.3f} ms/call")
                print(kernel_table(step))
                if provider != "eager_cl":
                    print(host_profile(step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
