"""Building blocks on [M, C] rows (`channel_stats`, `bn_apply`, `bn_backward_reduce`, `bn_backward_apply`, with an
explicit impl 'torch' | 'triton' | 'cuda'), their unchecked implementations, the Triton launch shapes and
launchers, and `kernel_configurations` (every configuration the launchers pick, for dla_fast.ops.aot)."""
from __future__ import annotations

from typing import Optional

import torch

from ... import backend
from ..common import cdiv, device_guard, extension_ops, next_power_of_2, num_sms
from ..running_stats import update_running_stats
from .kernels import (bn_apply_kernel, bn_backward_apply_kernel, bn_backward_reduce_merge_kernel,
                      bn_backward_reduce_partial_kernel, channel_stats_merge_kernel, channel_stats_partial_kernel,
                      running_stats_update_kernel)


IMPLS = ("torch", "triton", "cuda")

# Triton launch shape: a program handles [BLOCK_M, BLOCK_C] tiles of TILE_ELEMENTS values; the reductions
# give each program a run of tiles, with about PROGRAMS_PER_SM programs per streaming multiprocessor.
TILE_ELEMENTS = 4096
MAX_BLOCK_C = 64
MAX_BLOCK_PARTIALS = 64
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4  # CPU tensors under TRITON_INTERPRET=1: programs run one after another


# --------------------------------------------------------------------------------------------------------
# Building blocks on [M, C] rows
# --------------------------------------------------------------------------------------------------------

def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")


def _check_rows(t: torch.Tensor, name: str, like: Optional[torch.Tensor] = None) -> None:
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 2-D [M, C] tensor, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")
    if like is not None and (t.shape != like.shape or t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"{name} ({tuple(t.shape)}, {t.dtype}, {t.device}) must match the activations "
                         f"({tuple(like.shape)}, {like.dtype}, {like.device})")


def _check_vectors(channels: int, device: torch.device, **vectors: Optional[torch.Tensor]) -> None:
    for name, v in vectors.items():
        if v is not None and (v.shape != (channels,) or v.dtype != torch.float32 or v.device != device
                              or not v.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 [{channels}] vector on {device}, got "
                             f"{tuple(v.shape)} {v.dtype} on {v.device}")


def channel_stats(y2d: torch.Tensor, *, impl: str, out=None):
    """Batch mean and biased variance per channel of y2d [M, C] (M >= 1): fp32 [C] each.

    out: optional (mean, var) fp32 [C] tensors to write into.
    """
    _check_impl(impl)
    _check_rows(y2d, "y2d")
    m, c = y2d.shape
    if m == 0:
        raise ValueError("channel_stats: y2d has no rows; the statistics of an empty batch are undefined")
    mean, var = out if out is not None else (y2d.new_empty(c, dtype=torch.float32),
                                             y2d.new_empty(c, dtype=torch.float32))
    _check_vectors(c, y2d.device, mean=mean, var=var)
    _channel_stats_impl(y2d, mean, var, impl)
    return mean, var


def bn_apply(y2d, mean, var, weight, bias, eps, residual2d=None, relu=True, *, impl: str, out=None):
    """out2d = [relu]((y2d - mean) * rsqrt(var + eps) * weight + bias [+ residual2d]), [M, C] like y2d.

    weight/bias: fp32 [C] or None (affine=False). out: optional [M, C] tensor to write into.
    """
    _check_impl(impl)
    _check_rows(y2d, "y2d")
    if residual2d is not None:
        _check_rows(residual2d, "residual2d", like=y2d)
    out = torch.empty_like(y2d) if out is None else out
    _check_rows(out, "out", like=y2d)
    _check_vectors(y2d.shape[1], y2d.device, mean=mean, var=var, weight=weight, bias=bias)
    _bn_apply_impl(y2d, mean, var, weight, bias, eps, residual2d, relu, impl, out)
    return out


def _check_backward_rows(op: str, grad_out2d, out2d, y2d, relu: bool, impl: str) -> None:
    """The backward building blocks' common arguments: impl, y2d and grad_out2d rows alike, and with relu the
    saved output out2d (the ReLU mask)."""
    _check_impl(impl)
    _check_rows(y2d, "y2d")
    _check_rows(grad_out2d, "grad_out2d", like=y2d)
    if relu:
        if out2d is None:
            raise ValueError(f"{op}: relu=True needs out2d (the ReLU mask)")
        _check_rows(out2d, "out2d", like=y2d)


def bn_backward_reduce(grad_out2d, out2d, y2d, mean, var, eps, relu, *, impl: str, out=None):
    """(sum_g, sum_g_xhat), fp32 [C]: per-channel sums over the rows of g and g * xhat.

    g = grad_out2d * (out2d > 0) if relu else grad_out2d (out2d may be None without ReLU),
    xhat = (y2d - mean) * rsqrt(var + eps). These are also grad_bias and grad_weight.
    out: optional (sum_g, sum_g_xhat) tensors to write into.
    """
    _check_backward_rows("bn_backward_reduce", grad_out2d, out2d, y2d, relu, impl)
    c = y2d.shape[1]
    sum_g, sum_g_xhat = out if out is not None else (y2d.new_empty(c, dtype=torch.float32),
                                                     y2d.new_empty(c, dtype=torch.float32))
    _check_vectors(c, y2d.device, mean=mean, var=var, sum_g=sum_g, sum_g_xhat=sum_g_xhat)
    _bn_backward_reduce_impl(grad_out2d, out2d if relu else None, y2d, mean, var, eps, impl, sum_g, sum_g_xhat)
    return sum_g, sum_g_xhat


def bn_backward_apply(grad_out2d, out2d, y2d, mean, var, weight, eps, relu, sum_g=None, sum_g_xhat=None, *,
                      residual_grad: bool = False, impl: str, out=None):
    """(grad_y2d, grad_residual2d): the input gradient [M, C], and g itself when residual_grad (else None).

    With sum_g and sum_g_xhat (from bn_backward_reduce; the forward normalized with batch statistics):
        grad_y = weight * rsqrt(var + eps) * (g - sum_g / M - xhat * sum_g_xhat / M)
    without them (constant running statistics, eval): grad_y = weight * rsqrt(var + eps) * g.
    out: optional (grad_y2d, grad_residual2d or None) tensors to write into.
    """
    _check_backward_rows("bn_backward_apply", grad_out2d, out2d, y2d, relu, impl)
    if (sum_g is None) != (sum_g_xhat is None):
        raise ValueError("bn_backward_apply: give both sum_g and sum_g_xhat (batch statistics) or neither")
    if out is not None:
        grad_y, grad_residual = out
    else:
        grad_y = torch.empty_like(y2d)
        grad_residual = torch.empty_like(y2d) if residual_grad else None
    _check_rows(grad_y, "grad_y", like=y2d)
    if (grad_residual is not None) != residual_grad:
        raise ValueError("bn_backward_apply: give an output for grad_residual exactly when residual_grad=True")
    if grad_residual is not None:
        _check_rows(grad_residual, "grad_residual", like=y2d)
    _check_vectors(y2d.shape[1], y2d.device, mean=mean, var=var, weight=weight, sum_g=sum_g, sum_g_xhat=sum_g_xhat)
    _bn_backward_apply_impl(grad_out2d, out2d if relu else None, y2d, mean, var, weight, sum_g, sum_g_xhat, eps,
                            grad_y, grad_residual, impl)
    return grad_y, grad_residual


# The same steps without argument checks, on arguments the callers above (or the fused op, on tensors it
# allocated or checked itself) have validated: rows [M, C] contiguous, fp32 [C] vectors, outputs given.
# out2d is None when there is no ReLU.

def _channel_stats_impl(y2d, mean, var, impl, running=None):
    """channel_stats into (mean, var), M >= 1. running: None, or (running_mean, running_var,
    num_batches_tracked or None, momentum or None) to update in place as nn.BatchNorm2d does in training."""
    if impl == "triton":
        _channel_stats_triton(y2d, mean, var, running)
        return
    if impl == "torch":
        batch_var, batch_mean = torch.var_mean(y2d.float(), dim=0, correction=0)
        mean.copy_(batch_mean)
        var.copy_(batch_var)
    else:
        extension_ops().bn_channel_stats(y2d, mean, var)
    if running is not None:
        _update_running_stats(mean, var, y2d.shape[0], running)


def _bn_apply_impl(y2d, mean, var, weight, bias, eps, residual2d, relu, impl, out):
    if y2d.shape[0] == 0:
        return
    if impl == "triton":
        _bn_apply_triton(y2d, mean, var, weight, bias, eps, residual2d, relu, out)
    elif impl == "torch":
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        z = (y2d.float() - mean) * scale
        if bias is not None:
            z = z + bias
        if residual2d is not None:
            z = z + residual2d.float()
        out.copy_(torch.relu(z) if relu else z)
    else:
        extension_ops().bn_apply(y2d, mean, var, weight, bias, eps, residual2d, relu, out)


def _masked_grad(grad_out2d: torch.Tensor, out2d: Optional[torch.Tensor]) -> torch.Tensor:
    """g in fp32: grad_out, zeroed where the ReLU output is <= 0 (as ReLU's backward does); no ReLU: out2d None."""
    g = grad_out2d.float()
    return g if out2d is None else torch.where(out2d <= 0, 0.0, g)


def _bn_backward_reduce_impl(grad_out2d, out2d, y2d, mean, var, eps, impl, sum_g, sum_g_xhat):
    if y2d.shape[0] == 0:
        sum_g.zero_()
        sum_g_xhat.zero_()
    elif impl == "triton":
        _bn_backward_reduce_triton(grad_out2d, out2d, y2d, mean, var, eps, sum_g, sum_g_xhat)
    elif impl == "torch":
        g = _masked_grad(grad_out2d, out2d)
        sum_g.copy_(g.sum(0))
        sum_g_xhat.copy_((g * (y2d.float() - mean)).sum(0) * torch.rsqrt(var + eps))
    else:
        extension_ops().bn_backward_reduce(grad_out2d, out2d, y2d, mean, var, eps, out2d is not None, sum_g,
                                           sum_g_xhat)


def _bn_backward_apply_impl(grad_out2d, out2d, y2d, mean, var, weight, sum_g, sum_g_xhat, eps, grad_y,
                            grad_residual, impl):
    if y2d.shape[0] == 0:
        return
    if impl == "triton":
        _bn_backward_apply_triton(grad_out2d, out2d, y2d, mean, var, weight, sum_g, sum_g_xhat, eps, grad_y,
                                  grad_residual)
    elif impl == "torch":
        g = _masked_grad(grad_out2d, out2d)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        if sum_g is None:
            grad_y.copy_(g * scale)
        else:
            rows = y2d.shape[0]
            xhat = (y2d.float() - mean) * invstd
            grad_y.copy_(scale * (g - sum_g / rows - xhat * (sum_g_xhat / rows)))
        if grad_residual is not None:
            grad_residual.copy_(g)
    else:
        extension_ops().bn_backward_apply(grad_out2d, out2d, y2d, mean, var, weight, sum_g, sum_g_xhat, eps,
                                          out2d is not None, grad_y, grad_residual)


def _update_running_stats(mean, var, count, running) -> None:
    """Fold a batch's (mean, biased var) over `count` rows into running = (running_mean, running_var,
    num_batches_tracked or None, momentum or None), counting the batch: one Triton program where Triton runs
    on these tensors, else the eager in-place ops of running_stats.update_running_stats."""
    running_mean, running_var, num_batches_tracked, momentum = running
    if not (mean.is_cuda or backend.triton_interpreter_enabled()):
        update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, count)
        return
    channels = mean.shape[0]
    with device_guard(mean):
        running_stats_update_kernel[(1,)](
            mean, var, running_mean, running_var, mean if num_batches_tracked is None else num_batches_tracked,
            0.0 if momentum is None else momentum, count / (count - 1), channels,
            COUNT_BATCH=num_batches_tracked is not None, CUMULATIVE=momentum is None,
            BLOCK_C=min(next_power_of_2(channels), 1024))


# --------------------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------------------

def _tile_shape(channels: int) -> tuple[int, int]:
    block_c = min(next_power_of_2(channels), MAX_BLOCK_C)
    return TILE_ELEMENTS // block_c, block_c


def _rows_per_program(rows: int, block_m: int, channel_blocks: int, device: torch.device) -> int:
    """Rows each reduction program walks (a multiple of block_m), for about the number of programs the
    device runs at once."""
    if device.type == "cuda":
        programs = PROGRAMS_PER_SM * num_sms(device)
    else:
        programs = INTERPRETER_PROGRAMS
    row_programs = max(1, programs // channel_blocks)
    tiles = cdiv(rows, block_m)
    return block_m * cdiv(tiles, min(tiles, row_programs))


def _channel_stats_triton(y2d, mean, var, running=None):
    """running: None, or (running_mean, running_var, num_batches_tracked or None, momentum or None), updated
    in place by the two kernels (see _channel_stats_impl)."""
    rows, channels = y2d.shape
    block_m, block_c = _tile_shape(channels)
    channel_blocks = cdiv(channels, block_c)
    rows_per_program = _rows_per_program(rows, block_m, channel_blocks, y2d.device)
    num_partials = cdiv(rows, rows_per_program)
    partial_mean = y2d.new_empty((num_partials, channels), dtype=torch.float32)
    partial_m2 = y2d.new_empty((num_partials, channels), dtype=torch.float32)
    # Pointers a variant does not read get `mean` (an empty CUDA tensor's null pointer is refused).
    running_mean, running_var, num_batches, momentum = running if running is not None else (mean, mean, None, 0.0)
    count_batch = num_batches is not None
    num_batches = num_batches if count_batch else mean
    with device_guard(y2d):
        channel_stats_partial_kernel[(num_partials, channel_blocks)](
            y2d, partial_mean, partial_m2, num_batches, rows, channels, rows_per_program, COUNT_BATCH=count_batch,
            BLOCK_M=block_m, BLOCK_C=block_c)
        channel_stats_merge_kernel[(channel_blocks,)](
            y2d, partial_mean, partial_m2, mean, var, running_mean, running_var, num_batches,
            0.0 if momentum is None else momentum, rows, channels, num_partials, rows_per_program,
            UPDATE_RUNNING=running is not None, CUMULATIVE=momentum is None,
            BLOCK_P=min(next_power_of_2(num_partials), MAX_BLOCK_PARTIALS), BLOCK_C=block_c)


def _bn_apply_triton(y2d, mean, var, weight, bias, eps, residual2d, relu, out):
    rows, channels = y2d.shape
    block_m, block_c = _tile_shape(channels)
    grid = (cdiv(rows, block_m), cdiv(channels, block_c))
    with device_guard(y2d):
        bn_apply_kernel[grid](
            y2d, residual2d if residual2d is not None else y2d, out, mean, var,
            weight if weight is not None else mean, bias if bias is not None else mean, rows, channels, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual2d is not None,
            RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c)


def _bn_backward_reduce_triton(grad_out2d, out2d, y2d, mean, var, eps, sum_g, sum_g_xhat):
    rows, channels = y2d.shape
    block_m, block_c = _tile_shape(channels)
    channel_blocks = cdiv(channels, block_c)
    rows_per_program = _rows_per_program(rows, block_m, channel_blocks, y2d.device)
    num_partials = cdiv(rows, rows_per_program)
    partial_g = y2d.new_empty((num_partials, channels), dtype=torch.float32)
    partial_gc = y2d.new_empty((num_partials, channels), dtype=torch.float32)
    with device_guard(y2d):
        bn_backward_reduce_partial_kernel[(num_partials, channel_blocks)](
            grad_out2d, out2d if out2d is not None else grad_out2d, y2d, mean, partial_g, partial_gc, rows,
            channels, rows_per_program, RELU=out2d is not None, BLOCK_M=block_m, BLOCK_C=block_c)
        bn_backward_reduce_merge_kernel[(channel_blocks,)](
            partial_g, partial_gc, var, sum_g, sum_g_xhat, channels, num_partials, eps,
            BLOCK_P=min(next_power_of_2(num_partials), MAX_BLOCK_PARTIALS), BLOCK_C=block_c)


def _bn_backward_apply_triton(grad_out2d, out2d, y2d, mean, var, weight, sum_g, sum_g_xhat, eps, grad_y,
                              grad_residual):
    rows, channels = y2d.shape
    block_m, block_c = _tile_shape(channels)
    grid = (cdiv(rows, block_m), cdiv(channels, block_c))
    with device_guard(y2d):
        bn_backward_apply_kernel[grid](
            grad_out2d, out2d if out2d is not None else grad_out2d, y2d, mean, var,
            weight if weight is not None else mean, sum_g if sum_g is not None else mean,
            sum_g_xhat if sum_g_xhat is not None else mean, grad_y,
            grad_residual if grad_residual is not None else grad_y, rows, channels, eps,
            HAS_WEIGHT=weight is not None, BATCH_STATS=sum_g is not None, RELU=out2d is not None,
            WRITE_RESIDUAL_GRAD=grad_residual is not None, BLOCK_M=block_m, BLOCK_C=block_c)


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time compile (dla_fast.ops.aot): every configuration the Triton launchers above can pick
# --------------------------------------------------------------------------------------------------------

def kernel_configurations() -> list:
    """The Triton kernels of this package in every configuration their launchers pick on CUDA tensors: tiles from
    `_tile_shape` (every channel count up to MAX_BLOCK_C), merge widths BLOCK_P up to MAX_BLOCK_PARTIALS, the
    running-statistics update's BLOCK_C up to 1024, every flag, activation and running-statistics dtype; the
    launchers pass no num_warps / num_stages (Triton's defaults, 4 and 3)."""
    from ..aot import make_config, triton_type
    tiles = sorted({_tile_shape(c) for c in (1, 2, 3, 5, 9, 17, 33, 65)})
    block_ps = sorted({min(next_power_of_2(p), MAX_BLOCK_PARTIALS) for p in (1, 2, 3, 5, 9, 17, 33, 65)})
    f32 = "*fp32"
    configs = []
    for dtype in backend.FUSED_DTYPES:
        act = "*" + triton_type(dtype)
        for (block_m, block_c), flag in _flag_product(tiles, 1):
            configs.append(make_config(
                channel_stats_partial_kernel,
                dict(y_ptr=act, partial_mean_ptr=f32, partial_m2_ptr=f32, num_batches_ptr="*i64" if flag[0] else f32,
                     M="i32", C="i32", rows_per_program="i32"),
                dict(COUNT_BATCH=flag[0], BLOCK_M=block_m, BLOCK_C=block_c), label=triton_type(dtype)))
            configs.append(make_config(
                bn_backward_reduce_partial_kernel,
                dict(grad_out_ptr=act, out_ptr=act, y_ptr=act, mean_ptr=f32, partial_g_ptr=f32, partial_gc_ptr=f32,
                     M="i32", C="i32", rows_per_program="i32"),
                dict(RELU=flag[0], BLOCK_M=block_m, BLOCK_C=block_c), label=triton_type(dtype)))
        for (block_m, block_c), (has_weight, has_bias, has_residual, relu) in _flag_product(tiles, 4):
            configs.append(make_config(
                bn_apply_kernel,
                dict(y_ptr=act, residual_ptr=act, out_ptr=act, mean_ptr=f32, var_ptr=f32, weight_ptr=f32,
                     bias_ptr=f32, M="i32", C="i32", eps="fp32"),
                dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, RELU=relu,
                     BLOCK_M=block_m, BLOCK_C=block_c), label=triton_type(dtype)))
        for (block_m, block_c), (has_weight, batch_stats, relu, residual_grad) in _flag_product(tiles, 4):
            configs.append(make_config(
                bn_backward_apply_kernel,
                dict(grad_out_ptr=act, out_ptr=act, y_ptr=act, mean_ptr=f32, var_ptr=f32, weight_ptr=f32,
                     sum_g_ptr=f32, sum_g_xhat_ptr=f32, grad_y_ptr=act, grad_residual_ptr=act, M="i32", C="i32",
                     eps="fp32"),
                dict(HAS_WEIGHT=has_weight, BATCH_STATS=batch_stats, RELU=relu, WRITE_RESIDUAL_GRAD=residual_grad,
                     BLOCK_M=block_m, BLOCK_C=block_c), label=triton_type(dtype)))
        for (_, block_c), block_p in [(t, p) for t in tiles for p in block_ps]:
            for running, counter, cumulative in _running_variants():
                configs.append(make_config(
                    channel_stats_merge_kernel,
                    dict(y_ptr=act, partial_mean_ptr=f32, partial_m2_ptr=f32, mean_ptr=f32, var_ptr=f32,
                         running_mean_ptr=running or f32, running_var_ptr=running or f32,
                         num_batches_ptr=counter or f32, momentum="fp32", M="i32", C="i32", num_partials="i32",
                         rows_per_program="i32"),
                    dict(UPDATE_RUNNING=running is not None, CUMULATIVE=cumulative, BLOCK_P=block_p, BLOCK_C=block_c),
                    label=f"{triton_type(dtype)},running {running}"))
    for (_, block_c), block_p in [(t, p) for t in tiles for p in block_ps]:
        configs.append(make_config(
            bn_backward_reduce_merge_kernel,
            dict(partial_g_ptr=f32, partial_gc_ptr=f32, var_ptr=f32, sum_g_ptr=f32, sum_g_xhat_ptr=f32, C="i32",
                 num_partials="i32", eps="fp32"),
            dict(BLOCK_P=block_p, BLOCK_C=block_c)))
    for block_c in sorted({min(next_power_of_2(c), 1024) for c in (1, 3, 5, 9, 17, 33, 65, 129, 257, 513,
                                                                          1025)}):
        for running, counter, cumulative in _running_variants():
            if running is None:
                continue
            configs.append(make_config(
                running_stats_update_kernel,
                dict(mean_ptr=f32, var_ptr=f32, running_mean_ptr=running, running_var_ptr=running,
                     num_batches_ptr=counter or f32, momentum="fp32", bessel="fp32", C="i32"),
                dict(COUNT_BATCH=counter is not None, CUMULATIVE=cumulative, BLOCK_C=block_c),
                label=f"running {running}"))
    return configs


def _flag_product(tiles, flags: int):
    import itertools
    return itertools.product(tiles, itertools.product((False, True), repeat=flags))


def _running_variants():
    """(running-statistics pointer type or None, num_batches_tracked pointer type or None, cumulative)."""
    yield None, None, False
    for running in ("*fp32", "*fp16", "*bf16"):
        yield running, "*i64", False
        yield running, "*i64", True
        yield running, None, False
