"""Per-layer bytes and FLOPs of one training step (forward + backward) of a DLA model, and the H200 floors.

Runs the model once on the meta device (no memory, no arithmetic: a second on CPU) with forward hooks that see
every layer's shapes, and counts, per layer, for 16-bit activations (--bytes-per-value 2):

- convs (Conv2d, ConvTranspose2d): forward, dgrad (input gradient; none for the stem conv) and wgrad (weight
  gradient) FLOPs (2 * multiply-adds each); activation bytes of the three passes (forward: read input, write
  output; dgrad: read grad_out, write grad_in; wgrad: read input and grad_out; weights not counted);
- BatchNorm2d in training, as eager runs it: forward = statistics read + normalize read/write, backward =
  reduction read of (grad, input) + input-gradient pass read (grad, input) / write;
- ReLU: forward read/write, backward read (grad, output) / write;
- the residual add of a block or root (out = BN(...) + residual): forward 2 reads + 1 write (backward passes the
  gradient through: no traffic);
- an aggregation node's concatenation: forward read of the children + write, backward read + write of the split.

and the fused minimum of the BatchNorm [+ residual] + ReLU of each conv (dla_fast.ops.batchnorm_act's passes):
forward read input twice (statistics, normalize) + residual + write output; backward read (grad, output, input)
twice + write grad_in (+ grad_residual); a ReLU not behind a BatchNorm (CenterNet's heads) stays a pass.
Floors: bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s (H200, bf16).

The table groups the layers by (output resolution, channels). Nothing here is measured: the times are floors.

    python benchmarks/layer_costs.py [--models dla34:256:224,centernet_dla34:16:512] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from typing import Dict, List

import torch
import torch.nn as nn

import dla_fast

HBM_BYTES_PER_S = 4.3e12
BF16_FLOP_PER_S = 790e12
BLOCK_CLASSES = ("BasicBlock", "DlaBasic", "Bottleneck", "DlaBottleneck", "Bottle2neck", "DlaBottle2neck")
ROOT_CLASSES = ("Root", "DlaRoot")
DEFAULT_MODELS = "dla34:256:224,centernet_dla34:16:512"


def build(name: str) -> nn.Module:
    """The model on the meta device (CenterNet with plain convs, its usual heads)."""
    kwargs = dict(heads={"hm": 80, "wh": 2, "reg": 2}, head_conv=256, dcn=False) if name.startswith("centernet") else {}
    with torch.device("meta"):
        return dla_fast.create_model(name, **kwargs).train()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class CostCounter:
    """Forward hooks that add one row per layer call: kind, group key, FLOPs, eager bytes, fused bytes."""

    def __init__(self, model: nn.Module, bytes_per_value: int):
        self.rows: List[Dict] = []
        self.value_bytes = bytes_per_value
        self.handles = []
        # a ReLU whose module also holds a BatchNorm (block, stack, root) is absorbed by the fused BN op; others
        # (CenterNet's heads: conv -> ReLU -> conv) stay a pass of their own
        self.absorbed_relus = {id(child) for parent in model.modules()
                               if any(isinstance(c, nn.BatchNorm2d) for c in parent.children())
                               for child in parent.children() if isinstance(child, nn.ReLU)}
        for module in model.modules():
            kind = self._kind(module)
            if kind:
                self.handles.append(module.register_forward_hook(self._hook(kind)))

    @staticmethod
    def _kind(module: nn.Module) -> str:
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            return "conv"
        if isinstance(module, nn.BatchNorm2d):
            return "bn"
        if isinstance(module, nn.ReLU):
            return "relu"
        name = type(module).__name__
        if name in BLOCK_CLASSES:
            return "block"
        if name in ROOT_CLASSES:
            return "root"
        return ""

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _add(self, kind: str, out_shape, flops=(0, 0, 0), eager_bytes=0, fused_bytes=0) -> None:
        n, c, h, w = out_shape
        self.rows.append(dict(kind=kind, resolution=h, width=w, channels=c, fwd_flop=flops[0], dgrad_flop=flops[1],
                              wgrad_flop=flops[2], eager_bytes=eager_bytes * self.value_bytes,
                              fused_bytes=fused_bytes * self.value_bytes))

    def _hook(self, kind: str):
        def hook(module, args, output):
            tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
                       if isinstance(t, torch.Tensor)]
            x = tensors[0]
            out_shape = tuple(output.shape)
            values_in, values_out = x.numel(), output.numel()
            if kind == "conv":
                w = module.weight
                cin_per_group = w.shape[1] if isinstance(module, nn.Conv2d) else w.shape[0] // module.groups
                kernel = w.shape[2] * w.shape[3]
                # multiply-adds: every output value of a Conv2d takes cin/groups * kh * kw; a transposed conv
                # spreads every input value over cout/groups * kh * kw outputs.
                if isinstance(module, nn.Conv2d):
                    macs = values_out * cin_per_group * kernel
                else:
                    macs = values_in * (w.shape[1]) * kernel
                flop = 2 * macs
                dgrad = x.requires_grad  # the stem conv's input (the image) needs no gradient
                # forward: read x, write y; dgrad: read dy, write dx; wgrad: read x and dy
                eager = (values_in + values_out) + dgrad * (values_out + values_in) + (values_in + values_out)
                self._add("conv", out_shape, (flop, dgrad * flop, flop), eager, eager)
            elif kind == "bn":
                # eager training BN: fwd stats read + normalize read/write; bwd reduce read 2 + apply read 2 write 1
                eager = 3 * values_out + 5 * values_out
                # fused BN (+ReLU): fwd read twice, write once; bwd read (grad, out, in) twice, write once
                fused = 3 * values_out + 7 * values_out
                self._add("bn", out_shape, eager_bytes=eager, fused_bytes=fused)
            elif kind == "relu":
                eager = 2 * values_out + 3 * values_out  # fwd read/write; bwd read grad + out, write
                absorbed = id(module) in self.absorbed_relus
                self._add("relu", out_shape, eager_bytes=eager, fused_bytes=0 if absorbed else eager)
            elif kind in ("block", "root"):
                has_residual = kind == "block" or bool(getattr(module, "residual", getattr(module, "shortcut", 0)))
                if has_residual:
                    # eager add: read two, write one; the fused op reads the residual once (forward) and writes
                    # its gradient once (backward)
                    self._add("residual_add", out_shape, eager_bytes=3 * values_out, fused_bytes=2 * values_out)
                if kind == "root":
                    children = sum(t.numel() for t in tensors)
                    if len(tensors) > 1:
                        # cat forward read + write; backward the split copies gradient slices (read + write)
                        self._add("aggregation_cat", out_shape, eager_bytes=4 * children, fused_bytes=0)
        return hook


def layer_costs(name: str, batch: int, size: int, bytes_per_value: int = 2) -> List[Dict]:
    """One row per layer call of a training step of model `name` at batch x 3 x size x size."""
    model = build(name)
    counter = CostCounter(model, bytes_per_value)
    with torch.device("meta"):
        x = torch.empty(batch, 3, size, size)
    model(x)
    counter.remove()
    return counter.rows


def summarize(rows: List[Dict]) -> Dict:
    total_flop = sum(r["fwd_flop"] + r["dgrad_flop"] + r["wgrad_flop"] for r in rows)
    eager_bytes = sum(r["eager_bytes"] for r in rows)
    fused_bytes = sum(r["fused_bytes"] for r in rows)
    non_conv_eager = sum(r["eager_bytes"] for r in rows if r["kind"] != "conv")
    non_conv_fused = sum(r["fused_bytes"] for r in rows if r["kind"] != "conv")
    return dict(flop=total_flop, eager_bytes=eager_bytes, fused_bytes=fused_bytes,
                non_conv_eager_bytes=non_conv_eager, non_conv_fused_bytes=non_conv_fused,
                compute_floor_ms=total_flop / BF16_FLOP_PER_S * 1e3,
                eager_memory_floor_ms=eager_bytes / HBM_BYTES_PER_S * 1e3,
                fused_memory_floor_ms=fused_bytes / HBM_BYTES_PER_S * 1e3)


def grouped_table(rows: List[Dict]) -> List[Dict]:
    """Rows summed per (resolution, channels), highest resolution first."""
    groups: Dict = collections.OrderedDict()
    for r in sorted(rows, key=lambda r: (-r["resolution"], r["channels"])):
        key = (r["resolution"], r["width"], r["channels"])
        g = groups.setdefault(key, collections.Counter())
        g["calls"] += 1
        for field in ("fwd_flop", "dgrad_flop", "wgrad_flop", "eager_bytes", "fused_bytes"):
            g[field] += r[field]
        g[r["kind"] + "_bytes"] += r["eager_bytes"]
    kinds = ("conv", "bn", "relu", "residual_add", "aggregation_cat")
    return [{"resolution": k[0], "width": k[1], "channels": k[2], **{f"{kind}_bytes": 0 for kind in kinds}, **g}
            for k, g in groups.items()]


def print_table(name: str, batch: int, size: int, rows: List[Dict], out=sys.stdout) -> None:
    summary = summarize(rows)
    print(f"\n{name}, batch {batch}, {size}x{size}, training step (fwd + bwd), 16-bit activations", file=out)
    print(f"{'HxW':>9} {'C':>5} {'layers':>6} {'conv TFLOP':>10} {'conv GB':>8} {'BN GB':>7} {'ReLU GB':>8} "
          f"{'add GB':>7} {'cat GB':>7} {'bytes %':>7} {'FLOP %':>7} {'mem ms':>7} {'fused ms':>8} {'flop ms':>8}",
          file=out)
    for g in grouped_table(rows):
        flop = g["fwd_flop"] + g["dgrad_flop"] + g["wgrad_flop"]
        print(f"{g['resolution']:>4}x{g['width']:<4} {g['channels']:>5} {g['calls']:>6} {flop / 1e12:>10.3f} "
              f"{g['conv_bytes'] / 1e9:>8.2f} {g['bn_bytes'] / 1e9:>7.2f} {g['relu_bytes'] / 1e9:>8.2f} "
              f"{g['residual_add_bytes'] / 1e9:>7.2f} {g['aggregation_cat_bytes'] / 1e9:>7.2f} "
              f"{100 * g['eager_bytes'] / summary['eager_bytes']:>6.1f}% {100 * flop / summary['flop']:>6.1f}% "
              f"{g['eager_bytes'] / HBM_BYTES_PER_S * 1e3:>7.3f} {g['fused_bytes'] / HBM_BYTES_PER_S * 1e3:>8.3f} "
              f"{flop / BF16_FLOP_PER_S * 1e3:>8.3f}", file=out)
    print(f"total: {summary['flop'] / 1e12:.2f} TFLOP (floor {summary['compute_floor_ms']:.2f} ms at 790 TFLOP/s); "
          f"activation traffic eager {summary['eager_bytes'] / 1e9:.1f} GB (floor "
          f"{summary['eager_memory_floor_ms']:.2f} ms at 4.3 TB/s), of which BN/ReLU/add/cat "
          f"{summary['non_conv_eager_bytes'] / 1e9:.1f} GB; with fused BN[+add]+ReLU "
          f"{summary['fused_bytes'] / 1e9:.1f} GB ({summary['fused_memory_floor_ms']:.2f} ms)", file=out)


def parse_models(spec: str):
    models = []
    for item in spec.split(","):
        name, batch, size = item.split(":")
        models.append((name, int(batch), int(size)))
    return models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="name:batch:size,... (default %(default)s)")
    parser.add_argument("--bytes-per-value", type=int, default=2, help="2 for bf16/fp16 activations, 4 for fp32")
    parser.add_argument("--json", default=None, help="also write the per-layer rows and totals here")
    args = parser.parse_args(argv)
    report = {}
    for name, batch, size in parse_models(args.models):
        rows = layer_costs(name, batch, size, args.bytes_per_value)
        print_table(name, batch, size, rows)
        report[f"{name}:{batch}:{size}"] = dict(rows=rows, summary=summarize(rows), groups=grouped_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
