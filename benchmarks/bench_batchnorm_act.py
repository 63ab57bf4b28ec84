"""Microbenchmark of the fused BatchNorm (+ residual) + ReLU, the memory-bound steps of DLA, at DLA shapes.

Shapes (N, C, H, W), --shapes: (256, 64, 56, 56) and (256, 128, 28, 28), DLA-34's level-2 and level-3 blocks
at 224 px and batch 256, and (16, 64, 128, 128), the stride-4 level of CenterNet DLA-34 at 512 px, batch 16.
Activations in --dtypes (bf16 as under AMP: bf16 activations, fp32 BatchNorm parameters and buffers, which is
what nn.BatchNorm2d sees after an autocast conv), channels_last.

Providers (the same inputs and BatchNorm state):
  eager   nn.BatchNorm2d (F.batch_norm; cuDNN) [+ residual] + ReLU on channels_last tensors
  triton  dla_fast.ops.batchnorm_act, backend 'triton'
  cuda    dla_fast.ops.batchnorm_act, backend 'cuda' (the extension's kernels; skipped when not built)

Modes:
  inference         eval BatchNorm (running statistics), no grad
  training_forward  train BatchNorm, no grad: batch statistics, running-statistics update, apply [+ residual]
                    + ReLU
  training          train BatchNorm, forward + backward to x [and residual] and the affine parameters

Minimum bytes (what any implementation must move; GB/s below is against it):
  inference, training_forward: read x [and residual] once, write out once. In training the statistics must be
      known before the first output is written, so a real kernel reads x twice (statistics, then apply): the
      floor counts one read, so training_forward cannot reach 100% of it.
  training adds the backward's floor: read grad_out and x, [read out, the ReLU mask, which without a residual
      can be recomputed from x], write grad_x [and grad_residual]. Again the gradient sums must be complete
      before grad_x is written, so real kernels read grad_out and x twice.

    python benchmarks/bench_batchnorm_act.py                        # the default grid (< 1 min on an H100)
    python benchmarks/bench_batchnorm_act.py --residual no,yes --dtypes bf16
    TRITON_INTERPRET=1 python benchmarks/bench_batchnorm_act.py --smoke --dtypes fp32 --out /tmp/bn.json
Writes benchmarks/results/<gpu>/batchnorm_act.json; `python benchmarks/report.py` makes the table and plot.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dla_fast  # noqa: E402
from common import bench_op, default_device, save_records, timed_step  # noqa: E402
from dla_fast.ops.batchnorm_act import batchnorm_act  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
PROVIDERS = ("eager", "triton", "cuda")
BASELINES = ("eager",)
MODES = ("inference", "training_forward", "training")
DEFAULT_SHAPES = "256x64x56x56,256x128x28x28,16x64x128x128"
SMOKE_SHAPES = "2x64x4x4"  # --smoke: one tiny shape (CPU, Triton interpreter)


def make_bn(channels: int, device: torch.device) -> nn.BatchNorm2d:
    """An fp32 nn.BatchNorm2d with random affine parameters and running statistics."""
    bn = nn.BatchNorm2d(channels).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


def provider_step(provider: str, bn: nn.BatchNorm2d, x: torch.Tensor, residual: Optional[torch.Tensor],
                  mode: str) -> Callable[[], None]:
    """A warmed-up call running one forward (and backward in training) of `provider`."""
    backward = mode == "training"
    bn.train(mode != "inference")
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(backward)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last).requires_grad_(backward)

    def forward() -> torch.Tensor:
        if provider == "eager":
            out = bn(x)
            return torch.relu(out if residual is None else out + residual)
        with dla_fast.use_backend(provider):
            return batchnorm_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                                 bn.training, bn.momentum, bn.eps, residual=residual, relu=True)

    return timed_step(forward, backward, [t for t in (x, residual, bn.weight, bn.bias) if t is not None])


def min_bytes(shape: Tuple[int, int, int, int], residual: bool, mode: str, dtype: torch.dtype) -> int:
    """See the module docstring: one pass over each tensor an implementation cannot avoid."""
    size = torch.tensor([], dtype=dtype).element_size()
    elements = shape[0] * shape[1] * shape[2] * shape[3]
    forward = (3 if residual else 2) * elements                  # x [+ residual] in, out
    backward = (5 if residual else 3) * elements                 # grad_out, x [, out] in; grad_x [, grad_res] out
    return (forward if mode != "training" else forward + backward) * size


def _shapes(text: str) -> List[Tuple[int, int, int, int]]:
    shapes = []
    for item in text.split(","):
        if item:
            dims = tuple(int(v) for v in item.lower().split("x"))
            if len(dims) != 4:
                raise ValueError(f"shape {item!r} is not NxCxHxW")
            shapes.append(dims)
    return shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxCxHxW shapes (comma separated)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--residual", default="no", help="'no', 'yes' or 'no,yes': time without / with a residual")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--smoke", action="store_true",
                        help=f"the tiny shape {SMOKE_SHAPES}: a quick check that every provider runs "
                             "(CPU + TRITON_INTERPRET=1)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<gpu>/batchnorm_act.json)")
    args = parser.parse_args(argv)

    device = default_device()
    try:
        shapes = _shapes(SMOKE_SHAPES if args.smoke else args.shapes)
    except ValueError as e:
        parser.error(str(e))
    if not set(args.residual.split(",")) <= {"no", "yes"}:
        parser.error(f"--residual takes 'no', 'yes' or 'no,yes'; got {args.residual!r}")
    residuals = [r == "yes" for r in args.residual.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    providers = [p for p in args.providers.split(",") if p]
    for p in ("triton", "cuda"):
        reason = dla_fast.backend.unavailable_reason(p, device) if p in providers else None
        if reason:
            print(f"skipping provider {p}: {reason}")
            providers.remove(p)
    grid = [(shape, res, dt, mode, p) for shape in shapes for res in residuals for dt in args.dtypes.split(",") if dt
            for mode in modes for p in providers]
    records = []
    for shape, res, dt, mode, provider in tqdm(grid, desc="batchnorm_act", unit="case"):
        dtype = DTYPES[dt]
        torch.manual_seed(0)
        bn = make_bn(shape[1], device)
        x = (torch.randn(shape, device=device) * 1.5 + 0.3).to(dtype)
        residual = torch.randn(shape, device=device).to(dtype) if res else None
        step = provider_step(provider, bn, x, residual, mode)
        records.append(bench_op("batchnorm_act", provider, mode, dt, dict(x=list(shape), residual=res), step,
                                device, min_bytes=min_bytes(shape, res, mode, dtype), baseline=provider in BASELINES,
                                grad_to_none=step.params if mode == "training" else None,
                                extra=dict(relu=True, residual=res)))
        name = "x".join(map(str, shape)) + ("+res" if res else "")
        tqdm.write(f"{name:20s} {dt} {mode:16s} {provider:7s} "
                   f"{records[-1].ms_p50:8.3f} ms {records[-1].gbps or 0:7.0f} GB/s")
        del step, x, residual, bn
    save_records(records, args.out, device, "batchnorm_act.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
