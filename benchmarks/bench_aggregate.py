"""Microbenchmark of the aggregation node at DLA-34's six root shapes.

Providers (each on the same inputs, weights and BN state):
  eager     cat -> conv1x1 -> BatchNorm2d -> [+x0] -> ReLU in NCHW (AMP autocast for bf16)
  eager_cl  the same on channels_last tensors
  compile   torch.compile (default mode) of eager_cl
  triton    dla_fast's fused node, backend 'triton'
  cuda      dla_fast's fused node, backend 'cuda' (Triton GEMM + the extension's BN kernels)

Modes: inference (eval BN, no grad) and training (train BN, forward + backward to the children and every
parameter). Minimum bytes: inference reads the children and writes the output once; training adds the
backward's floor: read grad_out and the children, write the children's gradients.

    python benchmarks/bench_aggregate.py                      # the issue's grid: batch 1/32/256 @224, 16 @512
    python benchmarks/bench_aggregate.py --batches 256 --dtypes bf16 --providers eager,triton
Writes benchmarks/results/<gpu>/aggregate.json; `python benchmarks/report.py` makes the table and plot.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dla_fast  # noqa: E402
from common import bench_op, default_device, save_records, timed_step  # noqa: E402
from dla_fast.models import Root  # noqa: E402
from dla_fast.nn import FusedRoot  # noqa: E402

# DLA-34's roots: name -> (children's channels, Cout, stride); no DLA-34 root is residual, so the last row is
# level3.tree2.root made residual (as in DLA-102's roots) to time the residual epilogue too.
DLA34_ROOTS: Dict[str, Tuple[Tuple[int, ...], int, int, bool]] = {
    "level2.root": ((64, 64), 64, 4, False),
    "level3.tree1.root": ((128, 128), 128, 8, False),
    "level3.tree2.root": ((128, 128, 64, 128), 128, 8, False),
    "level4.tree1.root": ((256, 256), 256, 16, False),
    "level4.tree2.root": ((256, 256, 128, 256), 256, 16, False),
    "level5.root": ((512, 512, 256), 512, 32, False),
    "level3.tree2.root+residual": ((128, 128, 64, 128), 128, 8, True),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
PROVIDERS = ("eager", "eager_cl", "compile", "triton", "cuda")
BASELINES = ("eager", "eager_cl", "compile")


def make_root(channels, cout, residual, device) -> Root:
    root = Root(sum(channels), cout, 1, residual).to(device)
    with torch.no_grad():
        root.bn.weight.uniform_(0.5, 1.5)
        root.bn.bias.normal_(0, 0.2)
        root.bn.running_mean.normal_(0, 0.2)
        root.bn.running_var.uniform_(0.5, 1.5)
    return root


def provider_step(provider: str, root: Root, children: List[torch.Tensor], mode: str, dtype: torch.dtype
                  ) -> Callable[[], None]:
    """A warmed-up call running one forward (and backward in training) of `provider` on `children`."""
    device = children[0].device
    training = mode == "training"
    fmt = torch.contiguous_format if provider == "eager" else torch.channels_last
    kids = [c.contiguous(memory_format=fmt).detach().requires_grad_(training) for c in children]
    root = root.to(memory_format=fmt).train(training)
    module: nn.Module = root
    backend = "torch"
    if provider in ("triton", "cuda"):
        module, backend = FusedRoot(root.conv, root.bn, root.residual, root), provider
    elif provider == "compile":
        module = torch.compile(root)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward():
        with dla_fast.use_backend(backend), torch.autocast(**autocast):
            return module(kids)

    return timed_step(forward, training, [*kids, *root.parameters()])


def min_bytes(children: List[torch.Tensor], cout: int, mode: str, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    rows = children[0].shape[0] * children[0].shape[2] * children[0].shape[3]
    k = sum(c.shape[1] for c in children)
    forward = rows * (k + cout) * size
    return forward if mode == "inference" else forward + rows * (cout + 2 * k) * size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32,256", help="batch sizes at --size (comma separated)")
    parser.add_argument("--size", type=int, default=224, help="input image side of DLA-34")
    parser.add_argument("--extra", default="16@512", help="extra batch@size cases, e.g. 16@512 ('' for none)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--compile-batches", default="256,16",
                        help="batches for which torch.compile is timed (compiling every case takes long)")
    parser.add_argument("--roots", default=",".join(DLA34_ROOTS))
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<gpu>/aggregate.json)")
    args = parser.parse_args(argv)

    device = default_device()
    cases = [(int(b), args.size) for b in args.batches.split(",") if b]
    cases += [tuple(int(v) for v in c.split("@")) for c in args.extra.split(",") if c]
    compile_batches = {int(b) for b in args.compile_batches.split(",") if b}
    providers = [p for p in args.providers.split(",") if p]
    if "cuda" in providers and dla_fast.backend.unavailable_reason("cuda", device):
        print(f"skipping provider cuda: {dla_fast.backend.unavailable_reason('cuda', device)}")
        providers.remove("cuda")
    grid = [(root, batch, size, dt, mode, p) for root in args.roots.split(",") for batch, size in cases
            for dt in args.dtypes.split(",") for mode in args.modes.split(",") for p in providers
            if p != "compile" or batch in compile_batches]
    records = []
    for root_name, batch, size, dt, mode, provider in tqdm(grid, desc="aggregate", unit="case"):
        channels, cout, stride, residual = DLA34_ROOTS[root_name]
        dtype = DTYPES[dt]
        side = size // stride
        torch.manual_seed(0)
        root = make_root(channels, cout, residual, device)
        children = [torch.randn(batch, c, side, side, device=device, dtype=dtype) for c in channels]
        step = provider_step(provider, root, children, mode, dtype)
        shape = dict(children=[list(c.shape) for c in children], cout=cout, residual=residual)
        records.append(bench_op("aggregate", provider, mode, dt, shape, step, device,
                                min_bytes=min_bytes(children, cout, mode, dtype), baseline=provider in BASELINES,
                                grad_to_none=step.params if mode == "training" else None,
                                extra=dict(root=root_name, batch=batch, image=size)))
        tqdm.write(f"{root_name:28s} b{batch:<4d}@{size} {dt} {mode:9s} {provider:9s} "
                   f"{records[-1].ms_p50:8.3f} ms {records[-1].gbps or 0:7.0f} GB/s")
        del step, children, root
    save_records(records, args.out, device, "aggregate.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
