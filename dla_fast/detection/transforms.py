"""The geometry of CenterNet / FairMOT / CenterTrack inference, on the host (numpy, float64 like OpenCV).

- `affine_transform_matrix(center, scale, output_size, inv=False)`: CenterNet's `get_affine_transform` (rotation
  0, no shift): the 2x3 matrix mapping the square of side `scale` centred at `center` onto `output_size`
  (w, h), or back with `inv=True`. Computed as OpenCV's `getAffineTransform` does — the exact solution of the
  three point pairs (float32 points, float64 solve) — without OpenCV.
- `centernet_geometry(height, width, input_size, down_ratio)`: CenterNet's / CenterTrack's fixed-resolution
  test geometry (`--fix_res`, their default): centre (w/2, h/2), scale max(h, w); the input warp and the
  transform of output-map coordinates back to the image.
- `letterbox_geometry(height, width, input_size, down_ratio)`: FairMOT's `letterbox` (resize by
  min(H/h, W/w), pad to H x W) and its tracker's transform back (centre (w/2, h/2), scale
  max(W/H * h, w)).

Every geometry is an `ImageGeometry`: what the pre-processing kernels and the decoder need per image.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import numpy as np

__all__ = ["ImageGeometry", "affine_transform_matrix", "centernet_geometry", "letterbox_geometry"]


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direction = a - b
    return b + np.array([-direction[1], direction[0]], dtype=np.float32)


def _solve_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix M with M @ [src_i, 1] = dst_i for three point pairs (float64, as cv2.getAffineTransform)."""
    a = np.zeros((6, 6), dtype=np.float64)
    b = np.zeros(6, dtype=np.float64)
    for i in range(3):
        x, y = float(src[i, 0]), float(src[i, 1])
        a[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0]
        a[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0]
        b[2 * i], b[2 * i + 1] = float(dst[i, 0]), float(dst[i, 1])
    return np.linalg.solve(a, b).reshape(2, 3)


def affine_transform_matrix(center: Sequence[float], scale, output_size: Sequence[int],
                            inv: bool = False) -> np.ndarray:
    """CenterNet's get_affine_transform(center, scale, rot=0, output_size, inv): a float64 (2, 3) matrix.

    `scale` is a number (a square of that side) or (sw, sh); only its first entry sets the mapping, as in
    CenterNet. `output_size` is (width, height)."""
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim == 0:
        scale = np.array([scale, scale], dtype=np.float32)
    center = np.asarray(center, dtype=np.float32)
    dst_w, dst_h = output_size[0], output_size[1]
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + np.array([0, scale[0] * -0.5], dtype=np.float32)
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5], np.float32) + np.array([0, dst_w * -0.5], np.float32)
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    return _solve_affine(dst, src) if inv else _solve_affine(src, dst)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine matrix, in float64 (cv2.invertAffineTransform)."""
    m = np.asarray(matrix, dtype=np.float64)
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    det = 1.0 / det if det != 0 else 0.0
    a11, a22 = m[1, 1] * det, m[0, 0] * det
    a12, a21 = -m[0, 1] * det, -m[1, 0] * det
    return np.array([[a11, a12, -a11 * m[0, 2] - a12 * m[1, 2]],
                     [a21, a22, -a21 * m[0, 2] - a22 * m[1, 2]]], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """How one image becomes the network input and how output-map points go back to it.

    height, width:      the image's size.
    input_size:         (H, W) of the network input.
    warp:               for "affine": the (2, 3) float64 matrix from image to input pixels (cv2.warpAffine's M);
                        for "letterbox": None.
    resized:            for "letterbox": (h', w') of the resized image, placed at (top, left); else None.
    top, left:          the letterbox offsets (0 for "affine").
    to_image:           (2, 3) float64 matrix from output-map (stride `down_ratio`) coordinates to image ones.
    center, scale:      CenterNet's c and s of this image (what its post-processing receives).
    """

    kind: str
    height: int
    width: int
    input_size: Tuple[int, int]
    warp: np.ndarray | None
    resized: Tuple[int, int] | None
    top: int
    left: int
    to_image: np.ndarray
    center: np.ndarray
    scale: float


def _check_size(height: int, width: int, input_size: Sequence[int], down_ratio: int) -> Tuple[int, int]:
    if height < 1 or width < 1:
        raise ValueError(f"images: an image of size {height}x{width} has no pixels")
    if len(input_size) != 2 or min(input_size) < 1:
        raise ValueError(f"input_size: expected (height, width) of positive ints; got {tuple(input_size)}")
    if down_ratio < 1 or input_size[0] % down_ratio or input_size[1] % down_ratio:
        raise ValueError(f"down_ratio {down_ratio}: must divide input_size {tuple(input_size)}")
    return int(input_size[0]), int(input_size[1])


def centernet_geometry(height: int, width: int, input_size: Sequence[int], down_ratio: int = 4) -> ImageGeometry:
    """CenterNet's pre_process at scale 1 with fix_res (and CenterTrack's): c = (w/2, h/2), s = max(h, w)."""
    inp_h, inp_w = _check_size(height, width, input_size, down_ratio)
    center = np.array([width / 2.0, height / 2.0], dtype=np.float32)
    scale = max(height, width) * 1.0
    warp = affine_transform_matrix(center, scale, [inp_w, inp_h])
    to_image = affine_transform_matrix(center, scale, [inp_w // down_ratio, inp_h // down_ratio], inv=True)
    return ImageGeometry("affine", height, width, (inp_h, inp_w), warp, None, 0, 0, to_image, center, scale)


def letterbox_geometry(height: int, width: int, input_size: Sequence[int], down_ratio: int = 4) -> ImageGeometry:
    """FairMOT's letterbox(img, height=H, width=W) and its tracker's c, s for the way back."""
    inp_h, inp_w = _check_size(height, width, input_size, down_ratio)
    ratio = min(float(inp_h) / height, float(inp_w) / width)
    new_w, new_h = round(width * ratio), round(height * ratio)
    dw, dh = (inp_w - new_w) / 2, (inp_h - new_h) / 2
    top, left = round(dh - 0.1), round(dw - 0.1)
    center = np.array([width / 2.0, height / 2.0], dtype=np.float32)
    scale = max(float(inp_w) / float(inp_h) * height, width) * 1.0
    to_image = affine_transform_matrix(center, scale, [inp_w // down_ratio, inp_h // down_ratio], inv=True)
    return ImageGeometry("letterbox", height, width, (inp_h, inp_w), None, (new_h, new_w), top, left, to_image,
                         center, scale)
