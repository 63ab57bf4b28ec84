"""The DLA aggregation node, fused: N(x_1..x_n) = ReLU(BN(W [x_1; ...; x_n]) [+ x_1]).

Eager PyTorch writes the concatenation, then runs a 1x1 conv, a BatchNorm and a ReLU, each a pass over
memory. Here the 1x1 conv is a GEMM  y[M, Cout] = sum_i x_i[M, C_i] @ W[:, K_i]^T  (M = N*H*W, the K
dimension split across the children, each child read through its own pointer, the concatenation never
written), and BatchNorm, the residual and the ReLU are applied in the GEMM's epilogue.

Layouts: activations are NHWC (channels_last), seen as row-major [M, C]; NCHW inputs are converted once.
The 1x1 conv weight is [Cout, K] with K = sum C_i in the children's order.

Kernels (Triton, fp32 accumulation, int64 row offsets):
- `aggregate_fwd_kernel`: the GEMM; its epilogue either applies BN (+residual) + ReLU with given statistics
  (eval) and/or writes the pre-BN output y together with per-tile channel sums and centred sums of squares
  (training), merged by `aggregate_stats_merge_kernel` (Chan's parallel variance, deterministic), in two levels
  (`aggregate_stats_group_kernel` first) when there are many row tiles.
- training forward then normalizes y with the batch statistics (`bn_apply` of dla_fast.ops.batchnorm_act).
- `aggregate_grad_input_kernel`: grad of every child = dy @ W_i, where dy (the gradient at y) comes from
  grad_out, the saved output (ReLU mask) and y: computed on the fly when the children fit one column tile (the
  programs of that column also store dy for the weight gradient), else materialised once by
  `aggregate_dy_kernel`; child 0 also gets the residual's gradient.
- `aggregate_grad_weight_kernel`: grad W = dy^T @ [x_1 ... x_n], split over M, partials summed once.

The public entry point is `aggregate(...)`, which picks the implementation with dla_fast.backend
(op name "aggregate"); the kernels are wrapped as the torch.library custom ops `dla_fast::aggregate_fwd`
and `dla_fast::aggregate_bwd`, with fake implementations and registered autograd.
"""
from __future__ import annotations

from itertools import product
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ... import backend
from .._triton import tl, triton
from ..batchnorm_act import fold_running_stats, bn_apply, bn_backward_reduce
from .. import sync_stats
from ..common import cached_derived, device_guard, empty_channels_last, fp32_vector, nhwc_rows, num_sms, rows_view
from ..running_stats import check_batchnorm_args, update_running_stats, uses_batch_stats

MAX_CHILDREN = 8  # pointer slots of the kernels; DLA-169's deepest roots have 7 children
CHILD_SLOTS = tl.constexpr(MAX_CHILDREN)
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
# Triton kernels
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _accumulate_child(acc, x_ptr, C, w_ptr, k_offset, stride_wn, offs_m, mask_m, offs_n, mask_n,
                      BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc[BM, BN] += x[offs_m, :C] @ W[offs_n, k_offset : k_offset + C]^T for one child."""
    x_rows = x_ptr + offs_m[:, None] * C
    w_cols = w_ptr + offs_n[None, :] * stride_wn + k_offset
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        a = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def aggregate_fwd_kernel(
    x0, x1, x2, x3, x4, x5, x6, x7,          # children, NHWC rows [M, C_i]
    c0, c1, c2, c3, c4, c5, c6, c7,          # their channel counts
    w_ptr, stride_wn,                        # W [Cout, K], row stride
    out_ptr, y_ptr,                          # out [M, Cout] (APPLY_BN), pre-BN y [M, Cout] (STORE_PREACT)
    part_sum_ptr, part_m2_ptr,               # per-row-tile channel sums / centred sums of squares [tiles, Cout]
    mean_ptr, var_ptr, gamma_ptr, beta_ptr,  # per-channel fp32 statistics and affine (APPLY_BN)
    M, Cout, eps,
    NUM_CHILDREN: tl.constexpr, RESIDUAL: tl.constexpr,
    APPLY_BN: tl.constexpr, STORE_PREACT: tl.constexpr, COMPUTE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < Cout

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_offset = 0
    for i in tl.static_range(CHILD_SLOTS):
        if i < NUM_CHILDREN:
            C = (c0, c1, c2, c3, c4, c5, c6, c7)[i]
            acc = _accumulate_child(acc, (x0, x1, x2, x3, x4, x5, x6, x7)[i], C, w_ptr, k_offset, stride_wn,
                                    offs_m, mask_m, offs_n, mask_n, BLOCK_K, DOT_PRECISION)
            k_offset += C

    tile = offs_m[:, None] * Cout + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_PREACT:
        tl.store(y_ptr + tile, acc.to(y_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_STATS:
        rows = tl.minimum(M - pid_m.to(tl.int64) * BLOCK_M, BLOCK_M).to(tl.float32)
        acc_valid = tl.where(mask_m[:, None], acc, 0.0)
        tile_sum = tl.sum(acc_valid, axis=0)
        centred = tl.where(mask_m[:, None], acc - (tile_sum / rows)[None, :], 0.0)
        tile_m2 = tl.sum(centred * centred, axis=0)
        tl.store(part_sum_ptr + pid_m * Cout + offs_n, tile_sum, mask=mask_n)
        tl.store(part_m2_ptr + pid_m * Cout + offs_n, tile_m2, mask=mask_n)
    if APPLY_BN:
        mean = tl.load(mean_ptr + offs_n, mask=mask_n, other=0.0)
        var = tl.load(var_ptr + offs_n, mask=mask_n, other=1.0)
        gamma = tl.load(gamma_ptr + offs_n, mask=mask_n, other=0.0)
        beta = tl.load(beta_ptr + offs_n, mask=mask_n, other=0.0)
        scale = gamma * tl.rsqrt(var + eps)
        z = (acc - mean[None, :]) * scale[None, :] + beta[None, :]  # eager CUDA's grouping (NaN/Inf as there)
        if RESIDUAL:  # child 0 has Cout channels
            z += tl.load(x0 + tile, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(z < 0.0, 0.0, z)  # ReLU that keeps NaN (tl.maximum drops it)
        tl.store(out_ptr + tile, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def aggregate_stats_group_kernel(part_sum_ptr, part_m2_ptr, group_sum_ptr, group_m2_ptr, M, C, num_tiles,
                                 TILE_ROWS: tl.constexpr, GROUP_TILES: tl.constexpr, BLOCK_C: tl.constexpr):
    """First level of the two-level statistics merge: grid (tile groups, channel blocks). Each program merges
    GROUP_TILES consecutive per-tile (sum, centred M2) of TILE_ROWS rows into one (sum, centred M2) over
    GROUP_TILES * TILE_ROWS rows (Chan: M2 = sum_t M2_t + sum_t n_t (mean_t - mean_group)^2), which
    aggregate_stats_merge_kernel then merges as tiles of that many rows."""
    pid_g = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_t = pid_g * GROUP_TILES + tl.arange(0, GROUP_TILES)
    valid_t = offs_t < num_tiles
    mask = valid_t[:, None] & mask_c[None, :]
    rows = tl.minimum(M - offs_t.to(tl.int64) * TILE_ROWS, TILE_ROWS).to(tl.float32)
    rows = tl.where(valid_t, rows, 0.0)
    offsets = offs_t[:, None] * C + offs_c[None, :]
    tile_sum = tl.load(part_sum_ptr + offsets, mask=mask, other=0.0)
    tile_m2 = tl.load(part_m2_ptr + offsets, mask=mask, other=0.0)
    total = tl.sum(tile_sum, axis=0)
    group_mean = total / tl.sum(rows, axis=0)
    delta = tl.where(mask, tile_sum / tl.where(valid_t, rows, 1.0)[:, None] - group_mean[None, :], 0.0)
    m2 = tl.sum(tile_m2 + rows[:, None] * delta * delta, axis=0)
    tl.store(group_sum_ptr + pid_g * C + offs_c, total, mask=mask_c)
    tl.store(group_m2_ptr + pid_g * C + offs_c, m2, mask=mask_c)


@triton.jit
def aggregate_stats_merge_kernel(part_sum_ptr, part_m2_ptr, mean_ptr, var_ptr,
                               running_mean_ptr, running_var_ptr, num_batches_ptr, momentum,
                               M, C, num_tiles, TILE_ROWS: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                               CUMULATIVE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge per-tile (sum, centred M2) of TILE_ROWS rows each into the mean and biased variance per channel,
    and with UPDATE_RUNNING fold them into the running statistics as nn.BatchNorm2d does (unbiased variance;
    factor `momentum`, or 1 / num_batches_tracked when CUMULATIVE, the counter already incremented).

    Chan et al.: M2 = sum_t M2_t + sum_t n_t (mean_t - mean)^2, with the global mean from the first pass.
    """
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, num_tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < num_tiles)[:, None] & mask_c[None, :]
        total += tl.sum(tl.load(part_sum_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0), axis=0)
    mean = total / M
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, num_tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        valid_t = offs_t < num_tiles
        mask = valid_t[:, None] & mask_c[None, :]
        rows = tl.minimum(M - offs_t.to(tl.int64) * TILE_ROWS, TILE_ROWS).to(tl.float32)
        rows = tl.where(valid_t, rows, 1.0)
        tile_sum = tl.load(part_sum_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        tile_m2 = tl.load(part_m2_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        delta = tile_sum / rows[:, None] - mean[None, :]
        m2 += tl.sum(tl.where(mask, tile_m2 + rows[:, None] * delta * delta, 0.0), axis=0)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, m2 / M, mask=mask_c)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / tl.load(num_batches_ptr).to(tl.float32)
        else:
            factor = momentum
        fold_running_stats(running_mean_ptr, running_var_ptr, offs_c, mask_c, mean, m2 / (M - 1), factor)


@triton.jit
def _dy_tile(tile, mask, offs_co, mask_co, grad_out_ptr, out_ptr, y_ptr, sum_g_ptr, sum_gx_ptr, mean_ptr, var_ptr,
             gamma_ptr, M, eps, BATCH_STATS: tl.constexpr):
    """dy, the gradient at the pre-BN y, on one [rows, offs_co] tile (fp32, 0 outside `mask`), from
    g = grad_out, 0 where out <= 0 (the ReLU mask from the saved output, as threshold_backward: NaN passes):
      batch statistics:   dy = k (g - sum_g/M - (y - mean) * (invstd sum_gx/M)), k = gamma*invstd
                          (eager's grouping, so NaN / Inf come out where they do in eager);
      running statistics: dy = k g."""
    invstd = tl.rsqrt(tl.load(var_ptr + offs_co, mask=mask_co, other=1.0) + eps)
    k = tl.load(gamma_ptr + offs_co, mask=mask_co, other=0.0) * invstd
    grad_out = tl.load(grad_out_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    g = tl.where(out <= 0.0, 0.0, grad_out)
    if BATCH_STATS:
        mean = tl.load(mean_ptr + offs_co, mask=mask_co, other=0.0)
        offset = tl.load(sum_g_ptr + offs_co, mask=mask_co, other=0.0) / M
        slope = tl.load(sum_gx_ptr + offs_co, mask=mask_co, other=0.0) * invstd / M
        y = tl.load(y_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        g = g - offset[None, :] - (y - mean[None, :]) * slope[None, :]
    return tl.where(mask, g * k[None, :], 0.0)


@triton.jit
def aggregate_dy_kernel(grad_out_ptr, out_ptr, y_ptr, dy_ptr, sum_g_ptr, sum_gx_ptr, mean_ptr, var_ptr, gamma_ptr,
                        M, Cout, eps, BATCH_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr):
    """dy [M, Cout] (see _dy_tile), one tile per program: materialised once when the children's gradient
    spans several column tiles, instead of recomputed by every column tile of aggregate_grad_input_kernel."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < Cout
    mask = (offs_m < M)[:, None] & mask_co[None, :]
    tile = offs_m[:, None] * Cout + offs_co[None, :]
    dy = _dy_tile(tile, mask, offs_co, mask_co, grad_out_ptr, out_ptr, y_ptr, sum_g_ptr, sum_gx_ptr, mean_ptr,
                  var_ptr, gamma_ptr, M, eps, BATCH_STATS)
    tl.store(dy_ptr + tile, dy.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_child_program(i: tl.constexpr, tile_start, grad_ptr, C, k_offset, pid_n,
                        grad_out_ptr, out_ptr, y_ptr, dy_ptr, sum_g_ptr, sum_gx_ptr, mean_ptr, var_ptr, gamma_ptr,
                        w_ptr, stride_wn, offs_m, mask_m, M, Cout, eps, store_dy,
                        RESIDUAL: tl.constexpr, BATCH_STATS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        DY_READY: tl.constexpr):
    """One gradient tile of child i: rows offs_m, its column tile pid_n - tile_start.

    grad x_i = dy @ W[:, k_offset : k_offset + C] with dy, the gradient at the pre-BN y: read from dy_ptr when
    DY_READY (aggregate_dy_kernel wrote it), else computed on the fly (_dy_tile: eager's grouping, the ReLU mask
    as threshold_backward), and then written by the programs with store_dy for the weight gradient.
    """
    offs_c = (pid_n - tile_start) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for co0 in range(0, Cout, BLOCK_CO):
        offs_co = co0 + tl.arange(0, BLOCK_CO)
        mask_co = offs_co < Cout
        tile = offs_m[:, None] * Cout + offs_co[None, :]
        mask = mask_m[:, None] & mask_co[None, :]
        if DY_READY:
            dy = tl.load(dy_ptr + tile, mask=mask, other=0.0)
        else:
            dy = _dy_tile(tile, mask, offs_co, mask_co, grad_out_ptr, out_ptr, y_ptr, sum_g_ptr, sum_gx_ptr,
                          mean_ptr, var_ptr, gamma_ptr, M, eps, BATCH_STATS).to(dy_ptr.dtype.element_ty)
            if store_dy:
                tl.store(dy_ptr + tile, dy, mask=mask)
        w = tl.load(w_ptr + offs_co[:, None] * stride_wn + k_offset + offs_c[None, :],
                    mask=mask_co[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    tile = offs_m[:, None] * C + offs_c[None, :]
    mask = mask_m[:, None] & mask_c[None, :]
    if RESIDUAL and i == 0:  # the residual's gradient is g itself (child 0 has Cout channels)
        grad_out = tl.load(grad_out_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        out = tl.load(out_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(out <= 0.0, 0.0, grad_out)
    tl.store(grad_ptr + tile, acc.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def aggregate_grad_input_kernel(
    g0, g1, g2, g3, g4, g5, g6, g7,          # gradients of the children, NHWC rows [M, C_i] (outputs)
    c0, c1, c2, c3, c4, c5, c6, c7,
    grad_out_ptr, out_ptr, y_ptr, dy_ptr,    # [M, Cout]; dy_ptr is written by the first column of programs
    sum_g_ptr, sum_gx_ptr, mean_ptr, var_ptr, gamma_ptr,   # per-channel fp32 BatchNorm backward inputs
    w_ptr, stride_wn, M, Cout, eps,
    NUM_CHILDREN: tl.constexpr, RESIDUAL: tl.constexpr, BATCH_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DY_READY: tl.constexpr = False,
):
    """Grid (row tiles, column tiles of all children side by side): each program owns one child's tile.
    DY_READY: dy_ptr already holds dy (aggregate_dy_kernel); otherwise each program computes it on the fly."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    store_dy = pid_n == 0
    start = 0
    k_offset = 0
    for i in tl.static_range(CHILD_SLOTS):
        if i < NUM_CHILDREN:
            C = (c0, c1, c2, c3, c4, c5, c6, c7)[i]
            end = start + tl.cdiv(C, BLOCK_C)
            if (pid_n >= start) & (pid_n < end):
                _grad_child_program(i, start, (g0, g1, g2, g3, g4, g5, g6, g7)[i], C, k_offset, pid_n,
                                    grad_out_ptr, out_ptr, y_ptr, dy_ptr, sum_g_ptr, sum_gx_ptr, mean_ptr,
                                    var_ptr, gamma_ptr, w_ptr, stride_wn, offs_m, mask_m, M, Cout, eps,
                                    store_dy, RESIDUAL, BATCH_STATS, BLOCK_M, BLOCK_C, BLOCK_CO, DOT_PRECISION,
                                    DY_READY)
            start = end
            k_offset += C


@triton.jit
def aggregate_grad_weight_kernel(
    x0, x1, x2, x3, x4, x5, x6, x7,          # children, NHWC rows [M, C_i]
    c0, c1, c2, c3, c4, c5, c6, c7,
    dy_ptr, partial_ptr,                     # dy [M, Cout]; partial grad W [splits, Cout, K] fp32
    M, Cout, K, rows_per_split,
    NUM_CHILDREN: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (Cout tiles, column tiles of all children, splits of M): partial dW = dy^T @ x over a row range."""
    pid_co = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < Cout
    row_start = pid_s.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    start = 0
    k_offset = 0
    for i in tl.static_range(CHILD_SLOTS):
        if i < NUM_CHILDREN:
            x_ptr = (x0, x1, x2, x3, x4, x5, x6, x7)[i]
            C = (c0, c1, c2, c3, c4, c5, c6, c7)[i]
            end = start + tl.cdiv(C, BLOCK_C)
            if (pid_n >= start) & (pid_n < end):
                offs_c = (pid_n - start) * BLOCK_C + tl.arange(0, BLOCK_C)
                mask_c = offs_c < C
                acc = tl.zeros((BLOCK_CO, BLOCK_C), dtype=tl.float32)
                for m0 in range(row_start, row_end, BLOCK_M):
                    offs_m = m0 + tl.arange(0, BLOCK_M)
                    mask_m = offs_m < row_end
                    dy = tl.load(dy_ptr + offs_m[:, None] * Cout + offs_co[None, :],
                                 mask=mask_m[:, None] & mask_co[None, :], other=0.0)
                    x = tl.load(x_ptr + offs_m[:, None] * C + offs_c[None, :],
                                mask=mask_m[:, None] & mask_c[None, :], other=0.0)
                    acc = tl.dot(tl.trans(dy), x, acc, input_precision=DOT_PRECISION)
                tl.store(partial_ptr + pid_s.to(tl.int64) * Cout * K + offs_co[:, None] * K + k_offset + offs_c[None, :],
                         acc, mask=mask_co[:, None] & mask_c[None, :])
            start = end
            k_offset += C


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow PyTorch's cuDNN setting: TF32 when torch.backends.cudnn.allow_tf32 (the default)."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


TILE_OVERRIDES: dict = {}


def _tile_sizes(kernel: str, m: int, cout: int, dtype: torch.dtype, device: torch.device) -> Tuple[int, int, int]:
    """Block sizes of a GEMM kernel: 'fwd' (BLOCK_M, BLOCK_N, BLOCK_K), 'grad_input' (BLOCK_M, BLOCK_C,
    BLOCK_CO), 'grad_weight' (BLOCK_CO, BLOCK_C, BLOCK_M). On CPU (the Triton interpreter) large tiles keep
    the number of interpreted programs small (the interpreter's cost is per program and per operation, not
    per element); on GPU 16-bit inputs take deeper K tiles than fp32."""
    if kernel in TILE_OVERRIDES:
        return TILE_OVERRIDES[kernel]
    if device.type != "cuda":
        return {"fwd": (128, 256, 256), "grad_input": (128, 256, 256), "grad_weight": (256, 256, 128)}[kernel]
    k = 32 if dtype == torch.float32 else 64
    # grad_input stays 64 x 64 at every Cout: 128 x 128 tiles (8 warps) spilled 136-144 bytes of stack per thread
    # in this kernel compiled for sm_90 (255 registers; the eight child slots), so they are not used
    return {"fwd": (128 if m >= 4096 else 64, _pow2_clamp(cout, 16, 128), k),
            "grad_input": (64, k, k),
            "grad_weight": (_pow2_clamp(cout, 16, 64), 64, k)}[kernel]


def materialise_dy(column_tiles: int) -> bool:
    """Whether the input gradient reads a materialised dy (aggregate_dy_kernel, one extra [M, Cout] write and
    read) rather than every one of its `column_tiles` column tiles recomputing dy from grad_out, out and y
    (three [M, Cout] reads each): from two column tiles on, materialising reads less."""
    return column_tiles > 1


DY_TILE_ELEMENTS = 4096


def _dy_tile_shape(cout: int) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_CO) of aggregate_dy_kernel: 4096-value tiles, at most 64 channels wide."""
    block_co = _pow2_clamp(cout, 16, 64)
    return DY_TILE_ELEMENTS // block_co, block_co


# The batch-statistics merge: narrow channel blocks (many programs); more than STATS_GROUP_TILES row tiles are
# merged in two levels (groups of STATS_GROUP_TILES tiles in parallel, then the groups), so that no program
# walks thousands of tiles (level2.root at batch 256: 6,272 tiles -> 98 groups).
STATS_BLOCK_C = 16
STATS_GROUP_TILES = 64
STATS_MAX_BLOCK_T = 256


def _stats_merge_shape(tiles: int, tile_rows: int) -> dict:
    """How the statistics of `tiles` row tiles of `tile_rows` rows are merged: groups (1: one level), and the
    final merge's tile count, rows per merged tile (constexpr TILE_ROWS) and BLOCK_T."""
    groups = triton.cdiv(tiles, STATS_GROUP_TILES) if tiles > STATS_GROUP_TILES else 1
    merged_tiles, merged_rows = (groups, tile_rows * STATS_GROUP_TILES) if groups > 1 else (tiles, tile_rows)
    return dict(groups=groups, merged_tiles=merged_tiles, tile_rows=merged_rows,
                block_t=_pow2_clamp(merged_tiles, 16, STATS_MAX_BLOCK_T))


def _launch_options(block_elems: int, device: torch.device) -> dict:
    """num_warps / num_stages for a GEMM tile of block_elems outputs (ignored by the interpreter)."""
    if device.type != "cuda":
        return {}
    return dict(num_warps=8 if block_elems >= 128 * 128 else 4, num_stages=3)


def _pad_children(tensors: Sequence[torch.Tensor]) -> Tuple[list, list]:
    """The 8 pointer and channel-count slots of the kernels (unused slots repeat child 0, count 0)."""
    ptrs = list(tensors) + [tensors[0]] * (MAX_CHILDREN - len(tensors))
    counts = [t.shape[-1] for t in tensors] + [0] * (MAX_CHILDREN - len(tensors))
    return ptrs, counts


def _empty_nhwc(like: torch.Tensor, channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A new channels_last (N, channels, H, W) tensor shaped like `like`, and its NHWC rows [N*H*W, channels]
    (a view of it, for the kernels). The 4-D tensor is what callers get: not a view, so in-place ops work."""
    n, _, h, w = like.shape
    t = empty_channels_last((n, channels, h, w), like.dtype, like.device)
    return t, rows_view(t)


_SCRATCH: dict = {}


def _scratch(device: torch.device) -> torch.Tensor:
    """A one-element fp32 buffer passed for pointer arguments a kernel variant never reads (an empty CUDA
    tensor has a null data pointer, which Triton's launcher refuses)."""
    if device not in _SCRATCH:
        _SCRATCH[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _SCRATCH[device]


def _weight_rows(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 1x1 conv weight (Cout, K, 1, 1) as contiguous rows [Cout, K] in the activations' dtype (the cast
    autocast would do for an eager conv)."""
    w2d = weight.reshape(weight.shape[0], -1)
    if w2d.dtype == dtype and w2d.is_contiguous():
        return w2d
    return cached_derived(weight, ("aggregate_weight_rows", dtype),
                          lambda: w2d.to(dtype, memory_format=torch.contiguous_format))


def _forward_triton(children, weight, bn_weight, bn_bias, mean, var, eps, residual, batch_stats, save_preact, impl,
                    running=None, merge_stats=None):
    """The fused forward. Returns (out, pre-BN y or an empty tensor, batch mean, batch biased var); out and y
    are channels_last (N, Cout, H, W), the statistics fp32 [Cout] (empty when normalizing with mean/var).

    running: (running_mean, running_var, num_batches_tracked, momentum) to update in the statistics kernel
    (the counter already incremented by the caller), or None.
    merge_stats: None, or a function (mean, var, rows) -> (mean, var) that replaces this batch's statistics
    before the normalize pass, also called for an empty batch (synchronized BatchNorm; running is then None).
    """
    first = children[0]
    n, _, h, w = first.shape
    m = n * h * w
    cout = weight.shape[0]
    dtype, device = first.dtype, first.device
    rows = [nhwc_rows(c) for c in children]
    w2d = _weight_rows(weight, dtype)
    f32 = dict(dtype=torch.float32, device=device)
    store_preact = batch_stats or save_preact
    out, out_rows = _empty_nhwc(first, cout)
    preact, y_rows = _empty_nhwc(first, cout) if store_preact else (first.new_empty(0), None)
    if m == 0:
        size = cout if batch_stats else 0
        stats = torch.zeros(size, **f32), torch.zeros(size, **f32)
        if merge_stats is not None:
            stats = merge_stats(*stats, 0)
        return out, preact, *stats

    scratch = _scratch(device)
    block_m, block_n, block_k = _tile_sizes("fwd", m, cout, dtype, device)
    tiles_m = triton.cdiv(m, block_m)
    ptrs, counts = _pad_children(rows)
    if batch_stats:
        part_sum = torch.empty((tiles_m, cout), **f32)
        part_m2 = torch.empty((tiles_m, cout), **f32)
    aggregate_fwd_kernel[(tiles_m, triton.cdiv(cout, block_n))](
        *ptrs, *counts, w2d, w2d.stride(0), out_rows, y_rows if store_preact else scratch,
        part_sum if batch_stats else scratch, part_m2 if batch_stats else scratch,
        scratch if batch_stats else mean, scratch if batch_stats else var, bn_weight, bn_bias, m, cout, eps,
        NUM_CHILDREN=len(children), RESIDUAL=residual, APPLY_BN=not batch_stats, STORE_PREACT=store_preact,
        COMPUTE_STATS=batch_stats, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(dtype), **_launch_options(block_m * block_n, device))
    if not batch_stats:
        return out, preact, torch.empty(0, **f32), torch.empty(0, **f32)

    batch_mean = torch.empty(cout, **f32)
    batch_var = torch.empty(cout, **f32)
    running_mean, running_var, num_batches, momentum = running or (scratch, scratch, None, 0.0)
    merge = _stats_merge_shape(tiles_m, block_m)
    if merge["groups"] > 1:  # two levels: groups of tiles in parallel, then the groups
        group_sum = torch.empty((merge["groups"], cout), **f32)
        group_m2 = torch.empty((merge["groups"], cout), **f32)
        aggregate_stats_group_kernel[(merge["groups"], triton.cdiv(cout, STATS_BLOCK_C))](
            part_sum, part_m2, group_sum, group_m2, m, cout, tiles_m, TILE_ROWS=block_m,
            GROUP_TILES=STATS_GROUP_TILES, BLOCK_C=STATS_BLOCK_C)
        part_sum, part_m2 = group_sum, group_m2
    aggregate_stats_merge_kernel[(triton.cdiv(cout, STATS_BLOCK_C),)](
        part_sum, part_m2, batch_mean, batch_var, running_mean, running_var,
        scratch if num_batches is None else num_batches, 0.0 if momentum is None else momentum, m, cout,
        merge["merged_tiles"], TILE_ROWS=merge["tile_rows"], UPDATE_RUNNING=running is not None,
        CUMULATIVE=momentum is None, BLOCK_T=merge["block_t"], BLOCK_C=STATS_BLOCK_C)
    if merge_stats is not None:
        batch_mean, batch_var = merge_stats(batch_mean, batch_var, m)
    bn_apply(y_rows, batch_mean, batch_var, bn_weight, bn_bias, eps, residual2d=rows[0] if residual else None,
             relu=True, impl=impl, out=out_rows)
    return out, preact, batch_mean, batch_var


def _backward_triton(grad_out, out, preact, children, weight, bn_weight, mean, var, eps, residual, batch_stats, impl,
                     sync=None):
    """The fused backward. Returns ([grad of each child], grad of the conv weight, grad of the BN weight, grad
    of the BN bias); mean/var are what the forward normalized with (fp32 [Cout]). sync: None, or (process group,
    global count) of a synchronized forward: the input gradient's sums are all-reduced (the BN weight and bias
    gradients stay local)."""
    first = children[0]
    n, _, h, w = first.shape
    m = n * h * w
    cout, k_total = weight.shape[0], weight.shape[1]
    dtype, device = first.dtype, first.device
    rows = [nhwc_rows(c) for c in children]
    grads, grad_rows = zip(*(_empty_nhwc(c, c.shape[1]) for c in children))
    if m == 0:
        zeros = torch.zeros(cout, dtype=torch.float32, device=device)
        if sync is not None:  # the other ranks' all-reduce needs this rank too
            sync_stats.all_reduce_grad_sums(zeros, zeros, sync[0], 0, sync[1])
        return list(grads), torch.zeros_like(weight), zeros, zeros.clone()
    g_rows, out_rows, y_rows = nhwc_rows(grad_out.to(dtype)), nhwc_rows(out), nhwc_rows(preact)
    sum_g, sum_gx = bn_backward_reduce(g_rows, out_rows, y_rows, mean, var, eps, relu=True, impl=impl)
    input_sum_g, input_sum_gx = sum_g, sum_gx
    if sync is not None:
        input_sum_g, input_sum_gx = sync_stats.all_reduce_grad_sums(sum_g, sum_gx, sync[0], m, sync[1])
    w2d = _weight_rows(weight, dtype)
    dy_rows = torch.empty((m, cout), dtype=dtype, device=device)
    precision = _dot_precision(dtype)
    ptrs, counts = _pad_children(rows)
    grad_ptrs, _ = _pad_children(grad_rows)

    block_m, block_c, block_co = _tile_sizes("grad_input", m, cout, dtype, device)
    col_tiles = sum(triton.cdiv(c, block_c) for c in counts if c)
    dy_ready = materialise_dy(col_tiles)
    if dy_ready:  # one pass writes dy, instead of every column tile recomputing it
        dy_block_m, dy_block_co = _dy_tile_shape(cout)
        aggregate_dy_kernel[(triton.cdiv(m, dy_block_m), triton.cdiv(cout, dy_block_co))](
            g_rows, out_rows, y_rows, dy_rows, input_sum_g, input_sum_gx, mean, var, bn_weight, m, cout, eps,
            BATCH_STATS=batch_stats, BLOCK_M=dy_block_m, BLOCK_CO=dy_block_co)
    aggregate_grad_input_kernel[(triton.cdiv(m, block_m), col_tiles)](
        *grad_ptrs, *counts, g_rows, out_rows, y_rows, dy_rows, input_sum_g, input_sum_gx, mean, var, bn_weight,
        w2d, w2d.stride(0), m, cout, eps,
        NUM_CHILDREN=len(children), RESIDUAL=residual, BATCH_STATS=batch_stats,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_CO=block_co, DOT_PRECISION=precision, DY_READY=dy_ready,
        **_launch_options(block_m * block_c, device))

    block_wco, block_wc, block_wm = _tile_sizes("grad_weight", m, cout, dtype, device)
    wcol_tiles = sum(triton.cdiv(c, block_wc) for c in counts if c)
    tiles = triton.cdiv(cout, block_wco) * wcol_tiles
    splits = max(1, min(triton.cdiv(4 * num_sms(device), tiles), triton.cdiv(m, 8 * block_wm)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_wm) * block_wm
    splits = triton.cdiv(m, rows_per_split)
    partial = torch.empty((splits, cout, k_total), dtype=torch.float32, device=device)
    aggregate_grad_weight_kernel[(triton.cdiv(cout, block_wco), wcol_tiles, splits)](
        *ptrs, *counts, dy_rows, partial, m, cout, k_total, rows_per_split,
        NUM_CHILDREN=len(children), BLOCK_CO=block_wco, BLOCK_C=block_wc, BLOCK_M=block_wm,
        DOT_PRECISION=precision, **_launch_options(block_wco * block_wc, device))
    grad_weight = (partial[0] if splits == 1 else partial.sum(0)).view_as(weight).to(weight.dtype)
    return list(grads), grad_weight, sum_gx, sum_g


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


class _AggregateFunction(torch.autograd.Function):
    """Eager-mode autograd for the fused node; updates the running statistics in its statistics kernel."""

    @staticmethod
    def forward(ctx, config, running, weight, bn_weight, bn_bias, mean, var, *children):
        eps, residual, batch_stats, save_preact, impl = config
        with device_guard(children[0]):
            out, preact, batch_mean, batch_var = _forward_triton(
                children, weight, fp32_vector(bn_weight), fp32_vector(bn_bias), fp32_vector(mean),
                fp32_vector(var), eps, residual, batch_stats, save_preact, impl, running)
        if batch_stats:
            mean, var = batch_mean, batch_var
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
    check_inputs(children, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training,
                 momentum, eps, residual, synchronized=group is not None)
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
    if training and running_mean is not None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        running = (running_mean, running_var, num_batches_tracked, momentum)
    return _AggregateFunction.apply((eps, residual, batch_stats, save_preact, impl), running, weight, bn_weight,
                                    bn_bias, *given, *children)


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time compile (dla_fast.ops.aot): every configuration the launchers above can pick on a GPU
# --------------------------------------------------------------------------------------------------------
def kernel_configurations() -> list:
    """The aggregation node's Triton kernels in every configuration `_forward_triton` / `_backward_triton`
    launch on CUDA tensors: tile sizes from `_tile_sizes` / `_dy_tile_shape` (M below / above its threshold,
    Cout up to the largest tile), the statistics merge's shapes from `_stats_merge_shape` (one and two levels),
    options from `_launch_options`, both fp32 dot precisions, every child count, residual, mode, dy read or
    recomputed, and running-statistics dtype. 16-bit tiles with at least 64 rows (wgmma's smallest M) must use
    wgmma."""
    from ..aot import make_config, triton_type
    cuda = torch.device("cuda")
    configs = []
    precisions = {torch.float32: ("tf32", "ieee"), torch.float16: ("tf32",), torch.bfloat16: ("tf32",)}
    children = [f"x{i}" for i in range(MAX_CHILDREN)]
    counts = {f"c{i}": "i32" for i in range(MAX_CHILDREN)}
    couts = (1, 17, 33, 65, 1024)
    for dtype in backend.FUSED_DTYPES:
        act = "*" + triton_type(dtype)
        wgmma = dtype != torch.float32
        fwd_tiles = {_tile_sizes("fwd", m, cout, dtype, cuda) for m in (1, 1 << 20) for cout in couts}
        for (block_m, block_n, block_k), precision, num in product(sorted(fwd_tiles), precisions[dtype],
                                                                    range(1, MAX_CHILDREN + 1)):
            for residual, (apply_bn, store_preact, stats) in product(
                    (False, True), ((True, False, False), (True, True, False), (False, True, True))):
                args = dict({c: act for c in children}, **counts, w_ptr=act, stride_wn="i32", out_ptr=act,
                            y_ptr=act if store_preact else "*fp32", part_sum_ptr="*fp32", part_m2_ptr="*fp32",
                            mean_ptr="*fp32", var_ptr="*fp32", gamma_ptr="*fp32", beta_ptr="*fp32", M="i32",
                            Cout="i32", eps="fp32")
                configs.append(make_config(
                    aggregate_fwd_kernel, args,
                    dict(NUM_CHILDREN=num, RESIDUAL=residual, APPLY_BN=apply_bn, STORE_PREACT=store_preact,
                         COMPUTE_STATS=stats, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                         DOT_PRECISION=precision),
                    needs_wgmma=wgmma, label=triton_type(dtype), aligned=_aligned(args),
                    **_launch_options(block_m * block_n, cuda)))
        for precision, num in product(precisions[dtype], range(1, MAX_CHILDREN + 1)):
            block_m, block_c, block_co = _tile_sizes("grad_input", 1, 1, dtype, cuda)
            for residual, batch_stats, dy_ready in product((False, True), (False, True), (False, True)):
                args = dict({f"g{i}": act for i in range(MAX_CHILDREN)}, **counts, grad_out_ptr=act, out_ptr=act,
                            y_ptr=act, dy_ptr=act, sum_g_ptr="*fp32", sum_gx_ptr="*fp32", mean_ptr="*fp32",
                            var_ptr="*fp32", gamma_ptr="*fp32", w_ptr=act, stride_wn="i32", M="i32", Cout="i32",
                            eps="fp32")
                configs.append(make_config(
                    aggregate_grad_input_kernel, args,
                    dict(NUM_CHILDREN=num, RESIDUAL=residual, BATCH_STATS=batch_stats, BLOCK_M=block_m,
                         BLOCK_C=block_c, BLOCK_CO=block_co, DOT_PRECISION=precision, DY_READY=dy_ready),
                    needs_wgmma=wgmma, label=triton_type(dtype), aligned=_aligned(args),
                    **_launch_options(block_m * block_c, cuda)))
            for cout in (1, 17, 33, 1024):
                block_wco, block_wc, block_wm = _tile_sizes("grad_weight", 1, cout, dtype, cuda)
                args = dict({c: act for c in children}, **counts, dy_ptr=act, partial_ptr="*fp32", M="i32",
                            Cout="i32", K="i32", rows_per_split="i32")
                configs.append(make_config(  # wgmma tiles have at least 64 rows: dW's rows are BLOCK_CO
                    aggregate_grad_weight_kernel, args,
                    dict(NUM_CHILDREN=num, BLOCK_CO=block_wco, BLOCK_C=block_wc, BLOCK_M=block_wm,
                         DOT_PRECISION=precision),
                    needs_wgmma=wgmma and block_wco >= 64, label=triton_type(dtype), aligned=_aligned(args),
                    **_launch_options(block_wco * block_wc, cuda)))
        for dy_shape, batch_stats in product(sorted({_dy_tile_shape(cout) for cout in couts}), (False, True)):
            args = dict(grad_out_ptr=act, out_ptr=act, y_ptr=act, dy_ptr=act, sum_g_ptr="*fp32", sum_gx_ptr="*fp32",
                        mean_ptr="*fp32", var_ptr="*fp32", gamma_ptr="*fp32", M="i32", Cout="i32", eps="fp32")
            configs.append(make_config(aggregate_dy_kernel, args,
                                       dict(BATCH_STATS=batch_stats, BLOCK_M=dy_shape[0], BLOCK_CO=dy_shape[1]),
                                       label=triton_type(dtype)))
    # the statistics merge after a training forward: tiles of the forward's BLOCK_M rows, in one or two levels
    tile_rows = sorted({_tile_sizes("fwd", m, cout, dtype, cuda)[0] for m in (1, 1 << 20) for cout in couts
                        for dtype in backend.FUSED_DTYPES})
    for block_m in tile_rows:
        args = dict(part_sum_ptr="*fp32", part_m2_ptr="*fp32", group_sum_ptr="*fp32", group_m2_ptr="*fp32",
                    M="i32", C="i32", num_tiles="i32")
        configs.append(make_config(aggregate_stats_group_kernel, args,
                                   dict(TILE_ROWS=block_m, GROUP_TILES=STATS_GROUP_TILES, BLOCK_C=STATS_BLOCK_C)))
        tile_counts = (1, 17, 33, 64, 65, 64 * 17 + 1, 64 * 33 + 1, 6272, 100000)  # every BLOCK_T, both levels
        shapes = {(merge["tile_rows"], merge["block_t"])
                  for merge in (_stats_merge_shape(tiles, block_m) for tiles in tile_counts)}
        for (rows, block_t), running in product(sorted(shapes), (None, "*fp32", "*fp16", "*bf16")):
            for counter, cumulative in (((None, False),) if running is None else
                                        (("*i64", False), ("*i64", True), (None, False))):
                args = dict(part_sum_ptr="*fp32", part_m2_ptr="*fp32", mean_ptr="*fp32", var_ptr="*fp32",
                            running_mean_ptr=running or "*fp32", running_var_ptr=running or "*fp32",
                            num_batches_ptr=counter or "*fp32", momentum="fp32", M="i32", C="i32",
                            num_tiles="i32")
                configs.append(make_config(
                    aggregate_stats_merge_kernel, args,
                    dict(TILE_ROWS=rows, UPDATE_RUNNING=running is not None, CUMULATIVE=cumulative,
                         BLOCK_T=block_t, BLOCK_C=STATS_BLOCK_C), label=running or "no running stats"))
    return configs



def _aligned(args: dict) -> tuple:
    """What the JIT sees divisible by 16 at every DLA root: all pointers (fresh allocations and parameters),
    the children's channel counts (0 in unused slots), Cout, K and the weight's row stride (sums of multiples of
    16); not M = N*H*W (e.g. 49 at level 5, batch 1)."""
    return tuple(name for name, kind in args.items()
                 if kind.startswith("*") or name in (*(f"c{i}" for i in range(MAX_CHILDREN)), "Cout", "K",
                                                     "stride_wn"))
