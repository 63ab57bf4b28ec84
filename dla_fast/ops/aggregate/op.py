"""The aggregation node's host code: eager reference, argument checks, the eager autograd.Function, the
torch.library custom ops (torch.compile) and the public entry point `aggregate`."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ... import backend
from .. import recompute, sync_stats
from ..batchnorm_act import bn_apply
from ..common import ValidatedSignatures, device_guard, fp32_vector, nhwc_rows, tensor_signature
from ..running_stats import check_batchnorm_args, update_running_stats, uses_batch_stats
from .kernels import MAX_CHILDREN
from .launch import _backward_triton, _empty_nhwc, _forward_triton

OP_NAME = "aggregate"


# --------------------------------------------------------------------------------------------------------
# Eager reference
# --------------------------------------------------------------------------------------------------------
def aggregate_reference(children: Sequence[torch.Tensor], weight: torch.Tensor, bn_weight: torch.Tensor,
                        bn_bias: torch.Tensor, running_mean: Optional[torch.Tensor],
                        running_var: Optional[torch.Tensor], training: bool, momentum: Optional[float],
                        eps: float, residual: bool, num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """cat -> conv (any kernel size, 'same' padding) -> BatchNorm2d -> [+ children[0]] -> ReLU, eagerly.

    BatchNorm follows nn.BatchNorm2d exactly, running statistics and num_batches_tracked included.
    """
    x = torch.cat(list(children), 1)
    x = F.conv2d(x, weight.to(x.dtype), padding=(weight.shape[-1] - 1) // 2)  # an fp32 weight with 16-bit children
    factor = 0.0 if momentum is None else momentum
    if training and running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    x = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias,
                     uses_batch_stats(training, running_mean, running_var), factor, eps)
    if residual:
        x = x + children[0]
    return F.relu(x)


# --------------------------------------------------------------------------------------------------------
# Autograd: a plain autograd.Function in eager mode (the least host overhead per call), and the same
# computation as torch.library custom ops under torch.compile (functional: the caller updates the running
# statistics, which inductor fuses into one kernel).
# --------------------------------------------------------------------------------------------------------
def _save_for_backward(ctx, children, weight, bn_weight, out, preact, mean, var, config) -> None:
    ctx.save_for_backward(out, preact, mean, var, weight, bn_weight, *children)
    ctx.config = config  # (eps, residual, batch_stats, has_preact, impl)


def _run_backward(ctx, grad_out, backward):
    """The backward with `backward`: the custom op aggregate_bwd (torch.compile), or its implementation
    `_aggregate_bwd_impl` called directly (eager: no dispatcher round trip)."""
    eps, residual, batch_stats, has_preact, impl = ctx.config
    if not has_preact:
        raise RuntimeError("dla_fast aggregate: the forward ran without saving its pre-BN output (no input "
                           "required grad at the time); run the forward with gradients enabled")
    out, preact, mean, var, weight, bn_weight, *children = ctx.saved_tensors
    return backward(grad_out, out, preact, children, weight, bn_weight, mean, var, eps, residual, batch_stats, impl)


def _normalize_again(preact, bn_weight, bn_bias, mean, var, eps, residual_child, impl):
    """The training forward's normalize pass (launch._forward_triton's bn_apply) on the saved pre-BN output."""
    out, out_rows = _empty_nhwc(preact, preact.shape[1])
    bn_apply(nhwc_rows(preact), mean, var, fp32_vector(bn_weight), fp32_vector(bn_bias), eps,
             residual2d=None if residual_child is None else nhwc_rows(residual_child), relu=True, impl=impl,
             out=out_rows)
    return out


def _declare_recomputable(out, preact, bn_weight, bn_bias, mean, var, eps, residual, children, impl) -> None:
    """Inside recompute_activations() (dla_fast.ops.recompute) the output of a node normalized with batch statistics
    is saved as its recipe: the pre-BN output, the statistics and children[0], which the backward keeps anyway."""
    if recompute.active() and out.numel() > 0:
        recompute.recomputable(out, _normalize_again, preact, bn_weight, bn_bias, mean, var, eps,
                               children[0] if residual else None, impl)


class _AggregateFunction(torch.autograd.Function):
    """Eager-mode autograd for the fused node; its kernels update the running statistics (the GEMM kernel counts
    the batch, the statistics merge folds it in)."""

    @staticmethod
    def forward(ctx, config, running, weight, bn_weight, bn_bias, mean, var, *children):
        eps, residual, batch_stats, save_preact, impl = config
        with device_guard(children[0]):
            out, preact, batch_mean, batch_var = _forward_triton(
                children, weight, fp32_vector(bn_weight), fp32_vector(bn_bias), fp32_vector(mean),
                fp32_vector(var), eps, residual, batch_stats, save_preact, impl, running)
        if batch_stats:
            mean, var = batch_mean, batch_var
            _declare_recomputable(out, preact, bn_weight, bn_bias, mean, var, eps, residual, children, impl)
        _save_for_backward(ctx, children, weight, bn_weight, out, preact, fp32_vector(mean),
                           fp32_vector(var),
                           (eps, residual, batch_stats, batch_stats or save_preact, impl))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads, grad_w, grad_gamma, grad_beta = _run_backward(ctx, grad_out, _aggregate_bwd_impl)
        return None, None, grad_w, grad_gamma, grad_beta, None, None, *grads


class _SyncAggregateFunction(torch.autograd.Function):
    """Eager autograd of the synchronized node (training, batch statistics merged over a process group by
    dla_fast.ops.sync_stats between the statistics kernel and the normalize pass)."""

    @staticmethod
    def forward(ctx, config, running, group, weight, bn_weight, bn_bias, *children):
        eps, residual, impl = config
        totals = []

        def merge(mean, var, rows):
            mean, var, total = sync_stats.merge_batch_stats(mean, var, rows, group)
            if running is not None:  # the caller counted the batch in num_batches_tracked
                sync_stats.update_running_stats(*running, mean, var, total)
            totals.append(total)
            return mean, var

        with device_guard(children[0]):
            out, preact, mean, var = _forward_triton(children, weight, fp32_vector(bn_weight), fp32_vector(bn_bias),
                                                     None, None, eps, residual, True, True, impl, merge_stats=merge)
        _declare_recomputable(out, preact, bn_weight, bn_bias, mean, var, eps, residual, children, impl)
        _save_for_backward(ctx, children, weight, bn_weight, out, preact, mean, var, (eps, residual, True, True, impl))
        ctx.sync = (group, totals[0])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        eps, residual, _, _, impl = ctx.config
        out, preact, mean, var, weight, bn_weight, *children = ctx.saved_tensors
        with device_guard(children[0]):
            grads, grad_w, grad_gamma, grad_beta = _backward_triton(
                grad_out, out, preact, children, weight, fp32_vector(bn_weight), mean, var, eps, residual, True, impl,
                sync=ctx.sync)
        return None, None, None, grad_w, grad_gamma.to(bn_weight.dtype), grad_beta.to(bn_weight.dtype), *grads


@torch.library.custom_op("dla_fast::aggregate_fwd", mutates_args=())
def aggregate_fwd(children: List[torch.Tensor], weight: torch.Tensor, bn_weight: torch.Tensor,
                  bn_bias: torch.Tensor, mean: Optional[torch.Tensor], var: Optional[torch.Tensor], eps: float,
                  residual: bool, batch_stats: bool, save_preact: bool, impl: str
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, pre-BN y or empty, batch mean or empty, batch biased var or empty); out/y channels_last.

    batch_stats: normalize with this batch's statistics (returned), else with `mean`/`var`.
    save_preact: also write y when normalizing with given statistics (needed by the backward).
    """
    backend.require_traced(impl, children[0].device, OP_NAME)
    with device_guard(children[0]):
        return _forward_triton(children, weight, fp32_vector(bn_weight), fp32_vector(bn_bias), fp32_vector(mean),
                               fp32_vector(var), eps, residual, batch_stats, save_preact, impl)


@aggregate_fwd.register_fake
def _(children, weight, bn_weight, bn_bias, mean, var, eps, residual, batch_stats, save_preact, impl):
    first, cout = children[0], weight.shape[0]
    out = _empty_nhwc(first, cout)[0]
    y = _empty_nhwc(first, cout)[0] if (batch_stats or save_preact) else first.new_empty(0)
    stat = first.new_empty((cout,) if batch_stats else (0,), dtype=torch.float32)
    return out, y, stat, stat.clone()


@torch.library.custom_op("dla_fast::aggregate_bwd", mutates_args=())
def aggregate_bwd(grad_out: torch.Tensor, out: torch.Tensor, preact: torch.Tensor, children: List[torch.Tensor],
                  weight: torch.Tensor, bn_weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                  residual: bool, batch_stats: bool, impl: str
                  ) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grads of the children, grad of the conv weight, grad of BN weight, grad of BN bias)."""
    backend.require_traced(impl, children[0].device, OP_NAME)
    return _aggregate_bwd_impl(grad_out, out, preact, children, weight, bn_weight, mean, var, eps, residual,
                               batch_stats, impl)


def _aggregate_bwd_impl(grad_out, out, preact, children, weight, bn_weight, mean, var, eps, residual, batch_stats,
                        impl):
    with device_guard(children[0]):
        grads, grad_w, grad_gamma, grad_beta = _backward_triton(
            grad_out, out, preact, children, weight, fp32_vector(bn_weight), fp32_vector(mean), fp32_vector(var),
            eps, residual, batch_stats, impl)
    return grads, grad_w, grad_gamma.to(bn_weight.dtype), grad_beta.to(bn_weight.dtype)


@aggregate_bwd.register_fake
def _(grad_out, out, preact, children, weight, bn_weight, mean, var, eps, residual, batch_stats, impl):
    grads = [_empty_nhwc(c, c.shape[1])[0] for c in children]
    return grads, torch.empty_like(weight), torch.empty_like(bn_weight), torch.empty_like(bn_weight)


def _custom_op_setup_context(ctx, inputs, output):
    children, weight, bn_weight, bn_bias, mean, var, eps, residual, batch_stats, save_preact, impl = inputs
    out, preact, batch_mean, batch_var = output
    if batch_stats:
        mean, var = batch_mean, batch_var
    _save_for_backward(ctx, children, weight, bn_weight, out, preact, mean, var,
                       (eps, residual, batch_stats, batch_stats or save_preact, impl))


def _custom_op_backward(ctx, grad_out, grad_preact, grad_mean, grad_var):
    grads, grad_w, grad_gamma, grad_beta = _run_backward(ctx, grad_out, aggregate_bwd)
    return grads, grad_w, grad_gamma, grad_beta, None, None, None, None, None, None, None


aggregate_fwd.register_autograd(_custom_op_backward, setup_context=_custom_op_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------
def check_inputs(children: Sequence[torch.Tensor], weight: torch.Tensor, bn_weight: torch.Tensor,
                 bn_bias: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                 num_batches_tracked: Optional[torch.Tensor], training: bool, momentum: Optional[float], eps: float,
                 residual: bool, synchronized: bool = False) -> None:
    """The aggregation node's argument rules, checked before any backend runs (the same errors on every
    backend): ValueError/TypeError naming the problem, nn.BatchNorm2d's rules for the BatchNorm arguments
    (running_stats.check_batchnorm_args; synchronized: the batch is the process group's, not this rank's)."""
    if not isinstance(children, (list, tuple)) or not 1 <= len(children) <= MAX_CHILDREN:
        count = len(children) if isinstance(children, (list, tuple)) else type(children).__name__
        raise ValueError(f"aggregate takes a list of 1 to {MAX_CHILDREN} children; got {count}")
    first = children[0]
    for i, c in enumerate(children):
        if not isinstance(c, torch.Tensor) or c.dim() != 4:
            raise ValueError(f"child {i} must be a 4-D (N, C, H, W) tensor; got "
                             f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
        if not c.dtype.is_floating_point:
            raise ValueError(f"child {i} has dtype {c.dtype}; aggregate takes floating-point children")
        if c.dtype != first.dtype:
            raise ValueError(f"children must share a dtype: child 0 is {first.dtype}, child {i} is {c.dtype}")
        if c.device != first.device:
            raise ValueError(f"children must be on one device: child 0 is on {first.device}, child {i} on {c.device}")
        if c.shape[0] != first.shape[0] or c.shape[2:] != first.shape[2:]:
            raise ValueError(f"children must share batch and spatial size: child 0 is {tuple(first.shape)}, "
                             f"child {i} is {tuple(c.shape)}")
    channels = sum(c.shape[1] for c in children)
    if weight.dim() != 4 or weight.shape[1] != channels:
        raise ValueError(f"conv weight {tuple(weight.shape)} does not fit the children: they have {channels} "
                         f"channels in all ({' + '.join(str(c.shape[1]) for c in children)})")
    if weight.device != first.device:
        raise ValueError(f"conv weight is on {weight.device}, the children on {first.device}")
    if weight.dtype != first.dtype and not (weight.dtype == torch.float32
                                            and first.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"conv weight has dtype {weight.dtype}; with {first.dtype} children it must be "
                        f"{first.dtype}{' or torch.float32' if first.element_size() == 2 else ''}")
    cout = weight.shape[0]
    check_batchnorm_args("aggregate (the conv's outputs)", first.dtype, cout,
                         first.shape[0] * first.shape[2] * first.shape[3], first.device, weight=bn_weight,
                         bias=bn_bias, running_mean=running_mean, running_var=running_var,
                         num_batches_tracked=num_batches_tracked, training=training, momentum=momentum, eps=eps,
                         synchronized=synchronized)
    if residual and first.shape[1] != cout:
        raise ValueError(f"a residual root adds child 0 to its output: child 0 has {first.shape[1]} channels, "
                         f"the output {cout}")


_VALIDATED = ValidatedSignatures()  # signatures check_inputs accepted


def _signature(children, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training,
               momentum, eps, residual, synchronized):
    """Everything check_inputs reads (types, shapes, dtypes, devices, flags, eps and momentum with their types),
    as a hashable tuple; None when an argument is not what the checks expect (they then run and say so)."""
    try:
        return (type(children), *[(type(c), c.shape, c.dtype, c.device) for c in children],
                tensor_signature(weight), tensor_signature(bn_weight), tensor_signature(bn_bias),
                tensor_signature(running_mean), tensor_signature(running_var), tensor_signature(num_batches_tracked),
                training, type(momentum), momentum, type(eps), eps, residual, synchronized)
    except (AttributeError, TypeError):
        return None


def _check_fused(children: Sequence[torch.Tensor], weight: torch.Tensor, impl: str) -> None:
    """What the fused kernels need beyond check_inputs."""
    if weight.shape[-2:] != (1, 1):
        raise ValueError(f"the fused aggregation node takes 1x1 convs; got kernel {tuple(weight.shape[-2:])} "
                         "(use backend 'torch' for other kernel sizes)")
    gemm_problem = backend.unavailable_reason("triton", children[0].device)
    if gemm_problem is not None:  # backend 'cuda' keeps the GEMM in Triton
        raise backend.BackendUnavailable(f"dla_fast backend {impl!r} cannot run op {OP_NAME!r}: its GEMM runs in "
                                         f"Triton, and {gemm_problem}")


@torch.compiler.disable
def _aggregate_synchronized(children, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                            momentum, eps, residual, group):
    """aggregate in training with the BatchNorm statistics synchronized over `group` (eager even under
    torch.compile: the collectives are not traced). Backend 'torch': the eager reference with
    sync_stats.sync_batch_norm_reference."""
    impl = backend.resolve(children[0].device, OP_NAME, children[0].dtype)
    if impl == "torch":
        y = torch.cat(list(children), 1)
        y = F.conv2d(y, weight.to(y.dtype), padding=(weight.shape[-1] - 1) // 2)
        y = sync_stats.sync_batch_norm_reference(y, bn_weight, bn_bias, running_mean, running_var,
                                                 num_batches_tracked, momentum, eps, group)
        return F.relu(y + children[0] if residual else y)
    _check_fused(children, weight, impl)
    running = None
    if running_mean is not None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        elif momentum is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        running = (running_mean, running_var, num_batches_tracked, momentum)
    return _SyncAggregateFunction.apply((eps, residual, impl), running, group, weight, bn_weight, bn_bias, *children)


def aggregate(children: Sequence[torch.Tensor], weight: torch.Tensor, bn_weight: torch.Tensor,
              bn_bias: torch.Tensor, running_mean: Optional[torch.Tensor] = None,
              running_var: Optional[torch.Tensor] = None, num_batches_tracked: Optional[torch.Tensor] = None,
              training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
              residual: bool = False, sync: bool = False, process_group=None) -> torch.Tensor:
    """ReLU(BatchNorm2d(conv1x1(cat(children))) [+ children[0]]), fused, with nn.BatchNorm2d semantics.

    children: 1..8 tensors (N, C_i, H, W) of one dtype (fp32/fp16/bf16) and device, any memory format
    (channels_last avoids a copy). weight: (Cout, sum C_i, 1, 1); bn_*: BatchNorm2d's tensors; in training
    the running statistics and num_batches_tracked are updated in place. Returns (N, Cout, H, W) in
    channels_last memory format. The implementation comes from dla_fast.backend (op "aggregate").
    sync, process_group: nn.SyncBatchNorm's semantics (sync=True for one; process_group None is the whole
    world): in training in an initialized process group of more than one rank, the statistics and the
    backward's reductions are synchronized over the group (dla_fast.ops.sync_stats), otherwise plain BatchNorm.
    """
    group = sync_stats.sync_group(sync, process_group, training)
    signature = None if torch.compiler.is_compiling() else _signature(
        children, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
        residual, group is not None)
    _VALIDATED.check_once(signature, lambda: check_inputs(
        children, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
        residual, synchronized=group is not None))
    if group is not None:
        return _aggregate_synchronized(children, weight, bn_weight, bn_bias, running_mean, running_var,
                                       num_batches_tracked, momentum, eps, residual, group)
    impl = backend.resolve(children[0].device, OP_NAME, children[0].dtype)
    if impl == "torch":
        return aggregate_reference(children, weight, bn_weight, bn_bias, running_mean, running_var, training,
                                   momentum, eps, residual, num_batches_tracked)
    _check_fused(children, weight, impl)
    batch_stats = uses_batch_stats(training, running_mean, running_var)
    first = children[0]
    count = first.shape[0] * first.shape[2] * first.shape[3]
    save_preact = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*children, weight, bn_weight, bn_bias))
    given = (None, None) if batch_stats else (running_mean, running_var)
    if torch.compiler.is_compiling():
        out, _, batch_mean, batch_var = aggregate_fwd(list(children), weight, bn_weight, bn_bias, *given, eps,
                                                      residual, batch_stats, save_preact, impl)
        if training:
            update_running_stats(running_mean, running_var, num_batches_tracked, momentum, batch_mean, batch_var,
                                 count)
        return out
    running = None
    if training and running_mean is not None:  # counted and folded in by the kernels
        running = (running_mean, running_var, num_batches_tracked, momentum)
    return _AggregateFunction.apply((eps, residual, batch_stats, save_preact, impl), running, weight, bn_weight,
                                    bn_bias, *given, *children)
