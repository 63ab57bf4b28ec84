"""Modulated deformable conv (DCNv2) at every DCN layer shape of CenterNet's DLA-34: dla_fast against torchvision.

Cases are the distinct (Cin, Cout, H, W) of centernet_dla34(dcn=True)'s deformable IDA convs at the given image
size (found by running the model once on a small image with hooks and scaling the sides), each with the number
of layers of that shape. Two ops:
- deform_conv2d: the plain op, input + offset + mask given. Providers: torchvision_autocast (what a user of
  torchvision.ops.deform_conv2d gets under AMP: 16-bit activations, cast to fp32 inside), torchvision_fp32
  (fp32 inputs, no autocast), dla_fast (dla_fast.ops.deform_conv.deform_conv2d in the row's dtype). fp32 rows
  time torchvision_fp32 and dla_fast.
- dcn_block: CenterNet's whole DCN block (offset-mask conv, deformable conv, BN, ReLU). Providers: eager
  (IDAConv as it is, under autocast for 16-bit rows, channels_last) and dla_fast (accelerate()'s FusedDCNBlock:
  BN folded + ReLU epilogue in inference, batch statistics in the epilogue in training).
Modes: inference (no grad) and training (forward + backward to the input and every parameter; BN in training
mode). Each record has ms, the minimum FLOPs (2*M*Cout*Cin*9 forward, 3x that for training) and bytes (every
tensor read and written once), hence TFLOP/s and GB/s; `floor_ms` in the record's extra is the larger of
FLOPs / tensor-core peak and bytes / HBM bandwidth (H200 figures below), and `x_floor` = ms / floor_ms.

    python benchmarks/bench_deform_conv.py                       # 512x512, batch 1 and 16, bf16 and fp32
    python benchmarks/bench_deform_conv.py --smoke               # CPU smoke: tiny image and channels, one case
Writes benchmarks/results/<gpu>/deform_conv.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch
import torch.nn as nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dla_fast  # noqa: E402
from common import bench_op, default_device, save_records  # noqa: E402
from dla_fast.models.centernet import IDAConv, ModulatedDeformConv3x3  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Roofline of the H200 the device tool lends (../shared/GUIDE.md): dense bf16/fp16 tensor cores, fp32 on the
# CUDA cores (IEEE fp32, no TF32), HBM3e copy bandwidth.
PEAK_TFLOPS = {"bf16": 790.0, "fp16": 790.0, "fp32": 67.0}
PEAK_GBPS = 4300.0
OP_PROVIDERS = {"deform_conv2d": ("torchvision_autocast", "torchvision_fp32", "dla_fast"),
                "dcn_block": ("eager", "dla_fast")}
BASELINES = ("torchvision_autocast", "torchvision_fp32", "eager")
PROBE_SIZE = 32  # image side of the shape-finding run (the smallest CenterNet takes)


def dcn_layer_shapes(size: int) -> List[Dict]:
    """The distinct DCN layer shapes of centernet_dla34 at a size x size image: dicts with cin, cout, h, w, count
    and the names of the layers, finest first."""
    model = dla_fast.create_model("centernet_dla34", dcn=True, heads={"hm": 1}, head_conv=0).eval()
    seen: Dict[tuple, Dict] = {}

    def hook(name):
        def record(module, args):
            x = args[0]
            key = (x.shape[1], module.weight.shape[0], x.shape[2] * size // PROBE_SIZE, x.shape[3] * size // PROBE_SIZE)
            entry = seen.setdefault(key, dict(cin=key[0], cout=key[1], h=key[2], w=key[3], count=0, layers=[]))
            entry["count"] += 1
            entry["layers"].append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, ModulatedDeformConv3x3)]
    with torch.no_grad():
        model(torch.randn(1, 3, PROBE_SIZE, PROBE_SIZE))
    for h in handles:
        h.remove()
    return sorted(seen.values(), key=lambda e: (-e["h"], e["cin"], e["cout"]))


def _case_name(case: Dict) -> str:
    return f"{case['cin']}to{case['cout']}@{case['h']}x{case['w']}"


def minimum_work(batch: int, case: Dict, dtype: torch.dtype, training: bool):
    """(FLOPs, bytes) no implementation can go below: the GEMM's multiply-adds; every input and output once
    (activations in `dtype`, weight in `dtype`, offsets and mask in `dtype`; training: the gradients too)."""
    m = batch * case["h"] * case["w"]
    cin, cout = case["cin"], case["cout"]
    flops = 2 * m * cout * cin * 9
    size = torch.finfo(dtype).bits // 8
    activations = m * (cin + 27 + cout)  # input, offset (18) + mask (9), output
    weights = cout * cin * 9 + cout
    if training:
        return 3 * flops, size * (2 * activations + 2 * weights)
    return flops, size * (activations + weights)


def _op_step(provider: str, batch: int, case: Dict, dtype: torch.dtype, training: bool, device):
    """(call, tensors whose .grad the timer resets) for the plain deform_conv2d op."""
    import torchvision

    h, w, cin, cout = case["h"], case["w"], case["cin"], case["cout"]
    act_dtype = torch.float32 if provider == "torchvision_fp32" else dtype
    cl = torch.channels_last

    def act(c, scale=1.0):
        return (torch.randn(batch, c, h, w, device=device) * scale).to(act_dtype).contiguous(memory_format=cl) \
            .requires_grad_(training)

    x, offset, mask = act(cin), act(18, 2.0), torch.sigmoid(act(9)).detach().requires_grad_(training)
    weight = nn.Parameter(torch.randn(cout, cin, 3, 3, device=device) * (cin * 9) ** -0.5)
    bias = nn.Parameter(torch.randn(cout, device=device) * 0.1)
    if provider == "dla_fast":
        weight.data, bias.data = weight.data.to(dtype), bias.data.to(dtype)
        from dla_fast.ops.deform_conv import deform_conv2d as op
    else:
        op = torchvision.ops.deform_conv2d
    autocast = dict(device_type=device.type, dtype=dtype,
                    enabled=provider == "torchvision_autocast" and dtype != torch.float32)
    leaves = [x, offset, mask, weight, bias]
    grad = torch.randn(batch, cout, h, w, device=device).to(act_dtype)

    def call():
        with torch.set_grad_enabled(training), torch.autocast(**autocast):
            out = op(x, offset, weight, bias, padding=(1, 1), mask=mask)
        if training:
            out.backward(grad.to(out.dtype))

    return call, leaves if training else None


def _block_step(provider: str, batch: int, case: Dict, dtype: torch.dtype, training: bool, device):
    """(call, tensors whose .grad the timer resets) for CenterNet's whole DCN block."""
    torch.manual_seed(0)
    block = IDAConv(case["cin"], case["cout"], deformable=True)
    nn.init.normal_(block.conv.conv_offset_mask.weight, std=0.05)  # offsets of a few pixels, masks away from 0.5
    block = block.to(device).to(memory_format=torch.channels_last).train(training)
    if provider == "dla_fast":
        holder = nn.ModuleDict(dict(block=block))
        dla_fast.accelerate(holder)
        block = holder["block"]
    x = torch.randn(batch, case["cin"], case["h"], case["w"], device=device).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(training)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    params = [x, *block.parameters()]
    grad = torch.randn(batch, case["cout"], case["h"], case["w"], device=device)

    def call():
        with torch.set_grad_enabled(training), torch.autocast(**autocast):
            out = block(x)
        if training:
            out.backward(grad.to(out.dtype))

    return call, params if training else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side (the DCN layers run at 1/4 .. 1/32 of it)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--ops", default="deform_conv2d,dcn_block")
    parser.add_argument("--providers", default=None, help="subset of each op's providers (default: all)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (e.g. 64to64@128x128)")
    parser.add_argument("--backend", default="auto", choices=dla_fast.backend.BACKENDS,
                        help="kernels of the dla_fast provider (auto: Triton on a GPU, eager on the CPU)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke run: 64x64 image, batch 1, the smallest case with channels / 16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = default_device()
    cases = dcn_layer_shapes(64 if args.smoke else args.size)
    if args.smoke:
        smallest = min(cases, key=lambda c: c["h"] * c["w"] * c["cin"] * c["cout"])
        cases = [dict(smallest, cin=max(smallest["cin"] // 16, 3), cout=max(smallest["cout"] // 16, 3))]
        batches = [1]
    else:
        batches = [int(b) for b in args.batches.split(",")]
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if _case_name(c) in wanted]
    chosen = set(args.providers.split(",")) if args.providers else None
    grid = [(op, case, b, dt, mode, p) for op in args.ops.split(",") for case in cases for b in batches
            for dt in args.dtypes.split(",") for mode in args.modes.split(",") for p in OP_PROVIDERS[op]
            if (chosen is None or p in chosen) and not (dt == "fp32" and p == "torchvision_autocast")]
    records = []
    for op, case, batch, dt, mode, provider in tqdm(grid, desc="deform_conv", unit="case"):
        dtype, training = DTYPES[dt], mode == "training"
        make = _op_step if op == "deform_conv2d" else _block_step
        with dla_fast.use_backend(args.backend):
            call, leaves = make(provider, batch, case, dtype, training, device)
            flops, nbytes = minimum_work(batch, case, dtype, training)
            floor_ms = max(flops / (PEAK_TFLOPS[dt] * 1e12), nbytes / (PEAK_GBPS * 1e9)) * 1e3
            shape = dict(batch=batch, cin=case["cin"], cout=case["cout"], h=case["h"], w=case["w"], kernel=3)
            record = bench_op(op, provider, mode, dt, shape, call, device, min_bytes=nbytes, min_flops=flops,
                              baseline=provider in BASELINES, grad_to_none=leaves,
                              extra=dict(case=_case_name(case), layers=case["layers"], count=case["count"],
                                         batch=batch, floor_ms=floor_ms))
        record.extra["x_floor"] = record.ms_p50 / floor_ms
        records.append(record)
        tqdm.write(f"{op:13s} {_case_name(case):18s} b{batch:<3d} {dt} {mode:9s} {provider:20s} "
                   f"{record.ms_p50:9.3f} ms  {record.tflops:7.2f} TFLOP/s  {record.gbps:8.1f} GB/s  "
                   f"{record.extra['x_floor']:6.1f}x floor")
    _print_speedups(records)
    save_records(records, args.out, device, "deform_conv.json")
    return 0


def _print_speedups(records) -> None:
    """dla_fast's speedup over each baseline measured in the same run, per (op, case, batch, dtype, mode)."""
    groups: Dict[tuple, Dict[str, float]] = {}
    for r in records:
        key = (r.op, r.extra["case"], r.extra["batch"], r.dtype, r.mode)
        groups.setdefault(key, {})[r.provider] = r.ms_p50
    for key, times in groups.items():
        if "dla_fast" not in times:
            continue
        ratios = [f"{times[b] / times['dla_fast']:.2f}x vs {b}" for b in BASELINES if b in times]
        if ratios:
            print(" ".join(map(str, key)), ": ", ", ".join(ratios))


if __name__ == "__main__":
    sys.exit(main())
