"""A batched detect call: pre-processing, the network and decoding as one pipeline.

    detector = dla_fast.Detector(model, input_size=(512, 512))    # CenterNet, FairMOT or CenterTrack model
    results = detector(images)                                     # list of uint8 HWC images (BGR), any sizes
    results[0]["boxes"], results[0]["scores"], results[0]["classes"]
    dla_fast.detect(model, images, K=100)                          # the same, one call

Per image, a dict of CPU tensors, best score first: boxes (n, 4) float32 x1, y1, x2, y2 in the image's pixels;
scores (n,); classes (n,) int64, 0-based (CenterNet's result dicts key them + 1); FairMOT models (an "id" head)
add embeddings (n, D) (L2-normalized re-ID features); CenterTrack models add tracking (n, 2) (the offset to the
object's position in the previous frame, image pixels). n is K, or the detections above the model kind's
threshold (FairMOT's conf_thres 0.4: score > 0.4; CenterTrack's out_thresh = track_thresh 0.3: score >= 0.3;
CenterNet keeps all K).

Model kinds (`kind`, inferred when not given): "centernet" (CenterNet's pre_process: affine warp to
input_size, COCO mean/std), "fairmot" (a model with an "id" head: letterbox, RGB, / 255; wh with 4 channels is
FairMOT's ltrb), "centertrack" (a dla_fast CenterTrack model: CenterNet's pre-processing; `pre_images`: the
previous frame's images (pre-processed in the same way) or its already pre-processed float input (B, 3, H, W),
as CenterTrack keeps it; `pre_hms`: (B, 1, H, W) at input resolution (CenterTrack renders it from the previous
tracks, which is the tracker's business); each when the model takes it). The heatmap's sigmoid is fused into decoding.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .decode import decode, gather_embeddings
from .preprocess import COCO_MEAN, COCO_STD, ImageBatch, preprocess

__all__ = ["Detector", "detect", "KINDS"]

KIND_DEFAULT = object()  # `threshold` not given: the model kind's
KINDS = {
    # kind: (pre-processing mode, K, threshold, keep scores equal to the threshold)
    "centernet": ("centernet", 100, None, True),
    "fairmot": ("fairmot", 500, 0.4, False),
    "centertrack": ("centernet", 100, 0.3, True),
}


def infer_kind(model: nn.Module) -> str:
    """'centertrack' for a dla_fast CenterTrack, 'fairmot' for a model with an 'id' head, else 'centernet'."""
    from ..models.centertrack import CenterTrack

    inner = getattr(model, "model", model)  # through CUDAGraphInference
    if isinstance(inner, CenterTrack):
        return "centertrack"
    heads = getattr(inner, "heads", {})
    return "fairmot" if "id" in heads else "centernet"


class Detector:
    """The whole inference pipeline of a CenterNet / FairMOT / CenterTrack model on batches of images.

    Args:
        model: the network (eval mode is set); already accelerated or not (`accelerate=True` does it here).
        kind: "centernet", "fairmot" or "centertrack" (default: inferred from the model).
        input_size: (H, W) of the network input (CenterNet 512x512, FairMOT 608x1088).
        K: the top-K of decoding (default: the kind's: 100, FairMOT 500).
        threshold: keep detections scoring above it (default: the kind's; None keeps all K).
        mean, std: CenterNet's normalization (ignored by "fairmot").
        accelerate: run `dla_fast.accelerate(model)` first.
        cuda_graph: replay the network from CUDA graphs (dla_fast.CUDAGraphInference; CUDA, not CenterTrack).
        amp_dtype: autocast dtype for the network (None: fp32).
    """

    def __init__(self, model: nn.Module, kind: Optional[str] = None, input_size: Sequence[int] = (512, 512),
                 K: Optional[int] = None, threshold=KIND_DEFAULT, mean: Sequence[float] = COCO_MEAN,
                 std: Sequence[float] = COCO_STD, accelerate: bool = False, cuda_graph: bool = False,
                 amp_dtype: Optional[torch.dtype] = None):
        kind = infer_kind(model) if kind is None else kind
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.kind = kind
        self.mode, default_k, default_threshold, self.keep_equal = KINDS[kind]
        self.K = default_k if K is None else K
        self.threshold = default_threshold if threshold is KIND_DEFAULT else threshold
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean, self.std = mean, std
        if accelerate:
            from ..nn import accelerate as accelerate_model
            model = accelerate_model(model)
        model.eval()
        self.device = next(model.parameters()).device
        self.down_ratio = getattr(model, "down_ratio", 4)
        if cuda_graph:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graph=True: the model is on {self.device}; CUDA graphs need a CUDA GPU")
            if kind == "centertrack":
                raise ValueError("cuda_graph=True: CenterTrack takes the previous frame as extra inputs, which "
                                 "dla_fast.CUDAGraphInference does not capture; use cuda_graph=False")
            from ..nn import CUDAGraphInference
            model = CUDAGraphInference(model)
        self.model = model
        self.amp_dtype = amp_dtype

    def preprocess(self, images: ImageBatch):
        """The network input (B, 3, H, W) on the model's device and each image's geometry."""
        return preprocess(images, self.mode, self.input_size, self.mean, self.std, self.down_ratio, self.device)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def network(self, batch: torch.Tensor, pre_images: Optional[ImageBatch] = None,
                pre_hms: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The heads' outputs of the last stack (dict name -> (B, C, H/4, W/4))."""
        with torch.inference_mode(), self._autocast():
            if self.kind == "centertrack":
                pre = pre_images
                if pre is not None and not (isinstance(pre, torch.Tensor) and pre.is_floating_point()):
                    pre = self.preprocess(pre)[0]
                hm = pre_hms.to(self.device) if pre_hms is not None else None
                return self.model(batch, pre, hm)[-1]
            if pre_images is not None or pre_hms is not None:
                raise ValueError(f"pre_images / pre_hms: only CenterTrack models take the previous frame; this is "
                                 f"a {self.kind} model")
            return self.model(batch)[-1]

    def decode(self, output: Dict[str, torch.Tensor], geometries) -> List[Dict[str, torch.Tensor]]:
        """Decoded, transformed back to each image and moved to the host (one copy), split per image."""
        to_image = torch.from_numpy(np.stack([g.to_image for g in geometries]))
        wh = output["wh"]
        ltrb = self.kind == "fairmot" and wh.shape[1] == 4
        with torch.inference_mode():
            decoded = decode(output["hm"], wh, output.get("reg"), K=self.K, ltrb=ltrb,
                             clamp_wh=self.kind == "centertrack",
                             tracking=output.get("tracking") if self.kind == "centertrack" else None,
                             to_image=to_image.to(self.device, non_blocking=True), logits=True, check_nan=False)
            parts = [decoded.boxes, decoded.detections[..., 4:6]]
            if decoded.tracking is not None:
                parts.append(decoded.tracking)
            if self.kind == "fairmot" and "id" in output:
                parts.append(gather_embeddings(output["id"], decoded.inds))
            packed = torch.cat(parts, dim=2).cpu()  # one device -> host copy
        if torch.isnan(packed[..., 4]).any():
            raise ValueError("heat: the heatmap holds NaN (the network's output is broken: check the input and the "
                             "weights); refusing to decode it")
        results = []
        for row in packed:
            scores = row[:, 4]
            if self.threshold is None:
                keep = torch.ones_like(scores, dtype=torch.bool)
            else:
                keep = scores >= self.threshold if self.keep_equal else scores > self.threshold
            row = row[keep]
            result = {"boxes": row[:, :4], "scores": row[:, 4], "classes": row[:, 5].long()}
            column = 6
            if decoded.tracking is not None:
                result["tracking"] = row[:, column:column + 2]
                column += 2
            if row.shape[1] > column:
                result["embeddings"] = row[:, column:]
            results.append(result)
        return results

    def __call__(self, images: ImageBatch, pre_images: Optional[ImageBatch] = None,
                 pre_hms: Optional[torch.Tensor] = None) -> List[Dict[str, torch.Tensor]]:
        batch, geometries = self.preprocess(images)
        output = self.network(batch, pre_images, pre_hms)
        return self.decode(output, geometries)


def detect(model: nn.Module, images: ImageBatch, K: Optional[int] = None, **kwargs) -> List[Dict[str, torch.Tensor]]:
    """One pipeline run: `Detector(model, K=K, **kwargs)(images)` (build a Detector to reuse it, e.g. with
    cuda_graph=True)."""
    pre_images = kwargs.pop("pre_images", None)
    pre_hms = kwargs.pop("pre_hms", None)
    return Detector(model, K=K, **kwargs)(images, pre_images, pre_hms)
