"""CenterNet-style detection on DLA (Zhou et al., "Objects as Points", 2019) in plain eager PyTorch.

The network of xingyizhou/CenterNet `pose_dla_dcn.py` (FairMOT and CenterTrack reuse it): a DLA backbone, a
DLA-Up whose IDA steps *add* instead of concatenating, layers[i] = node_i(up_i(proj_i(layers[i])) + layers[i-1]),
with proj_i and node_i a 3x3 modulated deformable conv (DCNv2) + BN + ReLU, a last IDA step back to the stride of
the heads, and one conv3x3 -> ReLU -> conv1x1 head per output. `dcn=False` gives FairMOT's `pose_dla_conv.py`
variant with plain 3x3 convs. The deformable conv runs on `torchvision.ops.deform_conv2d`, imported only when a
model with dcn=True is built, so the package itself does not need torchvision.

State-dict keys equal CenterNet's (`base.*`, `dla_up.ida_{k}.{proj,up,node}_{i}.*`, `ida_up.*`, `<head>.0|2.*`);
its checkpoints also carry `base.fc.*` and ucbdrive's unused `base.level*.project.*`, which
`dla_fast.load_checkpoint` reports as ignored.

Registered as `centernet_<variant>` for all twelve backbones of `dla_fast.models.VARIANTS`: the up path is built
from the backbone's own channel plan, so every plan works (CenterNet itself ships only dla34).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .arguments import check_bool, check_choice, check_int
from .dla import VARIANTS, build_dla
from .dla_up import ida_stages
from .registry import register_model
from .upsample import bilinear_upsample

DOWN_RATIOS = (2, 4, 8, 16)
LAST_LEVEL = 5  # CenterNet's last_level: the final IDA step merges levels first_level .. 4
HEATMAP_BIAS = -2.19  # sigmoid(-2.19) ~= 0.1, the focal-loss prior of CenterNet's heatmap heads
COCO_HEADS = {"hm": 80, "wh": 2, "reg": 2}


def _torchvision_deform_conv2d() -> Callable[..., torch.Tensor]:
    try:
        from torchvision.ops import deform_conv2d
    except ImportError as e:
        raise ImportError("dcn=True runs the deformable conv on torchvision.ops.deform_conv2d, and torchvision "
                          "could not be imported; install torchvision or build the model with dcn=False") from e
    return deform_conv2d


class ModulatedDeformConv3x3(nn.Module):
    """Modulated deformable 3x3 conv (DCNv2), stride 1, padding 1, with bias: the layout of CenterNet's `DCN`.

    Parameters: `weight` (out, in, 3, 3), `bias` (out,), and `conv_offset_mask` = Conv2d(in, 27, 3, padding=1),
    zero-initialised so the layer starts as a plain conv with every tap weighted by sigmoid(0) = 0.5.

    forward(x): x (N, in, H, W) -> (N, out, H, W). With om = conv_offset_mask(x) (N, 27, H, W), the offset is
    om[:, :18], the (dy, dx) of kernel tap k = 3*i + j at channels 2k and 2k+1 (the layout of DCNv2 and of
    torchvision; CenterNet writes it as cat(o1, o2) of chunk(om, 3), the same 18 channels), and the mask is
    sigmoid(om[:, 18:]), one channel per tap. out[n, o, y, x] = bias[o] + sum_{c, k} weight[o, c, i, j] *
    mask[n, k, y, x] * bilinear(x[n, c], y - 1 + i + dy, x - 1 + j + dx), zero outside the image.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self._deform_conv2d = _torchvision_deform_conv2d()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.conv_offset_mask = nn.Conv2d(in_channels, 27, 3, padding=1, bias=True)
        bound = 1.0 / math.sqrt(in_channels * 9)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset_mask.weight)
        nn.init.zeros_(self.conv_offset_mask.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset_mask = self.conv_offset_mask(x)
        offset, mask = offset_mask[:, :18], torch.sigmoid(offset_mask[:, 18:])
        if torch.jit.is_scripting():  # the op torchvision.ops.deform_conv2d calls, with the same arguments
            return torch.ops.torchvision.deform_conv2d(x, self.weight, offset, mask, self.bias, 1, 1, 1, 1, 1, 1, 1,
                                                       1, True)
        return self._deform_conv2d(x, offset, self.weight, self.bias, padding=(1, 1), mask=mask)


class IDAConv(nn.Module):
    """The 3x3 conv + BN + ReLU of CenterNet's IDA steps (its `DeformConv`): `conv`, then `actf` = (BN, ReLU).

    deformable=True: `conv` is a ModulatedDeformConv3x3 (CenterNet); deformable=False: `conv` is a plain
    nn.Conv2d 3x3 without bias (FairMOT's pose_dla_conv). (N, in_channels, H, W) -> (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, deformable: bool = True):
        super().__init__()
        self.actf = nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        if deformable:
            self.conv = ModulatedDeformConv3x3(in_channels, out_channels)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actf(self.conv(x))


class IDAUpAdd(nn.Module):
    """Iterative deep aggregation with additive nodes (CenterNet's IDAUp).

    Args:
        out_channels: width o of every step; input 0 must already have o channels.
        in_channels: channels c_i of the inputs, finest first.
        up_factors: f_i, the stride of input i relative to input 0 (f_0 == 1, f_i >= 2 even for i >= 1).
        deformable: IDAConv flavour (CenterNet DCN or FairMOT plain conv).

    Submodules for i >= 1: `proj_i` = IDAConv(c_i -> o), `up_i` = trainable bilinear depthwise ConvTranspose2d
    by f_i, `node_i` = IDAConv(o -> o).

    forward(layers): layers[i] is (N, c_i, H/f_i, W/f_i). Returns [x_0, ..., x_{n-1}], all (N, o, H, W), with
    x_0 = layers[0] and x_i = node_i(up_i(proj_i(layers[i])) + x_{i-1}).
    """

    def __init__(self, out_channels: int, in_channels: Sequence[int], up_factors: Sequence[int],
                 deformable: bool = True):
        super().__init__()
        if len(in_channels) != len(up_factors):
            raise ValueError(f"IDAUpAdd needs one up factor per input: {list(in_channels)} vs {list(up_factors)}")
        if in_channels[0] != out_channels:
            raise ValueError(f"IDAUpAdd passes input 0 through, so it must have {out_channels} channels; "
                             f"got {in_channels[0]}")
        self.in_channels = tuple(in_channels)
        self.out_channels = out_channels
        self.up_factors = tuple(int(f) for f in up_factors)
        for i in range(1, len(self.in_channels)):
            setattr(self, f"proj_{i}", IDAConv(self.in_channels[i], out_channels, deformable))
            setattr(self, f"up_{i}", bilinear_upsample(out_channels, self.up_factors[i]))
            setattr(self, f"node_{i}", IDAConv(out_channels, out_channels, deformable))

    def forward(self, layers: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(layers) != len(self.in_channels):
            raise ValueError(f"IDAUpAdd was built for {len(self.in_channels)} inputs; got {len(layers)}")
        outputs = [layers[0]]
        for i in range(1, len(layers)):
            upsampled = getattr(self, f"up_{i}")(getattr(self, f"proj_{i}")(layers[i]))
            outputs.append(getattr(self, f"node_{i}")(upsampled + outputs[-1]))
        return outputs


class DLAUpAdd(nn.Module):
    """DLA-Up with additive IDA steps (CenterNet's DLAUp; the stages are built as in `dla_up.DLAUp`).

    Args:
        channels: widths of the n input levels, finest first.
        scales: their strides relative to the first level (1, 2, 4, ...).
        deformable: IDAConv flavour.

    Stage `ida_k` (k = 0 .. n-2) merges level j = n-2-k with the k+1 outputs of the previous stage. For DLA-34
    at down ratio 4: (out, inputs, factors) = (256, [256, 512], [1, 2]), (128, [128, 256, 256], [1, 2, 2]),
    (64, [64, 128, 128, 128], [1, 2, 2, 2]).

    forward(layers): layers[i] is (N, channels[i], H/scales[i], W/scales[i]). Returns the last output of every
    stage, finest first, and the untouched coarsest level: [ida_{n-2}, ..., ida_0, layers[-1]], entry i of
    shape (N, channels[i], H/scales[i], W/scales[i]).
    """

    def __init__(self, channels: Sequence[int], scales: Sequence[int], deformable: bool = True):
        super().__init__()
        if len(channels) != len(scales) or len(channels) < 2:
            raise ValueError(f"DLAUpAdd needs >= 2 levels with one scale each: {list(channels)}, {list(scales)}")
        self.channels = tuple(channels)
        for k, (out_channels, in_channels, factors) in enumerate(ida_stages(channels, scales)):
            setattr(self, f"ida_{k}", IDAUpAdd(out_channels, in_channels, factors, deformable))

    def forward(self, layers: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(layers) != len(self.channels):
            raise ValueError(f"DLAUpAdd was built for {len(self.channels)} levels; got {len(layers)}")
        layers = list(layers)
        outputs = [layers[-1]]
        for k in range(len(layers) - 1):
            j = len(layers) - 2 - k
            layers[j:] = getattr(self, f"ida_{k}")(layers[j:])
            outputs.insert(0, layers[-1])
        return outputs


def _head(in_channels: int, classes: int, head_conv: int, heatmap: bool) -> nn.Module:
    """conv3x3(in -> head_conv, bias) -> ReLU -> conv1x1(-> classes, bias), or one conv1x1 when head_conv == 0.

    Initialised as CenterNet: PyTorch's default conv init, then a heatmap head's last bias = HEATMAP_BIAS and
    every bias of the other heads = 0.
    """
    if head_conv > 0:
        head = nn.Sequential(nn.Conv2d(in_channels, head_conv, 3, padding=1, bias=True), nn.ReLU(inplace=True),
                             nn.Conv2d(head_conv, classes, 1, bias=True))
        last = head[-1]
    else:
        head = last = nn.Conv2d(in_channels, classes, 1, bias=True)
    with torch.no_grad():
        if heatmap:
            last.bias.fill_(HEATMAP_BIAS)
        else:
            for m in head.modules():
                if isinstance(m, nn.Conv2d):
                    m.bias.zero_()
    return head


def check_heads(heads: Mapping[str, int], head_conv: int) -> None:
    """ValueError naming the argument unless `heads` maps at least one identifier to a channel count >= 1 and
    `head_conv` is an int >= 0 (the width of the heads' 3x3 conv; 0 for a single 1x1 conv)."""
    if not isinstance(heads, Mapping) or not heads:
        raise ValueError(f"heads must be a dict of at least one head, name -> output channels (e.g. {COCO_HEADS}); "
                         f"got {heads!r}")
    for name, channels in heads.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"heads: head name {name!r} must be a Python identifier (it becomes a submodule)")
        check_int(f"heads[{name!r}]", channels, 1)
    check_int("head_conv", head_conv, 0)


class CenterNet(nn.Module):
    """CenterNet-style detector on a DLA backbone (CenterNet's pose_dla_dcn DLASeg, last_level 5).

    Args:
        variant: the backbone, a key of `dla_fast.models.VARIANTS` (CenterNet itself ships "dla34").
        heads: output name -> channels; default {"hm": 80, "wh": 2, "reg": 2} (COCO boxes). A head whose name
            contains "hm" is a heatmap head (last bias -2.19), as in CenterNet.
        head_conv: width of the heads' 3x3 conv (256 for DLA); 0 makes each head a single 1x1 conv.
        dcn: deformable IDA convs (CenterNet) or plain 3x3 convs (FairMOT's pose_dla_conv).
        down_ratio: stride of the outputs, 2, 4, 8 or 16; the network starts at level log2(down_ratio).
        in_chans: input channels.

    Path: backbone levels first..5 -> `dla_up` (DLAUpAdd) -> `ida_up` (IDAUpAdd over its outputs for levels
    first..4, up factors 1, 2, 4, ...) -> its last output, (N, channels[first], H/down_ratio, W/down_ratio) -> heads.

    forward(x): x is (N, in_chans, H, W) with H and W divisible by 32 (the backbone raises ValueError
    otherwise). Returns [dict(name -> (N, heads[name], H / down_ratio, W / down_ratio))], a one-element list
    like CenterNet (whose hourglass networks return one dict per stack).
    """

    def __init__(self, variant: str, heads: Optional[Mapping[str, int]] = None, head_conv: int = 256,
                 dcn: bool = True, down_ratio: int = 4, in_chans: int = 3):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown DLA backbone {variant!r}; known: {', '.join(VARIANTS)}")
        down_ratio = check_choice("down_ratio", down_ratio, DOWN_RATIOS)
        heads = COCO_HEADS if heads is None else heads
        check_heads(heads, head_conv)
        heads = {name: int(channels) for name, channels in heads.items()}
        dcn = check_bool("dcn", dcn)
        self.variant = f"centernet_{variant}"
        self.first_level = int(math.log2(down_ratio))
        self.down_ratio = down_ratio
        self.base = self.build_backbone(variant, in_chans)
        channels = self.base.channels[self.first_level:]
        self.dla_up = DLAUpAdd(channels, [2 ** i for i in range(len(channels))], deformable=dcn)
        merged = LAST_LEVEL - self.first_level
        self.ida_up = IDAUpAdd(channels[0], channels[:merged], [2 ** i for i in range(merged)], deformable=dcn)
        self.heads = {}
        for name, classes in heads.items():
            if hasattr(self, name):
                raise ValueError(f"heads: head name {name!r} must not be an attribute of the model already "
                                 "(base, dla_up, ida_up, forward, ...)")
            setattr(self, name, _head(channels[0], classes, head_conv, heatmap="hm" in name))
            self.heads[name] = classes

    def build_backbone(self, variant: str, in_chans: int) -> nn.Module:
        """The backbone `base`, returning the outputs of levels 0..5 (CenterTrack's subclass adds branches)."""
        return build_dla(variant, features_only=True, out_indices=tuple(range(6)), in_chans=in_chans)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles dla_fast.models.scripting's form of this model (the same submodules, the
        heads in a ModuleDict)."""
        from .scripting import scriptable

        return scriptable(self)

    def forward(self, x: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        return self.forward_from_levels(self.base(x))

    def forward_from_levels(self, levels: Sequence[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """The up path and the heads on the backbone's outputs of levels 0..5 (what `forward` returns)."""
        pyramid = self.dla_up(levels[self.first_level:])
        features = self.ida_up(pyramid[:LAST_LEVEL - self.first_level])[-1]
        return [{name: getattr(self, name)(features) for name in self.heads}]


def _register_centernet(variant: str) -> None:
    def build(heads: Optional[Mapping[str, int]] = None, head_conv: int = 256, dcn: bool = True,
              down_ratio: int = 4, in_chans: int = 3) -> CenterNet:
        return CenterNet(variant, heads, head_conv, dcn, down_ratio, in_chans)

    build.__name__ = build.__qualname__ = f"centernet_{variant}"
    build.__doc__ = (f"CenterNet-style detector on {variant}: COCO heads {COCO_HEADS}, head_conv 256, "
                     "deformable IDA convs, stride 4 by default.")
    register_model(build)


for _variant in VARIANTS:
    _register_centernet(_variant)
