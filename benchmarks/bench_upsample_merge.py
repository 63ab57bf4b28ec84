"""Microbenchmark of the IDA upsample-merge at the real shapes of CenterNet DLA-34 and DLA-Up DLA-34.

The op: up = ConvTranspose2d(low) (depthwise, kernel 2f, stride f, padding f // 2), merged with the finer level
`high`: out = up + high (CenterNet, mode add) or out = cat([high, up], 1) (DLA-Up, mode concat).

Cases (the merges the models run, derived from dla_fast.models: `centernet.DLAUpAdd` / `IDAUpAdd` and
`dla_up.DLAUp`; 'merges' in each record says how many merges of that shape one forward pass runs):
  centernet.ida_up.up_1      low (N, 64, S/8, S/8)   f=2 -> (N, 64, S/4, S/4), add   (default)
  centernet.ida_up.up_2      low (N, 64, S/16, S/16) f=4 -> (N, 64, S/4, S/4), add   (default)
  centernet.dla_up.ida_{k}   the f=2 add merges of CenterNet's DLA-Up (k = 0, 1, 2)
  dlaup.ida_{k}              DLA-Up segmentation at down ratio 2, all f=2 concat: ida_3 merges
                             low (N, 32, H/4, W/4) into high (N, 32, H/2, W/2) four times (default),
                             ida_2 low (N, 64, H/8, W/8) three times (default), ida_1 (128 ch), ida_0 (256 ch)
with S = --size (512) for CenterNet at batch --batches (16), and W x H = --seg-size (1024x512) for DLA-Up at
batch --seg-batches (8).

Providers (same inputs and weight):
  eager     F.conv_transpose2d(groups=C) + add / cat on NCHW tensors (AMP autocast for bf16, fp32 weight)
  eager_cl  the same on channels_last tensors
  triton    dla_fast.ops.upsample_merge, backend 'triton'
  cuda      dla_fast.ops.upsample_merge, backend 'cuda' (the extension's kernels; skipped when not built)
The fused providers take one dtype for all three tensors: for bf16 the fp32 weight is cast in the timed step,
as autocast does for the eager providers.

Modes: inference (no grad), training (forward + backward to low, weight and high).
Minimum bytes (activations only; the weight is a few KB): inference reads low and high and writes out;
training adds the backward's floor: read grad_out and low (the weight gradient needs both), write grad_low
and grad_high (autograd materialises the gradient of the leaf `high`).

    python benchmarks/bench_upsample_merge.py                       # the default grid (< 1 min on an H100)
    python benchmarks/bench_upsample_merge.py --batches 1,16,64 --cases all
    TRITON_INTERPRET=1 python benchmarks/bench_upsample_merge.py --smoke --dtypes fp32 --out /tmp/um.json
Writes benchmarks/results/<gpu>/upsample_merge.json; `python benchmarks/report.py` makes the table and plot.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dla_fast  # noqa: E402
from common import bench_op, default_device, save_records, timed_step  # noqa: E402
from dla_fast.models.centernet import LAST_LEVEL, DLAUpAdd, IDAUpAdd  # noqa: E402
from dla_fast.models.dla import VARIANTS  # noqa: E402
from dla_fast.models.dla_up import DLAUp  # noqa: E402
from dla_fast.models.upsample import bilinear_upsample  # noqa: E402
from dla_fast.ops.upsample_merge import upsample_merge  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
PROVIDERS = ("eager", "eager_cl", "triton", "cuda")
BASELINES = ("eager", "eager_cl")
DEFAULT_CASES = ("centernet.ida_up.up_1", "centernet.ida_up.up_2", "dlaup.ida_2", "dlaup.ida_3")
VARIANT = "dla34"
CENTERNET_DOWN_RATIO = 4
DLA_UP_DOWN_RATIO = 2
SMOKE_SIZE, SMOKE_SEG_SIZE = 32, (64, 32)  # --smoke: tiny images (CPU, Triton interpreter)


class Merge(NamedTuple):
    """One upsample-merge shape: low (N, channels, low_h, low_w) -> high (N, high_channels, f*low_h, f*low_w)."""

    model: str            # "centernet" (batch --batches) or "dlaup" (batch --seg-batches)
    channels: int
    high_channels: int
    low_hw: Tuple[int, int]
    factor: int
    mode: str
    merges: int           # merges of this shape in one forward pass of the model


def _ida_merges(ida, level_hw: Tuple[int, int], model: str, mode: str) -> List[Merge]:
    """The merges of one IDA module whose input 0 is (h, w) = level_hw: input i >= 1 comes in at 1/f_i of it."""
    h, w = level_hw
    return [Merge(model, ida.out_channels, ida.out_channels, (h // f, w // f), f, mode, 1)
            for f in ida.up_factors[1:]]


def model_cases(size: int, seg_hw: Tuple[int, int]) -> Dict[str, Merge]:
    """name -> Merge for CenterNet DLA-34 at size x size and DLA-Up DLA-34 at seg_hw = (H, W), read from the
    models' IDA modules (built on the meta device: no memory, no init cost)."""
    channels = VARIANTS[VARIANT][1]
    cases: Dict[str, Merge] = {}

    def add_stage(name: str, merges: List[Merge]) -> None:
        if len({m._replace(merges=1) for m in merges}) == 1:  # a stage of identical merges: one case
            cases[name] = merges[0]._replace(merges=len(merges))
        else:
            for i, m in enumerate(merges, start=1):
                cases[f"{name}.up_{i}"] = m

    with torch.device("meta"):
        first = CENTERNET_DOWN_RATIO.bit_length() - 1
        levels = channels[first:]
        dla_up = DLAUpAdd(levels, [2 ** i for i in range(len(levels))], deformable=False)
        merged = LAST_LEVEL - first
        ida_up = IDAUpAdd(levels[0], levels[:merged], [2 ** i for i in range(merged)], deformable=False)
        for k in range(len(levels) - 1):
            stride = CENTERNET_DOWN_RATIO * 2 ** (len(levels) - 2 - k)
            add_stage(f"centernet.dla_up.ida_{k}",
                      _ida_merges(getattr(dla_up, f"ida_{k}"), (size // stride, size // stride), "centernet", "add"))
        base = size // CENTERNET_DOWN_RATIO
        for i, m in enumerate(_ida_merges(ida_up, (base, base), "centernet", "add"), start=1):
            cases[f"centernet.ida_up.up_{i}"] = m

        first = DLA_UP_DOWN_RATIO.bit_length() - 1
        levels = channels[first:]
        seg_up = DLAUp(levels, [2 ** i for i in range(len(levels))])
        for k in range(len(levels) - 1):
            stride = DLA_UP_DOWN_RATIO * 2 ** (len(levels) - 2 - k)
            add_stage(f"dlaup.ida_{k}", _ida_merges(getattr(seg_up, f"ida_{k}"),
                                                     (seg_hw[0] // stride, seg_hw[1] // stride), "dlaup", "concat"))
    return cases


def make_inputs(case: Merge, batch: int, dtype: torch.dtype, device: torch.device):
    """low, high (dtype, NCHW) and the bilinear-initialised fp32 weight (C, 1, 2f, 2f) of the module."""
    h, w = case.low_hw
    f = case.factor
    low = torch.randn(batch, case.channels, h, w, device=device, dtype=dtype)
    high = torch.randn(batch, case.high_channels, f * h, f * w, device=device, dtype=dtype)
    weight = bilinear_upsample(case.channels, f).weight.detach().to(device)
    return low, high, weight


def provider_step(provider: str, case: Merge, low: torch.Tensor, high: torch.Tensor, weight: torch.Tensor,
                  mode: str, dtype: torch.dtype) -> Callable[[], None]:
    """A warmed-up call running one forward (and backward in training) of `provider`."""
    device = low.device
    training = mode == "training"
    fmt = torch.contiguous_format if provider == "eager" else torch.channels_last
    low = low.contiguous(memory_format=fmt).requires_grad_(training)
    high = high.contiguous(memory_format=fmt).requires_grad_(training)
    weight = weight.clone().requires_grad_(training)
    f, merge_mode = case.factor, case.mode
    fused = provider in ("triton", "cuda")
    autocast = dict(device_type=device.type, dtype=dtype, enabled=not fused and dtype != torch.float32)

    def forward() -> torch.Tensor:
        if fused:
            with dla_fast.use_backend(provider):
                return upsample_merge(low, weight.to(dtype), high, f, merge_mode)
        with torch.autocast(**autocast):
            up = F.conv_transpose2d(low, weight, stride=f, padding=f // 2, groups=low.shape[1])
            return up + high if merge_mode == "add" else torch.cat([high, up], dim=1)

    return timed_step(forward, training, [low, high, weight])


def min_bytes(case: Merge, batch: int, mode: str, dtype: torch.dtype) -> int:
    """Inference: read low + high, write out. Training adds: read grad_out + low, write grad_low + grad_high."""
    size = torch.tensor([], dtype=dtype).element_size()
    h, w = case.low_hw
    low = batch * case.channels * h * w
    high = batch * case.high_channels * h * w * case.factor ** 2
    out = batch * (case.channels + (case.high_channels if case.mode == "concat" else 0)) * h * w * case.factor ** 2
    forward = low + high + out
    backward = out + low + low + high
    return (forward if mode == "inference" else forward + backward) * size


def _sizes(text: str) -> Tuple[int, int]:
    """'WxH' -> (H, W)."""
    w, h = (int(v) for v in text.lower().split("x"))
    return h, w


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="16", help="CenterNet batch sizes (comma separated), e.g. 1,16,64")
    parser.add_argument("--size", type=int, default=512, help="CenterNet input side")
    parser.add_argument("--seg-batches", default="8", help="DLA-Up segmentation batch sizes (comma separated)")
    parser.add_argument("--seg-size", default="1024x512", help="DLA-Up input WxH")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="case names (comma separated) or 'all'")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny images (CenterNet {SMOKE_SIZE}, DLA-Up {SMOKE_SEG_SIZE[0]}x{SMOKE_SEG_SIZE[1]}) "
                             "and batch 1: a quick check that every provider runs (CPU + TRITON_INTERPRET=1)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/<gpu>/upsample_merge.json)")
    args = parser.parse_args(argv)

    device = default_device()
    size, seg_hw = args.size, _sizes(args.seg_size)
    batches = {"centernet": [int(b) for b in args.batches.split(",") if b],
               "dlaup": [int(b) for b in args.seg_batches.split(",") if b]}
    if args.smoke:
        size, seg_hw = SMOKE_SIZE, (SMOKE_SEG_SIZE[1], SMOKE_SEG_SIZE[0])
        batches = {"centernet": [1], "dlaup": [1]}
    cases = model_cases(size, seg_hw)
    names = list(cases) if args.cases == "all" else [c for c in args.cases.split(",") if c]
    unknown = [n for n in names if n not in cases]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(cases)}")
    providers = [p for p in args.providers.split(",") if p]
    for p in ("triton", "cuda"):
        reason = dla_fast.backend.unavailable_reason(p, device) if p in providers else None
        if reason:
            print(f"skipping provider {p}: {reason}")
            providers.remove(p)
    grid = [(name, batch, dt, mode, p) for name in names for batch in batches[cases[name].model]
            for dt in args.dtypes.split(",") if dt for mode in args.modes.split(",") if mode for p in providers]
    records = []
    for name, batch, dt, mode, provider in tqdm(grid, desc="upsample_merge", unit="case"):
        case, dtype = cases[name], DTYPES[dt]
        torch.manual_seed(0)
        low, high, weight = make_inputs(case, batch, dtype, device)
        step = provider_step(provider, case, low, high, weight, mode, dtype)
        shape = dict(low=list(low.shape), high=list(high.shape), factor=case.factor, merge=case.mode)
        records.append(bench_op("upsample_merge", provider, mode, dt, shape, step, device,
                                min_bytes=min_bytes(case, batch, mode, dtype), baseline=provider in BASELINES,
                                grad_to_none=step.params if mode == "training" else None,
                                extra=dict(case=name, batch=batch, merges=case.merges,
                                           image=size if case.model == "centernet" else list(seg_hw))))
        tqdm.write(f"{name:26s} b{batch:<3d} {dt} {mode:9s} {provider:8s} "
                   f"{records[-1].ms_p50:8.3f} ms {records[-1].gbps or 0:7.0f} GB/s")
        del step, low, high, weight
    save_records(records, args.out, device, "upsample_merge.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
