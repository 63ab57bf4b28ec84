"""Triton kernels of the detection pipeline (host code: dla_fast.detection.preprocess / .decode).

Pre-processing (one launch per batch; grid (pixel blocks, images)):
- `warp_affine_normalize_kernel`: CenterNet's cv2.warpAffine(INTER_LINEAR, constant 0 border) of uint8 HWC
  images, rounded to uint8 as OpenCV does, then (v / 255 - mean) / std through a 3 x 256 lookup table, written
  as float32 NCHW. The source coordinate of output pixel (x, y) is OpenCV's (>= 4.11):
  fp32(fp32(M0) * x + fp32(M1 * y + M2)) (one rounding, as its FMA), the taps lerped in fp32.
- `letterbox_area_normalize_kernel`: FairMOT's letterbox: cv2.resize(INTER_AREA, downscaling) as separable
  per-axis tap tables computed on the host (OpenCV's area weights), the constant 128 border, BGR -> RGB and
  v / 255 through the lookup table.

Decoding:
- `heat_peaks_kernel`: optional sigmoid, CenterNet's 3x3 max-pool "NMS" (`heat * (max_pool3x3(heat) == heat)`,
  -inf padding) in one pass, written as the very values the peers' code gives torch.topk.
- `assemble_detections_kernel`: after the two torch.topk calls: the class and position of each of the K
  winners, the gathers of reg / wh / tracking at its position, the box (CenterNet's xs +- w / 2, or FairMOT's
  ltrb), and its transform back to image coordinates (fp64, as CenterNet's numpy post-processing).
- `gather_normalize_kernel`: FairMOT's re-ID embeddings at the K winners, L2-normalized (F.normalize).
"""
from __future__ import annotations

from ..ops._triton import tl, triton

# Round to the nearest integer, ties to even (cvRound), for |v| < 2**22: adding and subtracting 1.5 * 2**23 in
# fp32 leaves the integer part.
ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _lut_store(out_ptr, lut_ptr, value, channel, out_offset, plane, mask):
    """Round `value` (fp32 in [0, 255]) to uint8 as OpenCV does, look it up in lut[channel] and store it."""
    value = (value + ROUND_MAGIC) - ROUND_MAGIC
    index = tl.minimum(tl.maximum(value, 0.0), 255.0).to(tl.int32)
    normalized = tl.load(lut_ptr + channel * 256 + index, mask=mask, other=0.0)
    tl.store(out_ptr + out_offset + channel * plane, normalized, mask=mask)


@triton.jit
def _tap(src_ptr, base, ix, iy, channel, width, height, mask):
    inside = mask & (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
    offset = base + (iy.to(tl.int64) * width + ix) * 3 + channel
    return tl.load(src_ptr + offset, mask=inside, other=0).to(tl.float32)


@triton.jit
def load_affine(ptr):
    """The six coefficients of a 2x3 affine matrix stored row by row at ptr: (m0, m1, m2, m3, m4, m5)."""
    return tl.load(ptr), tl.load(ptr + 1), tl.load(ptr + 2), tl.load(ptr + 3), tl.load(ptr + 4), tl.load(ptr + 5)


@triton.jit
def warp_affine_normalize_kernel(src_ptr, image_ptr, matrix_ptr, lut_ptr, out_ptr, out_h, out_w,
                                 BLOCK: tl.constexpr):
    """src: all images' uint8 HWC pixels, flat; image (B, 3) int64: offset, height, width; matrix (B, 6)
    float64: the inverse warp (output pixel -> source pixel, cv2.invertAffineTransform of M); lut (3, 256)
    float32; out (B, 3, out_h, out_w) float32."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    base = tl.load(image_ptr + b * 3)
    height = tl.load(image_ptr + b * 3 + 1).to(tl.int32)
    width = tl.load(image_ptr + b * 3 + 2).to(tl.int32)
    m0, m1, m2, m3, m4, m5 = load_affine(matrix_ptr + b * 6)
    plane = out_h * out_w
    p = pid * BLOCK + tl.arange(0, BLOCK)
    mask = p < plane
    y = p // out_w
    x = p % out_w
    yd = y.to(tl.float64)
    xd = x.to(tl.float64)
    # OpenCV: the row term in double, rounded to float; then fma(float(M0), x, row) in float (emulated exactly:
    # the product of two floats is exact in double, and the sum is rounded once more to float).
    row_x = (yd * m1 + m2).to(tl.float32).to(tl.float64)
    row_y = (yd * m4 + m5).to(tl.float32).to(tl.float64)
    sx = (m0.to(tl.float32).to(tl.float64) * xd + row_x).to(tl.float32)
    sy = (m3.to(tl.float32).to(tl.float64) * xd + row_y).to(tl.float32)
    fx = tl.floor(sx)
    fy = tl.floor(sy)
    ax = sx - fx
    ay = sy - fy
    ix = fx.to(tl.int32)
    iy = fy.to(tl.int32)
    out_offset = b.to(tl.int64) * 3 * plane + p
    for channel in tl.static_range(3):
        p00 = _tap(src_ptr, base, ix, iy, channel, width, height, mask)
        p01 = _tap(src_ptr, base, ix + 1, iy, channel, width, height, mask)
        p10 = _tap(src_ptr, base, ix, iy + 1, channel, width, height, mask)
        p11 = _tap(src_ptr, base, ix + 1, iy + 1, channel, width, height, mask)
        v0 = p00 + ax * (p01 - p00)
        v1 = p10 + ax * (p11 - p10)
        value = v0 + ay * (v1 - v0)
        _lut_store(out_ptr, lut_ptr, value, channel, out_offset, plane, mask)


@triton.jit
def letterbox_area_normalize_kernel(src_ptr, image_ptr, xtab_idx_ptr, xtab_w_ptr, ytab_idx_ptr, ytab_w_ptr,
                                    lut_ptr, out_ptr, out_h, out_w, pad_value,
                                    TAPS_X: tl.constexpr, TAPS_Y: tl.constexpr, SWAP_RB: tl.constexpr,
                                    BLOCK: tl.constexpr):
    """src: uint8 HWC pixels, flat; image (B, 8) int64: offset, height, width, resized height, resized width,
    top, left, round half up (OpenCV's 2x2 fast area path; else half to even); x tables (B, out_w, TAPS_X) int32 source column / float32 weight per resized column (rows past
    the resized width unused), y tables (B, out_h, TAPS_Y) likewise; lut (3, 256) float32; out (B, 3, out_h,
    out_w) float32. Pixels outside the resized image get lut[pad_value]."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    base = tl.load(image_ptr + b * 8)
    width = tl.load(image_ptr + b * 8 + 2).to(tl.int32)
    new_h = tl.load(image_ptr + b * 8 + 3).to(tl.int32)
    new_w = tl.load(image_ptr + b * 8 + 4).to(tl.int32)
    top = tl.load(image_ptr + b * 8 + 5).to(tl.int32)
    left = tl.load(image_ptr + b * 8 + 6).to(tl.int32)
    half_up = tl.load(image_ptr + b * 8 + 7) != 0
    plane = out_h * out_w
    p = pid * BLOCK + tl.arange(0, BLOCK)
    mask = p < plane
    ry = p // out_w - top
    rx = p % out_w - left
    inside = mask & (ry >= 0) & (ry < new_h) & (rx >= 0) & (rx < new_w)
    ry = tl.where(inside, ry, 0)
    rx = tl.where(inside, rx, 0)
    xrow = (b * out_w + rx) * TAPS_X
    yrow = (b * out_h + ry) * TAPS_Y
    out_offset = b.to(tl.int64) * 3 * plane + p
    for channel in tl.static_range(3):
        source_channel = 2 - channel if SWAP_RB else channel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for ty in tl.static_range(TAPS_Y):
            sy = tl.load(ytab_idx_ptr + yrow + ty, mask=inside, other=0)
            wy = tl.load(ytab_w_ptr + yrow + ty, mask=inside, other=0.0)
            row = tl.zeros([BLOCK], dtype=tl.float32)
            for tx in tl.static_range(TAPS_X):
                sx = tl.load(xtab_idx_ptr + xrow + tx, mask=inside, other=0)
                wx = tl.load(xtab_w_ptr + xrow + tx, mask=inside, other=0.0)
                offset = base + (sy.to(tl.int64) * width + sx) * 3 + source_channel
                pixel = tl.load(src_ptr + offset, mask=inside, other=0).to(tl.float32)
                row += wx * pixel
            acc += wy * row
        acc = tl.where(half_up, tl.floor(acc + 0.5), acc)
        value = tl.where(inside, acc, pad_value)
        _lut_store(out_ptr, lut_ptr, value, channel, out_offset, plane, mask)


@triton.jit
def heat_peaks_kernel(heat_ptr, out_ptr, total, height, width, APPLY_SIGMOID: tl.constexpr, BLOCK: tl.constexpr):
    """heat (B*C, H, W) contiguous, any float dtype; out the same shape in float32:
    s * (max over the 3x3 neighbourhood of s == s), s = sigmoid(heat) if APPLY_SIGMOID else heat (the sigmoid
    rounded to heat's dtype, as `heat.sigmoid_()`), the neighbourhood padded with -inf
    (F.max_pool2d(s, 3, stride=1, padding=1)). float32 as the peers' `heat * keep.float()` promotes to."""
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < total
    x = (p % width).to(tl.int32)
    y = ((p // width) % height).to(tl.int32)
    center = tl.load(heat_ptr + p, mask=mask, other=0.0)
    if APPLY_SIGMOID:
        center = (1.0 / (1.0 + tl.exp(-center.to(tl.float32)))).to(heat_ptr.dtype.element_ty)
    hmax = center
    for dy in tl.static_range(-1, 2):
        for dx in tl.static_range(-1, 2):
            if dy != 0 or dx != 0:
                inside = mask & (y + dy >= 0) & (y + dy < height) & (x + dx >= 0) & (x + dx < width)
                value = tl.load(heat_ptr + p + dy * width + dx, mask=inside, other=0.0)
                if APPLY_SIGMOID:
                    value = (1.0 / (1.0 + tl.exp(-value.to(tl.float32)))).to(heat_ptr.dtype.element_ty)
                hmax = tl.where(inside & (value > hmax), value, hmax)
    keep = (hmax == center).to(center.dtype)
    tl.store(out_ptr + p, (center * keep).to(tl.float32), mask=mask)


@triton.jit
def assemble_detections_kernel(score_ptr, order_ptr, class_index_ptr, wh_ptr, reg_ptr, tracking_ptr,
                               to_image_ptr, det_ptr, ind_ptr, image_box_ptr, image_tracking_ptr,
                               K, num_classes, height, width,
                               s_wh_b, s_wh_c, s_wh_y, s_wh_x, s_reg_b, s_reg_c, s_reg_y, s_reg_x,
                               s_tr_b, s_tr_c, s_tr_y, s_tr_x,
                               HAS_REG: tl.constexpr, CAT_SPEC_WH: tl.constexpr, LTRB: tl.constexpr,
                               CLAMP_WH: tl.constexpr, HAS_TRACKING: tl.constexpr, TO_IMAGE: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    """One program per image. score/order (B, K): the global top-K scores and their indices into the per-class
    candidates; class_index (B, C*K) int64: each class's top-K positions y * W + x. wh / reg / tracking:
    (B, ch, H, W) with any strides. Writes det (B, K, 6) float32 = x1, y1, x2, y2, score, class (output-map
    coordinates), ind (B, K) int64 = y * W + x, with TO_IMAGE the boxes (B, K, 4) mapped through to_image
    (B, 6) float64, and with HAS_TRACKING the tracking offsets (B, K, 2) (mapped too with TO_IMAGE)."""
    b = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    mask = k < K
    row = b.to(tl.int64) * K + k
    score = tl.load(score_ptr + row, mask=mask, other=0.0).to(tl.float32)
    order = tl.load(order_ptr + row, mask=mask, other=0)
    cls = order // K
    ind = tl.load(class_index_ptr + b.to(tl.int64) * num_classes * K + order, mask=mask, other=0)
    ys = (ind // width).to(tl.float32)
    xs = (ind % width).to(tl.float32)
    iy = ind // width
    ix = ind % width
    if HAS_REG:
        reg_at = reg_ptr + b.to(tl.int64) * s_reg_b + iy * s_reg_y + ix * s_reg_x
        x = xs + tl.load(reg_at, mask=mask, other=0.0).to(tl.float32)
        y = ys + tl.load(reg_at + s_reg_c, mask=mask, other=0.0).to(tl.float32)
    else:
        x = xs + 0.5
        y = ys + 0.5
    wh_at = wh_ptr + b.to(tl.int64) * s_wh_b + iy * s_wh_y + ix * s_wh_x
    if CAT_SPEC_WH:
        wh_at += cls * 2 * s_wh_c
    w = tl.load(wh_at, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(wh_at + s_wh_c, mask=mask, other=0.0).to(tl.float32)
    if CLAMP_WH:
        w = tl.where(w < 0, 0.0, w)
        h = tl.where(h < 0, 0.0, h)
    if LTRB:
        r = tl.load(wh_at + 2 * s_wh_c, mask=mask, other=0.0).to(tl.float32)
        bottom = tl.load(wh_at + 3 * s_wh_c, mask=mask, other=0.0).to(tl.float32)
        x1 = x - w
        y1 = y - h
        x2 = x + r
        y2 = y + bottom
    else:
        x1 = x - w / 2
        y1 = y - h / 2
        x2 = x + w / 2
        y2 = y + h / 2
    det = det_ptr + row * 6
    tl.store(det, x1, mask=mask)
    tl.store(det + 1, y1, mask=mask)
    tl.store(det + 2, x2, mask=mask)
    tl.store(det + 3, y2, mask=mask)
    tl.store(det + 4, score, mask=mask)
    tl.store(det + 5, cls.to(tl.float32), mask=mask)
    tl.store(ind_ptr + row, ind, mask=mask)
    if TO_IMAGE:
        t0, t1, t2, t3, t4, t5 = load_affine(to_image_ptr + b * 6)
        box = image_box_ptr + row * 4
        tl.store(box, (t0 * x1.to(tl.float64) + t1 * y1.to(tl.float64) + t2).to(tl.float32), mask=mask)
        tl.store(box + 1, (t3 * x1.to(tl.float64) + t4 * y1.to(tl.float64) + t5).to(tl.float32), mask=mask)
        tl.store(box + 2, (t0 * x2.to(tl.float64) + t1 * y2.to(tl.float64) + t2).to(tl.float32), mask=mask)
        tl.store(box + 3, (t3 * x2.to(tl.float64) + t4 * y2.to(tl.float64) + t5).to(tl.float32), mask=mask)
    if HAS_TRACKING:
        tr_at = tracking_ptr + b.to(tl.int64) * s_tr_b + iy * s_tr_y + ix * s_tr_x
        off_x = tl.load(tr_at, mask=mask, other=0.0).to(tl.float32)
        off_y = tl.load(tr_at + s_tr_c, mask=mask, other=0.0).to(tl.float32)
        track = image_tracking_ptr + row * 2
        if TO_IMAGE:
            # CenterTrack: the image point of (centre + tracking) minus the image point of the centre, where
            # the centre is the integer peak (xs, ys), not the reg-refined one.
            tx = (xs + off_x).to(tl.float64)
            ty = (ys + off_y).to(tl.float64)
            cx = t0 * xs.to(tl.float64) + t1 * ys.to(tl.float64) + t2
            cy = t3 * xs.to(tl.float64) + t4 * ys.to(tl.float64) + t5
            off_x = ((t0 * tx + t1 * ty + t2) - cx).to(tl.float32)
            off_y = ((t3 * tx + t4 * ty + t5) - cy).to(tl.float32)
        tl.store(track, off_x, mask=mask)
        tl.store(track + 1, off_y, mask=mask)


@triton.jit
def gather_normalize_kernel(feature_ptr, ind_ptr, out_ptr, K, dim, s_b, s_c, s_y, s_x, width, eps,
                            NORMALIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (image, k): out[b, k, :] = f / max(||f||, eps) (f as is without NORMALIZE), where f is
    feature[b, :, y, x] at ind[b, k] = y * W + x; feature (B, D, H, W) with any strides, out (B, K, D) float32."""
    bk = tl.program_id(0)
    b = bk // K
    ind = tl.load(ind_ptr + bk)
    d = tl.arange(0, BLOCK_D)
    mask = d < dim
    at = feature_ptr + b.to(tl.int64) * s_b + (ind // width) * s_y + (ind % width) * s_x
    f = tl.load(at + d * s_c, mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        norm = tl.sqrt(tl.sum(f * f, axis=0))
        f = f / tl.maximum(norm, eps)
    tl.store(out_ptr + bk.to(tl.int64) * dim + d, f, mask=mask)
