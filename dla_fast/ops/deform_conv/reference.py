"""Eager reference of the modulated deformable convolution in plain torch ops (gather-based bilinear sampling).

Sampling rule (torchvision's, NaN and Inf included): the sample at (y, x) is 0 when y <= -1, y >= H, x <= -1
or x >= W (nothing is read); otherwise it is the sum over the four corners of weight * value, a corner outside
the image contributing 0 and a corner inside being read even where its weight is 0 (so a NaN or Inf there
reaches the sample as 0 * NaN, as torchvision's). A NaN coordinate passes that test and gives a NaN sample.
The column is mask * sample (a NaN or Inf mask gives NaN on a zero sample, as torchvision's).

Differentiable by autograd in every argument; the bilinear weights are linear in the fractional part of the
coordinates, so the gradient w.r.t. the offsets is torchvision's corner-difference formula, which has no
range test: one-sided at integer coordinates, and at y = -1 (or x = -1) the corner row 0 has weight 0 but
slope 1. For finite input values the bilinear sum of a sample outside the range is exactly 0 (its corners
inside the image all have weight 0), so that sum is kept (value 0, torchvision's slope); only where it is
not finite is it replaced by 0. Runs in the input's dtype for fp32/fp64 and in fp32 for 16-bit inputs
(rounded to the input dtype at the end).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def sample_columns(input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor], kernel: Tuple[int, int],
                   stride: Tuple[int, int], padding: Tuple[int, int], dilation: Tuple[int, int]) -> torch.Tensor:
    """The mask-scaled bilinear samples ("columns") [B, Cin, kh*kw, Ho, Wo] in the input's dtype.

    offset [B, 2*G*kh*kw, Ho, Wo] (y then x per group and tap), mask [B, G*kh*kw, Ho, Wo] or None.
    """
    b, cin, h, w = input.shape
    kh, kw = kernel
    taps = kh * kw
    ho, wo = offset.shape[-2:]
    groups = offset.shape[1] // (2 * taps)
    dtype = input.dtype
    off = offset.to(dtype).reshape(b, groups, taps, 2, ho, wo)
    tap_y = (torch.arange(kh, device=input.device) * dilation[0]).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=input.device) * dilation[1]).repeat(kh)
    base_y = torch.arange(ho, device=input.device) * stride[0] - padding[0]
    base_x = torch.arange(wo, device=input.device) * stride[1] - padding[1]
    y = off[:, :, :, 0] + (tap_y[:, None, None] + base_y[None, :, None]).to(dtype)  # [B, G, K, Ho, Wo]
    x = off[:, :, :, 1] + (tap_x[:, None, None] + base_x[None, None, :]).to(dtype)
    # torchvision's range test: these samples are 0 (NaN compares False: a NaN coordinate is not outside).
    outside = (y <= -1) | (y >= h) | (x <= -1) | (x >= w)
    # Beyond [-2, H+1] every corner is outside the image; clamping keeps floor() in integer range. The corner
    # indices of a NaN coordinate are taken at -2 (no corner in the image); its weights stay NaN.
    y = y.clamp(-2, h + 1)
    x = x.clamp(-2, w + 1)
    y0 = torch.floor(torch.where(torch.isnan(y), -2.0, y))
    x0 = torch.floor(torch.where(torch.isnan(x), -2.0, x))
    ly, lx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    cg = cin // groups
    flat = input.reshape(b, groups, cg, h * w)
    zero = torch.zeros((), dtype=dtype, device=input.device)
    samples = None
    for dy, dx, weight in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        valid = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)).reshape(b, groups, 1, taps * ho * wo)
        index = torch.where(valid, (yy * w + xx).reshape(valid.shape), 0)
        values = torch.where(valid, torch.gather(flat, 3, index.expand(b, groups, cg, taps * ho * wo)), zero)
        term = values * weight.reshape(b, groups, 1, taps * ho * wo)
        samples = term if samples is None else samples + term
    outside = outside.reshape(b, groups, 1, taps * ho * wo)
    samples = torch.where(outside & ~torch.isfinite(samples), zero, samples)
    if mask is not None:
        samples = samples * mask.to(dtype).reshape(b, groups, 1, taps * ho * wo)
    return samples.reshape(b, cin, taps, ho, wo)


def deform_conv2d_reference(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], stride: Tuple[int, int], padding: Tuple[int, int],
                            dilation: Tuple[int, int], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """torchvision.ops.deform_conv2d (weight groups 1), eagerly: [B, Cout, Ho, Wo] in the input's dtype."""
    out_dtype = input.dtype
    compute = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
    x = input.to(compute)
    cols = sample_columns(x, offset.to(compute), None if mask is None else mask.to(compute), weight.shape[-2:],
                          stride, padding, dilation)
    cout = weight.shape[0]
    out = torch.einsum("bckhw,ock->bohw", cols, weight.to(compute).reshape(cout, weight.shape[1], -1))
    if bias is not None:
        out = out + bias.to(compute)[None, :, None, None]
    return out.to(out_dtype)
