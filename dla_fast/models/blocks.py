"""The residual blocks a DLA tree is built from (Yu et al. 2018, Sec. 4; Res2Net, Gao et al. 2019).

Every block takes `x` and an optional `residual` (the tree hands in the projected, downsampled input when
the block changes resolution or width); without one, the block's own input is the residual. Module and
parameter names follow the original ucbdrive code and timm, so their checkpoints load unchanged.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation,
                     groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, + residual, ReLU (DLA-34)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1, **_):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride, dilation)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_channels, out_channels, 1, dilation)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if residual is None:
            residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


def bottleneck_width(out_channels: int, cardinality: int, base_width: int, expansion: int = 2) -> int:
    """Width of a bottleneck's 3x3 stage: floor(out * base_width / 64) * cardinality // expansion (timm)."""
    return int(math.floor(out_channels * (base_width / 64)) * cardinality) // expansion


class Bottleneck(nn.Module):
    """1x1 - 3x3(stride, grouped by `cardinality`) - 1x1, each with BN, ReLU between; + residual, ReLU.

    cardinality=1, base_width=64 is DLA's Bottleneck; cardinality 32 (64), base_width 4 is BottleneckX.
    """

    expansion = 2

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 cardinality: int = 1, base_width: int = 64):
        super().__init__()
        mid = bottleneck_width(out_channels, cardinality, base_width, self.expansion)
        self.conv1 = conv1x1(in_channels, mid)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, mid, stride, dilation, groups=cardinality)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(mid, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if residual is None:
            residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class Bottle2neck(nn.Module):
    """Res2Net bottleneck: the 3x3 stage split into `scale` groups of channels, each 3x3 fed the previous
    group's output plus its own split (hierarchical residual). With stride > 1 the splits are convolved
    independently and the last one is average-pooled instead of passed through."""

    expansion = 2

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 cardinality: int = 1, base_width: int = 28, scale: int = 4):
        super().__init__()
        self.is_first = stride > 1
        self.scale = scale
        self.width = width = bottleneck_width(out_channels, cardinality, base_width, self.expansion)
        self.conv1 = conv1x1(in_channels, width * scale)
        self.bn1 = nn.BatchNorm2d(width * scale)
        num_convs = max(1, scale - 1)
        self.convs = nn.ModuleList(conv3x3(width, width, stride, dilation, groups=cardinality) for _ in range(num_convs))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(num_convs))
        self.pool = nn.AvgPool2d(3, stride=stride, padding=1) if self.is_first else None
        self.conv3 = conv1x1(width * scale, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if residual is None:
            residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        splits = torch.split(out, self.width, 1)
        outs = []
        sp = splits[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = splits[i] if i == 0 or self.is_first else sp + splits[i]
            sp = self.relu(bn(conv(sp)))
            outs.append(sp)
        if self.scale > 1:
            outs.append(self.pool(splits[-1]) if self.pool is not None else splits[-1])
        out = self.bn3(self.conv3(torch.cat(outs, 1)))
        return self.relu(out + residual)
