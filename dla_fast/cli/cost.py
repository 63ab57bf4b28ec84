"""Predict one step's kernels, bytes, FLOPs and time on an H100 — a CPU cost model (nothing runs on a GPU).

    python -m dla_fast cost --model dla34 --batch 256 --train
    python -m dla_fast cost --model centernet_dla34 --size 512 --batch 16 --kwarg dcn=True --json cost.json

One step (inference: an eval forward without gradients; --train: forward, backward and an SGD momentum step),
channels_last, AMP autocast in --dtype, is run on fake CUDA tensors (no GPU, no memory, no arithmetic) and every
kernel it would launch is recorded (dla_fast.cost): eager, torch.compile (an estimate by fusion rules, not a
trace), dla_fast (accelerate() with the backend choices `auto` makes on a GPU) and, in training, dla_fast with the
fused training BatchNorm (backend triton). Each kernel's predicted time is max(bytes / 3.0 TB/s, FLOPs / 800
TFLOP/s bf16) + 2.5 us per launch; the step is their sum. These are floors of a perfect kernel per launch,
not measurements: benchmarks/NOTES.md ("Cost model") sets them beside the H100 measurements.
"""
from __future__ import annotations

import argparse
import ast
import json
from typing import Dict, List

import torch

import dla_fast

from . import UsageError

DLA_STRIDE = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dla_fast.cost import AMP_DTYPES

    parser.add_argument("--model", default="dla34", help=f"model name, one of: {', '.join(dla_fast.list_models())}")
    parser.add_argument("--batch", type=int, default=256, help="images per step (default 256)")
    parser.add_argument("--size", type=int, default=224, help="image side, a multiple of 32 (default 224)")
    parser.add_argument("--dtype", choices=list(AMP_DTYPES), default="bf16",
                        help="AMP autocast dtype, or fp32 (TF32 convs) (default bf16)")
    parser.add_argument("--train", action="store_true", help="a training step: forward + backward + SGD step")
    parser.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE",
                        help="a create_model keyword argument (Python literal), e.g. dcn=False; repeatable")
    parser.add_argument("--providers", help="comma-separated subset of the rows (default: all for the mode)")
    parser.add_argument("--kernels", action="store_true", help="also list every kernel of every provider")
    parser.add_argument("--json", metavar="FILE", help="write the summary and every kernel here")


def _model_kwargs(items: List[str]) -> Dict[str, object]:
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--kwarg {item!r}: expected KEY=VALUE, e.g. dcn=False")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise UsageError(f"--kwarg {item!r}: the value must be a Python literal (True, 256, 'x', ...)") from None
    return kwargs


def _check(args) -> Dict[str, object]:
    from dla_fast.cost import providers_for

    if args.model not in dla_fast.list_models():
        raise UsageError(f"--model {args.model!r} is not a dla_fast model; choose one of "
                         f"{', '.join(dla_fast.list_models())}")
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1; got {args.batch}")
    if args.size < DLA_STRIDE or args.size % DLA_STRIDE:
        raise UsageError(f"--size must be a positive multiple of {DLA_STRIDE} (the network's stride); got {args.size}")
    kwargs = _model_kwargs(args.kwarg)
    known = providers_for(args.train)
    if args.providers:
        chosen = [p.strip() for p in args.providers.split(",") if p.strip()]
        unknown = [p for p in chosen if p not in known]
        if unknown or not chosen:
            raise UsageError(f"--providers {args.providers!r}: choose from {', '.join(known)}"
                             f"{'' if args.train else ' (the fused_bn rows need --train)'}")
        args.providers = chosen
    else:
        args.providers = known
    try:
        with torch.device("meta"):
            dla_fast.create_model(args.model, **kwargs)
    except (TypeError, ValueError, ImportError) as e:
        raise UsageError(f"--model {args.model} with {kwargs or 'no keyword arguments'}: {e}") from None
    if args.json:
        try:
            open(args.json, "a").close()
        except OSError as e:
            raise UsageError(f"--json {args.json}: cannot write there ({e.strerror})") from None
    return kwargs


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def format_table(result: dict) -> str:
    """The summary table (one row per provider) and the per-kind time table, as text."""
    rows = result["providers"]
    eager_ms = rows["eager"]["total"]["ms"] if "eager" in rows else None
    lines = [f"{result['model']} {result['mode']}, batch {result['batch']}, {result['size']}², {result['dtype']}, "
             f"channels_last — predicted on {result['gpu']}", ""]
    head = f"{'provider':<28} {'launches':>8} {'GB read':>8} {'GB written':>10} {'TFLOP':>7} {'ms':>8} {'vs eager':>8}"
    lines += [head, "-" * len(head)]
    for name, summary in rows.items():
        t = summary["total"]
        ratio = f"{eager_ms / t['ms']:.2f}x" if eager_ms else "-"
        lines.append(f"{name:<28} {t['launches']:>8} {_gb(t['read']):>8} {_gb(t['written']):>10} "
                     f"{t['flops'] / 1e12:>7.3f} {t['ms']:>8.2f} {ratio:>8}")
    kinds = sorted({k for s in rows.values() for k in s["kinds"]})
    lines += ["", "predicted ms (launches) per kind of kernel:"]
    width = max(12, *(len(n) for n in rows))
    lines.append(f"{'kind':<12} " + " ".join(f"{n:>{width}}" for n in rows))
    for kind in kinds:
        cells = []
        for summary in rows.values():
            k = summary["kinds"].get(kind)
            cells.append(f"{k['ms']:.2f} ({k['launches']})" if k else "-")
        lines.append(f"{kind:<12} " + " ".join(f"{c:>{width}}" for c in cells))
    lines += ["", "Floors per kernel (max of bytes / bandwidth and FLOPs / rate, plus a launch), not measurements; "
              "compile is estimated by fusion rules (dla_fast/cost.py)."]
    return "\n".join(lines)


def compute(model: str, batch: int, size: int, train: bool, dtype: str = "bf16", providers=None,
            kwargs=None) -> dict:
    """Every provider's kernels and summary of one step, as the JSON record `cost --json` writes."""
    from dla_fast import cost

    kwargs = kwargs or {}
    kernels = cost.cost_step(cost.model_builder(model, **kwargs), (batch, 3, size, size), train, dtype, providers)
    gpu = cost.H100
    return dict(model=model, model_kwargs={k: repr(v) for k, v in kwargs.items()}, batch=batch, size=size,
                dtype=dtype, mode="training" if train else "inference", gpu=gpu.name,
                gpu_model=dict(bytes_per_s=gpu.bytes_per_s, flops_per_s=gpu.flops_per_s[dtype], launch_s=gpu.launch_s),
                providers={name: cost.summarize(ks, gpu, dtype) for name, ks in kernels.items()},
                kernels={name: [k.as_dict(gpu, dtype) for k in ks] for name, ks in kernels.items()})


def run(args) -> int:
    kwargs = _check(args)
    result = compute(args.model, args.batch, args.size, args.train, args.dtype, args.providers, kwargs)
    print(format_table(result))
    if args.kernels:
        for name, kernels in result["kernels"].items():
            print(f"\n{name}: {len(kernels)} kernels")
            for k in kernels:
                print(f"  {k['phase']:<9} {k['kind']:<11} {k['name']:<48} read {k['read'] / 1e6:9.1f} MB  "
                      f"written {k['written'] / 1e6:9.1f} MB  {k['flops'] / 1e9:8.1f} GFLOP  {k['ms'] * 1e3:8.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0
