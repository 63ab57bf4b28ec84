"""Convergence check: does a DLA train the same with accelerate() as without? (Liger-Kernel's habit.)

Trains one model three times on the same synthetic, learnable task, same data in the same order:
- `dla_fast`: accelerate() with the backend forced (--backend, default triton: the fused BatchNorm training path
  and the fused roots), model seed 0;
- `eager`: the plain model, model seed 0;
- `eager_seed1`: the plain model, model seed 1 — its distance from `eager` is the run-to-run spread.
bf16 autocast and channels_last on a GPU; fp32 on CPU. Writes the loss curves to JSON and prints whether the
accelerated curve stays within the spread: max over steps of |smoothed dla_fast - smoothed eager| against the
same for eager_seed1 (smoothing: a moving average over --window steps).

The task: --classes classes, each a fixed random low-frequency colour pattern (generated from the data seed),
images = pattern of the label + Gaussian noise (--noise) at --size²; a DLA learns it in a few hundred steps.

    python benchmarks/convergence.py [--model dla34] [--size 64] [--batch 64] [--steps 300] [--backend triton]
        [--json results.json] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

import dla_fast


def make_task(classes: int, size: int, samples: int, noise: float, seed: int, device: torch.device):
    """(images [samples, 3, size, size] channels_last, labels [samples]) of the synthetic task."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes, 3, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.randint(0, classes, (samples,), generator=g)
    images = patterns[labels] + noise * torch.randn(samples, 3, size, size, generator=g)
    return images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)


def train(model_name: str, classes: int, images, labels, steps: int, batch: int, lr: float, model_seed: int,
          accelerated: bool, backend: str, device: torch.device) -> List[float]:
    """Loss per step of one training run."""
    torch.manual_seed(model_seed)
    model = dla_fast.create_model(model_name, num_classes=classes).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    if accelerated:
        dla_fast.accelerate(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    losses = []
    samples = images.shape[0]
    with dla_fast.use_backend(backend if accelerated else "torch"):
        for step in range(steps):
            start = (step * batch) % samples
            idx = torch.arange(start, start + batch, device=device) % samples
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(images[idx]).float(), labels[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def smoothed(values: List[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def max_gap(a: List[float], b: List[float], window: int) -> float:
    return max(abs(x - y) for x, y in zip(smoothed(a, window), smoothed(b, window)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dla34")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--window", type=int, default=20, help="moving-average window for the comparison")
    parser.add_argument("--backend", default="triton", help="backend forced for the accelerated run")
    parser.add_argument("--json", default=None, help="write the curves here")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, fp32, a tiny model (dla46_c), 32², batch 4, 4 steps: checks the script runs")
    args = parser.parse_args(argv)
    device = torch.device("cpu") if args.smoke or not torch.cuda.is_available() else torch.device("cuda")
    if args.smoke:
        args.model, args.size, args.batch, args.steps, args.samples, args.window = "dla46_c", 32, 4, 4, 16, 2
    images, labels = make_task(args.classes, args.size, args.samples, args.noise, seed=1234, device=device)
    runs = [("dla_fast", True, 0), ("eager", False, 0), ("eager_seed1", False, 1)]
    curves: Dict[str, List[float]] = {}
    for name, accelerated, seed in runs:
        curves[name] = train(args.model, args.classes, images, labels, args.steps, args.batch, args.lr, seed,
                             accelerated, args.backend, device)
        print(f"{name:<12} loss first {curves[name][0]:.4f}  last {curves[name][-1]:.4f}")
    gap = max_gap(curves["dla_fast"], curves["eager"], args.window)
    spread = max_gap(curves["eager_seed1"], curves["eager"], args.window)
    within = gap <= spread
    print(f"max |dla_fast - eager| (smoothed over {args.window}) = {gap:.4f}; eager seed spread = {spread:.4f}: "
          f"{'within' if within else 'OUTSIDE'} the spread")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), device=str(device),
                           gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                           torch=torch.__version__, curves=curves, max_gap=gap, seed_spread=spread,
                           within_spread=within), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
