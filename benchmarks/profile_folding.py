"""Where the inference BatchNorm folding helps and where it costs: per conv shape and per model.

1. Records every folded conv call (input, weight, stride/padding/dilation/groups, residual, ReLU) of one
   accelerated inference forward of each model, then times each distinct shape four ways (bf16, channels_last,
   triton.testing.do_bench medians, L2 flushed):
     eager     conv -> BatchNorm (running stats) [-> + residual] -> ReLU, as the model runs it
     cudnn     one fused cuDNN call with the folded weight and bias (what accelerate() runs; for the rows
               without ReLU, the 1x1 projections, cuDNN has no fused call and this is F.conv2d with the bias)
     folded    F.conv2d with the folded weight and bias, then add_ / relu_ (separate passes)
     conv+bnact  conv, then dla_fast's batchnorm_act (one BN [+ residual] + ReLU pass)
   and prints one row per shape (x count of calls per forward) and per-model totals.
2. Host cost: cProfile of accelerated dla34 inference at batch 32, top functions by own time, and the host
   time per forward without synchronization.

    python benchmarks/profile_folding.py [--models dla34:32:224,dla34up:16:512x1024,centernet_dla34:16:512]
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
import triton

import dla_fast
from dla_fast.nn import folded as folded_module
from dla_fast.ops.batchnorm_act import batchnorm_act
from dla_fast.ops.conv_bn_act import compute_dtype, conv_bias_act, fold_batchnorm


def build(name: str):
    kwargs = dict(heads={"hm": 80, "wh": 2, "reg": 2}, head_conv=256, dcn=False) if name.startswith("centernet") else {}
    if name.endswith("up"):
        kwargs = dict(num_classes=19)
    return dla_fast.create_model(name, **kwargs).cuda().eval()


def record_calls(model, x):
    """(shape key -> [count, FoldedConvBN pair, example args]) of one accelerated forward."""
    seen = collections.OrderedDict()
    original_call = folded_module.FoldedConvBN.__call__

    def recording(self, inp, residual=None, relu=True):
        conv = self.conv
        key = (tuple(inp.shape), tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups,
               residual is not None, relu)
        if key not in seen:
            seen[key] = [0, self, (inp.clone(), None if residual is None else residual.clone(), relu)]
        seen[key][0] += 1
        return original_call(self, inp, residual, relu)

    folded_module.FoldedConvBN.__call__ = recording
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
    finally:
        folded_module.FoldedConvBN.__call__ = original_call
    return seen


def variants(pair, inp, residual, relu):
    conv, bn = pair.conv, pair.bn
    w, b = fold_batchnorm(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                          compute_dtype(inp))
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)

    def eager():
        out = bn(conv(inp))
        if residual is not None:
            out = out + residual
        return out.relu_() if relu else out

    def cudnn():
        return conv_bias_act(inp, w, b, *args, residual=residual, relu=relu)

    def folded():
        out = F.conv2d(inp, w, b, *args)
        if residual is not None:
            out = out.add_(residual)
        return out.relu_() if relu else out

    def conv_bnact():
        return batchnorm_act(conv(inp), bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                             False, bn.momentum, bn.eps, residual=residual, relu=relu)

    return dict(eager=eager, cudnn=cudnn, folded=folded, conv_bnact=conv_bnact)


def per_shape(models):
    names = ("eager", "cudnn", "folded", "conv_bnact")
    for spec in models:
        name, batch, size = spec.split(":")
        h, w = (int(v) for v in size.split("x")) if "x" in size else (int(size), int(size))
        model = dla_fast.accelerate(build(name))
        x = torch.randn(int(batch), 3, h, w, device="cuda").contiguous(memory_format=torch.channels_last)
        calls = record_calls(model, x)
        totals = dict.fromkeys(names, 0.0)
        print(f"\n== {name} batch {batch} {h}x{w}: {sum(c[0] for c in calls.values())} folded convs, "
              f"{len(calls)} shapes (ms per call, bf16, do_bench)")
        print(f"{'input':>22s} {'weight':>18s} s g res relu  n " + " ".join(f"{v:>10s}" for v in names))
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for key, (count, pair, (inp, residual, relu)) in calls.items():
                times = {v: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                         for v, fn in variants(pair, inp, residual, relu).items()}
                for v in names:
                    totals[v] += count * times[v]
                print(f"{str(key[0]):>22s} {str(key[1]):>18s} {key[2][0]} {key[5]} {int(key[6]):3d} {int(key[7]):4d} "
                      f"{count:2d} " + " ".join(f"{times[v]:10.4f}" for v in names))
        print(f"{'total (x count)':>48s}      " + " ".join(f"{totals[v]:10.3f}" for v in names))


def host_profile(batch: int = 32):
    model = dla_fast.accelerate(build("dla34"))
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    eager = build("dla34").to(memory_format=torch.channels_last)

    def run(m, n):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(n):
                m(x)

    for label, m in (("eager_cl", eager), ("dla_fast", model), ("dla_fast fold_bn=False",
                                                                dla_fast.accelerate(build("dla34"), fold_bn=False))):
        run(m, 5)
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(m, 20)
        host = (time.perf_counter() - start) / 20
        torch.cuda.synchronize()
        total = (time.perf_counter() - start) / 20
        print(f"dla34 b{batch} {label:24s} host {host * 1e3:7.3f} ms/forward, with sync {total * 1e3:7.3f} ms")
    profiler = cProfile.Profile()
    profiler.enable()
    run(model, 20)
    profiler.disable()
    torch.cuda.synchronize()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(25)
    print("\n".join(line[:150] for line in stream.getvalue().splitlines()[:45]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dla34:32:224,dla34:256:224,dla34up:16:512x1024,centernet_dla34:16:512")
    parser.add_argument("--skip-host", action="store_true")
    args = parser.parse_args()
    if not args.skip_host:
        host_profile()
    per_shape(args.models.split(","))


if __name__ == "__main__":
    main()
