"""conv -> BatchNorm [-> ReLU] -> conv -> ... chains through the implicit-GEMM conv (dla_fast.ops.conv_gemm).

Each conv writes only its pre-BatchNorm output y and the batch statistics of y (in its epilogue); the BatchNorm
becomes a per-channel affine map (scale = weight / sqrt(var + eps), shift = bias - mean * scale, autograd's chain
rule over tiny vectors) that the next conv applies, with the ReLU, while it loads y (its prologue). Only the chain's
last BatchNorm [+ residual] [+ ReLU] is applied as a pointwise pass, because its output leaves the chain. A conv the
kernels do not take (groups, dilation, a shape kept on cuDNN) runs as PyTorch's conv on the materialized activation,
its statistics from torch.var_mean; the chain goes on from there.

Which convs run the kernels is `accelerate(model, conv=...)`'s choice: "cudnn" (default) none, "triton" every conv
the kernels take, "auto" the shapes in MEASURED_FASTER (recorded from GPU measurements: none yet, so `auto` keeps
cuDNN). The kernels then run where dla_fast.backend resolves op "conv_gemm" to Triton (CUDA tensors under `auto`;
CPU tensors with backend 'triton' and TRITON_INTERPRET=1); backend 'torch' runs the replaced modules as they are.
Training mode, or eval with gradients wanted; eval without gradients folds the BatchNorms (dla_fast.nn.folded).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import backend
from ..ops.conv_bn_act import compute_dtype
from ..ops.conv_gemm import OP_NAME, affine_act, conv_gemm, fits_int32
from ..ops.running_stats import check_batch_size, update_running_stats, uses_batch_stats

CONV_CHOICES = ("cudnn", "triton", "auto")

# (in channels, out channels, kernel, stride, dtype) of the convs measured faster through the implicit GEMM than
# cuDNN (forward + backward) on a GPU; `auto` runs exactly these. Empty: nothing measured yet (no GPU lent since
# the kernels were written; benchmarks/NOTES.md).
MEASURED_FASTER: frozenset = frozenset()

# Convs with fewer input channels stay on cuDNN under "triton": a K tile of 32-64 channels per tap would be mostly
# padding (DLA's 7x7 base layer has 3 input channels).
MIN_IN_CHANNELS = 16


def check_conv_choice(conv: str) -> str:
    if conv not in CONV_CHOICES:
        raise ValueError(f"accelerate: conv must be one of {', '.join(map(repr, CONV_CHOICES))}; got {conv!r}")
    return conv


def _int_pair(v) -> Optional[int]:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return v[0] if len(v) == 2 and v[0] == v[1] and isinstance(v[0], int) else None


def kernel_takes(conv: nn.Module, choice: str, dtype: torch.dtype) -> bool:
    """Whether `conv` runs through the implicit GEMM under `choice`: a plain nn.Conv2d with one group, no dilation,
    at least MIN_IN_CHANNELS input channels, equal strides and zero paddings on both axes, and (choice "auto") a
    measured-faster shape."""
    if choice == "cudnn" or type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    if conv.in_channels < MIN_IN_CHANNELS:
        return False
    if isinstance(conv.padding, str) or _int_pair(conv.dilation) != 1:
        return False
    stride, padding = _int_pair(conv.stride), _int_pair(conv.padding)
    if stride is None or padding is None:
        return False
    if choice == "auto":
        key = (conv.in_channels, conv.out_channels, conv.kernel_size[0], stride, dtype)
        return conv.kernel_size[0] == conv.kernel_size[1] and key in MEASURED_FASTER
    return True


def chain_applies(choice: str, convs: Iterable[nn.Module], bns: Iterable[nn.Module], x: torch.Tensor) -> bool:
    """Whether a call (not folded) runs through this module: some conv the kernels take, every BatchNorm a plain
    nn.BatchNorm2d (SyncBatchNorm keeps its synchronized path), not traced by torch.compile (the kernels are not
    custom ops yet), and the backend for op "conv_gemm" Triton (not 'torch')."""
    if choice == "cudnn" or torch.compiler.is_compiling() or backend.exporting_portable():
        return False
    if any(type(bn).forward is not nn.BatchNorm2d.forward for bn in bns):
        return False
    dtype = compute_dtype(x)
    if not any(kernel_takes(conv, choice, dtype) for conv in convs):
        return False
    return backend.resolve(x.device, OP_NAME, dtype) != "torch"


def bn_affine(bn: nn.BatchNorm2d, mean: Optional[torch.Tensor], var: Optional[torch.Tensor],
              count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), fp32, of `bn` over a batch with these statistics (training: batch statistics, and the
    running ones updated as nn.BatchNorm2d does; eval: the running statistics)."""
    if uses_batch_stats(bn.training, bn.running_mean, bn.running_var):
        check_batch_size(count, bn.num_features)
        if bn.training:
            update_running_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, mean, var,
                                 count)
    else:
        mean, var = bn.running_mean.float(), bn.running_var.float()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return scale, shift


def conv_stats(conv: nn.Conv2d, inputs: Sequence[tuple], dtype: torch.dtype, choice: str, batch_stats: bool):
    """(y, mean, var) of one conv over the channel concatenation of `inputs` (each (x, scale, shift, relu)): the
    implicit GEMM when it takes the conv, else PyTorch's conv on the materialized (concatenated) activations."""
    weight = conv.weight.to(dtype)
    bias = None if conv.bias is None else conv.bias.to(dtype)
    inputs = [(x.to(dtype), s, b, r) for x, s, b, r in inputs]
    stride, padding = _int_pair(conv.stride), _int_pair(conv.padding)
    if kernel_takes(conv, choice, dtype) and fits_int32(inputs, weight, stride, padding):
        out = conv_gemm(inputs, weight, bias, stride, padding, stats=batch_stats)
        return out if batch_stats else (out, None, None)
    acts = [x if s is None else affine_act(x, s, b, r) for x, s, b, r in inputs]
    y = torch.nn.functional.conv2d(acts[0] if len(acts) == 1 else torch.cat(acts, 1), weight, bias, conv.stride,
                                   conv.padding, conv.dilation, conv.groups)
    if not batch_stats:
        return y, None, None
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
    return y, mean, var


def run_chain(steps: Sequence[Tuple[nn.Conv2d, nn.BatchNorm2d, bool]], inputs: List[tuple], choice: str,
              residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu?(bn_k(conv_k(... relu?(bn_1(conv_1(cat(inputs)))) ...)) [+ residual]): `steps` are (conv, bn, relu);
    `inputs` the first conv's (x, None, None, False) inputs (two: concatenated). Returns the last step's output."""
    dtype = compute_dtype(inputs[0][0])
    for i, (conv, bn, relu) in enumerate(steps):
        batch_stats = uses_batch_stats(bn.training, bn.running_mean, bn.running_var)
        y, mean, var = conv_stats(conv, inputs, dtype, choice, batch_stats)
        scale, shift = bn_affine(bn, mean, var, y.shape[0] * y.shape[2] * y.shape[3])
        if i == len(steps) - 1:
            if residual is not None and residual.dtype != y.dtype:
                residual = residual.to(y.dtype)
            return affine_act(y, scale, shift, relu, residual)
        inputs = [(y, scale, shift, relu)]
    raise ValueError("run_chain: no steps")
