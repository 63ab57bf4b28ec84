// Fused BatchNorm (+ residual) (+ ReLU): what the C++ CPU kernels (batchnorm_act.cpp) and the CUDA kernels
// (batchnorm_act_cuda.cu) share. Python side: dla_fast/ops/batchnorm_act.py.
//
// Every op works on NHWC activations seen as row-major [M, C] tensors and fp32 [C] per-channel vectors, and
// writes into output tensors the caller allocated (schemas in batchnorm_act.cpp):
//   bn_channel_stats   y -> batch mean, biased variance (Welford per block, Chan's formula across blocks,
//                      everything relative to a per-channel shift = the first row, so |mean| >> std is fine)
//   bn_apply           out = [relu]((y - mean) * rsqrt(var + eps) * weight + bias [+ residual])
//   bn_backward_reduce sum_g = sum_m g, sum_g_xhat = sum_m g * xhat
//                      (g = relu ? grad_out * (out > 0) : grad_out, xhat = (y - mean) * rsqrt(var + eps))
//   bn_backward_apply  grad_y = weight * rsqrt(var + eps) * (g - sum_g / M - xhat * sum_g_xhat / M)
//                      (batch statistics), or weight * rsqrt(var + eps) * g (constant statistics);
//                      grad_residual = g
// Reductions are deterministic: fixed row blocks, partial results merged in a fixed order, no atomics.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <optional>

namespace dla_fast {

// Chan et al.'s parallel combination of two (count, mean, M2) summaries: folds (n_b, mean_b, m2_b) into
// (n_a, mean_a, m2_a). Updates mean_a and m2_a only; the caller adds n_b to n_a afterwards (the count is
// shared by the channels of a vector).
C10_HOST_DEVICE inline void welford_combine(float n_a, float n_b, float& mean_a, float& m2_a, float mean_b,
                                            float m2_b) {
  const float n = n_a + n_b;
  if (n == 0.f) return;
  const float delta = mean_b - mean_a;
  const float weight_b = n_b / n;
  mean_a += delta * weight_b;
  m2_a += m2_b + delta * delta * n_a * weight_b;
}

// Argument checks shared by the CPU and CUDA entry points (TORCH_CHECK with the op's name).
void check_channel_stats_args(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var);
void check_bn_apply_args(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, const at::Tensor& out);
void check_bn_backward_reduce_args(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                   const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var, bool relu,
                                   const at::Tensor& sum_g, const at::Tensor& sum_g_xhat);
void check_bn_backward_apply_args(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                  const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sum_g,
                                  const std::optional<at::Tensor>& sum_g_xhat, bool relu, const at::Tensor& grad_y,
                                  const std::optional<at::Tensor>& grad_residual);

}  // namespace dla_fast
