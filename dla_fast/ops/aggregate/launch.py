"""Launch choices (tile sizes, warps, the statistics merge's shape), the Triton launchers of the aggregation node's
forward and backward, and `kernel_configurations` (every configuration they pick, for dla_fast.ops.aot)."""
from __future__ import annotations

from functools import lru_cache
from itertools import product
from typing import Sequence, Tuple

import torch

from ... import backend
from ..batchnorm_act import bn_apply, bn_backward_reduce
from .. import sync_stats
from ..common import (cached_derived, cdiv, dense_stride, empty_channels_last, next_power_of_2, nhwc_rows, num_sms,
                      rows_view, with_stride)
from .kernels import (MAX_CHILDREN, aggregate_dy_kernel, aggregate_fwd_kernel, aggregate_grad_input_kernel,
                      aggregate_grad_weight_kernel, aggregate_stats_group_kernel, aggregate_stats_merge_kernel)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_power_of_2(max(int(n), 1))))


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
    return _default_tile_sizes(kernel, m >= 4096, cout, dtype, device.type)


@lru_cache(maxsize=4096)
def _default_tile_sizes(kernel: str, many_rows: bool, cout: int, dtype: torch.dtype,
                        device_type: str) -> Tuple[int, int, int]:
    """_tile_sizes without overrides: a pure function of its arguments, computed once per combination (1.6 us
    per call on CUDA tensors otherwise, three calls per training step)."""
    if device_type != "cuda":
        return {"fwd": (128, 256, 256), "grad_input": (128, 256, 256), "grad_weight": (256, 256, 128)}[kernel]
    k = 32 if dtype == torch.float32 else 64
    # grad_input stays 64 x 64 at every Cout: 128 x 128 tiles (8 warps) spilled 136-144 bytes of stack per thread
    # in this kernel compiled for sm_90 (255 registers; the eight child slots), so they are not used
    return {"fwd": (128 if many_rows else 64, _pow2_clamp(cout, 16, 128), k),
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
    groups = cdiv(tiles, STATS_GROUP_TILES) if tiles > STATS_GROUP_TILES else 1
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
    # one contiguous copy in dtype (Tensor.to ignores memory_format when the dtype is unchanged, which left a
    # weight with transposed storage non-contiguous here)
    return cached_derived(weight, ("aggregate_weight_rows", dtype),
                          lambda: torch.empty(w2d.shape, dtype=dtype, device=w2d.device).copy_(w2d))


def _forward_triton(children, weight, bn_weight, bn_bias, mean, var, eps, residual, batch_stats, save_preact, impl,
                    running=None, merge_stats=None):
    """The fused forward. Returns (out, pre-BN y or an empty tensor, batch mean, batch biased var); out and y
    are channels_last (N, Cout, H, W), the statistics fp32 [Cout] (empty when normalizing with mean/var).

    running: None (nothing to update), or (running_mean, running_var, num_batches_tracked or None, momentum) to
    update: the GEMM kernel counts the batch in num_batches_tracked, the statistics merge kernel folds it into
    the running statistics (an empty batch is counted and leaves them alone, as nn.BatchNorm2d).
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
    running_mean, running_var, num_batches, momentum = running or (None, None, None, 0.0)
    if m == 0:
        if num_batches is not None:
            num_batches.add_(1)
        size = cout if batch_stats else 0
        stats = torch.zeros(size, **f32), torch.zeros(size, **f32)
        if merge_stats is not None:
            stats = merge_stats(*stats, 0)
        return out, preact, *stats

    scratch = _scratch(device)
    block_m, block_n, block_k = _tile_sizes("fwd", m, cout, dtype, device)
    tiles_m = cdiv(m, block_m)
    ptrs, counts = _pad_children(rows)
    if batch_stats:
        part_sum = torch.empty((tiles_m, cout), **f32)
        part_m2 = torch.empty((tiles_m, cout), **f32)
    aggregate_fwd_kernel[(tiles_m, cdiv(cout, block_n))](
        *ptrs, *counts, w2d, w2d.stride(0), out_rows, y_rows if store_preact else scratch,
        part_sum if batch_stats else scratch, part_m2 if batch_stats else scratch,
        scratch if batch_stats else mean, scratch if batch_stats else var, bn_weight, bn_bias,
        scratch if num_batches is None else num_batches, m, cout, eps,
        NUM_CHILDREN=len(children), RESIDUAL=residual, APPLY_BN=not batch_stats, STORE_PREACT=store_preact,
        COMPUTE_STATS=batch_stats, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(dtype), COUNT_BATCH=num_batches is not None,
        **_launch_options(block_m * block_n, device))
    if not batch_stats:
        return out, preact, torch.empty(0, **f32), torch.empty(0, **f32)

    batch_mean = torch.empty(cout, **f32)
    batch_var = torch.empty(cout, **f32)
    merge = _stats_merge_shape(tiles_m, block_m)
    if merge["groups"] > 1:  # two levels: groups of tiles in parallel, then the groups
        group_sum = torch.empty((merge["groups"], cout), **f32)
        group_m2 = torch.empty((merge["groups"], cout), **f32)
        aggregate_stats_group_kernel[(merge["groups"], cdiv(cout, STATS_BLOCK_C))](
            part_sum, part_m2, group_sum, group_m2, m, cout, tiles_m, TILE_ROWS=block_m,
            GROUP_TILES=STATS_GROUP_TILES, BLOCK_C=STATS_BLOCK_C)
        part_sum, part_m2 = group_sum, group_m2
    aggregate_stats_merge_kernel[(cdiv(cout, STATS_BLOCK_C),)](
        part_sum, part_m2, batch_mean, batch_var, scratch if running is None else running_mean,
        scratch if running is None else running_var,
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
    col_tiles = sum(cdiv(c, block_c) for c in counts if c)
    dy_ready = materialise_dy(col_tiles)
    if dy_ready:  # one pass writes dy, instead of every column tile recomputing it
        dy_block_m, dy_block_co = _dy_tile_shape(cout)
        aggregate_dy_kernel[(cdiv(m, dy_block_m), cdiv(cout, dy_block_co))](
            g_rows, out_rows, y_rows, dy_rows, input_sum_g, input_sum_gx, mean, var, bn_weight, m, cout, eps,
            BATCH_STATS=batch_stats, BLOCK_M=dy_block_m, BLOCK_CO=dy_block_co)
    aggregate_grad_input_kernel[(cdiv(m, block_m), col_tiles)](
        *grad_ptrs, *counts, g_rows, out_rows, y_rows, dy_rows, input_sum_g, input_sum_gx, mean, var, bn_weight,
        w2d, w2d.stride(0), m, cout, eps,
        NUM_CHILDREN=len(children), RESIDUAL=residual, BATCH_STATS=batch_stats,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_CO=block_co, DOT_PRECISION=precision, DY_READY=dy_ready,
        **_launch_options(block_m * block_c, device))

    block_wco, block_wc, block_wm = _tile_sizes("grad_weight", m, cout, dtype, device)
    wcol_tiles = sum(cdiv(c, block_wc) for c in counts if c)
    tiles = cdiv(cout, block_wco) * wcol_tiles
    splits = max(1, min(cdiv(4 * num_sms(device), tiles), cdiv(m, 8 * block_wm)))
    rows_per_split = cdiv(cdiv(m, splits), block_wm) * block_wm
    splits = cdiv(m, rows_per_split)
    partial = torch.empty((splits, cout, k_total), dtype=torch.float32, device=device)
    aggregate_grad_weight_kernel[(cdiv(cout, block_wco), wcol_tiles, splits)](
        *ptrs, *counts, dy_rows, partial, m, cout, k_total, rows_per_split,
        NUM_CHILDREN=len(children), BLOCK_CO=block_wco, BLOCK_C=block_wc, BLOCK_M=block_wm,
        DOT_PRECISION=precision, **_launch_options(block_wco * block_wc, device))
    grad_weight = (partial[0] if splits == 1 else partial.sum(0)).view(weight.shape).to(weight.dtype)
    grad_weight = with_stride(grad_weight, dense_stride(weight))  # a channels_last weight: (K, 1, K, K)
    return list(grads), grad_weight, sum_gx, sum_g


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
            for residual, (apply_bn, store_preact, stats, count) in product(
                    (False, True), ((True, False, False, False), (True, True, False, False),
                                    (False, True, True, False), (False, True, True, True))):
                args = dict({c: act for c in children}, **counts, w_ptr=act, stride_wn="i32", out_ptr=act,
                            y_ptr=act if store_preact else "*fp32", part_sum_ptr="*fp32", part_m2_ptr="*fp32",
                            mean_ptr="*fp32", var_ptr="*fp32", gamma_ptr="*fp32", beta_ptr="*fp32",
                            num_batches_ptr="*i64" if count else "*fp32", M="i32", Cout="i32", eps="fp32")
                configs.append(make_config(
                    aggregate_fwd_kernel, args,
                    dict(NUM_CHILDREN=num, RESIDUAL=residual, APPLY_BN=apply_bn, STORE_PREACT=store_preact,
                         COMPUTE_STATS=stats, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                         DOT_PRECISION=precision, COUNT_BATCH=count),
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
