"""Convergence check: does a DLA train the same with accelerate() as without? (Liger-Kernel's habit.)

Trains one model three times on the same synthetic, learnable task, the same data in the same order:
- `dla_fast`: accelerate() with the backend forced (--backend, default triton: the fused roots, the fused
  BatchNorm training path of the blocks, the fused up path and deformable convs of CenterNet), model seed 0;
- `eager`: the plain model, model seed 0 (the same initial weights as `dla_fast`);
- `eager_seed1`: the plain model, model seed 1 — how far two correct trainings of this model drift apart.

The statistic: each loss curve is smoothed by a moving average over --window steps; the gap between two runs is
the largest |difference| of their smoothed curves over all steps. The accelerated run passes when
  gap(dla_fast, eager) <= gap(eager_seed1, eager)   (the seed spread)
and the task was learned: the eager run's mean loss over its last window is at most --learned times (default 0.5)
its mean over the first window (a run that learns nothing would pass the spread test vacuously).
Exit status 1 when either fails.

Tasks (data from a fixed data seed):
- `classify` (default): --classes classes, each a fixed random low-frequency colour pattern; image = the
  pattern of its label + Gaussian noise (--noise); cross-entropy. Models: `tiny` (a DLA with BasicBlocks,
  levels 1,1,1,2,1,1 and widths 4,8,8,16,16,32: small enough for Triton's CPU interpreter) or any backbone name.
- `centernet` (--task centernet, for a GPU): CenterNet-DLA-34 with deformable convs (--model
  centernet_dla34) on images of 1-3 filled squares, one colour per class; CenterNet's losses — the focal loss on
  the class heatmap (Gaussian peaks at the squares' centres, stride 4), L1 on width/height and on the centre
  offset at the peaks (weights 1, 0.1, 1).

On a GPU: bf16 autocast (--dtype) and channels_last; on CPU fp32 (bf16 is wrong in Triton's interpreter), with
the Triton kernels in the interpreter (TRITON_INTERPRET=1, set here before dla_fast is imported when there is
no GPU).

    python benchmarks/convergence.py                      # CPU: tiny DLA, 32², batch 16, 8 steps, interpreter
    python benchmarks/convergence.py --task centernet     # GPU: CenterNet-DLA-34 (DCN) 512², batch 16, 300 bf16 steps
        [--model M] [--size S] [--batch B] [--steps N] [--lr LR] [--backend triton] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():  # the fused kernels on CPU: Triton's interpreter (read when dla_fast imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dla_fast  # noqa: E402
from dla_fast.models.blocks import BasicBlock  # noqa: E402
from dla_fast.models.dla import DLA  # noqa: E402

TINY_LEVELS, TINY_CHANNELS = (1, 1, 1, 2, 1, 1), (4, 8, 8, 16, 16, 32)


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------
def build_model(name: str, task: str, classes: int) -> nn.Module:
    if task == "centernet":
        return dla_fast.create_model(name, heads={"hm": classes, "wh": 2, "reg": 2}, head_conv=64, dcn=True)
    if name == "tiny":
        return DLA(TINY_LEVELS, TINY_CHANNELS, BasicBlock, num_classes=classes)
    return dla_fast.create_model(name, num_classes=classes)


# --------------------------------------------------------------------------------------------------------
# Tasks: (batch of inputs, batch of targets) for step i, and the loss
# --------------------------------------------------------------------------------------------------------
def make_classification(classes: int, size: int, samples: int, noise: float, seed: int):
    """(images [samples, 3, size, size], labels [samples]) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes, 3, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.randint(0, classes, (samples,), generator=g)
    images = patterns[labels] + noise * torch.randn(samples, 3, size, size, generator=g)
    return images, labels


def gaussian_radius(side: float) -> float:
    """CenterNet's heatmap Gaussian, simplified: sigma a sixth of the object's side (at the output stride)."""
    return max(side / 6.0, 0.5)


def make_detection(classes: int, size: int, samples: int, noise: float, seed: int, stride: int = 4):
    """Images of 1-3 squares (class = colour) and CenterNet targets at `stride`: heatmap [classes, s, s],
    wh and reg [2, s, s], and the mask of object centres [s, s]."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(classes, 3, generator=g) * 2 - 1
    out = size // stride
    images = noise * torch.randn(samples, 3, size, size, generator=g)
    hm = torch.zeros(samples, classes, out, out)
    wh = torch.zeros(samples, 2, out, out)
    reg = torch.zeros(samples, 2, out, out)
    mask = torch.zeros(samples, out, out)
    ys, xs = torch.meshgrid(torch.arange(out, dtype=torch.float32), torch.arange(out, dtype=torch.float32),
                            indexing="ij")
    for i in range(samples):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            c = int(torch.randint(0, classes, (1,), generator=g))
            side = int(torch.randint(size // 8, size // 3, (1,), generator=g))
            y0, x0 = (int(torch.randint(0, size - side, (1,), generator=g)) for _ in range(2))
            images[i, :, y0:y0 + side, x0:x0 + side] += colours[c][:, None, None]
            cy, cx = (y0 + side / 2) / stride, (x0 + side / 2) / stride
            iy, ix = int(cy), int(cx)
            sigma = gaussian_radius(side / stride)
            peak = torch.exp(-((ys - iy) ** 2 + (xs - ix) ** 2) / (2 * sigma ** 2))
            hm[i, c] = torch.maximum(hm[i, c], peak)
            wh[i, :, iy, ix] = side / stride
            reg[i, :, iy, ix] = torch.tensor([cx - ix, cy - iy])
            mask[i, iy, ix] = 1
    return images, (hm, wh, reg, mask)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4) on the heatmap logits."""
    pred = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    pos = torch.log(pred) * (1 - pred) ** 2 * positive
    neg = torch.log(1 - pred) * pred ** 2 * (1 - target) ** 4 * (1 - positive)
    return -(pos.sum() + neg.sum()) / positive.sum().clamp(min=1)


def centernet_loss(output, targets) -> torch.Tensor:
    heads = output[0]
    hm, wh, reg, mask = targets
    m = mask.unsqueeze(1)
    count = m.sum().clamp(min=1)
    l1 = lambda pred, tgt: (pred.float() - tgt).abs().mul(m).sum() / count  # noqa: E731
    return focal_loss(heads["hm"], hm) + 0.1 * l1(heads["wh"], wh) + l1(heads["reg"], reg)


def classification_loss(output, labels) -> torch.Tensor:
    return F.cross_entropy(output.float(), labels)


# --------------------------------------------------------------------------------------------------------
# Training and the statistic
# --------------------------------------------------------------------------------------------------------
def train(args, data, model_seed: int, accelerated: bool, device: torch.device) -> List[float]:
    """Loss per step of one run (the same batches in the same order for every run)."""
    images, targets = data
    torch.manual_seed(model_seed)
    model = build_model(args.model, args.task, args.classes).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    if accelerated:
        dla_fast.accelerate(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    loss_fn = centernet_loss if args.task == "centernet" else classification_loss
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    losses = []
    samples = images.shape[0]
    with dla_fast.use_backend(args.backend if accelerated else "torch"):
        for step in range(args.steps):
            idx = torch.arange(step * args.batch, (step + 1) * args.batch) % samples
            x = images[idx].to(device).contiguous(memory_format=torch.channels_last)
            y = tuple(t[idx].to(device) for t in targets) if isinstance(targets, tuple) else targets[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss {value} at step {step} ({'accelerated' if accelerated else 'eager'})")
            losses.append(value)
    return losses


def smoothed(values: List[float], window: int) -> List[float]:
    """Moving average over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def max_gap(a: List[float], b: List[float], window: int) -> float:
    """The largest |difference| of the two smoothed curves over all steps."""
    return max(abs(x - y) for x, y in zip(smoothed(a, window), smoothed(b, window)))


def verdict(curves: Dict[str, List[float]], window: int, learned: float) -> Tuple[dict, bool]:
    """The statistic of the module docstring: (numbers, passed)."""
    gap = max_gap(curves["dla_fast"], curves["eager"], window)
    spread = max_gap(curves["eager_seed1"], curves["eager"], window)
    eager = curves["eager"]
    first, last = sum(eager[:window]) / window, sum(eager[-window:]) / window
    numbers = dict(max_gap=gap, seed_spread=spread, within_spread=gap <= spread, first_window_loss=first,
                   last_window_loss=last, learned=last <= learned * first)
    return numbers, numbers["within_spread"] and numbers["learned"]


DEFAULTS = {  # (task, on a GPU) -> defaults. CPU: every fused launch runs in the interpreter (~30 ms each, ~190
    # per step of the tiny DLA), so the CPU run is short: 8 steps at a batch and rate where the tiny DLA learns.
    ("classify", False): dict(model="tiny", size=32, batch=16, steps=8, samples=128, lr=0.02, noise=0.3, window=2,
                              dtype="fp32"),
    ("classify", True): dict(model="dla34", size=64, batch=64, steps=300, samples=4096, lr=0.02, noise=0.5,
                             window=20, dtype="bf16"),
    ("centernet", True): dict(model="centernet_dla34", size=512, batch=16, steps=300, samples=512, lr=0.01,
                              noise=0.2, window=20, dtype="bf16"),
    ("centernet", False): dict(model="centernet_dla34", size=64, batch=2, steps=4, samples=8, lr=0.01, noise=0.2,
                               window=2, dtype="fp32"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("classify", "centernet"), default="classify")
    parser.add_argument("--model", help="tiny, a backbone, or (--task centernet) a centernet_* model")
    parser.add_argument("--size", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--samples", type=int, help="images in the synthetic data set")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--noise", type=float)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--window", type=int, help="moving-average window of the statistic")
    parser.add_argument("--learned", type=float, default=0.5,
                        help="the eager run's last-window loss must be at most this times its first-window loss")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="autocast dtype (GPU default bf16)")
    parser.add_argument("--backend", default="triton", help="backend forced for the accelerated run")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--json", default=None, help="write the curves and the verdict here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for key, value in DEFAULTS[args.task, device.type == "cuda"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if device.type == "cpu" and args.dtype != "fp32":
        parser.error(f"--dtype {args.dtype} on CPU: Triton's interpreter computes 16-bit wrongly; use fp32")
    if args.window > args.steps:
        parser.error(f"--window {args.window} is longer than --steps {args.steps}")
    make = make_detection if args.task == "centernet" else make_classification
    data = make(args.classes, args.size, args.samples, args.noise, seed=1234)
    curves: Dict[str, List[float]] = {}
    for name, accelerated, seed in (("dla_fast", True, 0), ("eager", False, 0), ("eager_seed1", False, 1)):
        curves[name] = train(args, data, seed, accelerated, device)
        print(f"{name:<12} loss first {curves[name][0]:.4f}  last {curves[name][-1]:.4f}")
    numbers, passed = verdict(curves, args.window, args.learned)
    print(f"max |dla_fast - eager| (smoothed over {args.window}) = {numbers['max_gap']:.4g}; eager seed spread = "
          f"{numbers['seed_spread']:.4g}: {'within' if numbers['within_spread'] else 'OUTSIDE'} the spread; eager "
          f"loss {numbers['first_window_loss']:.4f} -> {numbers['last_window_loss']:.4f} "
          f"({'learned' if numbers['learned'] else 'NOT learned'}, bar {args.learned}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), device=str(device),
                           gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                           torch=torch.__version__, curves=curves, passed=passed, **numbers), f, indent=1)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
