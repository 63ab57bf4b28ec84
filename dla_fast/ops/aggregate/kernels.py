"""Triton kernels of the fused aggregation node (dla_fast.ops.aggregate): fp32 accumulation, int64 row offsets,
activations as NHWC rows [M, C]. Launched by launch.py."""
from .._triton import tl, triton
from ..batchnorm_act.kernels import fold_running_stats

MAX_CHILDREN = 8  # pointer slots of the kernels; DLA-169's deepest roots have 7 children
CHILD_SLOTS = tl.constexpr(MAX_CHILDREN)


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
    num_batches_ptr,                         # nn.BatchNorm2d's num_batches_tracked (COUNT_BATCH)
    M, Cout, eps,
    NUM_CHILDREN: tl.constexpr, RESIDUAL: tl.constexpr,
    APPLY_BN: tl.constexpr, STORE_PREACT: tl.constexpr, COMPUTE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COUNT_BATCH: tl.constexpr = False,
):
    """One [BLOCK_M, BLOCK_N] tile of y = [x_0 ... x_n] @ W^T and its epilogue (see the package docstring).
    COUNT_BATCH: program (0, 0) also adds 1 to num_batches_tracked (training), which the statistics merge kernel,
    launched after this one, reads for momentum=None: no separate launch counts the batch."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if COUNT_BATCH:
        if (pid_m == 0) & (pid_n == 0):
            tl.store(num_batches_ptr, tl.load(num_batches_ptr) + 1)
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
