"""The IDA up path alone: CenterNet's neck (DLAUp + the last IDAUp, add merge) and DLA-Up's (concat merge).

Inputs are the backbone's level outputs (random, of the real shapes), so the timing holds the up path only.
Providers: eager (NCHW, AMP autocast for bf16), eager_cl (channels_last), compile (torch.compile of eager_cl,
default mode), dla_fast (accelerate(): fused upsample-merge, BN+ReLU, 1x1 proj nodes).
Modes: inference (eval, no grad) and training (train BN, forward + backward to the inputs and parameters).

    python benchmarks/bench_ida.py                                  # CenterNet dla34 512x512 batch 16 (+dcn)
    python benchmarks/bench_ida.py --nets centernet --batches 1,16,64 --dtypes bf16
Writes benchmarks/results/<gpu>/ida.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

import torch
import torch.nn as nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dla_fast  # noqa: E402
from common import bench_op, default_device, save_records, timed_step  # noqa: E402
from dla_fast.models.centernet import LAST_LEVEL  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
PROVIDERS = ("eager", "eager_cl", "compile", "dla_fast")
BASELINES = ("eager", "eager_cl", "compile")
# name -> (model name, kwargs, image (H, W))
NETS = {
    "centernet": ("centernet_dla34", dict(dcn=False), (512, 512)),
    "centernet_dcn": ("centernet_dla34", dict(dcn=True), (512, 512)),
    "dlaup": ("dla34up", dict(num_classes=19, down_ratio=2), (512, 1024)),
}


class Neck(nn.Module):
    """The up path of a CenterNet or DLA-Up network, on the backbone's level outputs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.first_level = net.first_level
        self.dla_up = net.dla_up
        self.ida_up = getattr(net, "ida_up", None)

    def forward(self, levels: List[torch.Tensor]) -> torch.Tensor:
        if self.ida_up is None:  # DLA-Up: DLAUp returns the finest merged level
            return self.dla_up(levels)
        pyramid = self.dla_up(levels)
        return self.ida_up(pyramid[:LAST_LEVEL - self.first_level])[-1]


def make_step(provider: str, net_name: str, batch: int, dtype: torch.dtype, mode: str, device, scale: int = 1,
              warmup: int = 3):
    model_name, kwargs, (height, width) = NETS[net_name]
    height, width = height // scale, width // scale
    torch.manual_seed(0)
    net = dla_fast.create_model(model_name, **kwargs)
    neck = Neck(net).to(device)
    channels = net.base.channels[net.first_level:]
    training = mode == "training"
    fmt = torch.contiguous_format if provider == "eager" else torch.channels_last
    levels = [torch.randn(batch, c, height >> (net.first_level + i), width >> (net.first_level + i), device=device,
                          dtype=dtype).contiguous(memory_format=fmt).requires_grad_(training)
              for i, c in enumerate(channels)]
    neck = neck.to(memory_format=fmt).train(training)
    module = neck
    if provider == "dla_fast":
        module = dla_fast.accelerate(neck)
    elif provider == "compile":
        module = torch.compile(neck)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward():
        with torch.autocast(**autocast):
            return module(levels)

    step = timed_step(forward, training, [*levels, *neck.parameters()], warmup=max(warmup, 1))
    step.shapes = [list(t.shape) for t in levels]
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", default="centernet,centernet_dcn,dlaup")
    parser.add_argument("--batches", default="16")
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--providers", default="eager,eager_cl,dla_fast")
    parser.add_argument("--backend", default="auto", choices=dla_fast.backend.BACKENDS,
                        help="kernels of the dla_fast provider (auto: the fused ones on a GPU, eager on the CPU)")
    parser.add_argument("--scale", type=int, default=1, help="divide the image sides (a CPU smoke run: --scale 8)")
    parser.add_argument("--cpu-iters", type=int, default=20, help="timed calls per case on the CPU (a smoke run: 3)")
    parser.add_argument("--cpu-warmup", type=int, default=3,
                        help="untimed calls per case on the CPU before the timed ones (a smoke run: 1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = default_device()
    grid = [(net, int(b), dt, mode, p) for net in args.nets.split(",") for b in args.batches.split(",")
            for dt in args.dtypes.split(",") for mode in args.modes.split(",") for p in args.providers.split(",")]
    records = []
    for net, batch, dt, mode, provider in tqdm(grid, desc="ida", unit="case"):
        with dla_fast.use_backend(args.backend):
            step = make_step(provider, net, batch, DTYPES[dt], mode, device, args.scale, args.cpu_warmup)
            record = bench_op("ida_up_path", provider, mode, dt, dict(net=net, levels=step.shapes), step, device,
                              baseline=provider in BASELINES, grad_to_none=step.params if mode == "training" else None,
                              extra=dict(net=net, batch=batch), cpu_iters=args.cpu_iters,
                              cpu_warmup=args.cpu_warmup)
        records.append(record)
        tqdm.write(f"{net:14s} b{batch:<3d} {dt} {mode:9s} {provider:9s} {record.ms_p50:8.3f} ms")
    save_records(records, args.out, device, "ida.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
