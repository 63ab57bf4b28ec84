"""Fused IDA upsample-merge: a depthwise bilinear-style transposed conv by `factor`, merged with the finer level.

The IDA up path of DLA-Up and CenterNet upsamples a coarse level `low` (N, C, h, w) with a depthwise
ConvTranspose2d (kernel 2f x 2f, stride f, padding f // 2, groups C, no bias; the weight is trainable,
initialised bilinear in the models) and merges it with the finer level `high` (spatial f*h x f*w):

- mode "add"    (CenterNet):  out = up + high                      high (N, C,  f*h, f*w), out (N, C, f*h, f*w)
- mode "concat" (DLA-Up, ucbdrive's `cat([x, layers[i]])`):
                               out = cat([high, up], dim=1)         high (N, Ch, f*h, f*w), out (N, Ch + C, f*h, f*w)

With padding f // 2 and an even factor the transposed conv maps side s to exactly f*s, and each output pixel
(oy, ox) is a sum of at most 2 x 2 input taps: with t = oy + f // 2, the rows iy = t // f (kernel row t % f)
and iy - 1 (kernel row t % f + f), the same along x. The fused kernels compute those taps on the fly and write
the merged result once; the upsampled tensor is never materialised by itself.

Factor: an even integer >= 2 (DLA uses 2, 4 and 8). Factor 1 is an Identity in the models and an odd factor
does not give f times the input side, so both are rejected.

Backward (the same three implementations):
- grad_low[n, c, iy, ix] = sum_{ky, kx < 2f} grad_up[n, c, iy*f - f//2 + ky, ix*f - f//2 + kx] * w[c, ky, kx]
  (the adjoint: a stride-f 2f x 2f depthwise correlation of grad_up, out-of-range taps skipped);
- grad_w[c, ky, kx] = sum over n, iy, ix of low[n, c, iy, ix] * grad_up[n, c, iy*f - f//2 + ky, ix*f - f//2 + kx],
  computed in fixed blocks of input pixels into fp32 partials [blocks, (2f)^2, C] and reduced in a fixed order:
  deterministic, no float atomics;
- grad_high = grad_out for "add", the slice grad_out[:, :Ch] for "concat".

Implementations, chosen by `dla_fast.backend.resolve(low.device, "upsample_merge")`:
- 'torch':  `upsample_merge_reference` (F.conv_transpose2d + add / cat), any layout and float dtype;
- 'triton': the Triton kernels below;
- 'cuda':   `torch.ops.dla_fast_C.upsample_merge_forward/backward` from the extension (CUDA kernels for CUDA
            tensors, C++ kernels for CPU tensors).
The fused paths take fp32 / fp16 / bf16 (accumulating in fp32; 'auto' runs the reference for other dtypes)
and work on channels_last (NHWC) tensors seen as 2-D [N*H*W, C] row-major matrices; inputs in another layout
are copied to channels_last first, and the output is always channels_last. In eager mode the fused paths run
through a plain autograd.Function (the least host overhead per call); under torch.compile they are the custom ops `dla_fast::upsample_merge_fwd` /
`_bwd`, with fake (meta) kernels and autograd registered, so torch.compile(fullgraph=True) traces through them.
Both call the same forward / backward implementations. Double backward is not supported by the fused paths.
"""
from __future__ import annotations

from functools import partial
from typing import Tuple

import torch
import torch.nn.functional as F

from .. import backend
from . import recompute
from ._triton import tl, triton
from .common import (ValidatedSignatures, cached_derived, cdiv, channels_last, dense_stride, device_guard,
                     extension_ops, next_power_of_2, tensor_signature, with_stride)

__all__ = ["MODES", "upsample_merge", "upsample_merge_reference", "check_upsample_merge_inputs"]

MODES = ("add", "concat")
# grad_weight partial rows at most (Triton backward): each program sums ceil(tiles / MAX_PARTIAL_ROWS)
# consecutive pixel tiles into its own row, so the final reduce reads a bounded buffer. The grouping depends on
# the shape only, which keeps the result deterministic.
MAX_PARTIAL_ROWS = 1024
# Forward tiles: 2048 values per program for channel tiles of 16 and more (every DLA-Up / CenterNet step); 1024
# for narrower ones, where 2048 spills registers on sm_90 (tests/test_aot_sm90.py).
FWD_TILE_ELEMENTS = 2048
NARROW_FWD_TILE_ELEMENTS = 1024


def fwd_block_m(block_c: int) -> int:
    """BLOCK_M of upsample_merge_fwd_kernel for a channel tile of block_c."""
    return max(16, (FWD_TILE_ELEMENTS if block_c >= 16 else NARROW_FWD_TILE_ELEMENTS) // block_c)


def bwd_block_c(c: int, factor: int) -> int:
    """BLOCK_C of upsample_merge_bwd_kernel: 16 channels at every factor and channel count. Its (2f)^2 tap loop
    spills 8 B of stack on sm_90 with 32 channels at every factor (Triton 3.8: fp32; 3.6: fp16/bf16) and with 1 or
    2 channels at factors 8 / 16 (benchmarks/NOTES.md); the masked lanes of fewer channels cost no memory traffic."""
    return 16


def upsample_merge_reference(low: torch.Tensor, weight: torch.Tensor, high: torch.Tensor, factor: int,
                             mode: str = "add") -> torch.Tensor:
    """Eager reference: F.conv_transpose2d(low, weight, stride=f, padding=f//2, groups=C), then add or cat.

    low (N, C, h, w); weight (C, 1, 2f, 2f); high (N, C, f*h, f*w) for "add", (N, Ch, f*h, f*w) for "concat".
    Returns (N, C, f*h, f*w) for "add" and cat([high, up], 1) = (N, Ch + C, f*h, f*w) for "concat".
    """
    check_upsample_merge_inputs(low, weight, high, factor, mode)
    return _eager_upsample_merge(low, weight, high, factor, mode)


def _eager_upsample_merge(low, weight, high, factor, mode):
    # an fp32 weight with 16-bit activations (autocast's parameters) is cast as autocast casts it
    up = F.conv_transpose2d(low, weight.to(low.dtype), stride=factor, padding=factor // 2, groups=low.shape[1])
    return up + high if mode == "add" else torch.cat([high, up], dim=1)


def check_upsample_merge_inputs(low: torch.Tensor, weight: torch.Tensor, high: torch.Tensor, factor: int,
                                mode: str) -> None:
    """Raise ValueError / TypeError with a clear message when the arguments do not describe a valid op."""
    if mode not in MODES:
        raise ValueError(f"upsample_merge: mode must be one of {MODES}, got {mode!r}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2 or factor % 2:
        raise ValueError(f"upsample_merge: factor must be an even integer >= 2 (factor 1 is an Identity), "
                         f"got {factor!r}")
    for name, t in (("low", low), ("weight", weight), ("high", high)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"upsample_merge: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"upsample_merge: {name} must be 4-D, got shape {tuple(t.shape)}")
    fp32_weight = weight.dtype == torch.float32 and low.dtype in (torch.float16, torch.bfloat16)
    if low.dtype != high.dtype or (weight.dtype != low.dtype and not fp32_weight):
        raise TypeError(f"upsample_merge: dtypes differ: low {low.dtype}, weight {weight.dtype}, high {high.dtype} "
                        "(the weight may also be float32 with 16-bit low and high, as autocast keeps it)")
    if not low.dtype.is_floating_point:
        raise TypeError(f"upsample_merge: expected floating-point tensors, got {low.dtype}")
    if not (low.device == weight.device == high.device):
        raise ValueError(f"upsample_merge: devices differ: low {low.device}, weight {weight.device}, "
                         f"high {high.device}")
    n, c, h, w = low.shape
    k = 2 * factor
    if tuple(weight.shape) != (c, 1, k, k):
        raise ValueError(f"upsample_merge: weight must have shape (C, 1, 2f, 2f) = {(c, 1, k, k)} for low with "
                         f"C={c} channels and factor {factor}, got {tuple(weight.shape)}")
    if high.shape[0] != n:
        raise ValueError(f"upsample_merge: batch sizes differ: low {n}, high {high.shape[0]}")
    if tuple(high.shape[2:]) != (factor * h, factor * w):
        raise ValueError(f"upsample_merge: high must be exactly factor x low spatially: low {h}x{w} x {factor} = "
                         f"{factor * h}x{factor * w}, got high {high.shape[2]}x{high.shape[3]}")
    if mode == "add" and high.shape[1] != c:
        raise ValueError(f"upsample_merge: mode 'add' needs high with the channels of low ({c}), got {high.shape[1]}")


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. Activations are NHWC, addressed as rows of a 2-D matrix: row = (n*H + y)*W + x, with a row
# stride and a channel offset (the up part of a concat output starts at channel Ch). Row offsets are int64.
# The weight is passed transposed, weight_t [(2f)^2, C] contiguous, so loads along channels are contiguous.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def upsample_merge_fwd_kernel(low_ptr, weight_t_ptr, high_ptr, out_ptr,
                              M_out, C, C_high, C_out, H, W, h, w, n_high_channel_blocks,
                              FACTOR: tl.constexpr, CONCAT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """One [BLOCK_M output pixels, BLOCK_C channels] tile of the merged output out [M_out = N*H*W, C_out].

    low [N*h*w, C], high [M_out, C_high], out [M_out, C_out], all NHWC rows. "add": C_high = C_out = C and
    out = up + high. "concat": C_out = C_high + C; program-axis-1 blocks below n_high_channel_blocks copy
    high into out[:, :C_high], the others write up into out[:, C_high:].
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M_out
    if pid_c < n_high_channel_blocks:
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < C_high)[None, :]
        values = tl.load(high_ptr + rows[:, None] * C_high + cols[None, :], mask=mask)
        tl.store(out_ptr + rows[:, None] * C_out + cols[None, :], values, mask=mask)
    else:
        cols = (pid_c - n_high_channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        n = rows // (H * W)
        rem = rows - n * (H * W)
        oy = rem // W
        ox = rem - oy * W
        ty = oy + FACTOR // 2
        tx = ox + FACTOR // 2
        iy0 = ty // FACTOR
        ky0 = ty - iy0 * FACTOR
        ix0 = tx // FACTOR
        kx0 = tx - ix0 * FACTOR
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for a in tl.static_range(2):
            iy = iy0 - a
            ky = ky0 + a * FACTOR
            for b in tl.static_range(2):
                ix = ix0 - b
                kx = kx0 + b * FACTOR
                tap_ok = row_ok & (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
                mask = tap_ok[:, None] & col_ok[None, :]
                low_rows = (n * h + iy) * w + ix
                x = tl.load(low_ptr + low_rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
                k = ky * (2 * FACTOR) + kx
                wt = tl.load(weight_t_ptr + k[:, None] * C + cols[None, :], mask=mask, other=0.0)
                acc += x.to(tl.float32) * wt.to(tl.float32)
        mask = row_ok[:, None] & col_ok[None, :]
        if CONCAT:
            out_cols = C_high + cols
        else:
            out_cols = cols
            acc += tl.load(high_ptr + rows[:, None] * C + cols[None, :], mask=mask).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * C_out + out_cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def upsample_merge_bwd_kernel(grad_ptr, low_ptr, weight_t_ptr, grad_low_ptr, partial_ptr,
                              M_low, C, H, W, h, w, grad_row_stride, grad_channel_offset, tiles_per_program,
                              FACTOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_low, and one row of grad_weight partials, for `tiles_per_program` consecutive pixel tiles.

    grad: the merged output's gradient, NHWC rows [N*H*W, grad_row_stride]; the up part is its channels
    [grad_channel_offset, grad_channel_offset + C). low, grad_low [M_low = N*h*w, C]. partial [programs,
    (2f)^2, C] fp32, uninitialised: this program writes to partial[pid_m, k, c] the sum of low * grad_up at
    kernel tap k = ky*2f + kx over its tiles of BLOCK_M low pixels (its first tile stores, the next ones add),
    in tile order (deterministic).
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    partial_row_ptr = partial_ptr + pid_m.to(tl.int64) * (4 * FACTOR * FACTOR) * C
    for tile in range(tiles_per_program):
        rows = (pid_m.to(tl.int64) * tiles_per_program + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M_low
        mask = row_ok[:, None] & col_ok[None, :]
        n = rows // (h * w)
        rem = rows - n * (h * w)
        iy = rem // w
        ix = rem - iy * w
        x = tl.load(low_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_low = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for ky in range(2 * FACTOR):
            oy = iy * FACTOR - FACTOR // 2 + ky
            for kx in range(2 * FACTOR):
                ox = ix * FACTOR - FACTOR // 2 + kx
                tap_ok = row_ok & (oy >= 0) & (oy < H) & (ox >= 0) & (ox < W)
                tap_mask = tap_ok[:, None] & col_ok[None, :]
                grad_rows = (n * H + oy) * W + ox
                g = tl.load(grad_ptr + grad_rows[:, None] * grad_row_stride + grad_channel_offset + cols[None, :],
                            mask=tap_mask, other=0.0).to(tl.float32)
                k = ky * (2 * FACTOR) + kx
                wt = tl.load(weight_t_ptr + k * C + cols, mask=col_ok, other=0.0).to(tl.float32)
                # Taps outside the output are skipped, not added as 0 * w (0 * NaN / Inf would be NaN).
                acc_low += tl.where(tap_mask, g * wt[None, :], 0.0)
                partial_ptrs = partial_row_ptr + k * C + cols
                previous = tl.load(partial_ptrs, mask=col_ok & (tile > 0), other=0.0)
                tl.store(partial_ptrs, previous + tl.sum(tl.where(tap_mask, g * x, 0.0), axis=0), mask=col_ok)
        tl.store(grad_low_ptr + rows[:, None] * C + cols[None, :], acc_low.to(grad_low_ptr.dtype.element_ty),
                 mask=mask)
        # The next tile reads this tile's partial sums, which other threads of the program may have written.
        tl.debug_barrier()


@triton.jit
def grad_weight_reduce_kernel(partial_ptr, grad_weight_ptr, n_blocks, C, TAPS: tl.constexpr, BLOCK: tl.constexpr):
    """grad_weight[c, k] = sum over b of partial[b, k, c], summed in block order b = 0, 1, ... (deterministic).

    partial [n_blocks, TAPS, C] fp32 -> grad_weight [C, TAPS] (the (C, 1, 2f, 2f) weight layout), its dtype.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TAPS * C
    k = offs // C
    c = offs - k * C
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    partial_ptrs = partial_ptr + offs
    for _ in range(n_blocks):
        acc += tl.load(partial_ptrs, mask=ok, other=0.0)
        partial_ptrs += TAPS * C
    tl.store(grad_weight_ptr + c * TAPS + k, acc.to(grad_weight_ptr.dtype.element_ty), mask=ok)


def _transposed_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C, 1, 2f, 2f) -> [(2f)^2, C] contiguous in the activations' dtype: the weight layout of the Triton kernels
    (cast and transposed in one copy, cached until the weight changes, see common.cached_derived: under autocast
    the fp32 parameter is the cache's key, so the copy is made once per optimizer step, not per call)."""
    return cached_derived(weight, ("upsample_merge_weight_t", dtype),
                          lambda: _cast_copy(weight.reshape(weight.shape[0], -1).t(), dtype))


def _contiguous_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C, 1, 2f, 2f) contiguous in the activations' dtype: the weight layout of the extension's kernels (a cast
    is cached as in _transposed_weight)."""
    if weight.dtype == dtype:
        return weight.contiguous()
    return cached_derived(weight, ("upsample_merge_weight", dtype), lambda: _cast_copy(weight, dtype))


def _cast_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of t in dtype, one pass (Tensor.to ignores memory_format when the dtype is unchanged)."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def _output_for(low: torch.Tensor, high: torch.Tensor, factor: int, concat: bool) -> torch.Tensor:
    n, c, h, w = low.shape
    channels = high.shape[1] + c if concat else c
    return torch.empty((n, channels, factor * h, factor * w), dtype=low.dtype, device=low.device,
                       memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------------
# Implementations. Each takes low / high / grad_out channels_last and the weight in the layout and dtype its
# kernels read (`_IMPLS[impl][0](weight, activation dtype)`), so that the eager autograd.Function converts them
# once for both passes; the backwards also take the dtype of the weight the op was given (its gradient's).
# ----------------------------------------------------------------------------------------------------------

def _triton_forward(low: torch.Tensor, weight_t: torch.Tensor, high: torch.Tensor, factor: int,
                    concat: bool) -> torch.Tensor:
    out = _output_for(low, high, factor, concat)
    n, c, h, w = low.shape
    c_high, c_out, H, W = high.shape[1], out.shape[1], out.shape[2], out.shape[3]
    m_out = n * H * W
    if out.numel() == 0:
        return out
    block_c = min(64, next_power_of_2(max(c, c_high if concat else 1)))
    block_m = fwd_block_m(block_c)
    n_high_blocks = cdiv(c_high, block_c) if concat else 0
    grid = (cdiv(m_out, block_m), n_high_blocks + cdiv(c, block_c))
    with device_guard(low):
        upsample_merge_fwd_kernel[grid](low, weight_t, high, out,
                                        m_out, c, c_high, c_out, H, W, h, w, n_high_blocks,
                                        FACTOR=factor, CONCAT=concat, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4)
    return out


def _triton_backward(grad_out: torch.Tensor, channel_offset: int, low: torch.Tensor, weight_t: torch.Tensor,
                     factor: int, weight_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_low, grad_weight), grad_weight in weight_dtype (the reduce kernel stores its fp32 sums in it)."""
    n, c, h, w = low.shape
    H, W = grad_out.shape[2], grad_out.shape[3]
    taps = 4 * factor * factor
    grad_low = torch.empty_like(low, memory_format=torch.channels_last)
    grad_weight = weight_t.new_empty((c, 1, 2 * factor, 2 * factor), dtype=weight_dtype)
    if c == 0:
        return grad_low, grad_weight
    m_low = n * h * w
    block_c = bwd_block_c(c, factor)
    block_m = 64
    n_tiles = cdiv(m_low, block_m)
    tiles_per_program = max(1, cdiv(n_tiles, MAX_PARTIAL_ROWS))
    n_programs = cdiv(n_tiles, tiles_per_program)
    partial = torch.empty((n_programs, taps, c), dtype=torch.float32, device=low.device)
    reduce_block = 256
    with device_guard(low):
        if m_low > 0:
            upsample_merge_bwd_kernel[(n_programs, cdiv(c, block_c))](
                grad_out, low, weight_t, grad_low, partial,
                m_low, c, H, W, h, w, grad_out.shape[1], channel_offset, tiles_per_program,
                FACTOR=factor, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4)
        grad_weight_reduce_kernel[(cdiv(taps * c, reduce_block),)](
            partial, grad_weight, n_programs, c, TAPS=taps, BLOCK=reduce_block, num_warps=4)
    return grad_low, grad_weight


def _extension_forward(low, weight, high, factor, concat):
    return extension_ops().upsample_merge_forward(low, weight, high, factor, concat)


def _extension_backward(grad_out, channel_offset, low, weight, factor, weight_dtype):
    grad_low, grad_weight = extension_ops().upsample_merge_backward(grad_out, channel_offset, low, weight, factor)
    return grad_low, grad_weight.to(weight_dtype)


# impl -> (weight in the kernels' layout and the activations' dtype, forward, backward)
_IMPLS = {"triton": (_transposed_weight, _triton_forward, _triton_backward),
          "cuda": (_contiguous_weight, _extension_forward, _extension_backward)}


def _check_impl(impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"upsample_merge: impl must be one of {tuple(_IMPLS)}, got {impl!r}")


# ----------------------------------------------------------------------------------------------------------
# Autograd: a plain autograd.Function in eager mode (the least host overhead per call), the torch.library
# custom ops under torch.compile. Both save (low, weight) and share the backward.
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("dla_fast::upsample_merge_fwd", mutates_args=())
def upsample_merge_fwd(low: torch.Tensor, weight: torch.Tensor, high: torch.Tensor, factor: int, concat: bool,
                       impl: str) -> torch.Tensor:
    """Fused forward with kernels `impl` ('triton' | 'cuda'); output channels_last (see module docstring)."""
    _check_impl(impl)
    backend.require_traced(impl, low.device, "upsample_merge")
    kernel_weight, forward, _ = _IMPLS[impl]
    return forward(channels_last(low), kernel_weight(weight, low.dtype), channels_last(high), factor, concat)


@upsample_merge_fwd.register_fake
def _(low, weight, high, factor, concat, impl):
    return _output_for(low, high, factor, concat)


@torch.library.custom_op("dla_fast::upsample_merge_bwd", mutates_args=())
def upsample_merge_bwd(grad_out: torch.Tensor, channel_offset: int, low: torch.Tensor, weight: torch.Tensor,
                       factor: int, impl: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_low channels_last, grad_weight (C, 1, 2f, 2f) in the weight's dtype) from grad_out's channels
    [offset, offset + C)."""
    _check_impl(impl)
    backend.require_traced(impl, low.device, "upsample_merge")
    kernel_weight, _, backward = _IMPLS[impl]
    return backward(channels_last(grad_out), channel_offset, channels_last(low), kernel_weight(weight, low.dtype),
                    factor, weight.dtype)


@upsample_merge_bwd.register_fake
def _(grad_out, channel_offset, low, weight, factor, impl):
    return (torch.empty_like(low, memory_format=torch.channels_last),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _save_for_backward(ctx, low, weight, high_channels, factor, concat, impl, weight_dtype, weight_stride) -> None:
    ctx.save_for_backward(low, weight)
    ctx.factor, ctx.concat, ctx.impl, ctx.high_channels = factor, concat, impl, high_channels
    ctx.weight_dtype, ctx.weight_stride = weight_dtype, weight_stride


def _merge_backward(ctx, grad_out, low_weight_grads):
    """(grad_low, grad_weight, grad_high); `low_weight_grads(grad_out, channel_offset, low, weight, factor, impl)`
    computes the first two from the saved (low, weight), and runs only when one of them is needed (grad_weight
    in the dtype of the weight the op was given, ctx.weight_dtype)."""
    low, weight = ctx.saved_tensors
    grad_low = grad_weight = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        channel_offset = ctx.high_channels if ctx.concat else 0
        grad_low, grad_weight = low_weight_grads(grad_out, channel_offset, low, weight, ctx.factor, ctx.impl)
        grad_weight = with_stride(grad_weight, ctx.weight_stride) if ctx.needs_input_grad[1] else None
        grad_low = grad_low if ctx.needs_input_grad[0] else None
    grad_high = grad_out[:, :ctx.high_channels] if ctx.concat else grad_out
    return grad_low, grad_weight, grad_high


def _setup_context(ctx, inputs, output):
    low, weight, high, factor, concat, impl = inputs
    _save_for_backward(ctx, low, weight, high.shape[1], factor, concat, impl, weight.dtype, dense_stride(weight))


def _backward(ctx, grad_out):
    return (*_merge_backward(ctx, grad_out, upsample_merge_bwd), None, None, None)


upsample_merge_fwd.register_autograd(_backward, setup_context=_setup_context)


def _saved_input_backward(grad_out, channel_offset, low, kernel_weight, factor, impl, weight_dtype):
    """The backward on what the eager Function saved: low channels_last, the weight in the kernels' layout;
    grad_weight in weight_dtype (the dtype of the weight the op was given)."""
    return _IMPLS[impl][2](channels_last(grad_out), channel_offset, low, kernel_weight, factor, weight_dtype)


def _merge_again(forward, low, kernel_weight, high, factor, concat):
    """The eager Function's forward once more (memory-efficient mode, dla_fast.ops.recompute)."""
    return forward(low, kernel_weight, channels_last(high), factor, concat)


class _UpsampleMergeFunction(torch.autograd.Function):
    """Eager-mode autograd of the fused paths; low and the weight are converted once, for both passes (the
    weight's layout cached across calls until it changes)."""

    @staticmethod
    def forward(ctx, low, weight, high, factor, concat, impl):
        kernel_weight, forward, _ = _IMPLS[impl]
        weight_dtype, weight_stride = weight.dtype, dense_stride(weight)
        low, weight = channels_last(low), kernel_weight(weight, low.dtype)
        out = forward(low, weight, channels_last(high), factor, concat)
        if recompute.active():  # the merged tensor is saved (by the conv that reads it) as its recipe
            recompute.recomputable(out, _merge_again, forward, low, weight, high, factor, concat)
        _save_for_backward(ctx, low, weight, high.shape[1], factor, concat, impl, weight_dtype, weight_stride)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = partial(_saved_input_backward, weight_dtype=ctx.weight_dtype)
        return (*_merge_backward(ctx, grad_out, grads), None, None, None)


_VALIDATED = ValidatedSignatures()  # signatures check_upsample_merge_inputs accepted


def _signature(low, weight, high, factor, mode):
    """Everything check_upsample_merge_inputs reads, as a hashable tuple (factor with its type: 2.0 == 2);
    None when an argument is not a tensor (the checks then run and say so)."""
    try:
        return (tensor_signature(low), tensor_signature(weight), tensor_signature(high), type(factor), factor, mode)
    except AttributeError:
        return None


def upsample_merge(low: torch.Tensor, weight: torch.Tensor, high: torch.Tensor, factor: int,
                   mode: str = "add") -> torch.Tensor:
    """Upsample `low` by the depthwise transposed conv `weight` and merge it with `high` (see module docstring).

    low (N, C, h, w); weight (C, 1, 2f, 2f) of low's dtype, or float32 with 16-bit low and high (autocast's
    parameters: the fused paths cast it once per weight version, cached; its gradient is float32 then);
    high (N, C, f*h, f*w) for mode "add" -> out = up + high,
    (N, Ch, f*h, f*w) for mode "concat" -> out = cat([high, up], dim=1) of shape (N, Ch + C, f*h, f*w).
    The implementation comes from `dla_fast.backend.resolve(low.device, "upsample_merge")`.
    """
    signature = None if torch.compiler.is_compiling() else _signature(low, weight, high, factor, mode)
    _VALIDATED.check_once(signature, lambda: check_upsample_merge_inputs(low, weight, high, factor, mode))
    impl = backend.resolve(low.device, "upsample_merge", low.dtype)
    if impl == "torch":
        return _eager_upsample_merge(low, weight, high, factor, mode)
    if torch.compiler.is_compiling():
        return upsample_merge_fwd(low, weight, high, factor, mode == "concat", impl)
    return _UpsampleMergeFunction.apply(low, weight, high, factor, mode == "concat", impl)


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile (dla_fast.ops.aot): every configuration the Triton launchers above can pick
# ----------------------------------------------------------------------------------------------------------

AOT_FACTORS = (2, 4, 8, 16)  # the upsampling factors of the DLA-Up / CenterNet IDA paths


def kernel_configurations() -> list:
    """The Triton kernels in every configuration `_triton_forward` / `_triton_backward` pick: the channel tiles
    of every channel count (up to their 64 / 32 caps), both modes, the factors in AOT_FACTORS, every dtype
    (num_warps 4, as the launchers pass; num_stages: Triton's default, 3)."""
    from .aot import make_config, triton_type
    configs = []
    for dtype in backend.FUSED_DTYPES:
        t = "*" + triton_type(dtype)
        for factor in AOT_FACTORS:
            for block_c in sorted({min(64, next_power_of_2(c)) for c in (1, 2, 3, 5, 9, 17, 33, 65)}):
                for concat in (False, True):
                    configs.append(make_config(
                        upsample_merge_fwd_kernel,
                        dict(low_ptr=t, weight_t_ptr=t, high_ptr=t, out_ptr=t, M_out="i32", C="i32", C_high="i32",
                             C_out="i32", H="i32", W="i32", h="i32", w="i32", n_high_channel_blocks="i32"),
                        dict(FACTOR=factor, CONCAT=concat, BLOCK_M=fwd_block_m(block_c), BLOCK_C=block_c),
                        num_warps=4, label=triton_type(dtype),
                        aligned=_aligned(block_c, "low_ptr", "weight_t_ptr", "high_ptr", "out_ptr", "C", "C_high",
                                         "C_out")))
            for block_c in sorted({bwd_block_c(c, factor) for c in (1, 2, 3, 5, 9, 17, 33)}):
                configs.append(make_config(
                    upsample_merge_bwd_kernel,
                    dict(grad_ptr=t, low_ptr=t, weight_t_ptr=t, grad_low_ptr=t, partial_ptr="*fp32", M_low="i32",
                         C="i32", H="i32", W="i32", h="i32", w="i32", grad_row_stride="i32",
                         grad_channel_offset="i32", tiles_per_program="i32"),
                    dict(FACTOR=factor, BLOCK_M=64, BLOCK_C=block_c), num_warps=4, label=triton_type(dtype),
                    aligned=_aligned(block_c, "grad_ptr", "low_ptr", "weight_t_ptr", "grad_low_ptr", "partial_ptr",
                                     "C", "grad_row_stride", "grad_channel_offset")))
            for grad_weight_type in sorted({t, "*fp32"}):  # fp32: the weight under autocast
                configs.append(make_config(
                    grad_weight_reduce_kernel,
                    dict(partial_ptr="*fp32", grad_weight_ptr=grad_weight_type, n_blocks="i32", C="i32"),
                    dict(TAPS=4 * factor * factor, BLOCK=256), num_warps=4, label=triton_type(dtype)))
    return configs


def _aligned(block_c: int, *names: str) -> tuple:
    """The arguments the JIT sees divisible by 16 in the models' up paths (16-byte aligned pointers; channel
    counts and offsets, multiples of 16 in every DLA-Up / CenterNet step), for the channel tiles those channel
    counts pick (>= 16); narrower tiles come from narrower inputs, compiled generic."""
    return names if block_c >= 16 else ()
