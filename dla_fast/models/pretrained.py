"""timm's pretrained configurations of the DLA classifiers (timm/models/dla.py `default_cfgs`, tag in1k).

Every dla_fast backbone carries its variant's as `model.pretrained_cfg` (and `model.default_cfg`), so
`timm.data.resolve_data_config(model=model)` gives the pre-processing timm's weights were trained with
(bilinear resize, crop_pct 0.875, ImageNet mean/std, 224x224) instead of timm's bicubic fallback for a model
without one. The weights themselves are timm's files (see load_checkpoint); nothing here downloads.
"""
from __future__ import annotations

from typing import Dict

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
_UNKNOWN_LICENSE = ("dla60_res2net", "dla60_res2next")


def pretrained_cfg(variant: str) -> Dict[str, object]:
    """A fresh copy of timm's pretrained_cfg dict for `variant` ('dla34', ...), equal to
    `timm.create_model(variant).pretrained_cfg`."""
    return {
        "url": "", "hf_hub_id": f"timm/{variant}.in1k", "architecture": variant, "tag": "in1k",
        "custom_load": False, "input_size": (3, 224, 224), "fixed_input_size": False, "interpolation": "bilinear",
        "crop_pct": 0.875, "crop_mode": "center", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "num_classes": 1000, "pool_size": (7, 7), "first_conv": "base_layer.0", "classifier": "fc",
        "license": "unknown" if variant in _UNKNOWN_LICENSE else "bsd-3-clause",
    }
