"""CenterNet's DCN block fused: offset-mask tensor -> modulated deformable conv (+ bias) -> BatchNorm2d -> ReLU.

The block of CenterNet's IDA steps (`DeformConv` there, dla_fast.models.centernet.IDAConv(deformable=True)):

    om = conv_offset_mask(x)                      # plain 3x3 conv, (N, 3*K, H, W), K = kh*kw taps
    offset, mask = om[:, :2K], sigmoid(om[:, 2K:])
    y = deform_conv2d(x, offset, weight, bias, padding, mask=mask)
    out = relu(batch_norm(y))

The offset-mask conv stays a plain convolution (cuDNN) outside this op; `dcn_block(x, om, ...)` takes om as
that conv wrote it and the deformable-conv kernels split it and apply the sigmoid while loading (the op's
offset-mask mode: the offset and mask tensors are never materialised).

- Inference (BatchNorm with running statistics, no gradient wanted): `dcn_block_inference` takes a weight and
  bias with the BatchNorm folded in (`conv_bn_act.fold_batchnorm`, computed in fp32; callers cache it) and
  applies the ReLU in the kernel's epilogue: one kernel writes the block's output once.
- Training (batch statistics): the deformable conv's epilogue also reduces the per-channel batch mean and
  variance of its output y (the op's statistics mode); the running statistics are updated exactly as
  nn.BatchNorm2d does (momentum, momentum=None, num_batches_tracked), then one normalize + ReLU pass
  (`batchnorm_act.bn_apply`). Backward: `bn_backward_reduce` + `bn_backward_apply` give the gradient of y and
  of the BatchNorm's affine parameters, then the deformable conv's backward the gradients of x, om, weight and
  bias. The gradient reaching om flows on through the offset-mask conv by ordinary autograd.
- BatchNorm in eval mode while gradients are wanted: the same Function, normalizing with the running
  statistics (constant), so the gradients of every parameter are exact.
- SyncBatchNorm (`sync=True`, its `process_group`; dla_fast.ops.sync_stats): in training in an initialized process
  group of more than one rank, the same Function merges the epilogue's local mean and variance over the group
  (`merge_batch_stats`; an empty local batch counts 0) before the normalize pass, updates the running statistics
  with the global count, and all-reduces the backward's two per-channel sums before the input-gradient pass (the
  BatchNorm's weight and bias gradients stay local, as nn.SyncBatchNorm). Eager under torch.compile (the
  collectives are not traced); backend 'torch': the deformable conv's reference, `sync_batch_norm_reference`, ReLU.

`dcn_block_reference` is the eager computation all of this must equal. Activations may be NCHW or
channels_last (the fast path); fp32, fp16 or bf16 with fp32 accumulation and fp32 statistics.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ... import backend
from .. import recompute, sync_stats
from ..batchnorm_act import batchnorm_act, batchnorm_act_reference, bn_apply, bn_backward_apply, bn_backward_reduce
from ..common import channels_last, check_channel_vectors, empty_channels_last, fp32_vector, rows_view
from ..running_stats import check_batchnorm_args, update_running_stats, uses_batch_stats
from .reference import deform_conv2d_reference

OP_NAME = "dcn_block"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(i) for i in v)


def split_offset_mask(offset_mask: torch.Tensor, taps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(offset, mask) of an offset-mask tensor (N, 3*taps, H, W): offset = channels [0, 2*taps) (the (dy, dx) of
    tap k at 2k, 2k+1), mask = sigmoid(channels [2*taps, 3*taps))."""
    return offset_mask[:, :2 * taps], torch.sigmoid(offset_mask[:, 2 * taps:])


def dcn_block_reference(x, offset_mask, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                        num_batches_tracked=None, training=False, momentum=0.1, eps=1e-5, stride=1, padding=1,
                        dilation=1, relu=True):
    """The eager block: split + sigmoid of the offset-mask tensor, modulated deformable conv with bias (the op's
    eager reference), nn.BatchNorm2d (running-statistics bookkeeping included), ReLU."""
    taps = weight.shape[2] * weight.shape[3]
    offset, mask = split_offset_mask(offset_mask, taps)
    y = deform_conv2d_reference(x, offset, weight, bias, stride, padding, dilation, mask)
    return batchnorm_act_reference(y, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training,
                                   momentum, eps, relu=relu)


# --------------------------------------------------------------------------------------------------------
# The deformable conv steps (the op's kernels, offset-mask mode)
# --------------------------------------------------------------------------------------------------------

def _op():
    """The deformable-conv package (imported at call time: its __init__ may import this module)."""
    from .. import deform_conv

    return deform_conv


def _conv_forward(x, offset_mask, weight, bias, geometry, relu: bool, stats: bool):
    """(y, batch_mean, batch_var): y = [relu](deform_conv2d(x, split(offset_mask), weight, bias)), (N, Cout, Ho,
    Wo) channels_last in x's dtype, one kernel; with stats also the fp32 [Cout] mean and biased variance of y
    (reduced in the kernel's epilogue, merged by one small kernel)."""
    y, mean, var = _op().deform_conv2d_forward(x, weight, bias, *geometry, offset_mask=offset_mask, relu=relu,
                                               stats=stats)
    return y, mean, var


def _conv_backward(grad_y, x, offset_mask, weight, geometry, needs):
    """Gradients (x, offset_mask, weight, bias) of y = deform_conv2d(x, split(offset_mask), weight, bias); an entry
    is None where `needs` (four bools) says it is not wanted."""
    grad_x, grad_om, _, grad_w, grad_b = _op().deform_conv2d_backward(
        grad_y, x, weight, *geometry, offset_mask=offset_mask, needs_input_grad=tuple(needs))
    return grad_x, grad_om, grad_w, grad_b


def _out_shape(x, weight, geometry) -> Tuple[int, int, int, int]:
    stride, padding, dilation = geometry
    sizes = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
             for i in range(2)]
    return (x.shape[0], weight.shape[0], *sizes)


# --------------------------------------------------------------------------------------------------------
# Training / gradient path: deformable conv with statistics -> BN + ReLU, and its backward
# --------------------------------------------------------------------------------------------------------

def _normalize_again(y, mean, var, bn_weight32, bn_bias32, eps, bn_impl):
    """relu(BN(y)): the forward's normalize pass once more (memory-efficient mode, dla_fast.ops.recompute)."""
    out = empty_channels_last(y.shape, y.dtype, y.device)
    bn_apply(rows_view(y), mean, var, bn_weight32, bn_bias32, eps, relu=True, impl=bn_impl, out=rows_view(out))
    return out


class _DCNBlockFunction(torch.autograd.Function):
    """relu(batch_norm(deform_conv2d(x, split(om), weight, bias))) with exact gradients of x, om, weight, bias and
    the BatchNorm's weight and bias. use_batch_stats: normalize with the batch's statistics (reduced in the
    conv's epilogue) and update `running` = (running_mean, running_var, num_batches_tracked, momentum) or None;
    otherwise with the running statistics. group: None, or the process group a SyncBatchNorm synchronizes over
    (use_batch_stats only): the statistics are merged over it, running statistics updated with the global count,
    and the backward's sums for the input gradient all-reduced over it."""

    @staticmethod
    def forward(ctx, x, offset_mask, weight, bias, bn_weight, bn_bias, running_mean, running_var, geometry,
                use_batch_stats, eps, running, bn_impl, group=None):
        x, offset_mask = channels_last(x), channels_last(offset_mask)
        shape = _out_shape(x, weight, geometry)
        count = shape[0] * shape[2] * shape[3]
        ctx.sync = None
        if use_batch_stats:
            if count == 0:
                y = empty_channels_last(shape, x.dtype, x.device)
                mean = var = x.new_zeros(shape[1], dtype=torch.float32)
            else:
                y, mean, var = _conv_forward(x, offset_mask, weight, bias, geometry, relu=False, stats=True)
            if group is not None:
                mean, var, total = sync_stats.merge_batch_stats(mean, var, count, group)
                ctx.sync = (group, total)
                if running is not None:
                    running_mean, running_var, num_batches_tracked, momentum = running
                    if num_batches_tracked is not None:
                        num_batches_tracked.add_(1)
                    sync_stats.update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean,
                                                    var, total)
            elif running is not None:
                update_running_stats(*running, mean, var, count)
        else:
            y, _, _ = _conv_forward(x, offset_mask, weight, bias, geometry, relu=False, stats=False)
            mean, var = fp32_vector(running_mean), fp32_vector(running_var)
        bn_weight32, bn_bias32 = fp32_vector(bn_weight), fp32_vector(bn_bias)
        out = empty_channels_last(shape, y.dtype, y.device)
        bn_apply(rows_view(y), mean, var, bn_weight32, bn_bias32, eps, relu=True, impl=bn_impl, out=rows_view(out))
        if recompute.active():  # out is saved (here: the ReLU mask; by the next conv) as its recipe
            recompute.recomputable(out, _normalize_again, y, mean if use_batch_stats else mean.clone(),
                                   var if use_batch_stats else var.clone(), bn_weight32, bn_bias32, eps, bn_impl)
        ctx.save_for_backward(x, offset_mask, weight, bn_weight, y, out, mean, var)
        ctx.geometry, ctx.use_batch_stats, ctx.eps, ctx.bn_impl = geometry, use_batch_stats, eps, bn_impl
        ctx.bn_bias_dtype = None if bn_bias is None else bn_bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, offset_mask, weight, bn_weight, y, out, mean, var = ctx.saved_tensors
        need_x, need_om, need_w, need_b, need_bn_w, need_bn_b = ctx.needs_input_grad[:6]
        y2d, out2d = rows_view(y), rows_view(out)
        grad_out2d = rows_view(channels_last(grad_out.to(out.dtype)))
        sum_g, sum_g_xhat = bn_backward_reduce(grad_out2d, out2d, y2d, mean, var, ctx.eps, True, impl=ctx.bn_impl)
        grads = (None, None, None, None)
        if need_x or need_om or need_w or need_b:
            grad_y = empty_channels_last(y.shape, y.dtype, y.device)
            batch_sums = (sum_g, sum_g_xhat) if ctx.use_batch_stats else (None, None)
            if ctx.sync is not None:  # the weight and bias gradients below stay this rank's
                batch_sums = sync_stats.all_reduce_grad_sums(sum_g, sum_g_xhat, ctx.sync[0], y2d.shape[0],
                                                             ctx.sync[1])
            bn_backward_apply(grad_out2d, out2d, y2d, mean, var, fp32_vector(bn_weight), ctx.eps, True,
                              *batch_sums, impl=ctx.bn_impl, out=(rows_view(grad_y), None))
            grads = _conv_backward(grad_y, x, offset_mask, weight, ctx.geometry,
                                   (need_x, need_om, need_w, need_b))
        grad_bn_w = sum_g_xhat.to(bn_weight.dtype) if need_bn_w else None
        grad_bn_b = sum_g.to(ctx.bn_bias_dtype) if need_bn_b else None
        return (*grads, grad_bn_w, grad_bn_b, None, None, None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------

def _geometry(stride, padding, dilation):
    return _pair(stride), _pair(padding), _pair(dilation)


def check_inputs(x: torch.Tensor, offset_mask: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 geometry, **channel_vectors: Optional[torch.Tensor]) -> None:
    """ValueError/TypeError naming the argument for anything the block cannot take (every backend)."""
    for name, t in (("input", x), ("offset_mask", offset_mask), ("weight", weight)):
        if t.dim() != 4:
            raise ValueError(f"{OP_NAME}: {name} must be 4-D; got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{OP_NAME}: {name} must be a floating-point tensor; got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{OP_NAME}: {name} is on {t.device}, input on {x.device}: all must be on one device")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{OP_NAME}: input has {x.shape[1]} channels but weight {tuple(weight.shape)} takes "
                         f"{weight.shape[1]} (groups 1)")
    taps = weight.shape[2] * weight.shape[3]
    n, _, ho, wo = _out_shape(x, weight, geometry)
    expected = (n, 3 * taps, ho, wo)
    if tuple(offset_mask.shape) != expected:
        raise ValueError(f"{OP_NAME}: offset_mask must have shape {expected} (2*{taps} offset channels, then "
                         f"{taps} mask logits, at the output size); got {tuple(offset_mask.shape)}")
    check_channel_vectors(OP_NAME, weight.shape[0], x.device, bias=bias, **channel_vectors)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def dcn_block(x: torch.Tensor, offset_mask: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
              running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor] = None,
              training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
              stride: Sequence[int] = 1, padding: Sequence[int] = 1, dilation: Sequence[int] = 1,
              sync: bool = False, process_group=None) -> torch.Tensor:
    """relu(BatchNorm2d(deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask))) with autograd,
    offset = offset_mask[:, :2K], mask = sigmoid(offset_mask[:, 2K:]) (K = kh*kw), nn.BatchNorm2d semantics.

    x: (N, Cin, H, W); offset_mask: (N, 3K, Ho, Wo); weight: (Cout, Cin, kh, kw); bias, bn_weight, bn_bias,
    running_mean, running_var: [Cout] or None; num_batches_tracked: the BatchNorm's counter. Running statistics
    are updated in place in training (momentum=None: cumulative average). Under autocast the block computes in
    the autocast dtype (fp32 statistics). Returns (N, Cout, Ho, Wo), channels_last. Backend 'torch' (and 'auto'
    on CPU tensors, and fp64) runs `dcn_block_reference`; otherwise the deformable conv runs in the op's Triton
    kernels and the BatchNorm steps in the `batchnorm_act` building blocks. Under torch.compile the block is
    traced as the op's deform_conv2d custom op (split and sigmoid left to inductor) then `batchnorm_act`.
    sync, process_group: nn.SyncBatchNorm's semantics (sync=True for one; process_group None is the whole
    world): in training in an initialized process group of more than one rank, the batch statistics and the
    backward's reductions are synchronized over the group (dla_fast.ops.sync_stats; eager under torch.compile),
    otherwise plain BatchNorm.
    """
    geometry = _geometry(stride, padding, dilation)
    check_inputs(x, offset_mask, weight, bias, geometry, bn_weight=bn_weight, bn_bias=bn_bias,
                 running_mean=running_mean, running_var=running_var)
    group = sync_stats.sync_group(sync, process_group, training)
    shape = _out_shape(x, weight, geometry)
    check_batchnorm_args(OP_NAME, _compute_dtype(x), shape[1], shape[0] * shape[2] * shape[3], x.device,
                         weight=bn_weight, bias=bn_bias, running_mean=running_mean, running_var=running_var,
                         num_batches_tracked=num_batches_tracked, training=training, momentum=momentum, eps=eps,
                         synchronized=group is not None)
    impl = backend.resolve(x.device, OP_NAME)
    dtype = _compute_dtype(x)
    reference = impl == "torch" or (dtype not in SUPPORTED_DTYPES and backend.get_backend() == "auto")
    if not reference and dtype not in SUPPORTED_DTYPES:
        raise backend.BackendUnavailable(f"{OP_NAME}: the {impl} kernels take {', '.join(map(str, SUPPORTED_DTYPES))};"
                                         f" got {dtype}")
    if group is not None:
        return _dcn_block_synchronized(x, offset_mask, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                       num_batches_tracked, momentum, eps, geometry, group, reference, dtype)
    if reference:
        return dcn_block_reference(x, offset_mask, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                   num_batches_tracked, training, momentum, eps, *geometry)
    use_batch_stats = uses_batch_stats(training, running_mean, running_var)
    running = None
    if training and running_mean is not None:
        running = (running_mean, running_var, num_batches_tracked, momentum)
    x, offset_mask, weight, bias = (_cast(t, dtype) for t in (x, offset_mask, weight, bias))
    if torch.compiler.is_compiling():  # traced: the op's custom ops with autograd, BN + ReLU as batchnorm_act
        offset, mask = split_offset_mask(offset_mask, weight.shape[2] * weight.shape[3])
        y = _op().deform_conv2d(x, offset, weight, bias, *geometry, mask)
        return batchnorm_act(y, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training,
                             momentum, eps)
    bn_impl = backend.resolve(x.device, "batchnorm_act")
    return _DCNBlockFunction.apply(x, offset_mask, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                   geometry, use_batch_stats, eps, running, bn_impl)


@torch.compiler.disable
def _dcn_block_synchronized(x, offset_mask, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                            num_batches_tracked, momentum, eps, geometry, group, reference: bool,
                            dtype: torch.dtype) -> torch.Tensor:
    """dcn_block in training with the BatchNorm's statistics synchronized over `group` (eager even under
    torch.compile: the collectives are not traced). reference: the deformable conv's eager reference, then
    sync_stats.sync_batch_norm_reference and ReLU; otherwise _DCNBlockFunction over the group, computing in
    `dtype` (the autocast dtype)."""
    if reference:
        offset, mask = split_offset_mask(offset_mask, weight.shape[2] * weight.shape[3])
        y = deform_conv2d_reference(x, offset, weight, bias, *geometry, mask)
        return torch.relu(sync_stats.sync_batch_norm_reference(y, bn_weight, bn_bias, running_mean, running_var,
                                                               num_batches_tracked, momentum, eps, group))
    running = None if running_mean is None else (running_mean, running_var, num_batches_tracked, momentum)
    x, offset_mask, weight, bias = (_cast(t, dtype) for t in (x, offset_mask, weight, bias))
    bn_impl = backend.resolve(x.device, "batchnorm_act")
    return _DCNBlockFunction.apply(x, offset_mask, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                   geometry, True, eps, running, bn_impl, group)


def dcn_block_inference(x: torch.Tensor, offset_mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        stride: Sequence[int] = 1, padding: Sequence[int] = 1,
                        dilation: Sequence[int] = 1) -> torch.Tensor:
    """relu(deform_conv2d(x, split(offset_mask), weight, bias)) with a BatchNorm-folded (weight, bias) from
    `conv_bn_act.fold_batchnorm` (fp32 fold, in the dtype the block computes in): one kernel, the ReLU in its
    epilogue. Inference only (no autograd). x and offset_mask are cast to weight's dtype. Backend 'torch' (and
    'auto' on CPU tensors) runs the eager deformable conv and ReLU. Returns (N, Cout, Ho, Wo), channels_last."""
    geometry = _geometry(stride, padding, dilation)
    check_inputs(x, offset_mask, weight, bias, geometry)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, offset_mask, weight, bias)):
        raise RuntimeError(f"{OP_NAME}: dcn_block_inference has no autograd; run it under torch.no_grad() or use "
                           "dcn_block")
    x, offset_mask = _cast(x, weight.dtype), _cast(offset_mask, weight.dtype)
    impl = backend.resolve(x.device, OP_NAME)
    if impl == "torch" or (weight.dtype not in SUPPORTED_DTYPES and backend.get_backend() == "auto"):
        offset, mask = split_offset_mask(offset_mask, weight.shape[2] * weight.shape[3])
        return channels_last(torch.relu(deform_conv2d_reference(x, offset, weight, bias, *geometry, mask)))
    if weight.dtype not in SUPPORTED_DTYPES:
        raise backend.BackendUnavailable(f"{OP_NAME}: the {impl} kernels take {', '.join(map(str, SUPPORTED_DTYPES))};"
                                         f" got {weight.dtype}")
    y, _, _ = _conv_forward(channels_last(x), channels_last(offset_mask), weight, bias, geometry, relu=True,
                            stats=False)
    return y
