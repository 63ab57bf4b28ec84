"""Modulated deformable convolution (DCNv2), torchvision.ops.deform_conv2d semantics, as a Triton implicit GEMM.

Public API
----------
deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None) -> Tensor
    Drop-in for torchvision.ops.deform_conv2d (same signature, same semantics), differentiable in every
    tensor argument; a torch.library custom op (`dla_fast::deform_conv2d_fwd` / `dla_fast::deform_conv2d_bwd`,
    fake implementations and registered autograd), so torch.compile(fullgraph=True) traces through it.
    - input  [B, Cin, H, W] fp32/fp16/bf16 (fp64: eager reference under backend auto/torch), NCHW or
      channels_last (channels_last is the fast path: NCHW is converted once);
    - weight [Cout, Cin, kh, kw] (weight groups: 1 only, anything else is a ValueError naming `groups`);
    - offset [B, 2*G*kh*kw, Ho, Wo]: for offset group g and tap k = i*kw + j (row-major), channel
      2*(g*kh*kw + k) is the y (row) offset and 2*(g*kh*kw + k) + 1 the x (column) offset; input channel c
      belongs to offset group c // (Cin // G);
    - mask [B, G*kh*kw, Ho, Wo] or None (channel g*kh*kw + k);
    - the sample of tap (i, j) at output (ho, wo) is taken at y = ho*sh - ph + i*dh + dy, x = wo*sw - pw + j*dw
      + dx by bilinear interpolation with torchvision's boundary rule: 0 when y <= -1, y >= H, x <= -1 or
      x >= W (nothing read); otherwise each of the four corners outside the image contributes 0 (never read)
      and each corner inside is read even at weight 0, so NaN / Inf in the input, offsets and mask give
      torchvision's NaN / Inf pattern (a NaN coordinate gives a NaN sample; the mask multiplies the bilinear
      sum), on every backend;
    - offset and mask must have the input's dtype (TypeError naming the argument, as torchvision refuses them);
    - returns [B, Cout, Ho, Wo] in the input's dtype, channels_last memory format.
    Offsets, coordinates and bilinear weights are fp32 always; products accumulate in fp32. fp32 GEMMs are
    IEEE fp32 unless torch.backends.cuda.matmul.allow_tf32 is set (as torchvision's matmul would be).

Building blocks for the fused CenterNet DCN block (dla_fast/ops/deform_conv/block.py)
----------------------------------------------------------------------------------------
deform_conv2d_forward(input, weight, bias=None, stride=1, padding=0, dilation=1, *, offset=None, mask=None,
                      offset_mask=None, scale=None, shift=None, relu=False, stats=False)
    -> (out, mean, var)
    One kernel launch (plus a tiny statistics merge when stats=True). Not differentiable (use
    deform_conv2d_backward in the caller's autograd.Function); a custom op, so it traces under torch.compile.
    - Sampling: either `offset` (+ optional `mask`) exactly as deform_conv2d, or `offset_mask`
      om [B, 3*G*kh*kw, Ho, Wo] as CenterNet's conv_offset_mask produces it: offset = om[:, :2K] (K = G*kh*kw;
      CenterNet's cat(o1, o2) of om.chunk(3, 1) is exactly om[:, :2K]) and mask = sigmoid(om[:, 2K:]), the
      sigmoid applied while loading (nothing is split, concatenated or written).
    - y = conv(input) + bias  (fp32 accumulator);
      mean, var: per-channel batch mean and *biased* variance of y over (B, Ho, Wo), fp32 [Cout], when
      stats=True (per-row-tile sums and centred sums of squares merged with Chan's formula, deterministic);
      else empty fp32 tensors of shape (0,). B*Ho*Wo must be >= 1 for stats.
    - out = y, or with scale/shift (fp32 [Cout], both or neither, e.g. BatchNorm folded by the caller:
      scale = gamma*rsqrt(var+eps), shift = beta - mean*scale) out = y*scale + shift, then ReLU if relu
      (NaN-propagating). out [B, Cout, Ho, Wo] in the input's dtype, channels_last. The statistics are of y,
      before scale/shift/ReLU.
deform_conv2d_backward(grad_out, input, weight, stride=1, padding=0, dilation=1, *, offset=None, mask=None,
                       offset_mask=None, needs_input_grad=(True, True, True, True))
    -> (grad_input, grad_offset, grad_mask, grad_weight, grad_bias)
    Gradients of y = conv(input) + bias (no scale/shift/ReLU: the caller differentiates its own epilogue and
    passes grad_out = dL/dy, any memory format). needs_input_grad = (input, offset/mask/offset_mask, weight,
    bias); a gradient not needed is None. With offset_mask, grad_offset is dL/d(om) [B, 3K, Ho, Wo] (the
    sigmoid derivative folded in) and grad_mask is None. grad_bias is sum over (B, Ho, Wo) of grad_out (fp32
    accumulated, returned in the weight's dtype).

Both entry points follow dla_fast.backend (op name "deform_conv2d"): `triton` runs the kernels, `torch` the
eager reference (plain torch ops, gather-based bilinear sampling; it is also the fp64 path), `auto` Triton for
CUDA tensors and the reference on CPU. One validation function, `check_inputs`, serves every backend.

Kernels (dla_fast/ops/deform_conv/kernels.py; fp32 accumulation, int64 addressing):
- `deform_conv_fwd_kernel`: implicit GEMM, M = B*Ho*Wo rows, N = Cout, K tap-major (for each tap, the Cin
  channels): each program builds the mask-scaled bilinear samples of its row tile for one tap and one
  channel chunk directly in registers (the A operand; columns never touch memory) and tl.dot's them with the
  tap's slice of the weight pre-packed as [kh*kw*Cin, Cout] in the compute dtype; epilogue: bias, statistics
  partials, scale/shift, ReLU.
- `deform_conv_grad_sample_kernel`: one program per (row tile, tap, offset group): dcol = grad_out @ W_tap^T
  per channel chunk (tl.dot), then grad input scattered through the bilinear weights with fp32 atomics into
  an fp32 buffer (as torchvision does; non-deterministic summation order), and grad offset / grad mask
  reduced over the group's channels in registers (no atomics: the program owns its rows x tap x group).
- `deform_conv_grad_weight_kernel`: samples recomputed, tl.dot(A^T, grad_out) over a split of the rows into
  fp32 partials [splits, kh*kw*Cin, Cout], summed once (no atomics).
- batch statistics merge: dla_fast.ops.aggregate's `aggregate_stats_merge_kernel`.
Tile sizes and warps (launch.py, the only place they are chosen; `kernel_configurations()` lists every one for
the ahead-of-time sm_90 check): the largest that compile for sm_90 without register spills, the four-corner
gather of the A tile being what competes with the accumulator for registers. Speed is unmeasured (no GPU yet).

Module layout: reference.py (eager reference), kernels.py (Triton), launch.py (tiles, launchers, configurations),
op.py (validation, custom ops, autograd, public entry points), block.py (the fused CenterNet DCN block).
"""
from .launch import kernel_configurations
from .op import (check_inputs, deform_conv2d, deform_conv2d_backward, deform_conv2d_bwd, deform_conv2d_forward,
                 deform_conv2d_fwd)
from .reference import deform_conv2d_reference

__all__ = ["check_inputs", "deform_conv2d", "deform_conv2d_backward", "deform_conv2d_bwd", "deform_conv2d_forward",
           "deform_conv2d_fwd", "deform_conv2d_reference", "kernel_configurations"]
