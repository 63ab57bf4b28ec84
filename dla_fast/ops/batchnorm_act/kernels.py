"""Triton kernels of the fused BatchNorm (dla_fast.ops.batchnorm_act), all on row-major [M, C] rows: grid axis 0
walks rows, axis 1 channel blocks; fp32 accumulation. Launched by blocks.py; `fold_running_stats` is also used
by the aggregation node's statistics merge."""
from .._triton import tl, triton



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
