"""Detection and tracking inference around the networks: pre-processing, decoding, a batched detect call.

    from dla_fast import detection
    batch, geometries = detection.preprocess(images, "centernet", input_size=(512, 512))   # one kernel
    dets = detection.ctdet_decode(hm.sigmoid(), wh, reg, K=100)       # CenterNet's (B, K, 6), fused
    dets, inds = detection.mot_decode(hm, wh, reg, K=500, logits=True)  # FairMOT's, sigmoid fused
    results = dla_fast.detect(model, images)                           # the whole pipeline on a batch

Modules: transforms (the peers' geometry, numpy), preprocess (CenterNet's warpAffine / FairMOT's letterbox as
one Triton kernel per batch), decode (peak test + top-K + gathers + boxes), detector (`Detector`, `detect`),
kernels (the Triton kernels).
"""
from .decode import (Decoded, centertrack_decode, ctdet_decode, decode, gather_embeddings, heat_peaks,
                     mot_decode)
from .detector import Detector, detect
from .preprocess import preprocess
from .transforms import ImageGeometry, affine_transform_matrix, centernet_geometry, letterbox_geometry

__all__ = ["Decoded", "Detector", "ImageGeometry", "detect", "preprocess", "affine_transform_matrix", "centernet_geometry", "centertrack_decode",
           "ctdet_decode", "decode", "gather_embeddings", "heat_peaks", "letterbox_geometry", "mot_decode"]
