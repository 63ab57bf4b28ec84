"""Inference conv + BatchNorm (+ residual) (+ ReLU) as one convolution: the BatchNorm folded into the conv.

With running statistics (eval mode) BatchNorm is a per-channel affine map, so

    BN(conv(x; W, c)) = conv(x; W * s) + (beta + (c - mean) * s),   s = gamma / sqrt(var + eps)

and a whole conv -> BN [-> + residual] [-> ReLU] chain is one convolution with a bias and an epilogue. On
CUDA tensors it runs as one cuDNN call (`torch.cudnn_convolution_relu` / `torch.cudnn_convolution_add_relu`,
cuDNN's fused convolution-bias-add-activation), which writes the output once instead of a conv pass, a
BatchNorm pass, an add pass and a ReLU pass. Everywhere else (CPU tensors, a chain without ReLU) the same
folded arithmetic runs as F.conv2d with the bias, then in-place add and ReLU. Under torch.compile the call is
the custom op `dla_fast::conv_bias_act` (same implementation, a fake kernel for tracing), which Inductor keeps
as one extern call, so a compiled model still runs the fused cuDNN call.

Inference only: batch statistics (training mode) cannot be folded, and the fused cuDNN calls have no autograd
formula. `foldable()` says when the fold applies; callers run their eager modules otherwise. The eager
reference is `conv_bn_act_reference` (conv2d, batch_norm with running statistics, add, ReLU).
"""
from __future__ import annotations

import functools
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import backend

OP_NAME = "conv_bn_act"
_CUDNN_FAILURES: set = set()


def foldable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether no gradient is wanted of these tensors (the fold has no autograd; BatchNorm's running-statistics
    mode is the caller's to check)."""
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the eager conv would compute in: the autocast dtype when autocast is on for x's device."""
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fold_batchnorm(conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
                   bn_bias: Optional[torch.Tensor], running_mean: torch.Tensor, running_var: torch.Tensor,
                   eps: float, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the convolution that equals conv -> BN(running statistics), computed in fp32 and
    returned in `dtype`; the weight keeps conv_weight's memory format."""
    out_channels = conv_weight.shape[0]
    for name, v in (("conv bias", conv_bias), ("BatchNorm weight", bn_weight), ("BatchNorm bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if v is not None and v.shape != (out_channels,):
            raise ValueError(f"{OP_NAME}: {name} must have shape ({out_channels},) for a conv with "
                             f"{out_channels} output channels; got {tuple(v.shape)}")
    scale = torch.rsqrt(running_var.float() + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.float()
    shift = -running_mean.float() if conv_bias is None else conv_bias.float() - running_mean.float()
    bias = shift * scale if bn_bias is None else torch.addcmul(bn_bias.float(), shift, scale)
    weight = conv_weight.float() * scale.view(-1, *([1] * (conv_weight.dim() - 1)))
    return weight.to(dtype), bias.to(dtype)


def conv_bn_act_reference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
                          stride=1, padding=0, dilation=1, groups=1, residual=None, relu=True) -> torch.Tensor:
    """The eager computation the folded one must equal: conv2d, BatchNorm with running statistics, add, ReLU."""
    out = F.conv2d(x, conv_weight, conv_bias, stride, padding, dilation, groups)
    out = F.batch_norm(out, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride, padding, dilation, groups: int,
           residual: Optional[torch.Tensor]) -> None:
    if x.dim() != 4:
        raise ValueError(f"{OP_NAME}: input must be 4-D (N, C, H, W); got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"{OP_NAME}: input has {x.shape[1]} channels but the conv takes "
                         f"{weight.shape[1] * groups} (weight {tuple(weight.shape)}, groups {groups})")
    if x.device != weight.device or bias.device != weight.device:
        raise ValueError(f"{OP_NAME}: input on {x.device}, weight on {weight.device}, bias on {bias.device}: "
                         "all must be on one device")
    if residual is None:
        return
    out_shape = _output_shape(x, weight, stride, padding, dilation)
    if tuple(residual.shape) != out_shape or residual.device != x.device:
        raise ValueError(f"{OP_NAME}: residual is {tuple(residual.shape)} on {residual.device} but the conv output "
                         f"is {out_shape} on {x.device}")


def _failure_key(x, weight, stride, padding, dilation, groups, residual) -> tuple:
    return (tuple(x.shape[1:]), tuple(weight.shape), x.dtype, tuple(stride), tuple(padding), tuple(dilation),
            groups, residual is not None)


def _is_device_error(e: RuntimeError) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(e, (torch.OutOfMemoryError, accelerator_error)) or "CUDA error" in str(e)


def _cudnn_fused(x, weight, bias, stride, padding, dilation, groups, residual):
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)


def uses_cudnn_fusion(x: torch.Tensor, relu: bool) -> bool:
    """Whether conv_bias_act runs this call as one fused cuDNN call."""
    return relu and x.is_cuda and torch.backends.cudnn.enabled and _cudnn_available()


@functools.lru_cache(maxsize=None)
def _cudnn_available() -> bool:
    return torch.backends.cudnn.is_available()


def _output_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> Tuple[int, int, int, int]:
    return (x.shape[0], weight.shape[0]) + tuple(
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(2))


def _has_channels_last_strides(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and t.shape[1] > 1 and t.stride(1) == 1


def output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """channels_last when the input or the weight has channels_last strides (what cuDNN and the CPU convs
    choose), else contiguous: the layout conv_bias_act's output always has (its fake kernel promises it)."""
    if _has_channels_last_strides(x) or _has_channels_last_strides(weight):
        return torch.channels_last
    return torch.contiguous_format


def _conv_bias_act_impl(x, weight, bias, stride, padding, dilation, groups, residual, relu) -> torch.Tensor:
    """conv_bias_act on checked arguments of one dtype: cuDNN's fused call where it applies, else conv2d +
    add + ReLU; the output in `output_memory_format`."""
    memory_format = output_memory_format(x, weight)
    if uses_cudnn_fusion(x, relu):
        key = None
        if _CUDNN_FAILURES:
            key = _failure_key(x, weight, stride, padding, dilation, groups, residual)
        if key is None or key not in _CUDNN_FAILURES:
            try:
                out = _cudnn_fused(x, weight, bias, stride, padding, dilation, groups, residual)
                return out.contiguous(memory_format=memory_format)
            except RuntimeError as e:
                if _is_device_error(e):  # out of memory, a CUDA error: not a fusion limit
                    raise
                _CUDNN_FAILURES.add(_failure_key(x, weight, stride, padding, dilation, groups, residual))
                warnings.warn(f"dla_fast {OP_NAME}: cuDNN could not fuse conv{tuple(weight.shape)} + bias + "
                              f"{'add + ' if residual is not None else ''}ReLU for input {tuple(x.shape)} "
                              f"{x.dtype} ({str(e).splitlines()[0]}); this configuration runs as separate "
                              "conv, add and ReLU passes")
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous(memory_format=memory_format)
    if residual is not None:
        out = out.add_(residual)
    return out.relu_() if relu else out


@torch.library.custom_op("dla_fast::conv_bias_act", mutates_args=())
def conv_bias_act_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: List[int],
                     padding: List[int], dilation: List[int], groups: int, residual: Optional[torch.Tensor],
                     relu: bool) -> torch.Tensor:
    """conv_bias_act as one opaque op for torch.compile: x, residual in the weight's dtype (checked by the
    caller); the output (N, Cout, Ho, Wo) in `output_memory_format(x, weight)`. No autograd (inference only)."""
    return _conv_bias_act_impl(x, weight, bias, stride, padding, dilation, groups, residual, relu)


@conv_bias_act_op.register_fake
def _conv_bias_act_fake(x, weight, bias, stride, padding, dilation, groups, residual, relu):
    return torch.empty(_output_shape(x, weight, stride, padding, dilation), dtype=weight.dtype, device=x.device,
                       memory_format=output_memory_format(x, weight))


def _exporting() -> bool:
    """Whether torch.export traces (not torch.compile): the module flag torch.export sets, read directly —
    torch.compiler.is_exporting() answers True under torch.compile too on torch 2.11 (dynamo folds it)."""
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


def conv_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: Sequence[int] = (1, 1),
                  padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
                  residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
    """[relu](conv2d(x, weight, bias) [+ residual]) with a folded (weight, bias) from `fold_batchnorm`.

    x and residual are cast to the weight's dtype (the autocast dtype the caller folded for). On CUDA with
    ReLU: one cuDNN fused call. If cuDNN rejects a configuration, a warning names it once and that
    configuration runs as conv2d + add + ReLU from then on (same numbers, separate passes). Under
    torch.compile: the custom op dla_fast::conv_bias_act (the same implementation); under torch.export of CPU
    tensors its aten ops (conv2d, add, relu) themselves, so that an AOTInductor package compiles them and runs
    without dla_fast.
    """
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    _check(x, weight, bias, stride, padding, dilation, groups, residual)
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    if residual is not None and residual.dtype != weight.dtype:
        residual = residual.to(weight.dtype)
    if torch.compiler.is_compiling() and (x.is_cuda or not _exporting()):
        return conv_bias_act_op(x, weight, bias, stride, padding, dilation, groups, residual, relu)
    return _conv_bias_act_impl(x, weight, bias, stride, padding, dilation, groups, residual, relu)


def conv_bn_act(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                running_var: torch.Tensor, eps: float, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                groups: int = 1, residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
    """[relu](BN_eval(conv2d(x)) [+ residual]), inference only (see `foldable`). Backend 'torch' (and 'auto'
    on CPU tensors) runs the eager reference; any other backend folds the BatchNorm into the conv (cuDNN's
    fused call on CUDA). Callers that run it often fold once with `fold_batchnorm` and call `conv_bias_act`."""
    if not foldable(x, conv_weight, conv_bias, bn_weight, bn_bias, residual):
        raise RuntimeError(f"{OP_NAME} is inference-only (no autograd): run it under torch.no_grad() or "
                           "torch.inference_mode(), or use the eager modules when gradients are needed")
    if backend.resolve(x.device, OP_NAME, x.dtype) == "torch":
        return conv_bn_act_reference(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
                                     stride, padding, dilation, groups, residual, relu)
    weight, bias = fold_batchnorm(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
                                  compute_dtype(x))
    return conv_bias_act(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups, residual, relu)


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)
