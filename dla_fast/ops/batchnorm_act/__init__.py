"""Fused BatchNorm2d (+ residual add) (+ ReLU): out = ReLU?(BN(x) [+ residual]), exactly nn.BatchNorm2d.

Everything here works on 4-D (N, C, H, W) tensors of any memory format. channels_last (NHWC) is the fast path:
its data is seen without a copy as a row-major 2-D [M = N*H*W, C] tensor, and the outputs are allocated
channels_last; NCHW inputs are converted once. Per-channel vectors (statistics, affine parameters, gradient
sums) are fp32 [C]; activations may be fp32, fp16 or bf16, always accumulated in fp32.

Public pieces:

- `batchnorm_act(x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
  residual=None, relu=True)`: the op, with autograd and torch.compile support, running statistics updated
  like nn.BatchNorm2d. The backend (`dla_fast.backend.resolve`) picks the implementation. In eager mode it
  runs a plain autograd.Function (the least host overhead per call) whose statistics step also updates the
  running statistics and num_batches_tracked on the device (Triton: inside the two statistics kernels; the
  extension: one extra single-program Triton kernel), with no host sync for momentum=None.
- `batchnorm_act_reference(...)`: the eager reference it must equal (F.batch_norm, add, relu).
- Building blocks on [M, C] rows, reused by other fused ops with an explicit `impl` ('torch' | 'triton' |
  'cuda'): `channel_stats`, `bn_apply`, `bn_backward_reduce`, `bn_backward_apply`.
- Custom ops `dla_fast::batchnorm_act_forward` and `dla_fast::batchnorm_act_backward`, what the op runs under
  torch.compile (functional; the running statistics are updated outside them with
  `running_stats.update_running_stats`, which inductor fuses). Both paths share the forward and backward.

The math, with xhat = (y - mean) * rsqrt(var + eps), g = grad_out zeroed where out <= 0 with
ReLU (a NaN output passes it, as eager's threshold_backward), else grad_out:
    forward:  out = [relu](xhat * weight + bias [+ residual])
    backward: grad_y = weight * rsqrt(var + eps) * (g - sum(g) / M - xhat * sum(g * xhat) / M) (batch stats),
              grad_y = weight * rsqrt(var + eps) * g (running stats, eval); grad_residual = g;
              grad_weight = sum(g * xhat); grad_bias = sum(g)   (sums over the M rows, per channel)

Reductions are deterministic (per-block partials merged in a fixed order, no float atomics). The batch
statistics use Welford/Chan merging of values shifted by the first row, so they stay accurate for large M
and |mean| >> std.

Module layout: kernels.py (Triton), blocks.py (the building blocks on rows, their Triton launchers and launch
shapes, `kernel_configurations` for the ahead-of-time sm_90 check), op.py (eager reference, validation, the fused
forward / backward, autograd, custom ops, public op).
"""
from .blocks import bn_apply, bn_backward_apply, bn_backward_reduce, channel_stats, kernel_configurations
from .kernels import fold_running_stats
from .op import (batchnorm_act, batchnorm_act_backward, batchnorm_act_forward, batchnorm_act_reference,
                 check_inputs)

__all__ = ["batchnorm_act", "batchnorm_act_backward", "batchnorm_act_forward", "batchnorm_act_reference", "bn_apply",
           "bn_backward_apply", "bn_backward_reduce", "channel_stats", "check_inputs", "fold_running_stats",
           "kernel_configurations"]
