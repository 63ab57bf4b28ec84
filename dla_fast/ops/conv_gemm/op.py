"""The implicit-GEMM convolution as an op: validation (shared by every backend), the eager reference, the autograd
function over the Triton kernels, and the public entry point `conv_gemm`."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ... import backend
from .. import recompute
from ..common import cached_derived, channels_last, dense_stride, with_stride
from . import launch

OP_NAME = "conv_gemm"

# (x, scale, shift, relu): one input of the conv, with its prologue relu(x * scale + shift) (scale None: none)
Input = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], bool]

INT32_LIMIT = 2 ** 31 - 1


def check_inputs(inputs: Sequence[Input], weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                 padding: int) -> None:
    """The argument rules of `conv_gemm` on every backend: ValueError / TypeError naming what is wrong."""
    if not 1 <= len(inputs) <= 2:
        raise ValueError(f"{OP_NAME}: takes one or two inputs (their channels concatenated); got {len(inputs)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{OP_NAME}: weight must be a 4-D (Cout, Cin, KH, KW) tensor")
    for name, v in (("stride", stride), ("padding", padding)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "stride" else 0):
            raise ValueError(f"{OP_NAME}: {name} must be an int >= {1 if name == 'stride' else 0}; got {v!r}")
    x1 = inputs[0][0]
    channels = 0
    for i, (x, scale, shift, relu) in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{OP_NAME}: input {i} must be a 4-D (N, C, H, W) tensor")
        if x.dtype != weight.dtype or x.device != weight.device:
            raise TypeError(f"{OP_NAME}: input {i} is {x.dtype} on {x.device}, the weight {weight.dtype} on "
                            f"{weight.device}; they must match")
        if x.shape[0] != x1.shape[0] or x.shape[2:] != x1.shape[2:]:
            raise ValueError(f"{OP_NAME}: the inputs' batch and spatial sizes differ: {tuple(x1.shape)} and "
                             f"{tuple(x.shape)}")
        if (scale is None) != (shift is None):
            raise ValueError(f"{OP_NAME}: input {i}'s prologue needs both scale and shift, or neither")
        if not isinstance(relu, bool):
            raise TypeError(f"{OP_NAME}: relu must be True or False; got {relu!r}")
        if relu and scale is None:
            raise ValueError(f"{OP_NAME}: input {i} asks for a ReLU without a prologue (scale and shift)")
        for name, v in (("scale", scale), ("shift", shift)):
            if v is not None and (v.shape != (x.shape[1],) or v.dtype != torch.float32 or v.device != x.device):
                raise ValueError(f"{OP_NAME}: input {i}'s {name} must be an fp32 vector of {x.shape[1]} values on "
                                 f"{x.device}; got {tuple(v.shape)} {v.dtype} on {v.device}")
        channels += x.shape[1]
    if weight.shape[1] != channels:
        raise ValueError(f"{OP_NAME}: the weight takes {weight.shape[1]} input channels, the inputs have {channels} "
                         "(groups are not supported)")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{OP_NAME}: bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    kh, kw = weight.shape[2:]
    if x1.shape[2] + 2 * padding < kh or x1.shape[3] + 2 * padding < kw:
        raise ValueError(f"{OP_NAME}: a {kh}x{kw} kernel does not fit the padded {x1.shape[2]}x{x1.shape[3]} input")


def fits_int32(inputs: Sequence[Input], weight: torch.Tensor, stride: int, padding: int) -> bool:
    """Whether every element offset the kernels compute fits in int32 (their index arithmetic)."""
    x1 = inputs[0][0]
    n, _, h, w = x1.shape
    oh, ow = (h + 2 * padding - weight.shape[2]) // stride + 1, (w + 2 * padding - weight.shape[3]) // stride + 1
    return max(n * oh * ow * weight.shape[0], *(x.numel() for x, *_ in inputs), weight.numel()) <= INT32_LIMIT


def _prologue(x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
              relu: bool) -> torch.Tensor:
    if scale is None:
        return x
    a = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return (torch.relu(a) if relu else a).to(x.dtype)


def conv_gemm_reference(inputs: Sequence[Input], weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        stride: int = 1, padding: int = 0, stats: bool = False):
    """The eager form: each input through its prologue, concatenated, F.conv2d; with stats also the output's
    per-channel mean and biased variance (fp32)."""
    a = [_prologue(*inp) for inp in inputs]
    y = F.conv2d(a[0] if len(a) == 1 else torch.cat(a, 1), weight, bias, stride, padding)
    if not stats:
        return y
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
    return y, mean, var


def merge_stats(part_sum: torch.Tensor, part_m2: torch.Tensor, m: int, block_m: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) from per-tile sums and centred sums of squares (Chan's parallel formula)."""
    tiles = part_sum.shape[0]
    counts = torch.full((tiles, 1), float(block_m), dtype=torch.float32, device=part_sum.device)
    counts[-1] = float(m - (tiles - 1) * block_m)
    mean = part_sum.sum(0) / m
    tile_means = part_sum / counts
    m2 = part_m2.sum(0) + (counts * (tile_means - mean) ** 2).sum(0)
    return mean, m2 / m


def _weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight as [KH*KW*Cin, Cout] rows (tap-major, then input channel), cached per weight version."""
    cout, cin, kh, kw = weight.shape
    return cached_derived(weight, ("conv_gemm_rows",),
                          lambda: weight.detach().permute(2, 3, 1, 0).reshape(kh * kw * cin, cout).contiguous())


class ConvGemmFunction(torch.autograd.Function):
    """conv_gemm with the Triton kernels; saves each input's pre-prologue tensor, the weight and the output (which
    the statistics' gradient needs), nothing else: the prologue's output is recomputed by the backward kernels."""

    @staticmethod
    def forward(ctx, stride, padding, relus, stats, weight, bias, *flat):
        inputs = [(flat[3 * i], flat[3 * i + 1], flat[3 * i + 2], relus[i]) for i in range(len(relus))]
        inputs = [(channels_last(x), s, b, r) for x, s, b, r in inputs]
        w_rows = _weight_rows(weight)
        bias32 = None if bias is None else bias.detach().float().contiguous()
        kernel = tuple(weight.shape[2:])
        y, part_sum, part_m2 = launch.forward(inputs, w_rows, bias32, kernel, stride, padding, stats)
        ctx.meta = (stride, padding, relus, stats, kernel, bias is not None)
        ctx.save_for_backward(weight, y if stats else None, *[t for x, s, b, _ in inputs for t in (x, s, b)])
        if not stats:
            return y
        m = y.shape[0] * y.shape[2] * y.shape[3]
        block_m = launch.tile_sizes("fwd", y.shape[1], y.dtype, y.device.type, launch.dot_precision(y.dtype))[0]
        if m == 0:
            nan = torch.full((y.shape[1],), float("nan"), dtype=torch.float32, device=y.device)
            mean, var = nan, nan.clone()
        else:
            mean, var = merge_stats(part_sum, part_m2, m, block_m)
        ctx.stats_mean = mean
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, *grad_stats):
        stride, padding, relus, stats, kernel, has_bias = ctx.meta
        weight, y, *flat = ctx.saved_tensors
        inputs = [(flat[3 * i], flat[3 * i + 1], flat[3 * i + 2], relus[i]) for i in range(len(relus))]
        cout = weight.shape[0]
        g = grad_y
        if stats and any(gs is not None for gs in grad_stats):
            m = y.shape[0] * y.shape[2] * y.shape[3]
            g32 = torch.zeros_like(y, dtype=torch.float32) if g is None else g.float()
            grad_mean, grad_var = grad_stats
            if grad_mean is not None:
                g32 = g32 + (grad_mean / m).view(1, -1, 1, 1)
            if grad_var is not None:
                g32 = g32 + (grad_var * (2.0 / m)).view(1, -1, 1, 1) * (y.float() - ctx.stats_mean.view(1, -1, 1, 1))
            g = g32.to(weight.dtype)
        if g is None:
            return (None,) * (6 + len(flat))
        g = channels_last(g)
        oh, ow = g.shape[2], g.shape[3]
        g_rows = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        w_rows = _weight_rows(weight)
        cin = weight.shape[1]
        grads: List[Optional[torch.Tensor]] = []
        k_offset = 0
        for i, (x, scale, shift, relu) in enumerate(inputs):
            need_x, need_s = ctx.needs_input_grad[6 + 3 * i], scale is not None and (
                ctx.needs_input_grad[7 + 3 * i] or ctx.needs_input_grad[8 + 3 * i])
            gx = gscale = gshift = None
            if need_x or need_s:
                gx, part_gshift, part_gscale = launch.grad_input(g_rows, w_rows, x, scale, shift, relu, k_offset,
                                                                 cin, (oh, ow), kernel, stride, padding)
                if scale is not None:
                    gshift, gscale = part_gshift.sum(0), part_gscale.sum(0)
            grads += [gx if need_x else None, gscale, gshift]
            k_offset += x.shape[1]
        grad_w = grad_b = None
        if ctx.needs_input_grad[4]:
            dw = launch.grad_weight(g_rows, inputs, cin, (oh, ow), kernel, stride, padding)
            grad_w = dw.view(kernel[0], kernel[1], cin, cout).permute(3, 2, 0, 1).to(weight.dtype)
            grad_w = with_stride(grad_w.contiguous(), dense_stride(weight))
        if has_bias and ctx.needs_input_grad[5]:
            grad_b = g_rows.float().sum(0).to(weight.dtype)
        return (None, None, None, None, grad_w, grad_b, *grads)


def _affine_act(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool,
                residual: Optional[torch.Tensor]) -> torch.Tensor:
    """relu(y * scale + shift [+ residual]) in fp32, returned in y's dtype (also the recompute recipe)."""
    z = torch.addcmul(shift.view(1, -1, 1, 1), y.float(), scale.view(1, -1, 1, 1))
    if residual is not None:
        z = z + residual.float()
    return (torch.relu(z) if relu else z).to(y.dtype)


class AffineActFunction(torch.autograd.Function):
    """_affine_act without saving anything the chain does not keep anyway: the ReLU's mask comes from the output,
    which the next conv saves as its input, or — inside the memory-efficient mode, where the output is a recipe —
    is recomputed from the inputs (y, scale, shift, residual)."""

    @staticmethod
    def forward(ctx, y, scale, shift, residual, relu):
        out = _affine_act(y, scale, shift, relu, residual)
        ctx.relu, ctx.from_inputs = relu, relu and recompute.active()
        if ctx.from_inputs:
            ctx.save_for_backward(y, scale, shift, residual)
        else:
            ctx.save_for_backward(y, scale, out if relu else None)
        ctx.residual_dtype = None if residual is None else residual.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        gz = grad.float()
        if ctx.from_inputs:
            y, scale, shift, residual = ctx.saved_tensors
            z = torch.addcmul(shift.view(1, -1, 1, 1), y.float(), scale.view(1, -1, 1, 1))
            if residual is not None:
                z = z + residual.float()
            gz = torch.where(z > 0, gz, 0.0)
        else:
            y, scale, out = ctx.saved_tensors
            if ctx.relu:
                gz = torch.where(out > 0, gz, 0.0)
        grad_y = (gz * scale.view(1, -1, 1, 1)).to(y.dtype) if ctx.needs_input_grad[0] else None
        grad_scale = (gz * y.float()).sum((0, 2, 3)) if ctx.needs_input_grad[1] else None
        grad_shift = gz.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        grad_res = gz.to(ctx.residual_dtype) if ctx.residual_dtype is not None and ctx.needs_input_grad[3] else None
        return grad_y, grad_scale, grad_shift, grad_res, None


def affine_act(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool,
               residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(y * scale + shift [+ residual]) with per-channel fp32 scale / shift (a BatchNorm with known statistics):
    the one pass a conv chain writes. Saves no output for the backward; in the memory-efficient mode the output is
    declared recomputable (dla_fast.ops.recompute), so later consumers save the recipe instead of it."""
    if residual is not None and residual.shape != y.shape:
        raise ValueError(f"affine_act: residual {tuple(residual.shape)} and input {tuple(y.shape)} differ in shape")
    out = AffineActFunction.apply(y, scale, shift, residual, relu)
    recompute.recomputable(out, _affine_act, y, scale, shift, relu, residual)
    return out


def conv_gemm(inputs: Sequence[Input], weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: int = 1,
              padding: int = 0, stats: bool = False, impl: Optional[str] = None):
    """conv2d over the channel concatenation of one or two inputs (x, scale, shift, relu), each through its prologue
    relu(x * scale + shift) (scale None: the input as it is), with zero padding of the prologue's output; with
    stats also the fp32 per-channel mean and biased variance of the output (differentiable: the next BatchNorm's
    batch statistics). `impl`: 'torch' or 'triton' (default: dla_fast.backend's choice for op "conv_gemm").
    Groups and dilation are not supported."""
    inputs = [tuple(inp) for inp in inputs]
    check_inputs(inputs, weight, bias, stride, padding)
    if impl is None:
        impl = backend.resolve(weight.device, OP_NAME, weight.dtype)
    if impl == "torch":
        return conv_gemm_reference(inputs, weight, bias, stride, padding, stats)
    if not fits_int32(inputs, weight, stride, padding):
        raise ValueError(f"{OP_NAME}: tensors of 2**31 or more elements exceed the kernels' int32 offsets")
    flat = [t for x, s, b, _ in inputs for t in (x, s, b)]
    relus = tuple(r for *_, r in inputs)
    return ConvGemmFunction.apply(stride, padding, relus, stats, weight, bias, *flat)


__all__ = ["OP_NAME", "AffineActFunction", "ConvGemmFunction", "affine_act", "check_inputs", "conv_gemm",
           "conv_gemm_reference", "fits_int32", "merge_stats"]
