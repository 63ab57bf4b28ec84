"""Pre-processing of a batch of uint8 HWC images into the network's input, one kernel per batch.

    batch, geometries = preprocess(images, "centernet", input_size=(512, 512))

`images`: a uint8 tensor (B, H, W, 3), or a list of uint8 (H_i, W_i, 3) tensors / numpy arrays of any sizes
(on the host or the device; a list is packed into one flat buffer and copied to `device` in one transfer).
Channels are taken as they come (OpenCV's BGR for the peers' pipelines).

Modes (`MODES`):
- "centernet": CenterNet's / CenterTrack's test pre_process (scale 1, fix_res): cv2.warpAffine(INTER_LINEAR,
  constant 0 border) by get_affine_transform(c=(w/2, h/2), s=max(h, w)) into `input_size`, then
  ((v / 255 - mean) / std) in float64, cast to float32, channels kept.
- "fairmot": FairMOT's letterbox: cv2.resize(INTER_AREA) by min(H/h, W/w) (downscaling or none: an image
  smaller than the input raises), padded with 127.5 (stored as 128 in uint8), then channels reversed (BGR ->
  RGB) and v / 255 in float32.

Exactness (the stated bound, tested in tests/test_detection_preprocess.py against OpenCV 5): each output value
comes from a uint8 level through a lookup table computed on the host exactly as the peers' numpy code, so it
is exact whenever the interpolated uint8 level is. The levels follow OpenCV's arithmetic as far as it could be
reproduced: resize's area weights (computed in double, stored as float, the 2x2 fast path's rounding) give
OpenCV's levels exactly in the tests; warpAffine's fp32 source coordinates and fp32 lerps give its level for
96-100% of values (the tests' half-noise half-ramp images; >99.9% on noise), the rest one level off (OpenCV's
vector code rounds some coordinates differently by an ulp, which moves a value near .5 across). The bound:
|out - opencv| <= 1 / (255 * std_c) per channel ("centernet"), <= 1 / 255 ("fairmot"). On the GPU the compiler
may also fuse multiply-adds (same bound). Older OpenCV (<= 4.10: fixed-point warpAffine with 1/32-pixel
coordinates) can differ by more where neighbouring pixels differ a lot.

Implementations (`dla_fast.backend.resolve(device, "detection_preprocess")`): 'triton' (kernels in
dla_fast.detection.kernels; CUDA, or the interpreter) and 'torch' (the same arithmetic as tensor ops).
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import backend
from ..ops.common import cdiv, device_guard
from .kernels import letterbox_area_normalize_kernel, warp_affine_normalize_kernel
from .transforms import ImageGeometry, centernet_geometry, invert_affine, letterbox_geometry

__all__ = ["MODES", "COCO_MEAN", "COCO_STD", "preprocess", "normalization_table"]

MODES = ("centernet", "fairmot")
# CenterNet's and CenterTrack's COCO / MOT statistics (their datasets' mean and std, BGR order as the images)
COCO_MEAN = (0.40789654, 0.44719302, 0.47026115)
COCO_STD = (0.28863828, 0.27408164, 0.27809835)
LETTERBOX_PAD = 128  # cv2.copyMakeBorder(value=127.5) on uint8 stores saturate_cast<uchar>(127.5) = 128
PIXEL_BLOCK = 256
OP_NAME = "detection_preprocess"

ImageBatch = Union[torch.Tensor, Sequence[Union[torch.Tensor, np.ndarray]]]


def normalization_table(mode: str, mean: Sequence[float] = COCO_MEAN, std: Sequence[float] = COCO_STD) -> np.ndarray:
    """(3, 256) float32: the network input value of each uint8 level per output channel, as the peers compute
    it ("centernet": float32((v / 255. - mean) / std) in float64; "fairmot": float32(v) / 255 in float32)."""
    levels = np.arange(256, dtype=np.float64)
    if mode == "centernet":
        mean = np.asarray(mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(std, dtype=np.float32).reshape(3, 1)
        return ((levels[None] / 255. - mean) / std).astype(np.float32)
    return np.repeat((levels.astype(np.float32) / np.float32(255.0))[None], 3, axis=0)


@functools.lru_cache(maxsize=16)
def _device_table(mode: str, mean: tuple, std: tuple, device: torch.device) -> torch.Tensor:
    """normalization_table on `device`, kept (one upload per mode, statistics and device)."""
    return torch.from_numpy(normalization_table(mode, mean, std)).to(device)


def _as_images(images: ImageBatch) -> List[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected a uint8 (B, H, W, 3) tensor or a list of (H, W, 3) images; got "
                             f"shape {tuple(images.shape)}")
        items = list(images.unbind(0))
    elif isinstance(images, (list, tuple)):
        items = [torch.from_numpy(np.ascontiguousarray(im)) if isinstance(im, np.ndarray) else im for im in images]
    else:
        raise ValueError(f"images: expected a uint8 tensor or a list of images; got {type(images).__name__}")
    if not items:
        raise ValueError("images: empty batch")
    for i, im in enumerate(items):
        if not isinstance(im, torch.Tensor) or im.dim() != 3 or im.shape[-1] != 3:
            raise ValueError(f"images[{i}]: expected an (H, W, 3) image; got "
                             f"{tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__}")
        if im.dtype != torch.uint8:
            raise ValueError(f"images[{i}]: expected uint8 pixels; got {im.dtype}")
    return items


def _pack(items: List[torch.Tensor], images: ImageBatch, device: torch.device) -> Tuple[torch.Tensor, List[int]]:
    """All pixels in one flat uint8 buffer on `device` (one copy for a list on the host), and each image's offset."""
    if isinstance(images, torch.Tensor):
        flat = images.contiguous().reshape(-1).to(device, non_blocking=True)
        size = items[0].numel()
        return flat, [i * size for i in range(len(items))]
    offsets, total = [], 0
    for im in items:
        offsets.append(total)
        total += im.numel()
    on_device = all(im.device == device for im in items)
    flat = torch.cat([im.reshape(-1) for im in items]) if on_device else torch.cat(
        [im.cpu().reshape(-1) for im in items])
    if flat.device != device:
        if device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
    return flat, offsets


def _area_taps(src: int, dst: int) -> Tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA weights for downscaling src -> dst pixels along one axis: (dst, taps) source indices
    (int32) and weights (float32, computed in double as OpenCV's computeResizeAreaTab), zero-weight padding."""
    scale = src / dst
    dx = np.arange(dst, dtype=np.float64)
    fsx1 = dx * scale
    fsx2 = fsx1 + scale
    cell = np.minimum(scale, src - fsx1)
    sx2 = np.minimum(np.floor(fsx2), src - 1)
    sx1 = np.minimum(np.ceil(fsx1), sx2)
    taps = int(math.ceil(scale)) + 2
    index = sx1[:, None] - 1 + np.arange(taps)[None]
    first = np.where(sx1 - fsx1 > 1e-3, (sx1 - fsx1) / cell, 0.0)
    last = np.where(fsx2 - sx2 > 1e-3, np.minimum(np.minimum(fsx2 - sx2, 1.0), cell) / cell, 0.0)
    weight = np.where((index >= sx1[:, None]) & (index < sx2[:, None]), 1.0 / cell[:, None], 0.0)
    weight[:, 0] = first
    weight = np.where(index == sx2[:, None], last[:, None], weight)
    return np.clip(index, 0, src - 1).astype(np.int32), weight.astype(np.float32)


def _halves_up(geometry: ImageGeometry) -> int:
    """1 where OpenCV takes its 2x2 fast area path ((a + b + c + d + 2) >> 2: halves round up), else 0."""
    return int(geometry.height == 2 * geometry.resized[0] and geometry.width == 2 * geometry.resized[1])


def _letterbox_tables(geometries: List[ImageGeometry], out_h: int, out_w: int):
    """Per image tap tables padded to the batch's widest: x (B, out_w, TX), y (B, out_h, TY)."""
    xs = [_area_taps(g.width, g.resized[1]) for g in geometries]
    ys = [_area_taps(g.height, g.resized[0]) for g in geometries]
    taps_x, taps_y = max(t[0].shape[1] for t in xs), max(t[0].shape[1] for t in ys)

    def stack(tables, length, taps):
        index = np.zeros((len(tables), length, taps), dtype=np.int32)
        weight = np.zeros((len(tables), length, taps), dtype=np.float32)
        for i, (idx, w) in enumerate(tables):
            index[i, :idx.shape[0], :idx.shape[1]] = idx
            weight[i, :w.shape[0], :w.shape[1]] = w
        return torch.from_numpy(index), torch.from_numpy(weight)

    return stack(xs, out_w, taps_x), stack(ys, out_h, taps_y), taps_x, taps_y


def preprocess(images: ImageBatch, mode: str = "centernet", input_size: Sequence[int] = (512, 512),
               mean: Sequence[float] = COCO_MEAN, std: Sequence[float] = COCO_STD, down_ratio: int = 4,
               device: Optional[Union[str, torch.device]] = None) -> Tuple[torch.Tensor, List[ImageGeometry]]:
    """The network input (B, 3, H, W) float32 on `device` (default: the images' device) and each image's
    geometry (for decoding back to image coordinates). See the module docstring for the modes and the bound."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    items = _as_images(images)
    device = torch.device(device) if device is not None else items[0].device
    out_h, out_w = int(input_size[0]), int(input_size[1])
    make_geometry = centernet_geometry if mode == "centernet" else letterbox_geometry
    geometries = [make_geometry(int(im.shape[0]), int(im.shape[1]), (out_h, out_w), down_ratio) for im in items]
    if mode == "fairmot":
        for i, g in enumerate(geometries):
            if g.resized[0] > g.height or g.resized[1] > g.width:
                raise ValueError(f"images[{i}]: {g.height}x{g.width} is smaller than the letterbox of "
                                 f"{out_h}x{out_w}; the fused letterbox implements INTER_AREA downscaling only "
                                 "(upscale the image first, or use a smaller input_size)")
    flat, offsets = _pack(items, images, device)
    lut = _device_table(mode, tuple(float(v) for v in mean), tuple(float(v) for v in std), device)
    out = torch.empty(len(items), 3, out_h, out_w, dtype=torch.float32, device=device)
    implementation = backend.resolve(device, OP_NAME)
    if mode == "centernet":
        inverse = np.stack([invert_affine(g.warp).reshape(6) for g in geometries])
        meta = torch.tensor([[o, g.height, g.width] for o, g in zip(offsets, geometries)], dtype=torch.int64)
        matrices = torch.from_numpy(inverse).to(device, non_blocking=True)
        if implementation == "torch":
            _warp_affine_torch(flat, meta.tolist(), inverse, lut, out)
        else:
            with device_guard(out):
                warp_affine_normalize_kernel[(cdiv(out_h * out_w, PIXEL_BLOCK), len(items))](
                    flat, meta.to(device, non_blocking=True), matrices, lut, out, out_h, out_w, BLOCK=PIXEL_BLOCK)
        return out, geometries
    (xi, xw), (yi, yw), taps_x, taps_y = _letterbox_tables(geometries, out_h, out_w)
    meta = torch.tensor([[o, g.height, g.width, g.resized[0], g.resized[1], g.top, g.left, _halves_up(g)]
                         for o, g in zip(offsets, geometries)], dtype=torch.int64)
    if implementation == "torch":
        _letterbox_torch(flat, meta.tolist(), xi, xw, yi, yw, lut, out)
    else:
        tables = [t.to(device, non_blocking=True) for t in (xi, xw, yi, yw)]
        with device_guard(out):
            letterbox_area_normalize_kernel[(cdiv(out_h * out_w, PIXEL_BLOCK), len(items))](
                flat, meta.to(device, non_blocking=True), *tables, lut, out, out_h, out_w, float(LETTERBOX_PAD),
                TAPS_X=taps_x, TAPS_Y=taps_y, SWAP_RB=True, BLOCK=PIXEL_BLOCK)
    return out, geometries


def _round_to_level(value: torch.Tensor) -> torch.Tensor:
    """OpenCV's saturate_cast<uchar> of an fp32 value: round half to even, clamp to [0, 255]."""
    return torch.round(value).clamp(0, 255).long()


def _warp_affine_torch(flat: torch.Tensor, meta: List[List[int]], inverse: np.ndarray, lut: torch.Tensor,
                       out: torch.Tensor) -> None:
    """The eager twin of warp_affine_normalize_kernel, one image at a time."""
    out_h, out_w = out.shape[2:]
    device = out.device
    y = torch.arange(out_h, device=device, dtype=torch.float64)[:, None]
    x = torch.arange(out_w, device=device, dtype=torch.float64)[None, :]
    for b, (offset, height, width) in enumerate(meta):
        m = [float(v) for v in inverse[b]]
        row_x = (y * m[1] + m[2]).float().double()
        row_y = (y * m[4] + m[5]).float().double()
        sx = (float(np.float32(m[0])) * x + row_x).float()
        sy = (float(np.float32(m[3])) * x + row_y).float()
        fx, fy = torch.floor(sx), torch.floor(sy)
        ax, ay = sx - fx, sy - fy
        ix, iy = fx.long(), fy.long()
        image = flat[offset:offset + height * width * 3].view(height, width, 3)

        def tap(tx, ty):
            inside = (tx >= 0) & (tx < width) & (ty >= 0) & (ty < height)
            values = image[ty.clamp(0, height - 1), tx.clamp(0, width - 1)].float()
            return torch.where(inside[..., None], values, torch.zeros((), device=device))

        p00, p01, p10, p11 = tap(ix, iy), tap(ix + 1, iy), tap(ix, iy + 1), tap(ix + 1, iy + 1)
        ax, ay = ax[..., None], ay[..., None]
        v0 = p00 + ax * (p01 - p00)
        v1 = p10 + ax * (p11 - p10)
        levels = _round_to_level(v0 + ay * (v1 - v0))
        for c in range(3):
            out[b, c] = lut[c][levels[..., c]]


def _letterbox_torch(flat: torch.Tensor, meta: List[List[int]], xi, xw, yi, yw, lut: torch.Tensor,
                     out: torch.Tensor) -> None:
    """The eager twin of letterbox_area_normalize_kernel, one image at a time."""
    device = out.device
    for b, (offset, height, width, new_h, new_w, top, left, half_up) in enumerate(meta):
        image = flat[offset:offset + height * width * 3].view(height, width, 3).float()
        ix, wx = xi[b, :new_w].to(device), xw[b, :new_w].to(device)
        iy, wy = yi[b, :new_h].to(device), yw[b, :new_h].to(device)
        acc = torch.zeros(new_h, new_w, 3, device=device)
        for ty in range(iy.shape[1]):
            row = torch.zeros(new_h, new_w, 3, device=device)
            for tx in range(ix.shape[1]):
                row += wx[None, :, tx, None] * image[iy[:, ty][:, None], ix[:, tx][None, :]]
            acc += wy[:, ty, None, None] * row
        levels = torch.full((out.shape[2], out.shape[3], 3), LETTERBOX_PAD, dtype=torch.long, device=device)
        levels[top:top + new_h, left:left + new_w] = _round_to_level(torch.floor(acc + 0.5) if half_up else acc)
        for c in range(3):
            out[b, c] = lut[c][levels[..., 2 - c]]
