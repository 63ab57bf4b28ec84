"""Triton kernels of the implicit-GEMM convolution (channels_last, fp32 accumulation).

A conv of KH x KW taps, stride S, zero padding P over the channel concatenation of up to two NHWC inputs is a GEMM
with M = N*OH*OW output pixels, N = Cout and K = KH*KW*(C1 + C2), whose A operand is gathered from the inputs
("implicit": neither the im2col matrix nor the concatenation is ever written). Each input may carry a prologue,
the previous BatchNorm's per-channel affine map and ReLU, a = relu(x * scale + shift), applied while its tile is
loaded (padding stays 0: the zero padding of the eager conv is applied to the normalized activation). The weight is
the [KH*KW*Cin, Cout] matrix (rows tap-major, then input channel).

- conv_gemm_fwd_kernel: y = conv(a) + bias; with STATS each row tile also writes its per-channel sum and the sum of
  squared deviations from its own mean (of the values as stored in y's dtype), merged on the host (Chan et al.), so
  the next BatchNorm's batch statistics need no pass over y.
- conv_gemm_dgrad_kernel: the gradient of one input: grad_a = conv_transpose(g) gathered per input pixel (for
  stride 2, the taps whose output position is not a multiple of the stride are masked), then, with a prologue,
  grad_x = grad_a * [z > 0] * scale with z = x * scale + shift recomputed, and per row tile the sums of
  grad_a * [z > 0] and of that times x (the gradients of shift and scale, merged on the host).
- conv_gemm_wgrad_kernel: dW[tap, ci, co] = sum over output pixels of a[pixel shifted by the tap, ci] * g[pixel,
  co], a recomputed through the prologue while loading; the pixels are split over SPLIT_M programs (fp32 partial
  results summed on the host).
"""
from __future__ import annotations

from .._triton import tl, triton


@triton.jit
def _pixels(rows, H, W):
    """(n, h, w) of NHWC row indices over an H x W image."""
    return rows // (W * H), (rows // W) % H, rows % W


@triton.jit
def _gather_input(x_ptr, scale_ptr, shift_ptr, n, ih, iw, row_ok, ch, C, H, W,
                  sxn, sxh, sxw, sxc, PROLOGUE: tl.constexpr, RELU: tl.constexpr):
    """The [rows, channels] tile of input pixels (n, ih, iw) and channels `ch` (< C), through the prologue,
    0 outside the image and past C, in fp32."""
    inside = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ch_ok = ch < C
    mask = inside[:, None] & ch_ok[None, :]
    offs = n[:, None] * sxn + ih[:, None] * sxh + iw[:, None] * sxw + ch[None, :] * sxc
    a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PROLOGUE:
        scale = tl.load(scale_ptr + ch, mask=ch_ok, other=0.0)
        shift = tl.load(shift_ptr + ch, mask=ch_ok, other=0.0)
        a = a * scale[None, :] + shift[None, :]
        if RELU:
            a = tl.maximum(a, 0.0)
        a = tl.where(mask, a, 0.0)
    return a


@triton.jit
def _fwd_input(acc, x_ptr, scale_ptr, shift_ptr, w_ptr, k_offset, Cin, n, oh, ow, row_ok, rn, col_ok, C, H, W,
               sxn, sxh, sxw, sxc, Cout, STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr,
               KW: tl.constexpr, PROLOGUE: tl.constexpr, RELU: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """acc += the contribution of one input (its C channels are rows k_offset.. of each tap's weight block)."""
    rk = tl.arange(0, BLOCK_K)
    for tap in range(KH * KW):
        ih = oh * STRIDE - PAD + tap // KW
        iw = ow * STRIDE - PAD + tap % KW
        for k0 in range(0, C, BLOCK_K):
            ch = k0 + rk
            a = _gather_input(x_ptr, scale_ptr, shift_ptr, n, ih, iw, row_ok, ch, C, H, W, sxn, sxh, sxw, sxc,
                              PROLOGUE, RELU)
            w_rows = tap * Cin + k_offset + ch
            b = tl.load(w_ptr + w_rows[:, None] * Cout + rn[None, :], mask=(ch < C)[:, None] & col_ok[None, :],
                        other=0.0)
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def conv_gemm_fwd_kernel(
        x1_ptr, scale1_ptr, shift1_ptr, C1, s1n, s1h, s1w, s1c,
        x2_ptr, scale2_ptr, shift2_ptr, C2, s2n, s2h, s2w, s2c,
        w_ptr, bias_ptr, y_ptr, part_sum_ptr, part_m2_ptr,
        M, H, W, OH, OW, Cout,
        STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        TWO_INPUTS: tl.constexpr, PROLOGUE1: tl.constexpr, RELU1: tl.constexpr,
        PROLOGUE2: tl.constexpr, RELU2: tl.constexpr, HAS_BIAS: tl.constexpr, STATS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < M
    col_ok = rn < Cout
    n, oh, ow = _pixels(rm, OH, OW)
    Cin = C1 + C2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _fwd_input(acc, x1_ptr, scale1_ptr, shift1_ptr, w_ptr, 0, Cin, n, oh, ow, row_ok, rn, col_ok, C1, H, W,
                     s1n, s1h, s1w, s1c, Cout, STRIDE, PAD, KH, KW, PROLOGUE1, RELU1, BLOCK_K, DOT_PRECISION)
    if TWO_INPUTS:
        acc = _fwd_input(acc, x2_ptr, scale2_ptr, shift2_ptr, w_ptr, C1, Cin, n, oh, ow, row_ok, rn, col_ok, C2,
                         H, W, s2n, s2h, s2w, s2c, Cout, STRIDE, PAD, KH, KW, PROLOGUE2, RELU2, BLOCK_K,
                         DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * Cout + rn[None, :], out, mask=mask)
    if STATS:  # statistics of the stored values (what the eager BatchNorm would read)
        v = tl.where(mask, out.to(tl.float32), 0.0)
        rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        total = tl.sum(v, axis=0)
        dev = tl.where(mask, v - (total / rows)[None, :], 0.0)
        tl.store(part_sum_ptr + pid_m * Cout + rn, total, mask=col_ok)
        tl.store(part_m2_ptr + pid_m * Cout + rn, tl.sum(dev * dev, axis=0), mask=col_ok)


@triton.jit
def conv_gemm_dgrad_kernel(
        g_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, gx_ptr, part_gshift_ptr, part_gscale_ptr,
        M_in, C, k_offset, Cin, Cout, H, W, OH, OW, sxn, sxh, sxw, sxc,
        STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        PROLOGUE: tl.constexpr, RELU: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Gradient of one input (channels k_offset.. of the weight's input channels); g: [N*OH*OW, Cout] rows,
    gx: the [N*H*W, C] rows of the input's gradient (dense NHWC)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rm < M_in
    c_ok = rc < C
    n, ih, iw = _pixels(rm, H, W)
    rco = tl.arange(0, BLOCK_CO)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for tap in range(KH * KW):
        # output position o with o * STRIDE - PAD + k = i; shifted by STRIDE * KH to stay non-negative
        oh_s = ih + PAD - tap // KW + STRIDE * KH
        ow_s = iw + PAD - tap % KW + STRIDE * KW
        oh = oh_s // STRIDE - KH
        ow = ow_s // STRIDE - KW
        ok = row_ok & (oh_s % STRIDE == 0) & (ow_s % STRIDE == 0) & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        g_rows = (n * OH + oh) * OW + ow
        for co0 in range(0, Cout, BLOCK_CO):
            co = co0 + rco
            g = tl.load(g_ptr + g_rows[:, None] * Cout + co[None, :], mask=ok[:, None] & (co < Cout)[None, :],
                        other=0.0)
            w_rows = tap * Cin + k_offset + rc
            wt = tl.load(w_ptr + w_rows[None, :] * Cout + co[:, None], mask=c_ok[None, :] & (co < Cout)[:, None],
                         other=0.0)
            acc = tl.dot(g, wt, acc, input_precision=DOT_PRECISION)
    mask = row_ok[:, None] & c_ok[None, :]
    if PROLOGUE:
        x = tl.load(x_ptr + n[:, None] * sxn + ih[:, None] * sxh + iw[:, None] * sxw + rc[None, :] * sxc,
                    mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + rc, mask=c_ok, other=0.0)
        shift = tl.load(shift_ptr + rc, mask=c_ok, other=0.0)
        gz = acc
        if RELU:
            gz = tl.where(x * scale[None, :] + shift[None, :] > 0.0, acc, 0.0)
        gz = tl.where(mask, gz, 0.0)
        tl.store(part_gshift_ptr + pid_m * C + rc, tl.sum(gz, axis=0), mask=c_ok)
        tl.store(part_gscale_ptr + pid_m * C + rc, tl.sum(gz * x, axis=0), mask=c_ok)
        acc = gz * scale[None, :]
    tl.store(gx_ptr + rm[:, None] * C + rc[None, :], acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_gemm_wgrad_kernel(
        g_ptr, x_ptr, scale_ptr, shift_ptr, dw_ptr,
        M, C, k_offset, Cin, Cout, H, W, OH, OW, sxn, sxh, sxw, sxc, rows_per_split,
        STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        PROLOGUE: tl.constexpr, RELU: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dw: fp32 [SPLIT_M, KH*KW*Cin, Cout]; program (c tile, co tile, tap * SPLIT_M + split) sums its split's
    output pixels for one tap and one input (channels k_offset.. of the weight's input channels)."""
    pid_c = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_t = tl.program_id(2)
    num_splits = tl.cdiv(M, rows_per_split)
    tap = pid_t // num_splits
    split = pid_t % num_splits
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rco = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    c_ok = rc < C
    co_ok = rco < Cout
    acc = tl.zeros((BLOCK_C, BLOCK_CO), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, stop, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        row_ok = rm < stop
        n, oh, ow = _pixels(rm, OH, OW)
        ih = oh * STRIDE - PAD + tap // KW
        iw = ow * STRIDE - PAD + tap % KW
        a = _gather_input(x_ptr, scale_ptr, shift_ptr, n, ih, iw, row_ok, rc, C, H, W, sxn, sxh, sxw, sxc,
                          PROLOGUE, RELU)
        g = tl.load(g_ptr + rm[:, None] * Cout + rco[None, :], mask=row_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a.to(g.dtype)), g, acc, input_precision=DOT_PRECISION)
    rows = tap * Cin + k_offset + rc
    tl.store(dw_ptr + (split * KH * KW * Cin + rows[:, None]) * Cout + rco[None, :], acc,
             mask=c_ok[:, None] & co_ok[None, :])
