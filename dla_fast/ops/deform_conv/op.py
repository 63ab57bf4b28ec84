"""Validation, backend dispatch, autograd and torch.library registration of the deformable convolution."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ... import backend
from ..common import device_guard
from .launch import MASK_GIVEN, MASK_NONE, MASK_SIGMOID, backward_triton, forward_triton
from .reference import deform_conv2d_reference

OP_NAME = "deform_conv2d"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------------------
# Validation (one function for every backend and entry point)
# --------------------------------------------------------------------------------------------------------
def _pair(value, name: str, minimum: int) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"deform_conv2d: {name} must be an int or a pair of ints; got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"deform_conv2d: {name} must be >= {minimum}; got {value!r}")
    return pair


def _check_tensor(t: torch.Tensor, name: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"deform_conv2d: {name} must be a tensor; got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"deform_conv2d: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16 "
                        "(float64 on the eager reference)")
    if t.device != device:
        raise ValueError(f"deform_conv2d: {name} is on {t.device}, the input on {device}; all tensors must be "
                         "on one device")


def _check_sampling_dtype(t: torch.Tensor, name: str, input: torch.Tensor) -> None:
    """torchvision refuses offsets and masks whose dtype is not the input's; so does this op (every backend)."""
    if t.dtype != input.dtype:
        raise TypeError(f"deform_conv2d: {name} has dtype {t.dtype}, the input {input.dtype}; they must match "
                        "(as torchvision.ops.deform_conv2d)")


def check_inputs(input: torch.Tensor, weight: torch.Tensor, offset: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None, offset_mask: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1,
                 scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None, stats: bool = False,
                 grad_out: Optional[torch.Tensor] = None):
    """Raise TypeError/ValueError naming the problem; return (stride, padding, dilation) as pairs.

    Exactly one of `offset` (with optional `mask`) and `offset_mask` is given.
    """
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        raise ValueError("deform_conv2d: input must be a 4-D (B, Cin, H, W) tensor; got "
                         f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}")
    device = input.device
    _check_tensor(input, "input", device)
    _check_tensor(weight, "weight", device)
    if weight.dim() != 4:
        raise ValueError(f"deform_conv2d: weight must be 4-D (Cout, Cin, kh, kw); got {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"deform_conv2d: weight has dtype {weight.dtype}, the input {input.dtype}; they must match")
    stride, padding, dilation = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    b, cin, h, w = input.shape
    cout, cin_per_group, kh, kw = weight.shape
    if cin_per_group == 0 or cin % cin_per_group != 0 or kh == 0 or kw == 0 or cout == 0:
        raise ValueError(f"deform_conv2d: weight {tuple(weight.shape)} does not fit the input's {cin} channels "
                         "(weight.shape[1] must divide Cin; kernel and Cout must be non-empty)")
    if cin_per_group != cin:
        raise ValueError(f"deform_conv2d: weight groups = {cin // cin_per_group} (input has {cin} channels, weight "
                         f"{cin_per_group} per group) are not supported; only groups=1 (weight.shape[1] == Cin)")
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"deform_conv2d: input {h}x{w} is too small for kernel {kh}x{kw}, padding {padding}, "
                         f"dilation {dilation} (output would be {ho}x{wo})")
    taps = kh * kw
    if (offset is None) == (offset_mask is None):
        raise ValueError("deform_conv2d: give exactly one of offset (with optional mask) and offset_mask")
    if offset_mask is not None:
        if mask is not None:
            raise ValueError("deform_conv2d: offset_mask carries the mask logits; do not pass mask with it")
        om = offset_mask
        _check_tensor(om, "offset_mask", device)
        _check_sampling_dtype(om, "offset_mask", input)
        groups = om.shape[1] // (3 * taps) if om.dim() == 4 else 0
        if (om.dim() != 4 or groups == 0 or om.shape[1] != 3 * groups * taps or cin % groups != 0
                or tuple(om.shape[::2]) != (b, ho) or om.shape[3] != wo):
            raise ValueError(f"deform_conv2d: offset_mask must have shape (B, 3*G*kh*kw, Ho, Wo) = ({b}, "
                             f"{3 * taps}*G, {ho}, {wo}) with G offset groups dividing Cin={cin}; "
                             f"got {tuple(om.shape)}")
    else:
        _check_tensor(offset, "offset", device)
        _check_sampling_dtype(offset, "offset", input)
        groups = offset.shape[1] // (2 * taps) if offset.dim() == 4 else 0
        if (offset.dim() != 4 or groups == 0 or offset.shape[1] != 2 * groups * taps or cin % groups != 0
                or offset.shape[0] != b or tuple(offset.shape[2:]) != (ho, wo)):
            raise ValueError(f"deform_conv2d: offset must have shape (B, 2*G*kh*kw, Ho, Wo) = ({b}, {2 * taps}*G, "
                             f"{ho}, {wo}) with G offset groups dividing Cin={cin}; got {tuple(offset.shape)}")
        if mask is not None:
            _check_tensor(mask, "mask", device)
            _check_sampling_dtype(mask, "mask", input)
            if tuple(mask.shape) != (b, groups * taps, ho, wo):
                raise ValueError(f"deform_conv2d: mask must have shape (B, G*kh*kw, Ho, Wo) = "
                                 f"{(b, groups * taps, ho, wo)} (G={groups} offset groups); got {tuple(mask.shape)}")
    for name, vector in (("bias", bias), ("scale", scale), ("shift", shift)):
        if vector is not None:
            _check_tensor(vector, name, device)
            if tuple(vector.shape) != (cout,):
                raise ValueError(f"deform_conv2d: {name} must have shape ({cout},) (one value per output channel); "
                                 f"got {tuple(vector.shape)}")
    if (scale is None) != (shift is None):
        raise ValueError("deform_conv2d: give scale and shift together (out = y*scale + shift) or neither")
    if stats and b * ho * wo == 0:
        raise ValueError("deform_conv2d: stats=True needs at least one output pixel (the batch is empty)")
    if grad_out is not None:
        _check_tensor(grad_out, "grad_out", device)
        if tuple(grad_out.shape) != (b, cout, ho, wo):
            raise ValueError(f"deform_conv2d: grad_out must have shape {(b, cout, ho, wo)}; "
                             f"got {tuple(grad_out.shape)}")
    return stride, padding, dilation


def _implementation(input: torch.Tensor) -> str:
    """'torch' or 'triton' for these inputs, from dla_fast.backend (BackendUnavailable when impossible)."""
    impl = backend.resolve(input.device, OP_NAME)
    if impl == "torch":
        return impl
    if input.dtype == torch.float64:
        if backend.get_backend() == "auto":
            return "torch"
        raise backend.BackendUnavailable(f"dla_fast backend {impl!r} cannot run op {OP_NAME!r} on float64 "
                                         "tensors (kernels take float32, float16, bfloat16); use backend 'torch'")
    problem = backend.unavailable_reason("triton", input.device)
    if problem is not None:  # backend 'cuda': this op has Triton kernels only
        raise backend.BackendUnavailable(f"dla_fast backend {impl!r} cannot run op {OP_NAME!r}: its kernels are "
                                         f"Triton kernels, and {problem}")
    return "triton"


# --------------------------------------------------------------------------------------------------------
# Eager reference of the building blocks (backend 'torch')
# --------------------------------------------------------------------------------------------------------
def _split_offset_mask(offset_mask: torch.Tensor, taps: int):
    groups = offset_mask.shape[1] // (3 * taps)
    return offset_mask[:, :2 * groups * taps], torch.sigmoid(offset_mask[:, 2 * groups * taps:])


def _forward_reference(input, weight, bias, stride, padding, dilation, offset, mask, offset_mask, scale, shift,
                       relu, stats):
    taps = weight.shape[2] * weight.shape[3]
    if offset_mask is not None:
        offset, mask = _split_offset_mask(offset_mask, taps)
    y = deform_conv2d_reference(input, offset, weight, bias, stride, padding, dilation, mask)
    if stats:
        var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    else:
        mean = var = y.new_empty(0, dtype=torch.float32)
    out = y
    if scale is not None:
        out = (y.float() * scale.float()[None, :, None, None] + shift.float()[None, :, None, None]).to(y.dtype)
    if relu:
        out = torch.where(out < 0, torch.zeros((), dtype=out.dtype, device=out.device), out)
    return out, mean, var


def _backward_reference(grad_out, input, weight, stride, padding, dilation, offset, mask, offset_mask, needs):
    need_input, need_offset, need_weight, need_bias = needs
    taps = weight.shape[2] * weight.shape[3]
    with torch.enable_grad():
        x = input.detach().requires_grad_(need_input)
        w = weight.detach().requires_grad_(need_weight)
        b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device, requires_grad=need_bias)
        if offset_mask is not None:
            om = offset_mask.detach().requires_grad_(need_offset)
            off, m = _split_offset_mask(om, taps)
            leaves = [x, om, None, w, b]
        else:
            off = offset.detach().requires_grad_(need_offset)
            m = None if mask is None else mask.detach().requires_grad_(need_offset)
            leaves = [x, off, m, w, b]
        y = deform_conv2d_reference(x, off, w, b, stride, padding, dilation, m)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad_out.to(y.dtype)) if wanted else ())
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in leaves)


# --------------------------------------------------------------------------------------------------------
# Custom ops (Triton kernels) and autograd
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("dla_fast::deform_conv2d_fwd", mutates_args=())
def deform_conv2d_fwd(input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                      bias: Optional[torch.Tensor], stride: List[int], padding: List[int], dilation: List[int],
                      mask_mode: int, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], relu: bool,
                      stats: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, var) of the Triton forward; mask_mode 2: `offset` is the offset-mask tensor."""
    backend.require_traced("triton", input.device, OP_NAME)
    with device_guard(input):
        return forward_triton(input, offset, mask, weight, bias, stride, padding, dilation, mask_mode, scale,
                              shift, relu, stats)


@deform_conv2d_fwd.register_fake
def _(input, offset, mask, weight, bias, stride, padding, dilation, mask_mode, scale, shift, relu, stats):
    b, cout = input.shape[0], weight.shape[0]
    ho, wo = offset.shape[-2:]
    out = input.new_empty((b, cout, ho, wo)).contiguous(memory_format=torch.channels_last)
    stat = input.new_empty((cout,) if stats else (0,), dtype=torch.float32)
    return out, stat, stat.clone()


@torch.library.custom_op("dla_fast::deform_conv2d_bwd", mutates_args=())
def deform_conv2d_bwd(grad_out: torch.Tensor, input: torch.Tensor, offset: torch.Tensor,
                      mask: Optional[torch.Tensor], weight: torch.Tensor, stride: List[int], padding: List[int],
                      dilation: List[int], mask_mode: int, needs: List[bool]
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad input, grad offset [or offset-mask], grad mask, grad weight, grad bias); an empty tensor of shape
    (0,) where not needed (or no mask)."""
    backend.require_traced("triton", input.device, OP_NAME)
    with device_guard(input):
        grads = backward_triton(grad_out, input, offset, mask, weight, stride, padding, dilation, mask_mode, needs)
    return tuple(input.new_empty(0) if g is None else g for g in grads)


@deform_conv2d_bwd.register_fake
def _(grad_out, input, offset, mask, weight, stride, padding, dilation, mask_mode, needs):
    need_input, need_offset, need_weight, need_bias = needs
    return (torch.empty_like(input, memory_format=torch.channels_last) if need_input else input.new_empty(0),
            offset.new_empty(offset.shape) if need_offset else input.new_empty(0),
            mask.new_empty(mask.shape) if need_offset and mask is not None else input.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else input.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_bias else input.new_empty(0))


def _grads_for_inputs(ctx, grad_out, needs_input_grad):
    """Gradients of (input, offset, mask, weight, bias) for an autograd backward of the plain op."""
    input, offset, mask, weight = ctx.saved_tensors
    stride, padding, dilation, mask_mode = ctx.config
    needs = [bool(needs_input_grad[0]), bool(needs_input_grad[1] or needs_input_grad[2]),
             bool(needs_input_grad[3]), bool(needs_input_grad[4])]
    grads = deform_conv2d_bwd(grad_out, input, offset, mask, weight, stride, padding, dilation, mask_mode, needs)
    flags = (needs[0], needs[1], needs[1] and mask is not None, needs[2], needs[3])
    return [g if flag else None for g, flag in zip(grads, flags)]


def _setup_context(ctx, inputs, output):
    input, offset, mask, weight, bias, stride, padding, dilation, mask_mode, scale, shift, relu, stats = inputs
    if scale is not None or relu:
        ctx.not_differentiable = True
    ctx.save_for_backward(input, offset, mask, weight)
    ctx.config = (list(stride), list(padding), list(dilation), mask_mode)


def _custom_op_backward(ctx, grad_out, _grad_mean, _grad_var):
    if getattr(ctx, "not_differentiable", False):
        raise RuntimeError("dla_fast deform_conv2d: the scale/shift/ReLU epilogue is for inference and has no "
                           "autograd; differentiate y = conv + bias with deform_conv2d_backward instead")
    grads = _grads_for_inputs(ctx, grad_out, ctx.needs_input_grad[:5])
    return (*grads, None, None, None, None, None, None, None, None)


deform_conv2d_fwd.register_autograd(_custom_op_backward, setup_context=_setup_context)


class _DeformConv2dFunction(torch.autograd.Function):
    """Eager-mode autograd of the plain op (the least host overhead per call)."""

    @staticmethod
    def forward(ctx, input, offset, mask, weight, bias, stride, padding, dilation):
        mask_mode = MASK_NONE if mask is None else MASK_GIVEN
        with device_guard(input):
            out, _, _ = forward_triton(input, offset, mask, weight, bias, stride, padding, dilation, mask_mode,
                                       None, None, False, False)
        ctx.save_for_backward(input, offset, mask, weight)
        ctx.config = (list(stride), list(padding), list(dilation), mask_mode)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return (*_grads_for_inputs(ctx, grad_out, ctx.needs_input_grad[:5]), None, None, None)


# --------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------
def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  stride=1, padding=0, dilation=1, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torchvision.ops.deform_conv2d, fused (see the package docstring). Returns [B, Cout, Ho, Wo] in the
    input's dtype (channels_last memory format from the Triton kernels)."""
    stride, padding, dilation = check_inputs(input, weight, offset=offset, mask=mask, bias=bias, stride=stride,
                                             padding=padding, dilation=dilation)
    if _implementation(input) == "torch":
        return deform_conv2d_reference(input, offset, weight, bias, stride, padding, dilation, mask)
    if torch.compiler.is_compiling():
        return deform_conv2d_fwd(input, offset, mask, weight, bias, list(stride), list(padding), list(dilation),
                                 MASK_NONE if mask is None else MASK_GIVEN, None, None, False, False)[0]
    return _DeformConv2dFunction.apply(input, offset, mask, weight, bias, stride, padding, dilation)


def deform_conv2d_forward(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1,
                          padding=0, dilation=1, *, offset: Optional[torch.Tensor] = None,
                          mask: Optional[torch.Tensor] = None, offset_mask: Optional[torch.Tensor] = None,
                          scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                          relu: bool = False, stats: bool = False
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, var): the fused block's forward building block (see the package docstring)."""
    stride, padding, dilation = check_inputs(input, weight, offset=offset, mask=mask, offset_mask=offset_mask,
                                             bias=bias, stride=stride, padding=padding, dilation=dilation,
                                             scale=scale, shift=shift, stats=stats)
    with torch.no_grad():
        if _implementation(input) == "torch":
            return _forward_reference(input, weight, bias, stride, padding, dilation, offset, mask, offset_mask,
                                      scale, shift, relu, stats)
        if offset_mask is not None:
            offset, mask_mode = offset_mask, MASK_SIGMOID
        else:
            mask_mode = MASK_NONE if mask is None else MASK_GIVEN
        return deform_conv2d_fwd(input, offset, mask, weight, bias, list(stride), list(padding), list(dilation),
                                 mask_mode, scale, shift, relu, stats)


def deform_conv2d_backward(grad_out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, stride=1, padding=0,
                           dilation=1, *, offset: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                           offset_mask: Optional[torch.Tensor] = None,
                           needs_input_grad: Sequence[bool] = (True, True, True, True)
                           ) -> Tuple[Optional[torch.Tensor], ...]:
    """(grad_input, grad_offset, grad_mask, grad_weight, grad_bias) of y = conv + bias (see the package
    docstring); with offset_mask, grad_offset is the offset-mask tensor's gradient and grad_mask is None."""
    stride, padding, dilation = check_inputs(input, weight, offset=offset, mask=mask, offset_mask=offset_mask,
                                             stride=stride, padding=padding, dilation=dilation, grad_out=grad_out)
    needs = [bool(n) for n in needs_input_grad]
    if len(needs) != 4:
        raise ValueError("deform_conv2d_backward: needs_input_grad has four flags (input, offset/mask/offset_mask, "
                         f"weight, bias); got {needs_input_grad!r}")
    if _implementation(input) == "torch":
        return _backward_reference(grad_out, input, weight, stride, padding, dilation, offset, mask, offset_mask,
                                   needs)
    if offset_mask is not None:
        offset, mask_mode = offset_mask, MASK_SIGMOID
    else:
        mask_mode = MASK_NONE if mask is None else MASK_GIVEN
    grads = deform_conv2d_bwd(grad_out, input, offset, mask, weight, list(stride), list(padding), list(dilation),
                              mask_mode, needs)
    flags = (needs[0], needs[1], needs[1] and mask_mode == MASK_GIVEN, needs[2], needs[3])
    return tuple(g if flag else None for g, flag in zip(grads, flags))
