// Fused BatchNorm (+ residual) (+ ReLU): op schemas, argument checks and the C++ CPU kernels.
// The math and layouts are described in batchnorm_act.h; the CUDA kernels are in batchnorm_act_cuda.cu.
#include "batchnorm_act.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace dla_fast {

void check_channel_stats_args(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var) {
  constexpr const char* op = "bn_channel_stats";
  check_rows(y, op, "y");
  TORCH_CHECK(y.size(0) > 0, op, ": y has no rows; the statistics of an empty batch are undefined");
  check_channel_vector(mean, y.size(1), y, op, "mean");
  check_channel_vector(var, y.size(1), y, op, "var");
}

void check_bn_apply_args(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, const at::Tensor& out) {
  constexpr const char* op = "bn_apply";
  check_rows(y, op, "y");
  const int64_t channels = y.size(1);
  check_channel_vector(mean, channels, y, op, "mean");
  check_channel_vector(var, channels, y, op, "var");
  check_optional_channel_vector(weight, channels, y, op, "weight");
  check_optional_channel_vector(bias, channels, y, op, "bias");
  if (is_present(residual)) check_rows_like(*residual, y, op, "residual", "y");
  check_rows_like(out, y, op, "out", "y");
}

void check_bn_backward_reduce_args(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                   const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var, bool relu,
                                   const at::Tensor& sum_g, const at::Tensor& sum_g_xhat) {
  constexpr const char* op = "bn_backward_reduce";
  check_rows(y, op, "y");
  const int64_t channels = y.size(1);
  check_rows_like(grad_out, y, op, "grad_out", "y");
  TORCH_CHECK(!relu || is_present(out), op, ": relu=True needs the forward output (its ReLU mask)");
  if (relu) check_rows_like(*out, y, op, "out", "y");
  check_channel_vector(mean, channels, y, op, "mean");
  check_channel_vector(var, channels, y, op, "var");
  check_channel_vector(sum_g, channels, y, op, "sum_g");
  check_channel_vector(sum_g_xhat, channels, y, op, "sum_g_xhat");
}

void check_bn_backward_apply_args(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                  const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sum_g,
                                  const std::optional<at::Tensor>& sum_g_xhat, bool relu, const at::Tensor& grad_y,
                                  const std::optional<at::Tensor>& grad_residual) {
  constexpr const char* op = "bn_backward_apply";
  check_rows(y, op, "y");
  const int64_t channels = y.size(1);
  check_rows_like(grad_out, y, op, "grad_out", "y");
  TORCH_CHECK(!relu || is_present(out), op, ": relu=True needs the forward output (its ReLU mask)");
  if (relu) check_rows_like(*out, y, op, "out", "y");
  check_channel_vector(mean, channels, y, op, "mean");
  check_channel_vector(var, channels, y, op, "var");
  check_optional_channel_vector(weight, channels, y, op, "weight");
  TORCH_CHECK(is_present(sum_g) == is_present(sum_g_xhat), op,
              ": give both sum_g and sum_g_xhat (batch statistics) or neither (constant statistics)");
  check_optional_channel_vector(sum_g, channels, y, op, "sum_g");
  check_optional_channel_vector(sum_g_xhat, channels, y, op, "sum_g_xhat");
  check_rows_like(grad_y, y, op, "grad_y", "y");
  if (is_present(grad_residual)) check_rows_like(*grad_residual, y, op, "grad_residual", "y");
}

namespace {

// Rows per parallel task; fixed (not derived from the thread count) so the results are deterministic.
constexpr int64_t kCpuRowsPerChunk = 512;

inline float relu_grad(float grad, float out) { return out <= 0.f ? 0.f : grad; }

template <typename scalar_t>
void channel_stats_cpu_kernel(const scalar_t* y, int64_t rows, int64_t channels, float* mean_out,
                              float* var_out) {
  const int64_t chunks = ceil_div(rows, kCpuRowsPerChunk);
  std::vector<float> shift(channels);
  for (int64_t c = 0; c < channels; ++c) shift[c] = static_cast<float>(y[c]);
  std::vector<float> partial_mean(chunks * channels, 0.f), partial_m2(chunks * channels, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      float* mean = partial_mean.data() + chunk * channels;
      float* m2 = partial_m2.data() + chunk * channels;
      const int64_t row_begin = chunk * kCpuRowsPerChunk;
      const int64_t row_end = std::min(rows, row_begin + kCpuRowsPerChunk);
      for (int64_t r = row_begin; r < row_end; ++r) {
        const float inv_count = 1.f / static_cast<float>(r - row_begin + 1);
        const scalar_t* row = y + r * channels;
        for (int64_t c = 0; c < channels; ++c) {
          const float d = static_cast<float>(row[c]) - shift[c];
          const float delta = d - mean[c];
          mean[c] += delta * inv_count;
          m2[c] += delta * (d - mean[c]);
        }
      }
    }
  });
  std::vector<float> mean(channels, 0.f), m2(channels, 0.f);
  float count = 0.f;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float chunk_count = static_cast<float>(std::min(kCpuRowsPerChunk, rows - chunk * kCpuRowsPerChunk));
    for (int64_t c = 0; c < channels; ++c) {
      welford_combine(count, chunk_count, mean[c], m2[c], partial_mean[chunk * channels + c],
                      partial_m2[chunk * channels + c]);
    }
    count += chunk_count;
  }
  for (int64_t c = 0; c < channels; ++c) {
    mean_out[c] = shift[c] + mean[c];
    var_out[c] = m2[c] / count;
  }
}

void bn_channel_stats_cpu(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var) {
  check_channel_stats_args(y, mean, var);
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "bn_channel_stats_cpu", [&] {
    channel_stats_cpu_kernel<scalar_t>(y.data_ptr<scalar_t>(), y.size(0), y.size(1), mean.data_ptr<float>(),
                                       var.data_ptr<float>());
  });
}

// Per-channel inverse standard deviation rsqrt(var + eps).
std::vector<float> inverse_std(const float* var, int64_t channels, double eps) {
  std::vector<float> invstd(channels);
  for (int64_t c = 0; c < channels; ++c) invstd[c] = 1.f / std::sqrt(var[c] + static_cast<float>(eps));
  return invstd;
}

template <typename scalar_t>
void bn_apply_cpu_kernel(const scalar_t* y, const scalar_t* residual, scalar_t* out, const float* mean,
                         const float* var, const float* weight, const float* bias, double eps, bool relu,
                         int64_t rows, int64_t channels) {
  std::vector<float> scale = inverse_std(var, channels, eps);
  std::vector<float> shift(channels, 0.f);
  for (int64_t c = 0; c < channels; ++c) {
    if (weight != nullptr) scale[c] *= weight[c];
    if (bias != nullptr) shift[c] = bias[c];
  }
  at::parallel_for(0, rows, kCpuRowsPerChunk, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      const int64_t base = r * channels;
      for (int64_t c = 0; c < channels; ++c) {
        float z = (static_cast<float>(y[base + c]) - mean[c]) * scale[c] + shift[c];
        if (residual != nullptr) z += static_cast<float>(residual[base + c]);
        if (relu) z = z < 0.f ? 0.f : z;
        out[base + c] = static_cast<scalar_t>(z);
      }
    }
  });
}

void bn_apply_cpu(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                  const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out) {
  check_bn_apply_args(y, mean, var, weight, bias, residual, out);
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "bn_apply_cpu", [&] {
    bn_apply_cpu_kernel<scalar_t>(y.data_ptr<scalar_t>(), optional_data<scalar_t>(residual), out.data_ptr<scalar_t>(),
                                  mean.data_ptr<float>(), var.data_ptr<float>(), optional_data<float>(weight),
                                  optional_data<float>(bias), eps, relu, y.size(0), y.size(1));
  });
}

template <typename scalar_t>
void bn_backward_reduce_cpu_kernel(const scalar_t* grad_out, const scalar_t* out, const scalar_t* y,
                                   const float* mean, const float* var, double eps, int64_t rows,
                                   int64_t channels, float* sum_g_out, float* sum_g_xhat_out) {
  const int64_t chunks = ceil_div(rows, kCpuRowsPerChunk);
  // Per chunk: sum of g and of g * (y - mean); the latter is scaled by invstd once at the end.
  std::vector<float> partial_g(chunks * channels, 0.f), partial_g_centered(chunks * channels, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      float* acc_g = partial_g.data() + chunk * channels;
      float* acc_gc = partial_g_centered.data() + chunk * channels;
      const int64_t row_end = std::min(rows, (chunk + 1) * kCpuRowsPerChunk);
      for (int64_t r = chunk * kCpuRowsPerChunk; r < row_end; ++r) {
        const int64_t base = r * channels;
        for (int64_t c = 0; c < channels; ++c) {
          float g = static_cast<float>(grad_out[base + c]);
          if (out != nullptr) g = relu_grad(g, static_cast<float>(out[base + c]));
          acc_g[c] += g;
          acc_gc[c] += g * (static_cast<float>(y[base + c]) - mean[c]);
        }
      }
    }
  });
  const std::vector<float> invstd = inverse_std(var, channels, eps);
  for (int64_t c = 0; c < channels; ++c) {
    float total_g = 0.f, total_gc = 0.f;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      total_g += partial_g[chunk * channels + c];
      total_gc += partial_g_centered[chunk * channels + c];
    }
    sum_g_out[c] = total_g;
    sum_g_xhat_out[c] = total_gc * invstd[c];
  }
}

void bn_backward_reduce_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& y,
                            const at::Tensor& mean, const at::Tensor& var, double eps, bool relu,
                            const at::Tensor& sum_g, const at::Tensor& sum_g_xhat) {
  check_bn_backward_reduce_args(grad_out, out, y, mean, var, relu, sum_g, sum_g_xhat);
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "bn_backward_reduce_cpu", [&] {
    bn_backward_reduce_cpu_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), relu ? out->data_ptr<scalar_t>() : nullptr,
                                            y.data_ptr<scalar_t>(), mean.data_ptr<float>(), var.data_ptr<float>(),
                                            eps, y.size(0), y.size(1), sum_g.data_ptr<float>(),
                                            sum_g_xhat.data_ptr<float>());
  });
}

template <typename scalar_t>
void bn_backward_apply_cpu_kernel(const scalar_t* grad_out, const scalar_t* out, const scalar_t* y,
                                  const float* mean, const float* var, const float* weight, const float* sum_g,
                                  const float* sum_g_xhat, double eps, int64_t rows, int64_t channels,
                                  scalar_t* grad_y, scalar_t* grad_residual) {
  // grad_y = scale * (g - offset - (y - mean) * slope), with slope = offset = 0 for constant statistics.
  const std::vector<float> invstd = inverse_std(var, channels, eps);
  std::vector<float> scale(channels), offset(channels, 0.f), slope(channels, 0.f);
  const float inv_rows = 1.f / static_cast<float>(rows);
  for (int64_t c = 0; c < channels; ++c) {
    scale[c] = weight != nullptr ? weight[c] * invstd[c] : invstd[c];
    if (sum_g != nullptr) {
      offset[c] = sum_g[c] * inv_rows;
      slope[c] = sum_g_xhat[c] * invstd[c] * inv_rows;
    }
  }
  at::parallel_for(0, rows, kCpuRowsPerChunk, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      const int64_t base = r * channels;
      for (int64_t c = 0; c < channels; ++c) {
        float g = static_cast<float>(grad_out[base + c]);
        if (out != nullptr) g = relu_grad(g, static_cast<float>(out[base + c]));
        // Running statistics: no centred term at all (0 * a NaN / Inf input would make it NaN; eager's is g * scale).
        const float centered = sum_g != nullptr ? static_cast<float>(y[base + c]) - mean[c] : 0.f;
        grad_y[base + c] = static_cast<scalar_t>(sum_g != nullptr ? scale[c] * (g - offset[c] - centered * slope[c])
                                                                  : scale[c] * g);
        if (grad_residual != nullptr) grad_residual[base + c] = static_cast<scalar_t>(g);
      }
    }
  });
}

void bn_backward_apply_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& y,
                           const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& sum_g, const std::optional<at::Tensor>& sum_g_xhat,
                           double eps, bool relu, const at::Tensor& grad_y,
                           const std::optional<at::Tensor>& grad_residual) {
  check_bn_backward_apply_args(grad_out, out, y, mean, var, weight, sum_g, sum_g_xhat, relu, grad_y, grad_residual);
  if (y.size(0) == 0) return;
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "bn_backward_apply_cpu", [&] {
    bn_backward_apply_cpu_kernel<scalar_t>(
        grad_out.data_ptr<scalar_t>(), relu ? out->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
        mean.data_ptr<float>(), var.data_ptr<float>(), optional_data<float>(weight), optional_data<float>(sum_g),
        optional_data<float>(sum_g_xhat), eps, y.size(0), y.size(1), grad_y.data_ptr<scalar_t>(),
        optional_mutable_data<scalar_t>(grad_residual));
  });
}

}  // namespace
}  // namespace dla_fast

TORCH_LIBRARY_FRAGMENT(dla_fast_C, m) {
  m.def("bn_channel_stats(Tensor y, Tensor(a!) mean, Tensor(b!) var) -> ()");
  m.def(
      "bn_apply(Tensor y, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, Tensor? residual, "
      "bool relu, Tensor(a!) out) -> ()");
  m.def(
      "bn_backward_reduce(Tensor grad_out, Tensor? out, Tensor y, Tensor mean, Tensor var, float eps, bool relu, "
      "Tensor(a!) sum_g, Tensor(b!) sum_g_xhat) -> ()");
  m.def(
      "bn_backward_apply(Tensor grad_out, Tensor? out, Tensor y, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? sum_g, Tensor? sum_g_xhat, float eps, bool relu, Tensor(a!) grad_y, Tensor(b!)? grad_residual) -> ()");
}

TORCH_LIBRARY_IMPL(dla_fast_C, CPU, m) {
  m.impl("bn_channel_stats", &dla_fast::bn_channel_stats_cpu);
  m.impl("bn_apply", &dla_fast::bn_apply_cpu);
  m.impl("bn_backward_reduce", &dla_fast::bn_backward_reduce_cpu);
  m.impl("bn_backward_apply", &dla_fast::bn_backward_apply_cpu);
}
