"""Fused BatchNorm2d (+ residual add) (+ ReLU): out = ReLU?(BN(x) [+ residual]), exactly nn.BatchNorm2d.

Everything here works on 4-D (N, C, H, W) tensors of any memory format. channels_last (NHWC) is the fast path:
its data is seen without a copy as a row-major 2-D [M = N*H*W, C] tensor, and the outputs are allocated
channels_last; NCHW inputs are converted once. Per-channel vectors (statistics, affine parameters, gradient
sums) are fp32 [C]; activations may be fp32, fp16 or bf16, always accumulated in fp32.

Public pieces:

- `batchnorm_act(x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
  residual=None, relu=True)`: the op, with autograd and torch.compile support, running statistics updated
  like nn.BatchNorm2d. The backend (`dla_fast.backend.resolve`) picks the implementation. In eager mode it
  runs a plain autograd.Function (the least host overhead per call) whose statistics step also updates the
  running statistics and num_batches_tracked on the device (Triton: inside the two statistics kernels; the
  extension: one extra single-program Triton kernel), with no host sync for momentum=None.
- `batchnorm_act_reference(...)`: the eager reference it must equal (F.batch_norm, add, relu).
- Building blocks on [M, C] rows, reused by other fused ops with an explicit `impl` ('torch' | 'triton' |
  'cuda'): `channel_stats`, `bn_apply`, `bn_backward_reduce`, `bn_backward_apply`.
- Custom ops `dla_fast::batchnorm_act_forward` and `dla_fast::batchnorm_act_backward`, what the op runs under
  torch.compile (functional; the running statistics are updated outside them with
  `running_stats.update_running_stats`, which inductor fuses). Both paths share the forward and backward.

The math, with xhat = (y - mean) * rsqrt(var + eps), g = grad_out zeroed where out <= 0 with
ReLU (a NaN output passes it, as eager's threshold_backward), else grad_out:
    forward:  out = [relu](xhat * weight + bias [+ residual])
    backward: grad_y = weight * rsqrt(var + eps) * (g - sum(g) / M - xhat * sum(g * xhat) / M) (batch stats),
              grad_y = weight * rsqrt(var + eps) * g (running stats, eval); grad_residual = g;
              grad_weight = sum(g * xhat); grad_bias = sum(g)   (sums over the M rows, per channel)

Reductions are deterministic (per-block partials merged in a fixed order, no float atomics). The batch
statistics use Welford/Chan merging of values shifted by the first row, so they stay accurate for large M
and |mean| >> std.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ... import backend
from .._triton import tl, triton
from ..common import (channels_last, device_guard, empty_channels_last, extension_ops,
                     fp32_vector, num_sms, rows_view)
from .. import sync_stats
from ..running_stats import check_batchnorm_args, update_running_stats, uses_batch_stats

OP_NAME = "batchnorm_act"
IMPLS = ("torch", "triton", "cuda")

# Triton launch shape: a program handles [BLOCK_M, BLOCK_C] tiles of TILE_ELEMENTS values; the reductions
# give each program a run of tiles, with about PROGRAMS_PER_SM programs per streaming multiprocessor.
TILE_ELEMENTS = 4096
MAX_BLOCK_C = 64
MAX_BLOCK_PARTIALS = 64
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4  # CPU tensors under TRITON_INTERPRET=1: programs run one after another


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


def bn_backward_reduce(grad_out2d, out2d, y2d, mean, var, eps, relu, *, impl: str, out=None):
    """(sum_g, sum_g_xhat), fp32 [C]: per-channel sums over the rows of g and g * xhat.

    g = grad_out2d * (out2d > 0) if relu else grad_out2d (out2d may be None without ReLU),
    xhat = (y2d - mean) * rsqrt(var + eps). These are also grad_bias and grad_weight.
    out: optional (sum_g, sum_g_xhat) tensors to write into.
    """
    _check_impl(impl)
    _check_rows(y2d, "y2d")
    _check_rows(grad_out2d, "grad_out2d", like=y2d)
    if relu:
        if out2d is None:
            raise ValueError("bn_backward_reduce: relu=True needs out2d (the ReLU mask)")
        _check_rows(out2d, "out2d", like=y2d)
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
    _check_impl(impl)
    _check_rows(y2d, "y2d")
    _check_rows(grad_out2d, "grad_out2d", like=y2d)
    if relu:
        if out2d is None:
            raise ValueError("bn_backward_apply: relu=True needs out2d (the ReLU mask)")
        _check_rows(out2d, "out2d", like=y2d)
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
            BLOCK_C=min(triton.next_power_of_2(channels), 1024))


# --------------------------------------------------------------------------------------------------------
# Triton kernels (all on row-major [M, C]; grid axis 0 walks rows, axis 1 channel blocks)
# --------------------------------------------------------------------------------------------------------

@triton.jit
def channel_stats_partial_kernel(y_ptr, partial_mean_ptr, partial_m2_ptr, num_batches_ptr, M, C, rows_per_program,
                                 COUNT_BATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (run of rows_per_program rows, channel): count-weighted mean and M2 of y - y[0, c].

    Each [BLOCK_M, BLOCK_C] tile is summarized exactly (two passes in registers) and folded into the
    running summary with Chan's formula. Writes partial_mean/partial_m2 [num_programs_0, C] (fp32).
    COUNT_BATCH: program (0, 0) also adds 1 to num_batches_tracked (nn.BatchNorm2d's counter), which the merge
    kernel, launched after this one, reads for momentum=None.
    """
    pid_m = tl.program_id(0)
    if COUNT_BATCH:
        if (pid_m == 0) & (tl.program_id(1) == 0):
            tl.store(num_batches_ptr, tl.load(num_batches_ptr) + 1)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    shift = tl.load(y_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    row_begin = pid_m * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, M)
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile_start in range(row_begin, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
        d = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - shift[None, :]
        d = tl.where(mask, d, 0.0)
        tile_count = tl.minimum(row_end - tile_start, BLOCK_M).to(tl.float32)
        tile_mean = tl.sum(d, axis=0) / tile_count
        centered = tl.where(mask, d - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(centered * centered, axis=0)
        total = count + tile_count
        delta = tile_mean - mean
        tile_weight = tile_count / total
        mean = mean + delta * tile_weight
        m2 = m2 + tile_m2 + delta * delta * (count * tile_weight)
        count = total
    tl.store(partial_mean_ptr + pid_m * C + cols, mean, mask=col_mask)
    tl.store(partial_m2_ptr + pid_m * C + cols, m2, mask=col_mask)


@triton.jit
def fold_running_stats(running_mean_ptr, running_var_ptr, cols, col_mask, mean, unbiased_var, factor):
    """running = running * (1 - factor) + batch * factor for the channels `cols`, as nn.BatchNorm2d updates
    running_mean and running_var (with the unbiased batch variance), in fp32, stored in the buffers' dtype."""
    running_mean = tl.load(running_mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    running_var = tl.load(running_var_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    running_mean = running_mean * (1.0 - factor) + mean * factor
    running_var = running_var * (1.0 - factor) + unbiased_var * factor
    tl.store(running_mean_ptr + cols, running_mean.to(running_mean_ptr.dtype.element_ty), mask=col_mask)
    tl.store(running_var_ptr + cols, running_var.to(running_var_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def channel_stats_merge_kernel(y_ptr, partial_mean_ptr, partial_m2_ptr, mean_ptr, var_ptr,
                               running_mean_ptr, running_var_ptr, num_batches_ptr, momentum, M, C, num_partials,
                               rows_per_program, UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges the partial summaries in order (groups of BLOCK_P, Chan's formula): mean [C], biased var [C].

    UPDATE_RUNNING: also folds them into running_mean / running_var with factor `momentum`, or with
    1 / num_batches_tracked when CUMULATIVE (momentum=None; the counter already incremented).
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for part_start in range(0, num_partials, BLOCK_P):
        parts = part_start + tl.arange(0, BLOCK_P)
        part_mask = parts < num_partials
        part_count = tl.where(part_mask, tl.minimum(M - parts * rows_per_program, rows_per_program), 0)
        part_count = part_count.to(tl.float32)
        mask = part_mask[:, None] & col_mask[None, :]
        offsets = parts[:, None] * C + cols[None, :]
        part_mean = tl.load(partial_mean_ptr + offsets, mask=mask, other=0.0)
        part_m2 = tl.load(partial_m2_ptr + offsets, mask=mask, other=0.0)
        group_count = tl.sum(part_count, axis=0)
        group_mean = tl.sum(part_count[:, None] * part_mean, axis=0) / group_count
        deviation = tl.where(mask, part_mean - group_mean[None, :], 0.0)
        group_m2 = tl.sum(part_m2 + part_count[:, None] * deviation * deviation, axis=0)
        total = count + group_count
        delta = group_mean - mean
        group_weight = group_count / total
        mean = mean + delta * group_weight
        m2 = m2 + group_m2 + delta * delta * (count * group_weight)
        count = total
    shift = tl.load(y_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(mean_ptr + cols, shift + mean, mask=col_mask)
    tl.store(var_ptr + cols, m2 / count, mask=col_mask)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / tl.load(num_batches_ptr).to(tl.float32)
        else:
            factor = momentum
        fold_running_stats(running_mean_ptr, running_var_ptr, cols, col_mask, shift + mean, m2 / (count - 1.0),
                            factor)


@triton.jit
def running_stats_update_kernel(mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_ptr, momentum,
                                bessel, C, COUNT_BATCH: tl.constexpr, CUMULATIVE: tl.constexpr,
                                BLOCK_C: tl.constexpr):
    """One program: nn.BatchNorm2d's running-statistics step from a batch's mean and biased var [C] (fp32).

    COUNT_BATCH: num_batches_tracked += 1; the factor is `momentum`, or 1 / num_batches_tracked (counted)
    when CUMULATIVE; the running variance takes var * bessel (bessel = M / (M - 1), the unbiased variance).
    """
    if COUNT_BATCH:
        batches = tl.load(num_batches_ptr) + 1
    if CUMULATIVE:
        factor = 1.0 / batches.to(tl.float32)
    else:
        factor = momentum
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
        var = tl.load(var_ptr + cols, mask=col_mask, other=0.0)
        fold_running_stats(running_mean_ptr, running_var_ptr, cols, col_mask, mean, var * bessel, factor)
    if COUNT_BATCH:
        tl.debug_barrier()  # every thread has read the counter before it is written
        tl.store(num_batches_ptr, batches)


@triton.jit
def bn_apply_kernel(y_ptr, residual_ptr, out_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, M, C, eps,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                    RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out [M, C] = [relu]((y - mean) * rsqrt(var + eps) * weight + bias [+ residual]), one tile per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < M)[:, None] & col_mask[None, :]
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    scale = tl.rsqrt(tl.load(var_ptr + cols, mask=col_mask, other=1.0) + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols, mask=col_mask, other=0.0)
    offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
    z = (tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * scale[None, :]
    if HAS_BIAS:
        z = z + tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if HAS_RESIDUAL:
        z = z + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        z = tl.where(z < 0.0, 0.0, z)
    tl.store(out_ptr + offsets, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_backward_reduce_partial_kernel(grad_out_ptr, out_ptr, y_ptr, mean_ptr, partial_g_ptr, partial_gc_ptr,
                                      M, C, rows_per_program, RELU: tl.constexpr, BLOCK_M: tl.constexpr,
                                      BLOCK_C: tl.constexpr):
    """Per (run of rows, channel): sum of g and of g * (y - mean) -> partial_g, partial_gc [programs, C]."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    row_begin = pid_m * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, M)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile_start in range(row_begin, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
        g = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            g = tl.where(tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32) <= 0.0, 0.0, g)
        centered = tl.where(mask, tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean[None, :],
                            0.0)
        acc_g += tl.sum(g, axis=0)
        acc_gc += tl.sum(g * centered, axis=0)
    tl.store(partial_g_ptr + pid_m * C + cols, acc_g, mask=col_mask)
    tl.store(partial_gc_ptr + pid_m * C + cols, acc_gc, mask=col_mask)


@triton.jit
def bn_backward_reduce_merge_kernel(partial_g_ptr, partial_gc_ptr, var_ptr, sum_g_ptr, sum_g_xhat_ptr, C,
                                    num_partials, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum_g = sum of partial_g; sum_g_xhat = (sum of partial_gc) * rsqrt(var + eps), in a fixed order."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for part_start in range(0, num_partials, BLOCK_P):
        parts = part_start + tl.arange(0, BLOCK_P)
        mask = (parts < num_partials)[:, None] & col_mask[None, :]
        offsets = parts[:, None] * C + cols[None, :]
        acc_g += tl.sum(tl.load(partial_g_ptr + offsets, mask=mask, other=0.0), axis=0)
        acc_gc += tl.sum(tl.load(partial_gc_ptr + offsets, mask=mask, other=0.0), axis=0)
    invstd = tl.rsqrt(tl.load(var_ptr + cols, mask=col_mask, other=1.0) + eps)
    tl.store(sum_g_ptr + cols, acc_g, mask=col_mask)
    tl.store(sum_g_xhat_ptr + cols, acc_gc * invstd, mask=col_mask)


@triton.jit
def bn_backward_apply_kernel(grad_out_ptr, out_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, sum_g_ptr,
                             sum_g_xhat_ptr, grad_y_ptr, grad_residual_ptr, M, C, eps, HAS_WEIGHT: tl.constexpr,
                             BATCH_STATS: tl.constexpr, RELU: tl.constexpr, WRITE_RESIDUAL_GRAD: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_y [M, C] (and grad_residual = g), one tile per program; see bn_backward_apply for the formula."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < M)[:, None] & col_mask[None, :]
    invstd = tl.rsqrt(tl.load(var_ptr + cols, mask=col_mask, other=1.0) + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols, mask=col_mask, other=0.0)
    offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
    g = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        g = tl.where(tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32) <= 0.0, 0.0, g)
    if BATCH_STATS:
        inv_rows = 1.0 / M
        mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
        offset = tl.load(sum_g_ptr + cols, mask=col_mask, other=0.0) * inv_rows
        slope = tl.load(sum_g_xhat_ptr + cols, mask=col_mask, other=0.0) * invstd * inv_rows
        centered = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean[None, :]
        grad_y = scale[None, :] * (g - offset[None, :] - centered * slope[None, :])
    else:
        grad_y = scale[None, :] * g
    tl.store(grad_y_ptr + offsets, grad_y.to(grad_y_ptr.dtype.element_ty), mask=mask)
    if WRITE_RESIDUAL_GRAD:
        tl.store(grad_residual_ptr + offsets, g.to(grad_residual_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------------------

def _tile_shape(channels: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(channels), MAX_BLOCK_C)
    return TILE_ELEMENTS // block_c, block_c


def _rows_per_program(rows: int, block_m: int, channel_blocks: int, device: torch.device) -> int:
    """Rows each reduction program walks (a multiple of block_m), for about the number of programs the
    device runs at once."""
    if device.type == "cuda":
        programs = PROGRAMS_PER_SM * num_sms(device)
    else:
        programs = INTERPRETER_PROGRAMS
    row_programs = max(1, programs // channel_blocks)
    tiles = triton.cdiv(rows, block_m)
    return block_m * triton.cdiv(tiles, min(tiles, row_programs))


def _channel_stats_triton(y2d, mean, var, running=None):
    """running: None, or (running_mean, running_var, num_batches_tracked or None, momentum or None), updated
    in place by the two kernels (see _channel_stats_impl)."""
    rows, channels = y2d.shape
    block_m, block_c = _tile_shape(channels)
    channel_blocks = triton.cdiv(channels, block_c)
    rows_per_program = _rows_per_program(rows, block_m, channel_blocks, y2d.device)
    num_partials = triton.cdiv(rows, rows_per_program)
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
            BLOCK_P=min(triton.next_power_of_2(num_partials), MAX_BLOCK_PARTIALS), BLOCK_C=block_c)


def _bn_apply_triton(y2d, mean, var, weight, bias, eps, residual2d, relu, out):
    rows, channels = y2d.shape
    block_m, block_c = _tile_shape(channels)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(channels, block_c))
    with device_guard(y2d):
        bn_apply_kernel[grid](
            y2d, residual2d if residual2d is not None else y2d, out, mean, var,
            weight if weight is not None else mean, bias if bias is not None else mean, rows, channels, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual2d is not None,
            RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c)


def _bn_backward_reduce_triton(grad_out2d, out2d, y2d, mean, var, eps, sum_g, sum_g_xhat):
    rows, channels = y2d.shape
    block_m, block_c = _tile_shape(channels)
    channel_blocks = triton.cdiv(channels, block_c)
    rows_per_program = _rows_per_program(rows, block_m, channel_blocks, y2d.device)
    num_partials = triton.cdiv(rows, rows_per_program)
    partial_g = y2d.new_empty((num_partials, channels), dtype=torch.float32)
    partial_gc = y2d.new_empty((num_partials, channels), dtype=torch.float32)
    with device_guard(y2d):
        bn_backward_reduce_partial_kernel[(num_partials, channel_blocks)](
            grad_out2d, out2d if out2d is not None else grad_out2d, y2d, mean, partial_g, partial_gc, rows,
            channels, rows_per_program, RELU=out2d is not None, BLOCK_M=block_m, BLOCK_C=block_c)
        bn_backward_reduce_merge_kernel[(channel_blocks,)](
            partial_g, partial_gc, var, sum_g, sum_g_xhat, channels, num_partials, eps,
            BLOCK_P=min(triton.next_power_of_2(num_partials), MAX_BLOCK_PARTIALS), BLOCK_C=block_c)


def _bn_backward_apply_triton(grad_out2d, out2d, y2d, mean, var, weight, sum_g, sum_g_xhat, eps, grad_y,
                              grad_residual):
    rows, channels = y2d.shape
    block_m, block_c = _tile_shape(channels)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(channels, block_c))
    with device_guard(y2d):
        bn_backward_apply_kernel[grid](
            grad_out2d, out2d if out2d is not None else grad_out2d, y2d, mean, var,
            weight if weight is not None else mean, sum_g if sum_g is not None else mean,
            sum_g_xhat if sum_g_xhat is not None else mean, grad_y,
            grad_residual if grad_residual is not None else grad_y, rows, channels, eps,
            HAS_WEIGHT=weight is not None, BATCH_STATS=sum_g is not None, RELU=out2d is not None,
            WRITE_RESIDUAL_GRAD=grad_residual is not None, BLOCK_M=block_m, BLOCK_C=block_c)


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
    residual2d = None if residual is None else rows_view(channels_last(residual))
    _bn_apply_impl(x2d, norm_mean, norm_var, fp32_vector(weight), fp32_vector(bias), eps, residual2d, relu, impl,
                   rows_view(out))
    return out, mean, var


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
    residual2d = None if residual is None else rows_view(channels_last(residual))
    _bn_apply_impl(x2d, mean, var, fp32_vector(weight), fp32_vector(bias), eps, residual2d, relu, impl,
                   rows_view(out))
    return out, mean, var, total


class _SyncBatchNormActFunction(torch.autograd.Function):
    """Eager autograd of the synchronized op (training, batch statistics over a process group)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, residual, eps, relu, impl, running, group):
        x = channels_last(x)
        out, mean, var, total = _forward_synchronized(x, weight, bias, residual, eps, relu, impl, running, group)
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
    check_inputs(x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, residual,
                 synchronized=group is not None)
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


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time compile (dla_fast.ops.aot): every configuration the Triton launchers above can pick
# --------------------------------------------------------------------------------------------------------

def kernel_configurations() -> list:
    """The Triton kernels of this module in every configuration their launchers pick on CUDA tensors: tiles from
    `_tile_shape` (every channel count up to MAX_BLOCK_C), merge widths BLOCK_P up to MAX_BLOCK_PARTIALS, the
    running-statistics update's BLOCK_C up to 1024, every flag, activation and running-statistics dtype; the
    launchers pass no num_warps / num_stages (Triton's defaults, 4 and 3)."""
    from ..aot import make_config, triton_type
    tiles = sorted({_tile_shape(c) for c in (1, 2, 3, 5, 9, 17, 33, 65)})
    block_ps = sorted({min(triton.next_power_of_2(p), MAX_BLOCK_PARTIALS) for p in (1, 2, 3, 5, 9, 17, 33, 65)})
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
    for block_c in sorted({min(triton.next_power_of_2(c), 1024) for c in (1, 3, 5, 9, 17, 33, 65, 129, 257, 513,
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
