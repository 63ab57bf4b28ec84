"""DLA-Up semantic segmentation (ucbdrive/dla `dla_up.py`, Yu et al. CVPR 2018, Sec. 4.4) in plain eager PyTorch.

Iterative deep aggregation runs back up the backbone: each `IDAUp` projects its inputs to one width,
upsamples them to the finest input's resolution with a bilinear-initialised depthwise transposed conv and
merges them left to right with aggregation nodes conv(cat([x, next])) + BN + ReLU. `DLAUp` chains these
stages from the coarsest pair of levels down to the finest, and `DLASeg` adds a 1x1 classifier and a fixed
bilinear upsample to the input resolution.

State-dict keys equal ucbdrive's DLASeg (`base.*`, `dla_up.ida_{k}.proj_{i}|up_{i}|node_{i}.*`, `fc.0.*`,
`up.weight`), so its checkpoints load with `dla_fast.load_checkpoint`, which reports the keys ucbdrive's backbone
carries and this one does not build (`base.fc.*`, unused `base.level*.project.*`).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from .arguments import check_choice, check_int
from .dla import VARIANTS, build_dla
from .registry import register_model
from .upsample import bilinear_upsample

DOWN_RATIOS = (2, 4, 8, 16)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """conv k x k (stride 1, 'same' padding, no bias) + BN + ReLU, keys `0.weight`, `1.*` as ucbdrive."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class IDAUp(nn.Module):
    """Iterative deep aggregation with concatenation nodes (ucbdrive's IDAUp).

    Args:
        node_kernel: kernel size k of the aggregation nodes (3 in DLA-Up).
        out_channels: width o of every projected input and every node.
        in_channels: channels c_i of the inputs, finest first.
        up_factors: f_i, the stride of input i relative to input 0 (f_0 == 1).

    Submodules, for every input i: `proj_i` = conv1x1(c_i -> o) + BN + ReLU, or Identity when c_i == o;
    `up_i` = trainable bilinear depthwise ConvTranspose2d by f_i, or Identity when f_i == 1; and for i >= 1
    `node_i` = conv k x k (2o -> o) + BN + ReLU.

    forward(layers): layers[i] is (N, c_i, H/f_i, W/f_i). With u_i = up_i(proj_i(layers[i])), all (N, o, H, W):
    x_0 = u_0 and x_i = node_i(cat([x_{i-1}, u_i], dim=1)). Returns (x_last, [x_1, ..., x_last]).
    """

    def __init__(self, node_kernel: int, out_channels: int, in_channels: Sequence[int], up_factors: Sequence[int]):
        super().__init__()
        if len(in_channels) != len(up_factors):
            raise ValueError(f"IDAUp needs one up factor per input: {list(in_channels)} vs {list(up_factors)}")
        self.in_channels = tuple(in_channels)
        self.out_channels = out_channels
        self.up_factors = tuple(int(f) for f in up_factors)
        for i, (c, f) in enumerate(zip(self.in_channels, self.up_factors)):
            setattr(self, f"proj_{i}", nn.Identity() if c == out_channels else _conv_bn_relu(c, out_channels, 1))
            setattr(self, f"up_{i}", nn.Identity() if f == 1 else bilinear_upsample(out_channels, f))
        for i in range(1, len(self.in_channels)):
            setattr(self, f"node_{i}", _conv_bn_relu(2 * out_channels, out_channels, node_kernel))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, layers: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if len(layers) != len(self.in_channels):
            raise ValueError(f"IDAUp was built for {len(self.in_channels)} inputs; got {len(layers)}")
        x = self.up_0(self.proj_0(layers[0]))
        nodes = []
        for i in range(1, len(layers)):
            upsampled = getattr(self, f"up_{i}")(getattr(self, f"proj_{i}")(layers[i]))
            x = getattr(self, f"node_{i}")(torch.cat([x, upsampled], 1))
            nodes.append(x)
        return x, nodes


def ida_stages(channels: Sequence[int], scales: Sequence[int]) -> List[Tuple[int, List[int], List[int]]]:
    """(out channels, input channels, up factors) of DLA-Up's IDA stages, coarsest first (ucbdrive's DLAUp).

    Stage k (k = 0 .. n-2) starts at level j = n-2-k: it merges level j with the k+1 outputs of the previous
    stage (for k = 0, the coarsest level itself) into channels[j] at level j's stride. Those outputs have
    channels[j+1] and scales[j+1]: after each stage the later entries of the running width and stride lists
    take the stage's own.
    """
    n = len(channels)
    in_channels, scales = list(channels), [int(s) for s in scales]
    stages = []
    for k in range(n - 1):
        j = n - 2 - k
        stages.append((channels[j], in_channels[j:], [s // scales[j] for s in scales[j:]]))
        in_channels[j + 1:] = [channels[j]] * (n - j - 1)
        scales[j + 1:] = [scales[j]] * (n - j - 1)
    return stages


class DLAUp(nn.Module):
    """DLA-Up: IDAUp stages from the coarsest pair of levels to the finest (ucbdrive's DLAUp).

    Args:
        channels: widths of the n input levels, finest first.
        scales: their strides relative to the first level (1, 2, 4, ...).

    Stage `ida_k` (k = 0 .. n-2) starts at level j = n-2-k: it merges level j with the k+1 outputs of the
    previous stage (for k = 0, the coarsest level itself) into channels[j] at level j's resolution. For DLA-34
    at down ratio 2 the stages are (out, inputs, factors) = (256, [256, 512], [1, 2]), (128, [128, 256, 256],
    [1, 2, 2]), (64, [64, 128, 128, 128], [1, 2, 2, 2]), (32, [32, 64, 64, 64, 64], [1, 2, 2, 2, 2]).

    forward(layers): layers[i] is (N, channels[i], H/scales[i], W/scales[i]); returns (N, channels[0], H, W).
    """

    def __init__(self, channels: Sequence[int], scales: Sequence[int]):
        super().__init__()
        if len(channels) != len(scales) or len(channels) < 2:
            raise ValueError(f"DLAUp needs >= 2 levels with one scale each: {list(channels)}, {list(scales)}")
        self.channels = tuple(channels)
        for k, (out_channels, in_channels, factors) in enumerate(ida_stages(channels, scales)):
            setattr(self, f"ida_{k}", IDAUp(3, out_channels, in_channels, factors))

    def forward(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(layers) != len(self.channels):
            raise ValueError(f"DLAUp was built for {len(self.channels)} levels; got {len(layers)}")
        layers = list(layers)
        for k in range(len(layers) - 1):
            j = len(layers) - 2 - k
            x, nodes = getattr(self, f"ida_{k}")(layers[j:])
            layers[j + 1:] = nodes
        return x


class DLASeg(nn.Module):
    """DLA-Up semantic segmentation network (ucbdrive's DLASeg).

    Args:
        variant: the backbone, a key of `dla_fast.models.VARIANTS` (e.g. "dla34").
        num_classes: classes of the 1x1 classifier `fc` (an int >= 1).
        down_ratio: stride of the logits, 2, 4, 8 or 16; DLA-Up starts at level log2(down_ratio).
        in_chans: input channels (an int >= 1).

    forward(x): x is (N, in_chans, H, W) with H and W divisible by 32 (the backbone raises ValueError
    otherwise). Returns (log_probs, logits), like ucbdrive:
        log_probs: (N, num_classes, H, W), log_softmax over classes of the logits upsampled by `up`;
        logits:    (N, num_classes, H / down_ratio, W / down_ratio), the classifier output.

    `up` is a bilinear depthwise ConvTranspose2d by down_ratio whose weight is a parameter (in the state dict)
    with requires_grad False, as in ucbdrive: give the optimizer only parameters that require grad.
    """

    def __init__(self, variant: str, num_classes: int, down_ratio: int = 2, in_chans: int = 3):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown DLA backbone {variant!r}; known: {', '.join(VARIANTS)}")
        num_classes = check_int("num_classes", num_classes, 1)
        down_ratio = check_choice("down_ratio", down_ratio, DOWN_RATIOS)
        self.variant = f"{variant}up"
        self.num_classes = num_classes
        self.down_ratio = down_ratio
        self.first_level = int(math.log2(down_ratio))
        self.base = build_dla(variant, features_only=True, out_indices=tuple(range(6)), in_chans=in_chans)
        channels = self.base.channels[self.first_level:]
        self.dla_up = DLAUp(channels, [2 ** i for i in range(len(channels))])
        self.fc = nn.Sequential(nn.Conv2d(channels[0], num_classes, 1, bias=True))
        nn.init.normal_(self.fc[0].weight, 0.0, math.sqrt(2.0 / num_classes))
        self.up = bilinear_upsample(num_classes, down_ratio, trainable=False)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles dla_fast.models.scripting's form of this model (the same submodules)."""
        from .scripting import scriptable

        return scriptable(self)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        levels = self.base(x)
        logits = self.fc(self.dla_up(levels[self.first_level:]))
        return torch.log_softmax(self.up(logits), dim=1), logits


def _register_dla_up(variant: str) -> None:
    def build(num_classes: int = 19, down_ratio: int = 2, in_chans: int = 3) -> DLASeg:
        return DLASeg(variant, num_classes, down_ratio, in_chans)

    build.__name__ = build.__qualname__ = f"{variant}up"
    build.__doc__ = (f"DLA-Up segmentation on {variant} (ucbdrive's `{variant}up`). num_classes defaults to 19 "
                     "(Cityscapes, ucbdrive's segmentation benchmark).")
    register_model(build)


for _variant in VARIANTS:
    _register_dla_up(_variant)
