"""Fused decoding of CenterNet / FairMOT / CenterTrack heatmaps, batched, with the peers' drop-in entry points.

The peers decode with a dozen small PyTorch ops (CenterNet's `ctdet_decode`, FairMOT's `mot_decode`,
CenterTrack's `generic_decode`): sigmoid, `_nms` (3x3 max-pool, compare, multiply), `_topk` (per-class
torch.topk over H*W, global torch.topk over C*K, five gathers), two more gathers, several cats. Here:

1. `heat_peaks`: sigmoid (optional) + the 3x3 peak test in one kernel, giving the peers' `_nms(heat)` values.
2. The peers' two torch.topk calls, on tensors of the same shapes and values: ties (plateaus, all-equal maps,
   K larger than the number of peaks, where the zeros tie) are broken exactly as in the peers' code on the
   same device. torch.topk does not break ties by index: on the CPU it returns an implementation-defined
   order among equal values (e.g. indices [12, 14, 13, 15, 11] for topk(zeros(20), 5)), and the CUDA
   implementation orders them differently again; calling it on the same values is the only way to agree.
3. `assemble_detections_kernel`: the winners' classes and positions, the gathers of reg / wh / tracking, the
   boxes, and (with `to_image`) CenterNet's `transform_preds` back to image coordinates, in one kernel.

Implementations, chosen by `dla_fast.backend.resolve(heat.device, "detection_decode")`: 'triton' (the kernels
above, CUDA tensors or the interpreter) and 'torch' (the same steps as eager PyTorch, `_peaks_torch` /
`_assemble_torch`). Heatmaps holding NaN raise ValueError (checked on the K winning scores: NaN survives the
peak test and torch.topk ranks it first, so a NaN anywhere in the heatmap reaches them).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import backend
from ..ops.common import cdiv, device_guard, next_power_of_2
from .kernels import assemble_detections_kernel, gather_normalize_kernel, heat_peaks_kernel

__all__ = ["Decoded", "ctdet_decode", "mot_decode", "centertrack_decode", "decode", "heat_peaks",
           "gather_embeddings"]

PEAK_BLOCK = 1024
OP_NAME = "detection_decode"


def _check_map(name: str, x: Optional[torch.Tensor], heat: torch.Tensor, channels: Optional[int] = None) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: expected a (B, C, H, W) tensor; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[0] != heat.shape[0] or x.shape[2:] != heat.shape[2:]:
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match heat {tuple(heat.shape)} in batch and "
                         "spatial size")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels; got {x.shape[1]}")
    if x.device != heat.device:
        raise ValueError(f"{name}: on {x.device}, heat on {heat.device}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor; got {x.dtype}")


def _check_heat(heat: torch.Tensor, K: int) -> None:
    if not isinstance(heat, torch.Tensor) or heat.dim() != 4:
        raise ValueError(f"heat: expected a (B, C, H, W) heatmap tensor; got "
                         f"{tuple(heat.shape) if isinstance(heat, torch.Tensor) else type(heat).__name__}")
    if not heat.is_floating_point():
        raise ValueError(f"heat: expected a floating-point tensor; got {heat.dtype}")
    b, c, h, w = heat.shape
    if min(b, c, h, w) < 1:
        raise ValueError(f"heat: empty heatmap of shape {tuple(heat.shape)}")
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K: expected a positive int; got {K!r}")
    if K > h * w:
        # The peers' per-class torch.topk over H*W raises here too ("selected index k out of range").
        raise ValueError(f"K={K}: larger than the heatmap's {h}x{w} = {h * w} positions per class; the peers' "
                         "per-class top-K cannot select that many")


def _implementation(heat: torch.Tensor) -> str:
    return backend.resolve(heat.device, OP_NAME, heat.dtype)


def _peaks_torch(heat: torch.Tensor, apply_sigmoid: bool) -> torch.Tensor:
    if apply_sigmoid:
        heat = heat.sigmoid()
    hmax = F.max_pool2d(heat, (3, 3), stride=1, padding=1)
    return heat * (hmax == heat).float()


def heat_peaks(heat: torch.Tensor, apply_sigmoid: bool = False) -> torch.Tensor:
    """CenterNet's `_nms(heat)` (with `heat.sigmoid()` first when apply_sigmoid): (B, C, H, W) float32, the
    heatmap where a value has no strictly larger 3x3 neighbour, 0 elsewhere."""
    if _implementation(heat) == "torch":
        return _peaks_torch(heat, apply_sigmoid)
    heat = heat.contiguous()
    out = torch.empty(heat.shape, dtype=torch.float32, device=heat.device)
    total = heat.numel()
    with device_guard(heat):
        heat_peaks_kernel[(cdiv(total, PEAK_BLOCK),)](heat, out, total, heat.shape[2], heat.shape[3],
                                                      APPLY_SIGMOID=apply_sigmoid, BLOCK=PEAK_BLOCK)
    return out


def _top_k(peaks: torch.Tensor, K: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The peers' two torch.topk calls: per class over H*W, then over the C*K candidates.
    Returns (scores (B, K), order (B, K) into the candidates, class_index (B, C*K) positions y * W + x)."""
    b, c = peaks.shape[:2]
    class_scores, class_index = torch.topk(peaks.view(b, c, -1), K)
    scores, order = torch.topk(class_scores.view(b, -1), K)
    return scores, order, class_index.view(b, -1)


def _check_finite_scores(scores: torch.Tensor) -> None:
    if bool(torch.isnan(scores).any()):
        raise ValueError("heat: the heatmap holds NaN (the network's output is broken: check the input and the "
                         "weights); refusing to decode it")


def _gather_map(x: torch.Tensor, ind: torch.Tensor) -> torch.Tensor:
    """x (B, D, H, W) at positions ind (B, K) -> (B, K, D), in x's dtype (the peers' _transpose_and_gather_feat)."""
    b, d = x.shape[:2]
    return x.flatten(2).gather(2, ind.unsqueeze(1).expand(b, d, ind.shape[1])).transpose(1, 2)


def _to_image_torch(points: torch.Tensor, to_image: torch.Tensor) -> torch.Tensor:
    """points (B, K, 2) float32 -> image coordinates through to_image (B, 2, 3) float64, as float32."""
    p = points.double()
    t = to_image.view(-1, 1, 2, 3)
    x = t[..., 0, 0] * p[..., 0] + t[..., 0, 1] * p[..., 1] + t[..., 0, 2]
    y = t[..., 1, 0] * p[..., 0] + t[..., 1, 1] * p[..., 1] + t[..., 1, 2]
    return torch.stack([x, y], dim=-1).float()


@dataclasses.dataclass
class Decoded:
    """The K best peaks of each image, best first.

    detections: (B, K, 6) float32 x1, y1, x2, y2, score, class in output-map coordinates (the peers' tensor).
    inds:       (B, K) int64 positions y * W + x on the output map.
    boxes:      (B, K, 4) float32 boxes in image coordinates (None without `to_image`).
    tracking:   (B, K, 2) CenterTrack's tracking offsets: in image coordinates with `to_image`, else the
                gathered head values (None without a tracking head).
    """

    detections: torch.Tensor
    inds: torch.Tensor
    boxes: Optional[torch.Tensor] = None
    tracking: Optional[torch.Tensor] = None


def decode(heat: torch.Tensor, wh: torch.Tensor, reg: Optional[torch.Tensor] = None, K: int = 100,
           cat_spec_wh: bool = False, ltrb: bool = False, clamp_wh: bool = False,
           tracking: Optional[torch.Tensor] = None, to_image: Optional[torch.Tensor] = None,
           logits: bool = False, check_nan: bool = True) -> Decoded:
    """Decode a batch of heatmaps (the shared core of ctdet_decode, mot_decode and centertrack_decode).

    heat (B, C, H, W) scores after the sigmoid, or logits with `logits=True` (the sigmoid is fused);
    wh (B, 2, H, W) (2*C with cat_spec_wh, 4 with ltrb); reg (B, 2, H, W) sub-pixel offsets or None (centre
    + 0.5); tracking (B, 2, H, W) or None; to_image (B, 2, 3) float64 output-map -> image matrices or None.
    clamp_wh: CenterTrack's `wh[wh < 0] = 0`. check_nan: raise ValueError on a heatmap holding NaN (one
    host synchronization)."""
    _check_heat(heat, K)
    b, c, h, w = heat.shape
    _check_map("wh", wh, heat, 4 if ltrb else (2 * c if cat_spec_wh else 2))
    _check_map("reg", reg, heat, 2)
    _check_map("tracking", tracking, heat, 2)
    if cat_spec_wh and ltrb:
        raise ValueError("cat_spec_wh and ltrb: choose one box parametrization")
    if to_image is not None:
        to_image = torch.as_tensor(to_image, dtype=torch.float64, device=heat.device)
        if to_image.shape != (b, 2, 3):
            raise ValueError(f"to_image: expected ({b}, 2, 3) matrices; got {tuple(to_image.shape)}")
    peaks = heat_peaks(heat, apply_sigmoid=logits)
    scores, order, class_index = _top_k(peaks, K)
    if check_nan:
        _check_finite_scores(scores)
    if _implementation(heat) == "torch":
        return _assemble_torch(scores, order, class_index, wh, reg, tracking, to_image, K, w, cat_spec_wh, ltrb,
                               clamp_wh)
    det = torch.empty(b, K, 6, dtype=torch.float32, device=heat.device)
    inds = torch.empty(b, K, dtype=torch.int64, device=heat.device)
    boxes = torch.empty(b, K, 4, dtype=torch.float32, device=heat.device) if to_image is not None else None
    has_tracking = tracking is not None
    image_tracking = torch.empty(b, K, 2, dtype=torch.float32, device=heat.device) if has_tracking else None
    dummy = det
    with device_guard(heat):
        assemble_detections_kernel[(b,)](
            scores, order, class_index, wh, reg if reg is not None else dummy,
            tracking if has_tracking else dummy, to_image.contiguous() if to_image is not None else dummy,
            det, inds, boxes if boxes is not None else dummy,
            image_tracking if image_tracking is not None else dummy, K, c, h, w,
            *wh.stride(), *(reg.stride() if reg is not None else (0,) * 4),
            *(tracking.stride() if has_tracking else (0,) * 4),
            HAS_REG=reg is not None, CAT_SPEC_WH=cat_spec_wh, LTRB=ltrb, CLAMP_WH=clamp_wh,
            HAS_TRACKING=has_tracking, TO_IMAGE=to_image is not None,
            BLOCK_K=max(16, next_power_of_2(K)))
    return Decoded(det, inds, boxes, image_tracking)


def _assemble_torch(scores, order, class_index, wh, reg, tracking, to_image, K, width, cat_spec_wh, ltrb,
                    clamp_wh) -> Decoded:
    """The eager twin of assemble_detections_kernel."""
    cls = order // K
    inds = class_index.gather(1, order)
    ys = (inds // width).float()
    xs = (inds % width).float()
    if reg is not None:
        r = _gather_map(reg, inds)
        x, y = xs + r[..., 0].float(), ys + r[..., 1].float()
    else:
        x, y = xs + 0.5, ys + 0.5
    size = _gather_map(wh, inds).float()
    if cat_spec_wh:
        size = size.view(*size.shape[:2], -1, 2).gather(2, cls.view(*cls.shape, 1, 1).expand(-1, -1, 1, 2))[:, :, 0]
    if clamp_wh:
        size = size.clamp(min=0)
    if ltrb:
        corners = [x - size[..., 0], y - size[..., 1], x + size[..., 2], y + size[..., 3]]
    else:
        corners = [x - size[..., 0] / 2, y - size[..., 1] / 2, x + size[..., 0] / 2, y + size[..., 1] / 2]
    det = torch.stack(corners + [scores.float(), cls.float()], dim=2)
    boxes = image_tracking = None
    if to_image is not None:
        boxes = torch.cat([_to_image_torch(det[..., 0:2], to_image), _to_image_torch(det[..., 2:4], to_image)], 2)
    if tracking is not None:
        offsets = _gather_map(tracking, inds)[..., :2].float()
        if to_image is not None:
            centres = torch.stack([xs, ys], dim=-1)
            image_tracking = (_to_image_torch(centres + offsets, to_image).double()
                              - _to_image_torch(centres, to_image).double()).float()
        else:
            image_tracking = offsets
    return Decoded(det, inds, boxes, image_tracking)


def gather_embeddings(feature: torch.Tensor, inds: torch.Tensor, normalize: bool = True,
                      eps: float = 1e-12) -> torch.Tensor:
    """FairMOT's re-ID features at the decoded positions: (B, D, H, W) at inds (B, K) -> (B, K, D) float32,
    L2-normalized over D as F.normalize(feature, dim=1) (computed on the K gathered vectors only)."""
    if feature.dim() != 4 or inds.dim() != 2 or feature.shape[0] != inds.shape[0]:
        raise ValueError(f"feature (B, D, H, W) and inds (B, K) expected; got {tuple(feature.shape)} and "
                         f"{tuple(inds.shape)}")
    if _implementation(feature) == "torch":
        gathered = _gather_map(feature, inds).float()
        return F.normalize(gathered, dim=2, eps=eps) if normalize else gathered
    b, d, h, w = feature.shape
    k = inds.shape[1]
    out = torch.empty(b, k, d, dtype=torch.float32, device=feature.device)
    with device_guard(feature):
        gather_normalize_kernel[(b * k,)](feature, inds.contiguous(), out, k, d, *feature.stride(), w, eps,
                                          NORMALIZE=normalize, BLOCK_D=max(16, next_power_of_2(d)))
    return out


def ctdet_decode(heat: torch.Tensor, wh: torch.Tensor, reg: Optional[torch.Tensor] = None,
                 cat_spec_wh: bool = False, K: int = 100, logits: bool = False) -> torch.Tensor:
    """Drop-in for CenterNet's `models.decode.ctdet_decode`: heat (B, C, H, W) after the sigmoid (or logits with
    `logits=True`), wh (B, 2 or 2*C, H, W), reg (B, 2, H, W) or None -> detections (B, K, 6) float32:
    x1, y1, x2, y2, score, class in output-map coordinates, best first."""
    return decode(heat, wh, reg, K=K, cat_spec_wh=cat_spec_wh, logits=logits).detections


def mot_decode(heat: torch.Tensor, wh: torch.Tensor, reg: Optional[torch.Tensor] = None, ltrb: bool = False,
               K: int = 100, logits: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for FairMOT's `models.decode.mot_decode`: (detections (B, K, 6), inds (B, K)); wh has 4 channels
    (left, top, right, bottom distances) with `ltrb`."""
    decoded = decode(heat, wh, reg, K=K, ltrb=ltrb, logits=logits)
    return decoded.detections, decoded.inds


def centertrack_decode(output: Dict[str, torch.Tensor], K: int = 100, logits: bool = False) -> Dict[str, torch.Tensor]:
    """CenterTrack's `generic_decode` for its detection + tracking heads ('hm', 'wh', optional 'reg' and
    'tracking'): {'scores', 'clses', 'xs', 'ys', 'cts', 'bboxes', 'tracking', 'inds'} as CenterTrack returns
    them (wh (B, 2, H, W), clamped at 0, as its `wh.view(batch, K, 2)` requires)."""
    heat = output["hm"]
    if "wh" not in output:
        raise ValueError("output: CenterTrack decoding here needs the 'wh' head (its box)")
    decoded = decode(heat, output["wh"], output.get("reg"), K=K, clamp_wh=True,
                     tracking=output.get("tracking"), logits=logits)
    det = decoded.detections
    width = heat.shape[3]
    xs, ys = (decoded.inds % width).float(), (decoded.inds // width).float()
    result = {"scores": det[..., 4], "clses": det[..., 5], "xs": xs, "ys": ys, "cts": torch.stack([xs, ys], 2),
              "bboxes": det[..., :4], "inds": decoded.inds}
    if decoded.tracking is not None:
        result["tracking"] = decoded.tracking
    return result
