"""One training step under torch.profiler, per provider: where the GPU time goes, by kernel class, and the host time.

Providers: eager (channels_last, bf16 autocast on CUDA), compile (torch.compile default mode of the same) and
dla_fast (accelerate(), backend --backend; `triton` or `cuda` forces the fused BatchNorm training path, `auto`
keeps it eager until measured). For each (model, provider): a few warm-up steps, then one profiled step (forward,
backward, SGD update), and:

- GPU time by kernel class: conv forward / dgrad / wgrad (cuDNN kernel names), BatchNorm (eager's and
  dla_fast's statistics / normalize / backward kernels; inductor's reductions), elementwise (ReLU, add,
  inductor's pointwise kernels), aggregation (dla_fast's root kernels), other (copies, optimizer, layout);
- conv time by layer: every aten convolution (forward) and convolution_backward (dgrad + wgrad) op grouped by its
  input's resolution and channels, with the op's device time;
- host time per step: the Python time to issue a step (no synchronization) and the synchronized step time.

--smoke: CPU, a tiny model and size, CPU time of the ops in place of GPU kernel time (checks the script runs).

    python benchmarks/profile_training.py [--models dla34:256:224,centernet_dla34:16:512]
        [--providers eager,compile,dla_fast] [--backend triton] [--json out.json] [--smoke]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from typing import Dict, List

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import dla_fast

DEFAULT_MODELS = "dla34:256:224,centernet_dla34:16:512"
SMOKE_MODELS = "dla46_c:2:32"
CLASSES = ("conv_fwd", "conv_dgrad", "conv_wgrad", "conv_bwd", "batchnorm", "elementwise", "aggregation", "other")


def classify(name: str) -> str:
    """Kernel class of a CUDA kernel name (or, in smoke mode, of an aten/dla_fast op name)."""
    n = name.lower()
    if "aggregate" in n or "upsample_merge" in n:
        return "aggregation"
    if "dgrad" in n:
        return "conv_dgrad"
    if "wgrad" in n:
        return "conv_wgrad"
    if "convolution_backward" in n:
        return "conv_bwd"  # CPU op (smoke): dgrad and wgrad together
    if any(k in n for k in ("fprop", "convolution", "conv2d", "implicit_gemm", "xmma", "cudnn_conv")):
        return "conv_fwd"
    if any(k in n for k in ("batch_norm", "batchnorm", "bn_", "channel_stats", "welford", "running_stats",
                            "triton_red", "triton_per")):
        return "batchnorm"
    if any(k in n for k in ("relu", "threshold", "add", "elementwise", "triton_poi", "vectorized", "mul")):
        return "elementwise"
    return "other"


def build(name: str, device: torch.device) -> nn.Module:
    kwargs = dict(heads={"hm": 80, "wh": 2, "reg": 2}, head_conv=256, dcn=False) if name.startswith("centernet") else {}
    if name.startswith("centernet") and device.type == "cpu":
        kwargs.update(heads={"hm": 3, "wh": 2}, head_conv=16)
    return dla_fast.create_model(name, **kwargs).to(device).to(memory_format=torch.channels_last).train()


def loss_of(output) -> torch.Tensor:
    if isinstance(output, list):  # CenterNet: one dict of head outputs per stack
        return sum(t.float().square().mean() for head in output for t in head.values())
    if isinstance(output, tuple):
        output = output[0]
    return output.float().square().mean()


def make_step(model: nn.Module, x: torch.Tensor, autocast: bool):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(model(x))
        loss.backward()
        optimizer.step()
    return step


def _input_key(shapes) -> str:
    """'HxW Cin' of an op's first 4-D input shape."""
    for shape in shapes:
        if len(shape) == 4:
            return f"{shape[2]}x{shape[3]} c{shape[1]}"
    return "?"


def profile_step(step, device: torch.device, warmup: int) -> Dict:
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    step()
    host_ms = (time.perf_counter() - start) * 1e3
    sync()
    step_ms = (time.perf_counter() - start) * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        sync()
    by_class = collections.Counter()
    conv_by_layer = collections.Counter()
    events = prof.key_averages(group_by_input_shape=True)
    for evt in events:
        if device.type == "cuda":
            # kernels: events with device time and no CPU-side children (their own time on the GPU)
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                by_class[classify(evt.key)] += evt.self_device_time_total / 1e3
        elif evt.key.startswith(("aten::", "dla_fast::")) or "Function" in evt.key or "kernel" in evt.key:
            by_class[classify(evt.key)] += evt.self_cpu_time_total / 1e3
        if evt.key in ("aten::convolution", "aten::convolution_backward"):
            kind = "fwd" if evt.key == "aten::convolution" else "bwd"
            shapes = evt.input_shapes or []
            if kind == "bwd":
                shapes = shapes[1:]  # (grad_output, input, weight, ...): the layer's input
            time_ms = (evt.device_time_total if device.type == "cuda" else evt.cpu_time_total) / 1e3
            conv_by_layer[f"{kind} {_input_key(shapes)}"] += time_ms
    return dict(host_ms=host_ms, step_ms=step_ms, by_class_ms=dict(by_class), conv_by_layer_ms=dict(conv_by_layer),
                time_kind="cuda" if device.type == "cuda" else "cpu")


def run(name: str, batch: int, size: int, provider: str, backend: str, device: torch.device, warmup: int) -> Dict:
    torch.manual_seed(0)
    model = build(name, device)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    if provider == "dla_fast":
        dla_fast.accelerate(model)
    elif provider == "compile":
        model = torch.compile(model)
    elif provider != "eager":
        raise ValueError(f"unknown provider {provider!r}")
    step = make_step(model, x, autocast=device.type == "cuda")
    with dla_fast.use_backend(backend if provider == "dla_fast" else "torch"):
        result = profile_step(step, device, warmup)
    return dict(model=name, batch=batch, size=size, provider=provider,
                backend=backend if provider == "dla_fast" else None, **result)


def print_result(r: Dict, out=sys.stdout) -> None:
    total = sum(r["by_class_ms"].values())
    unit = "GPU" if r["time_kind"] == "cuda" else "CPU (smoke)"
    print(f"\n{r['model']} b{r['batch']} {r['size']}², {r['provider']}"
          f"{' (backend ' + r['backend'] + ')' if r['backend'] else ''}: step {r['step_ms']:.2f} ms, "
          f"host {r['host_ms']:.2f} ms; {unit} time by class (ms):", file=out)
    for cls in CLASSES:
        ms = r["by_class_ms"].get(cls, 0.0)
        if ms:
            print(f"  {cls:<12} {ms:9.3f}  {100 * ms / total:5.1f}%", file=out)
    print("  conv by layer (op time, input resolution and channels):", file=out)
    for key, ms in sorted(r["conv_by_layer_ms"].items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {key:<24} {ms:9.3f}", file=out)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None, help=f"name:batch:size,... (default {DEFAULT_MODELS}; "
                                                       f"--smoke: {SMOKE_MODELS})")
    parser.add_argument("--providers", default="eager,compile,dla_fast")
    parser.add_argument("--backend", default="triton", help="dla_fast backend (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; --smoke: 1)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: check the script runs")
    args = parser.parse_args(argv)
    device = torch.device("cpu") if args.smoke or not torch.cuda.is_available() else torch.device("cuda")
    models = args.models or (SMOKE_MODELS if args.smoke else DEFAULT_MODELS)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    results = []
    for item in models.split(","):
        name, batch, size = item.split(":")
        for provider in args.providers.split(","):
            r = run(name, int(batch), int(size), provider, args.backend, device, warmup)
            print_result(r)
            results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           torch=torch.__version__, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
