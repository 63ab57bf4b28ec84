"""Triton kernels of the modulated deformable convolution (see the package docstring for the algorithm).

Layouts: the input is NHWC rows [B*H*W, Cin]; outputs and grad_out are NHWC rows [M, Cout], M = B*Ho*Wo,
row m = (b*Ho + ho)*Wo + wo. The weight is packed tap-major as [kh*kw*Cin, Cout] (row tap*Cin + c, tap =
i*kw + j) in the compute dtype. Offsets, masks and their gradients are addressed through their (b, c, h, w)
strides, so NCHW, channels_last and views into CenterNet's offset-mask tensor are read in place.

Runtime flags (uniform branches, not constexprs, so one compiled kernel per tile shape serves every mode):
mask_mode 0 = no mask, 1 = mask given, 2 = sigmoid of the given logits (offset-mask mode).
Bilinear rule (torchvision's, NaN and Inf included): a sample with y <= -1, y >= H, x <= -1 or x >= W is 0;
otherwise the sum over the four corners of weight * value, a corner outside the image contributing 0 (its load
masked off) and a corner inside being read even at weight 0; a NaN coordinate (not outside by that test)
gives a NaN sample. The column is modulation * sample. Coordinates are clamped to [-2, H+1] x [-2, W+1] for
the corner indices (every corner is outside there anyway; a NaN coordinate is taken at -2), so floor() stays
in range. The offset gradient is torchvision's corner-difference formula, which has no range test (at y = -1
the corner row 0 has weight 0 and slope 1).
"""
from .._triton import tl, triton



@triton.jit
def _sampling_point(off_ptr, so_b, so_c, so_h, so_w, mask_ptr, sm_b, sm_c, sm_h, sm_w, mask_mode,
                    b, ho, wo, mask_m, group, tap, taps, KW, H, W,
                    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w):
    """Sampling coordinates (fp32, clamped, NaN taken at -2) and modulation of one tap and offset group for a row
    tile, the raw mask value (the logit in mask_mode 2) for the mask gradient, `outside` (torchvision's range
    test: the sample is 0) and `poison` (NaN where a coordinate is NaN and the sample not outside, else 0: added
    to the sample)."""
    ki = tap // KW
    kj = tap - ki * KW
    ch = 2 * (group * taps + tap)
    off = off_ptr + b * so_b + ho * so_h + wo * so_w
    dy = tl.load(off + ch * so_c, mask=mask_m, other=0.0).to(tl.float32)
    dx = tl.load(off + (ch + 1) * so_c, mask=mask_m, other=0.0).to(tl.float32)
    y = (ho * stride_h - pad_h + ki * dil_h).to(tl.float32) + dy
    x = (wo * stride_w - pad_w + kj * dil_w).to(tl.float32) + dx
    outside = (y <= -1.0) | (y >= H) | (x <= -1.0) | (x >= W)
    undefined = (y != y) | (x != x)
    poison = tl.where(undefined & ~outside, float("nan"), 0.0)
    y = tl.where(undefined, -2.0, tl.minimum(tl.maximum(y, -2.0), (H + 1).to(tl.float32)))
    x = tl.where(undefined, -2.0, tl.minimum(tl.maximum(x, -2.0), (W + 1).to(tl.float32)))
    raw = tl.full(y.shape, 1.0, tl.float32)
    modulation = raw
    if mask_mode != 0:
        raw = tl.load(mask_ptr + b * sm_b + (group * taps + tap) * sm_c + ho * sm_h + wo * sm_w,
                      mask=mask_m, other=0.0).to(tl.float32)
        if mask_mode == 2:  # sigmoid without overflow: exp of a non-positive number
            e = tl.exp(-tl.abs(raw))
            modulation = tl.where(raw >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        else:
            modulation = raw
    return y, x, modulation, raw, outside, poison


@triton.jit
def _corners(y, x, H, W, mask_m):
    """Top-left corner (y0, x0), fractional parts (ly, lx) and the validity of the four corners."""
    y0f = tl.floor(y)
    x0f = tl.floor(x)
    ly = y - y0f
    lx = x - x0f
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    vy0 = (y0 >= 0) & (y0 < H) & mask_m
    vy1 = (y0 + 1 >= 0) & (y0 + 1 < H) & mask_m
    vx0 = (x0 >= 0) & (x0 < W)
    vx1 = (x0 + 1 >= 0) & (x0 + 1 < W)
    return y0, x0, ly, lx, vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1


@triton.jit
def _pixel_row(image_base, y0, x0, W):
    """int64 NHWC row index of the top-left corner; the others are +1, +W, +W+1 (loads of invalid corners are
    masked off, so their addresses are never dereferenced)."""
    return image_base + y0 * W + x0


@triton.jit
def _load_corner(x_ptr, rows, valid, Cin, offs_c, mask_c):
    return tl.load(x_ptr + rows[:, None] * Cin + offs_c[None, :], mask=valid[:, None] & mask_c[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _column_tile(x_ptr, r00, W, v00, v01, v10, v11, ly, lx, modulation, outside, poison, Cin, offs_c, mask_c):
    """Mask-scaled bilinear samples [BLOCK_M, BLOCK_C] in fp32: modulation * (0 if outside, else the sum over
    corners of weight * value + poison), as sum * scale + extra with the row vectors scale = (0 if outside
    else modulation) and extra = (modulation * 0 if outside else poison): the caller gives an outside sample's
    corners at -2 (none read, sum exactly 0), so it is modulation * 0 (NaN for an Inf or NaN mask, as
    torchvision's). Lanes of channels past the group are 0 (an Inf modulation there must not make NaN against
    the zero weight rows)."""
    a = ((1.0 - ly) * (1.0 - lx))[:, None] * _load_corner(x_ptr, r00, v00, Cin, offs_c, mask_c)
    a += ((1.0 - ly) * lx)[:, None] * _load_corner(x_ptr, r00 + 1, v01, Cin, offs_c, mask_c)
    a += (ly * (1.0 - lx))[:, None] * _load_corner(x_ptr, r00 + W, v10, Cin, offs_c, mask_c)
    a += (ly * lx)[:, None] * _load_corner(x_ptr, r00 + W + 1, v11, Cin, offs_c, mask_c)
    scale = tl.where(outside, 0.0, modulation)
    extra = tl.where(outside, modulation * 0.0, poison)
    a = a * scale[:, None]
    # extra is 0 unless a sample is NaN or a modulation not finite (rare: a uniform branch, which keeps the
    # common path's registers); then the lanes past the group must be 0, not 0 * Inf
    if tl.sum(((extra != 0.0) | (modulation * 0.0 != 0.0)).to(tl.int32), axis=0) > 0:
        a = tl.where(mask_c[None, :], a + extra[:, None], 0.0)
    return a


@triton.jit
def _row_position(offs_m, Ho, Wo):
    hw = Ho * Wo
    b = offs_m // hw
    rem = offs_m - b * hw
    ho = rem // Wo
    return b, ho, rem - ho * Wo


@triton.jit
def deform_conv_fwd_kernel(
    x_ptr, off_ptr, mask_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, out_ptr, part_sum_ptr, part_m2_ptr,
    H, W, Cin, Ho, Wo, Cout, M, Cg, G, KW, taps,
    so_b, so_c, so_h, so_w, sm_b, sm_c, sm_h, sm_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    mask_mode, has_bias, affine, relu, stats,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[M, Cout] = epilogue(sum over (tap, channel) of sample[m, tap, c] * Wp[tap*Cin + c, n]).

    Grid (cdiv(M, BLOCK_M), cdiv(Cout, BLOCK_N)). One flat K loop over (tap, offset group, channel chunk of
    BLOCK_K within the group); the A tile is built in registers from four corner gathers. Epilogue: + bias;
    with `stats` the per-tile channel sum and centred sum of squares of y go to part_*[pid_m, Cout]; with
    `affine` y*scale + shift; with `relu` a NaN-propagating ReLU.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < Cout
    b, ho, wo = _row_position(offs_m, Ho, Wo)
    image_base = b * H * W
    chunks = tl.cdiv(Cg, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, taps * G * chunks):
        tap = step // (G * chunks)
        rest = step - tap * (G * chunks)
        group = rest // chunks
        c0 = (rest - group * chunks) * BLOCK_K
        y, x, modulation, _, outside, poison = _sampling_point(
            off_ptr, so_b, so_c, so_h, so_w, mask_ptr, sm_b, sm_c, sm_h, sm_w, mask_mode, b, ho, wo, mask_m, group,
            tap, taps, KW, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
        y0, x0, ly, lx, v00, v01, v10, v11 = _corners(tl.where(outside, -2.0, y), x, H, W, mask_m)
        r00 = _pixel_row(image_base, y0, x0, W)
        offs_k = c0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < Cg
        channels = group * Cg + offs_k
        a = _column_tile(x_ptr, r00, W, v00, v01, v10, v11, ly, lx, modulation, outside, poison, Cin, channels,
                         mask_k)
        w_tile = tl.load(w_ptr + (tap * Cin + channels)[:, None].to(tl.int64) * Cout + offs_n[None, :],
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a.to(w_ptr.dtype.element_ty), w_tile, acc, input_precision=DOT_PRECISION)

    if has_bias:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if stats:
        rows = tl.minimum(M - pid_m.to(tl.int64) * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_sum = tl.sum(tl.where(mask_m[:, None], acc, 0.0), axis=0)
        centred = tl.where(mask_m[:, None], acc - (tile_sum / rows)[None, :], 0.0)
        tl.store(part_sum_ptr + pid_m * Cout + offs_n, tile_sum, mask=mask_n)
        tl.store(part_m2_ptr + pid_m * Cout + offs_n, tl.sum(centred * centred, axis=0), mask=mask_n)
    if affine:
        scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
        shift = tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * scale[None, :] + shift[None, :]
    if relu:
        acc = tl.where(acc < 0.0, 0.0, acc)
    tl.store(out_ptr + offs_m[:, None] * Cout + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def deform_conv_grad_sample_kernel(
    x_ptr, off_ptr, mask_ptr, w_ptr, grad_out_ptr, grad_in_ptr, grad_off_ptr, grad_mask_ptr,
    H, W, Cin, Ho, Wo, Cout, M, Cg, G, KW, taps,
    so_b, so_c, so_h, so_w, sm_b, sm_c, sm_h, sm_w, go_b, go_c, go_h, go_w, gm_b, gm_c, gm_h, gm_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    mask_mode, input_grad, offset_grad,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Gradients through the samples of one (row tile, tap, offset group): grid (cdiv(M, BLOCK_M), taps*G).

    dcol[m, c] = sum_n grad_out[m, n] * Wp[tap*Cin + c, n] for the group's channels, BLOCK_C at a time. Then
    - input_grad: grad_in (fp32 NHWC rows) += dcol * modulation * corner weight at each valid corner (atomics:
      samples of different rows and taps land on the same pixels);
    - offset_grad: with s_k = sum_c dcol * v_k over the group's channels for the corners k (reduced in
      registers: the program owns these outputs, no atomics), d/dy = modulation * ((1-lx)(s10 - s00) +
      lx (s11 - s01)), d/dx = modulation * ((1-ly)(s01 - s00) + ly (s11 - s10)), d/dmask = sum_k w_k s_k
      (0 for a sample outside the range test; times s(1-s) in mask_mode 2); a NaN coordinate's are NaN.
    """
    pid_m = tl.program_id(0)
    pid_tg = tl.program_id(1)
    tap = pid_tg // G
    group = pid_tg - tap * G
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    b, ho, wo = _row_position(offs_m, Ho, Wo)
    y, x, modulation, raw, outside, poison = _sampling_point(
        off_ptr, so_b, so_c, so_h, so_w, mask_ptr, sm_b, sm_c, sm_h, sm_w, mask_mode, b, ho, wo, mask_m, group, tap,
        taps, KW, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
    y0, x0, ly, lx, v00, v01, v10, v11 = _corners(y, x, H, W, mask_m)
    r00 = _pixel_row(b * H * W, y0, x0, W)
    # Per-corner channel sums s_k = sum_c dcol * value_k: the offset and mask gradients are combinations of
    # these four row vectors (formed after the loop), which keeps the loop's live row vectors few.
    s00 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s01 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s10 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s11 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < Cg
        channels = group * Cg + offs_c
        dcol = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for co0 in range(0, Cout, BLOCK_CO):
            offs_co = co0 + tl.arange(0, BLOCK_CO)
            mask_co = offs_co < Cout
            g = tl.load(grad_out_ptr + offs_m[:, None] * Cout + offs_co[None, :],
                        mask=mask_m[:, None] & mask_co[None, :], other=0.0)
            w_t = tl.load(w_ptr + (tap * Cin + channels)[None, :].to(tl.int64) * Cout + offs_co[:, None],
                          mask=mask_c[None, :] & mask_co[:, None], other=0.0)
            dcol = tl.dot(g, w_t, dcol, input_precision=DOT_PRECISION)
        if input_grad:
            dmod = dcol * modulation[:, None]
            mask_2d = mask_c[None, :]
            targets = grad_in_ptr + channels[None, :]
            tl.atomic_add(targets + r00[:, None] * Cin, dmod * ((1.0 - ly) * (1.0 - lx))[:, None],
                          mask=v00[:, None] & mask_2d, sem="relaxed")
            tl.atomic_add(targets + (r00 + 1)[:, None] * Cin, dmod * ((1.0 - ly) * lx)[:, None],
                          mask=v01[:, None] & mask_2d, sem="relaxed")
            tl.atomic_add(targets + (r00 + W)[:, None] * Cin, dmod * (ly * (1.0 - lx))[:, None],
                          mask=v10[:, None] & mask_2d, sem="relaxed")
            tl.atomic_add(targets + (r00 + W + 1)[:, None] * Cin, dmod * (ly * lx)[:, None],
                          mask=v11[:, None] & mask_2d, sem="relaxed")
        if offset_grad:
            s00 += tl.sum(dcol * _load_corner(x_ptr, r00, v00, Cin, channels, mask_c), axis=1)
            s01 += tl.sum(dcol * _load_corner(x_ptr, r00 + 1, v01, Cin, channels, mask_c), axis=1)
            s10 += tl.sum(dcol * _load_corner(x_ptr, r00 + W, v10, Cin, channels, mask_c), axis=1)
            s11 += tl.sum(dcol * _load_corner(x_ptr, r00 + W + 1, v11, Cin, channels, mask_c), axis=1)
    if offset_grad:
        grad_y = ((1.0 - lx) * (s10 - s00) + lx * (s11 - s01) + poison) * modulation
        grad_x = ((1.0 - ly) * (s01 - s00) + ly * (s11 - s10) + poison) * modulation
        ch = 2 * (group * taps + tap)
        goff = grad_off_ptr + b * go_b + ho * go_h + wo * go_w
        tl.store(goff + ch * go_c, grad_y.to(grad_off_ptr.dtype.element_ty), mask=mask_m)
        tl.store(goff + (ch + 1) * go_c, grad_x.to(grad_off_ptr.dtype.element_ty), mask=mask_m)
        if mask_mode != 0:
            grad_m = ((1.0 - ly) * ((1.0 - lx) * s00 + lx * s01) + ly * ((1.0 - lx) * s10 + lx * s11))
            grad_m = tl.where(outside, 0.0, grad_m + poison)
            if mask_mode == 2:
                grad_m = grad_m * modulation * (1.0 - modulation)
            tl.store(grad_mask_ptr + b * gm_b + (group * taps + tap) * gm_c + ho * gm_h + wo * gm_w,
                     grad_m.to(grad_mask_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def deform_conv_grad_weight_kernel(
    x_ptr, off_ptr, mask_ptr, grad_out_ptr, partial_ptr,
    H, W, Cin, Ho, Wo, Cout, M, Cg, G, KW, taps, rows_per_split,
    so_b, so_c, so_h, so_w, sm_b, sm_c, sm_h, sm_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, mask_mode,
    BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """partial[split, tap*Cin + c, n] = sum over the split's rows m of sample[m, tap, c] * grad_out[m, n].

    Grid (taps * G * cdiv(Cg, BLOCK_C), cdiv(Cout, BLOCK_CO), splits): the samples are recomputed in registers
    (compute dtype, as in the forward) and multiplied as tl.dot(grad_out^T, A) (= (A^T grad_out)^T, so that
    Cout, >= 64, is the tensor-core M dimension); the caller sums the fp32
    partials over the splits once.
    """
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    chunks = tl.cdiv(Cg, BLOCK_C)
    tap = pid_k // (G * chunks)
    rest = pid_k - tap * (G * chunks)
    group = rest // chunks
    offs_c = (rest - group * chunks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < Cg
    channels = group * Cg + offs_c
    offs_co = pid_n * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < Cout
    row_start = pid_s.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_CO, BLOCK_C), dtype=tl.float32)  # transposed: Cout is the wgmma M dimension
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        b, ho, wo = _row_position(offs_m, Ho, Wo)
        y, x, modulation, _, outside, poison = _sampling_point(
            off_ptr, so_b, so_c, so_h, so_w, mask_ptr, sm_b, sm_c, sm_h, sm_w, mask_mode, b, ho, wo, mask_m, group,
            tap, taps, KW, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
        y0, x0, ly, lx, v00, v01, v10, v11 = _corners(tl.where(outside, -2.0, y), x, H, W, mask_m)
        r00 = _pixel_row(b * H * W, y0, x0, W)
        a = _column_tile(x_ptr, r00, W, v00, v01, v10, v11, ly, lx, modulation, outside, poison, Cin, channels,
                         mask_c)
        g_t = tl.load(grad_out_ptr + offs_m[None, :] * Cout + offs_co[:, None],
                      mask=mask_m[None, :] & mask_co[:, None], other=0.0)
        acc = tl.dot(g_t, a.to(grad_out_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    tl.store(partial_ptr + (pid_s.to(tl.int64) * taps * Cin + tap * Cin + channels)[None, :] * Cout
             + offs_co[:, None], acc, mask=mask_c[None, :] & mask_co[:, None])
