"""Bilinear upsampling as a depthwise transposed convolution, shared by DLA-Up and CenterNet.

`bilinear_upsample(C, f)` is ConvTranspose2d(C, C, kernel 2f, stride f, padding f // 2, groups=C, bias=False)
whose every channel holds the same separable bilinear kernel (the FCN initialisation that ucbdrive's
`fill_up_weights` uses). It maps (N, C, H, W) -> (N, C, f*H, f*W) for even f; DLA-Up trains it, DLASeg's final
upsample keeps it fixed.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def bilinear_weights_(weight: torch.Tensor) -> torch.Tensor:
    """Fill a depthwise transposed-conv weight of shape (C, 1, k, k) in place with the bilinear kernel.

    Every channel gets w[i, j] = (1 - |i/fk - c|) * (1 - |j/fk - c|) with fk = ceil(k / 2) and
    c = (2*fk - 1 - fk % 2) / (2*fk); for k = 4 (factor 2) the taps are 0.25, 0.75, 0.75, 0.25.
    Computed in float64 and rounded once to the weight's dtype. Returns `weight`.
    """
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError("bilinear_weights_ expects a depthwise transposed-conv weight (C, 1, k, k); "
                         f"got shape {tuple(weight.shape)}")
    k = weight.shape[-1]
    fk = math.ceil(k / 2)
    center = (2 * fk - 1 - fk % 2) / (2.0 * fk)
    taps = 1 - (torch.arange(k, dtype=torch.float64, device=weight.device) / fk - center).abs()
    with torch.no_grad():
        weight.copy_(torch.outer(taps, taps).expand(weight.shape))
    return weight


def bilinear_upsample(channels: int, factor: int, trainable: bool = True) -> nn.ConvTranspose2d:
    """Depthwise ConvTranspose2d upsampling `channels` channels by `factor`, bilinear-initialised.

    Input (N, channels, H, W) -> output (N, channels, factor*H, factor*W). `factor` must be even (2, 4, 8, 16):
    an odd factor would give factor*H + 1 rows; the networks use nn.Identity where the factor is 1.
    With trainable=False the weight stays a parameter (it is in the state dict) with requires_grad False.
    """
    if int(factor) != factor or factor < 2 or factor % 2:
        raise ValueError(f"bilinear_upsample needs an even integer factor >= 2; got {factor!r}")
    factor = int(factor)
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2,
                            groups=channels, bias=False)
    bilinear_weights_(up.weight)
    up.weight.requires_grad_(trainable)
    return up
