"""CenterTrack (Zhou et al., "Tracking Objects as Points", ECCV 2020) on DLA, in plain eager PyTorch.

The tracking network of xingyizhou/CenterTrack (`src/lib/model/networks/dla.py`, `base_model.py`): CenterNet's
network (`dla_fast.models.centernet`) whose backbone base takes two more inputs, the previous frame and a
heatmap of the objects tracked in it. Each goes through a branch shaped like the base layer, conv 7x7 (pad 3,
no bias) -> BN -> ReLU to channels[0] (16) at full resolution, and is added to the base layer's output:

    x = base_layer(img) [+ pre_img_layer(pre_img)] [+ pre_hm_layer(pre_hm)],  then levels 0..5 as in DLA.

A branch whose input is not given is skipped, as in CenterTrack (its tracker feeds the current frame as the
previous one at the first frame; that is the caller's choice, not the network's). The heads are CenterNet's
(conv3x3 -> ReLU -> conv1x1, or one conv1x1 with head_conv=0) with CenterTrack's initialisation: the last bias of
every head whose name contains "hm" is the prior bias (-4.6, CenterTrack's default `--prior_bias`), every bias of
the other heads 0. The usual heads are hm, reg, wh, tracking (2, the offset to the object's previous centre) and
optionally ltrb_amodal (4).

State-dict keys equal CenterTrack's: `base.*` with `base.pre_img_layer.{0,1}.*` and `base.pre_hm_layer.{0,1}.*`,
`dla_up.*`, `ida_up.*`, `<head>.0|2.*`; its checkpoints ({"epoch", "state_dict"}) load strictly through
`dla_fast.load_checkpoint`, which reports their unused `base.fc.*` and `base.level*.project.*` as ignored.
`dcn=True` is CenterTrack's default `--dla_node dcn`; `dcn=False` is FairMOT's plain 3x3 conv layout, not
CenterTrack's `--dla_node conv` (a 1x1 conv). Not built: CenterTrack's non-default `--num_head_conv` > 1 (deeper
heads) and `--head_kernel` other than 3.

Registered as `centertrack_<variant>` for every backbone of `dla_fast.models.VARIANTS` (the branches only need
channels[0]; CenterTrack itself ships dla34).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Mapping, Optional, Sequence, Type

import torch
import torch.nn as nn

from .arguments import check_bool
from .centernet import CenterNet
from .dla import DLA, VARIANTS
from .pretrained import pretrained_cfg
from .registry import register_model

PRIOR_BIAS = -4.6  # CenterTrack's --prior_bias: sigmoid(-4.6) ~= 0.01, the heatmap heads' initial score
TRACKING_HEADS = {"hm": 80, "reg": 2, "wh": 2, "tracking": 2}  # COCO tracking (CenterTrack's tracking,ctdet)


def _previous_frame_branch(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv 7x7 (stride 1, pad 3, no bias) -> BN -> ReLU, like DLA's base layer; PyTorch's default init as in
    CenterTrack."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 7, stride=1, padding=3, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class CenterTrackDLA(DLA):
    """DLA backbone with CenterTrack's previous-frame branches in its base.

    Args (beyond DLA's):
        pre_img: build `pre_img_layer`, the branch of the previous frame (in_chans -> channels[0]).
        pre_hm: build `pre_hm_layer`, the branch of the previous frame's heatmap (1 -> channels[0]).

    forward(x, pre_img=None, pre_hm=None): x (N, in_chans, H, W) with H and W divisible by 32; pre_img
    (N, in_chans, H, W) and pre_hm (N, 1, H, W), each optional (a branch whose input is None is skipped).
    Returns what DLA's forward returns for x, with the branches' outputs added to the base layer's output.
    """

    def __init__(self, levels: Sequence[int], channels: Sequence[int], block: Type[nn.Module],
                 pre_img: bool = True, pre_hm: bool = True, **dla_kwargs):
        super().__init__(levels, channels, block, **dla_kwargs)
        if pre_img:
            self.pre_img_layer = _previous_frame_branch(self.in_chans, self.channels[0])
        if pre_hm:
            self.pre_hm_layer = _previous_frame_branch(1, self.channels[0])

    def check_previous_frame(self, x: torch.Tensor, pre_img: Optional[torch.Tensor],
                             pre_hm: Optional[torch.Tensor]) -> None:
        """Raise ValueError for a previous-frame input this network cannot take (x is already checked)."""
        n, _, h, w = x.shape
        for name, value, channels, branch in (("pre_img", pre_img, self.in_chans, "pre_img_layer"),
                                              ("pre_hm", pre_hm, 1, "pre_hm_layer")):
            if value is None:
                continue
            if not hasattr(self, branch):
                raise ValueError(f"{name} was given, but this model was built without its branch ({name}=False): "
                                 f"build it with {name}=True, or leave {name} out")
            expected = (n, channels, h, w)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must have shape {expected} (the image's batch and size, {channels} "
                                 f"channel{'s' if channels > 1 else ''}); got {got}")
            if value.dtype != x.dtype:
                raise ValueError(f"{name} must have the image's dtype {x.dtype}; got {value.dtype}")
            if value.device != x.device:
                raise ValueError(f"{name} must be on the image's device {x.device}; got {value.device}")

    def forward_levels(self, x: torch.Tensor, pre_img: Optional[torch.Tensor] = None,
                       pre_hm: Optional[torch.Tensor] = None, stop: int = 5) -> List[torch.Tensor]:
        """Outputs of levels 0..stop (strides 1, 2, 4, 8, 16, 32)."""
        if not torch.jit.is_scripting():  # TorchScript compiles the branches, not the Python-typed checks
            self.check_input(x)
            self.check_previous_frame(x, pre_img, pre_hm)
        x = self.base_layer(x)
        if pre_img is not None:
            if hasattr(self, "pre_img_layer"):  # TorchScript: a static check, the other branch is not compiled
                x = x + self.pre_img_layer(pre_img)
            else:  # what check_previous_frame says, for TorchScript
                raise ValueError("pre_img was given, but this model was built without its branch (pre_img=False)")
        if pre_hm is not None:
            if hasattr(self, "pre_hm_layer"):
                x = x + self.pre_hm_layer(pre_hm)
            else:
                raise ValueError("pre_hm was given, but this model was built without its branch (pre_hm=False)")
        return self.forward_levels_from_stem(x, stop)

    def forward(self, x: torch.Tensor, pre_img: Optional[torch.Tensor] = None, pre_hm: Optional[torch.Tensor] = None):
        levels = self.forward_levels(x, pre_img, pre_hm)
        if self.features_only:
            return [levels[i] for i in self.out_indices]
        return self.forward_head(levels[-1])


class CenterTrack(CenterNet):
    """CenterTrack's tracking network on a DLA backbone (CenterTrack's DLASeg with its DLA base).

    Args:
        variant: the backbone, a key of `dla_fast.models.VARIANTS` (CenterTrack itself ships "dla34").
        heads: output name -> channels; default {"hm": 80, "reg": 2, "wh": 2, "tracking": 2}. Add
            "ltrb_amodal": 4 for CenterTrack's --ltrb_amodal models. A head whose name contains "hm" is a
            heatmap head (last bias `prior_bias`).
        head_conv: width of the heads' 3x3 conv (256 for DLA, CenterTrack's default); 0: one 1x1 conv per head.
        dcn: deformable IDA convs (CenterTrack's default --dla_node dcn) or FairMOT's plain 3x3 convs.
        pre_img: build the previous-frame branch `base.pre_img_layer` (CenterTrack: unless --no_pre_img).
        pre_hm: build the previous-heatmap branch `base.pre_hm_layer` (CenterTrack: --pre_hm).
        down_ratio: stride of the outputs (CenterTrack uses 4).
        in_chans: channels of the image and of the previous frame.
        prior_bias: initial last bias of the heatmap heads.

    forward(img, pre_img=None, pre_hm=None): img (N, in_chans, H, W) with H and W divisible by 32; pre_img
    (N, in_chans, H, W), the previous frame; pre_hm (N, 1, H, W), the previous frame's heatmap. Either may be
    left out (its branch is skipped, as in CenterTrack); giving one the model was built without, or of another
    shape, raises ValueError. Returns [dict(name -> (N, heads[name], H / down_ratio, W / down_ratio))].
    """

    def __init__(self, variant: str, heads: Optional[Mapping[str, int]] = None, head_conv: int = 256,
                 dcn: bool = True, pre_img: bool = True, pre_hm: bool = True, down_ratio: int = 4,
                 in_chans: int = 3, prior_bias: float = PRIOR_BIAS):
        # Read by build_backbone, which CenterNet.__init__ calls (plain attributes may precede Module.__init__).
        self.takes_pre_img, self.takes_pre_hm = check_bool("pre_img", pre_img), check_bool("pre_hm", pre_hm)
        if isinstance(prior_bias, bool) or not isinstance(prior_bias, numbers.Real) or not math.isfinite(prior_bias):
            raise ValueError(f"prior_bias must be a finite number (CenterTrack's default {PRIOR_BIAS}); "
                             f"got {prior_bias!r}")
        super().__init__(variant, TRACKING_HEADS if heads is None else heads, head_conv, dcn, down_ratio, in_chans)
        self.variant = f"centertrack_{variant}"
        with torch.no_grad():
            for name in self.heads:
                if "hm" in name:
                    head = getattr(self, name)
                    (head[-1] if isinstance(head, nn.Sequential) else head).bias.fill_(prior_bias)

    def build_backbone(self, variant: str, in_chans: int) -> CenterTrackDLA:
        levels, channels, block, extra = VARIANTS[variant]
        base = CenterTrackDLA(levels, channels, block, pre_img=self.takes_pre_img, pre_hm=self.takes_pre_hm,
                              in_chans=in_chans, features_only=True, out_indices=tuple(range(6)), **extra)
        base.variant = variant
        base.pretrained_cfg = base.default_cfg = pretrained_cfg(variant)
        return base

    def forward(self, img: torch.Tensor, pre_img: Optional[torch.Tensor] = None,
                pre_hm: Optional[torch.Tensor] = None) -> List[Dict[str, torch.Tensor]]:
        return self.forward_from_levels(self.base(img, pre_img, pre_hm))


def _register_centertrack(variant: str) -> None:
    def build(heads: Optional[Mapping[str, int]] = None, head_conv: int = 256, dcn: bool = True,
              pre_img: bool = True, pre_hm: bool = True, down_ratio: int = 4, in_chans: int = 3,
              prior_bias: float = PRIOR_BIAS) -> CenterTrack:
        return CenterTrack(variant, heads, head_conv, dcn, pre_img, pre_hm, down_ratio, in_chans, prior_bias)

    build.__name__ = build.__qualname__ = f"centertrack_{variant}"
    build.__doc__ = (f"CenterTrack tracking network on {variant}: heads {TRACKING_HEADS}, head_conv 256, deformable "
                     "IDA convs, previous-frame image and heatmap branches, stride 4 by default.")
    register_model(build)


for _variant in VARIANTS:
    _register_centertrack(_variant)
