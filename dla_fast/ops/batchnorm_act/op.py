"""The fused op's host code: eager reference, argument checks, forward and backward on 4-D tensors, the eager
autograd.Functions (plain and synchronized), the torch.library custom ops (torch.compile) and the public op
`batchnorm_act`."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ... import backend
from ..common import (ValidatedSignatures, channels_last, empty_channels_last, fp32_vector, rows_view,
                      tensor_signature)
from .. import recompute, sync_stats
from ..running_stats import check_batchnorm_args, update_running_stats, uses_batch_stats
from .blocks import (_bn_apply_impl, _bn_backward_apply_impl, _bn_backward_reduce_impl, _channel_stats_impl,
                     _check_impl)

OP_NAME = "batchnorm_act"



# --------------------------------------------------------------------------------------------------------
# Eager reference
# --------------------------------------------------------------------------------------------------------

def batchnorm_act_reference(x, weight, bias, running_mean, running_var, num_batches_tracked=None,
                            training=False, momentum=0.1, eps=1e-5, residual=None, relu=True):
    """nn.BatchNorm2d.forward (running-stat bookkeeping included), then `+ residual`, then ReLU, in eager ops."""
    factor = 0.0 if momentum is None else momentum
    if training and running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    y = F.batch_norm(x, running_mean, running_var, weight, bias,
                     uses_batch_stats(training, running_mean, running_var), factor, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y



# --------------------------------------------------------------------------------------------------------
# The fused op's forward and backward, shared by the eager autograd.Function and the custom ops
# --------------------------------------------------------------------------------------------------------

def _forward(x, weight, bias, running_mean, running_var, residual, use_batch_stats, eps, relu, impl, running=None):
    """(out, batch_mean, batch_var) as batchnorm_act_forward, the statistics None without use_batch_stats.
    running: None, or (running_mean, running_var, num_batches_tracked or None, momentum or None) to update in
    place with this batch (training, eager)."""
    n, c, h, w = x.shape
    out = empty_channels_last(x.shape, x.dtype, x.device)
    mean = var = None
    if use_batch_stats:
        mean = x.new_empty(c, dtype=torch.float32)
        var = x.new_empty(c, dtype=torch.float32)
    if n * h * w == 0:
        if running is not None:  # PyTorch counts an empty batch and leaves the statistics alone
            update_running_stats(*running, mean, var, 0)
        return out, mean if mean is None else mean.zero_(), var if var is None else var.zero_()
    x2d = rows_view(channels_last(x))
    if use_batch_stats:
        _channel_stats_impl(x2d, mean, var, impl, running)
        norm_mean, norm_var = mean, var
    else:
        norm_mean, norm_var = fp32_vector(running_mean), fp32_vector(running_var)
    _normalize(x, norm_mean, norm_var, weight, bias, residual, eps, relu, impl, out)
    return out, mean, var


def _normalize(x, mean, var, weight, bias, residual, eps, relu, impl, out=None):
    """out = [relu](BN(x) [+ residual]) with the given fp32 statistics: the forward's normalize pass, and what the
    memory-efficient mode recomputes in the backward (dla_fast.ops.recompute). out: channels_last, allocated
    when None."""
    if out is None:
        out = empty_channels_last(x.shape, x.dtype, x.device)
    residual2d = None if residual is None else rows_view(channels_last(residual))
    _bn_apply_impl(rows_view(channels_last(x)), mean, var, fp32_vector(weight), fp32_vector(bias), eps, residual2d,
                   relu, impl, rows_view(out))
    return out


def _declare_recomputable(out, x, weight, bias, mean, var, residual, use_batch_stats, eps, relu, impl) -> None:
    """Inside recompute_activations(): `out` is saved as its recipe (x and the statistics, which the backward keeps
    anyway; running statistics are copied, a later training step changes them in place)."""
    if recompute.active():
        if not use_batch_stats:
            mean, var = mean.clone(), var.clone()
        recompute.recomputable(out, _normalize, x, mean, var, weight, bias, residual, eps, relu, impl)


def _backward(grad_out, out, x, weight, mean, var, use_batch_stats, eps, relu, impl, input_grad, residual_grad,
              param_grad, sync=None):
    """(grad_x, grad_residual, grad_weight, grad_bias) as batchnorm_act_backward. sync: None, or (process
    group, global count) of a synchronized forward: the sums for the input gradient are all-reduced (the
    weight and bias gradients stay local)."""
    c = x.shape[1]
    grad_x = empty_channels_last(x.shape, x.dtype, x.device) if input_grad else x.new_empty(0)
    grad_residual = empty_channels_last(x.shape, x.dtype, x.device) if residual_grad else x.new_empty(0)
    grad_weight = x.new_empty(c if param_grad else 0, dtype=torch.float32)
    grad_bias = x.new_empty(c if param_grad else 0, dtype=torch.float32)
    mean, var = fp32_vector(mean), fp32_vector(var)
    x2d = rows_view(channels_last(x))
    grad_out2d = rows_view(channels_last(grad_out))
    out2d = rows_view(channels_last(out)) if relu else None
    sum_g = sum_g_xhat = None
    if param_grad or (use_batch_stats and (input_grad or residual_grad)):
        sum_g, sum_g_xhat = ((grad_bias, grad_weight) if param_grad else
                             (x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)))
        _bn_backward_reduce_impl(grad_out2d, out2d, x2d, mean, var, eps, impl, sum_g, sum_g_xhat)
    if sync is not None and input_grad:
        sum_g, sum_g_xhat = sync_stats.all_reduce_grad_sums(sum_g, sum_g_xhat, sync[0], x2d.shape[0], sync[1])
    if input_grad or residual_grad:
        grad_y2d = rows_view(grad_x) if input_grad else torch.empty_like(x2d)
        _bn_backward_apply_impl(grad_out2d, out2d, x2d, mean, var, fp32_vector(weight),
                                sum_g if use_batch_stats else None, sum_g_xhat if use_batch_stats else None, eps,
                                grad_y2d, rows_view(grad_residual) if residual_grad else None, impl)
    return grad_x, grad_residual, grad_weight, grad_bias


def _save_for_backward(ctx, x, weight, bias, out, mean, var, use_batch_stats, eps, relu, impl) -> None:
    """mean/var: the statistics the forward normalized with."""
    ctx.save_for_backward(x, weight, out if relu else None, mean, var)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.use_batch_stats, ctx.eps, ctx.relu, ctx.impl = use_batch_stats, eps, relu, impl


def _input_grads(ctx, grad_out, backward):
    """Gradients of (x, weight, bias, running_mean, running_var, residual) with `backward` (_backward or the
    custom op batchnorm_act_backward), computing only what ctx.needs_input_grad asks for."""
    x, weight, out, mean, var = ctx.saved_tensors
    need_x, need_weight, need_bias, _, _, need_residual = ctx.needs_input_grad[:6]
    grad_x, grad_residual, grad_weight, grad_bias = backward(
        grad_out, out, x, weight, mean, var, ctx.use_batch_stats, ctx.eps, ctx.relu, ctx.impl, need_x,
        need_residual, need_weight or need_bias)
    return (grad_x if need_x else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias else None,
            None, None,
            grad_residual if need_residual else None)


class _BatchNormActFunction(torch.autograd.Function):
    """Eager-mode autograd of the fused op (the least host overhead per call). In training the statistics
    kernels also update the running statistics and num_batches_tracked (`running`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, residual, use_batch_stats, eps, relu, impl,
                running):
        x = channels_last(x)  # saved for the backward as its kernels read it
        out, batch_mean, batch_var = _forward(x, weight, bias, running_mean, running_var, residual,
                                              use_batch_stats, eps, relu, impl, running)
        mean, var = (batch_mean, batch_var) if use_batch_stats else (running_mean, running_var)
        _declare_recomputable(out, x, weight, bias, fp32_vector(mean), fp32_vector(var), residual, use_batch_stats,
                              eps, relu, impl)
        _save_for_backward(ctx, x, weight, bias, out, mean, var, use_batch_stats, eps, relu, impl)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return (*_input_grads(ctx, grad_out, _backward), None, None, None, None, None)


def _forward_synchronized(x, weight, bias, residual, eps, relu, impl, running, group):
    """(out, mean, var, global count): _forward in training with the batch statistics merged over `group`
    (dla_fast.ops.sync_stats) between the statistics step and the normalize pass; running statistics (if given,
    as in _forward) updated with the global statistics, also by a rank whose batch is empty."""
    n, c, h, w = x.shape
    out = empty_channels_last(x.shape, x.dtype, x.device)
    mean = x.new_zeros(c, dtype=torch.float32)
    var = x.new_zeros(c, dtype=torch.float32)
    x2d = rows_view(channels_last(x))
    if n * h * w > 0:
        _channel_stats_impl(x2d, mean, var, impl)
    mean, var, total = sync_stats.merge_batch_stats(mean, var, n * h * w, group)
    if running is not None:
        running_mean, running_var, num_batches_tracked, momentum = running
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        sync_stats.update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, total)
    _normalize(x, mean, var, weight, bias, residual, eps, relu, impl, out)
    return out, mean, var, total


class _SyncBatchNormActFunction(torch.autograd.Function):
    """Eager autograd of the synchronized op (training, batch statistics over a process group)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, residual, eps, relu, impl, running, group):
        x = channels_last(x)
        out, mean, var, total = _forward_synchronized(x, weight, bias, residual, eps, relu, impl, running, group)
        _declare_recomputable(out, x, weight, bias, mean, var, residual, True, eps, relu, impl)
        _save_for_backward(ctx, x, weight, bias, out, mean, var, True, eps, relu, impl)
        ctx.sync = (group, total)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        def synchronized_backward(*args):
            return _backward(*args, sync=ctx.sync)
        return (*_input_grads(ctx, grad_out, synchronized_backward), None, None, None, None, None)


@torch.compiler.disable
def _batchnorm_act_synchronized(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                residual, relu, group):
    """batchnorm_act in training with statistics synchronized over `group` (eager even under torch.compile:
    the collectives are not traced). Backend 'torch' runs sync_stats.sync_batch_norm_reference."""
    impl = backend.resolve(x.device, OP_NAME, x.dtype)
    if impl == "torch":
        y = sync_stats.sync_batch_norm_reference(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                                 momentum, eps, group)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    running = None
    if running_mean is not None:
        if momentum is None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        running = (running_mean, running_var, num_batches_tracked, momentum)
    return _SyncBatchNormActFunction.apply(x, weight, bias, running_mean, running_var, residual, eps, relu, impl,
                                           running, group)


# --------------------------------------------------------------------------------------------------------
# Custom ops (functional; for torch.compile) + autograd
# --------------------------------------------------------------------------------------------------------

@torch.library.custom_op("dla_fast::batchnorm_act_forward", mutates_args=())
def batchnorm_act_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                          residual: Optional[torch.Tensor], use_batch_stats: bool, eps: float, relu: bool,
                          impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, batch_mean, batch_var): out (N, C, H, W) with NHWC strides; with use_batch_stats the batch mean
    and biased variance fp32 [C] (zeros for an empty batch), otherwise the running statistics normalize and
    the two are empty [0] tensors."""
    _check_impl(impl)
    backend.require_traced(impl, x.device, OP_NAME)
    out, mean, var = _forward(x, weight, bias, running_mean, running_var, residual, use_batch_stats, eps, relu, impl)
    if not use_batch_stats:
        mean, var = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return out, mean, var


@batchnorm_act_forward.register_fake
def _batchnorm_act_forward_fake(x, weight, bias, running_mean, running_var, residual, use_batch_stats, eps, relu,
                                impl):
    stats_size = x.shape[1] if use_batch_stats else 0
    return (empty_channels_last(x.shape, x.dtype, x.device), x.new_empty(stats_size, dtype=torch.float32),
            x.new_empty(stats_size, dtype=torch.float32))


@torch.library.custom_op("dla_fast::batchnorm_act_backward", mutates_args=())
def batchnorm_act_backward(grad_out: torch.Tensor, out: Optional[torch.Tensor], x: torch.Tensor,
                           weight: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
                           use_batch_stats: bool, eps: float, relu: bool, impl: str, input_grad: bool,
                           residual_grad: bool, param_grad: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_residual, grad_weight, grad_bias). out: the forward's output (its ReLU mask; None without
    ReLU); mean/var: the statistics the forward normalized with.

    grad_x and grad_residual are (N, C, H, W) with NHWC strides, grad_weight and grad_bias fp32 [C]; each is an
    empty [0] tensor unless its flag (input_grad, residual_grad, param_grad) asks for it.
    """
    _check_impl(impl)
    backend.require_traced(impl, x.device, OP_NAME)
    if relu and out is None:
        raise ValueError("batchnorm_act_backward: relu=True needs out (the ReLU mask)")
    return _backward(grad_out, out, x, weight, mean, var, use_batch_stats, eps, relu, impl, input_grad,
                     residual_grad, param_grad)


@batchnorm_act_backward.register_fake
def _batchnorm_act_backward_fake(grad_out, out, x, weight, mean, var, use_batch_stats, eps, relu, impl, input_grad,
                                 residual_grad, param_grad):
    c = x.shape[1]
    grad_x = empty_channels_last(x.shape, x.dtype, x.device) if input_grad else x.new_empty(0)
    grad_residual = empty_channels_last(x.shape, x.dtype, x.device) if residual_grad else x.new_empty(0)
    return (grad_x, grad_residual, x.new_empty(c if param_grad else 0, dtype=torch.float32),
            x.new_empty(c if param_grad else 0, dtype=torch.float32))


def _forward_setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, residual, use_batch_stats, eps, relu, impl = inputs
    out, batch_mean, batch_var = output
    ctx.mark_non_differentiable(batch_mean, batch_var)
    mean, var = (batch_mean, batch_var) if use_batch_stats else (running_mean, running_var)
    _save_for_backward(ctx, x, weight, bias, out, mean, var, use_batch_stats, eps, relu, impl)


def _forward_backward(ctx, grad_out, _grad_mean, _grad_var):
    return (*_input_grads(ctx, grad_out, batchnorm_act_backward), None, None, None, None)


batchnorm_act_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------------

def check_inputs(x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
                 residual, synchronized: bool = False) -> None:
    """The op's argument rules, checked before any backend runs (the same errors on every backend): x a 4-D
    floating-point tensor, residual like x, and nn.BatchNorm2d's rules for the rest
    (running_stats.check_batchnorm_args; synchronized: the batch is the process group's)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"batchnorm_act: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"batchnorm_act: expected a 4-D (N, C, H, W) input, got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"batchnorm_act: x must be a floating-point tensor, got {x.dtype}")
    n, c, h, w = x.shape
    check_batchnorm_args("batchnorm_act", x.dtype, c, n * h * w, x.device, weight=weight, bias=bias,
                         running_mean=running_mean, running_var=running_var,
                         num_batches_tracked=num_batches_tracked, training=training, momentum=momentum, eps=eps,
                         synchronized=synchronized)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"batchnorm_act: residual ({tuple(residual.shape)}, {residual.dtype}, {residual.device}) "
                         f"must match the input ({tuple(x.shape)}, {x.dtype}, {x.device})")


_VALIDATED = ValidatedSignatures()  # signatures check_inputs accepted


def _signature(x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, residual,
               synchronized):
    """Everything check_inputs reads (types, shapes, dtypes, devices, flags, eps and momentum with their types),
    as a hashable tuple; None when an argument is not what the checks expect (they then run and say so)."""
    try:
        return (type(x), x.shape, x.dtype, x.device, tensor_signature(weight), tensor_signature(bias),
                tensor_signature(running_mean), tensor_signature(running_var), tensor_signature(num_batches_tracked),
                tensor_signature(residual), training, type(momentum), momentum, type(eps), eps, synchronized)
    except AttributeError:
        return None


def batchnorm_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                  num_batches_tracked: Optional[torch.Tensor] = None, training: bool = False,
                  momentum: Optional[float] = 0.1, eps: float = 1e-5, residual: Optional[torch.Tensor] = None,
                  relu: bool = True, sync: bool = False, process_group=None) -> torch.Tensor:
    """ReLU?(BatchNorm2d(x) [+ residual]) with nn.BatchNorm2d semantics, fused.

    x, residual: (N, C, H, W), any memory format (channels_last avoids copies); the result is channels_last.
    weight, bias: [C] or None (affine=False). running_mean, running_var, num_batches_tracked: the module's
    buffers, or None (track_running_stats=False); updated in place in training (momentum=None: cumulative
    average). Batch statistics normalize in training, or when there are no running statistics.
    sync, process_group: nn.SyncBatchNorm's semantics (sync=True for one; process_group None is the whole
    world): in training in an initialized process group of more than one rank, the statistics and the
    backward's reductions are synchronized over the group (dla_fast.ops.sync_stats), otherwise plain BatchNorm.
    """
    group = sync_stats.sync_group(sync, process_group, training)
    signature = None if torch.compiler.is_compiling() else _signature(
        x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, residual,
        group is not None)
    _VALIDATED.check_once(signature, lambda: check_inputs(
        x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, residual,
        synchronized=group is not None))
    if group is not None:
        return _batchnorm_act_synchronized(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                           momentum, eps, residual, relu, group)
    n, c, h, w = x.shape
    use_batch_stats = uses_batch_stats(training, running_mean, running_var)
    impl = backend.resolve(x.device, OP_NAME, x.dtype)
    if impl == "torch":
        return batchnorm_act_reference(x, weight, bias, running_mean, running_var, num_batches_tracked, training,
                                       momentum, eps, residual, relu)
    if torch.compiler.is_compiling():
        out, mean, var = batchnorm_act_forward(x, weight, bias, running_mean, running_var, residual,
                                               use_batch_stats, eps, relu, impl)
        if training:
            update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, n * h * w)
        return out
    running = None
    if training and running_mean is not None:
        running = (running_mean, running_var, num_batches_tracked, momentum)
    return _BatchNormActFunction.apply(x, weight, bias, running_mean, running_var, residual, use_batch_stats, eps,
                                       relu, impl, running)
