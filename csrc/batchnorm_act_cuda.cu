// Fused BatchNorm (+ residual) (+ ReLU): CUDA kernels. Math, layouts and op schemas: batchnorm_act.h/.cpp.
//
// Every kernel sees NHWC activations as row-major [M, C]. A block has 256 threads arranged as
// (channel_threads <= 32) x (row_threads); each thread owns VEC consecutive channels (16-byte accesses when
// possible) and walks the rows of its block with stride row_threads. grid = (row_blocks, channel_blocks).
// Reductions write one partial per (row block, channel), merged by a second small kernel in a fixed order:
// results do not depend on scheduling (no atomics).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "batchnorm_act.h"
#include "common.h"
#include "vec.cuh"

namespace dla_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxChannelThreads = kWarpSize;
constexpr int kBlocksPerSm = 8;
// Partial-merging kernels: 32 channels x 8 threads walking the partial rows.
constexpr int kMergeChannels = 32;
constexpr int kMergeRows = kThreads / kMergeChannels;

// Streaming multiprocessors of the current device (queried once per device).
int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices];
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device < kMaxDevices, "batchnorm_act: CUDA device index ", device, " out of range");
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

struct RowsLaunch {
  dim3 grid;
  dim3 block;
  int64_t rows_per_block;
};

RowsLaunch make_rows_launch(int64_t rows, int64_t channels, int vec) {
  const int64_t channel_vectors = ceil_div(channels, vec);
  int channel_threads = 1;
  while (channel_threads < channel_vectors && channel_threads < kMaxChannelThreads) channel_threads *= 2;
  const int row_threads = kThreads / channel_threads;
  const int64_t channel_blocks = ceil_div(channel_vectors, channel_threads);
  TORCH_CHECK(channel_blocks <= 65535, "batchnorm_act: too many channels (", channels, ") for one launch");
  const int64_t sms = multiprocessor_count();
  const int64_t wanted_row_blocks = std::max<int64_t>(1, sms * kBlocksPerSm / channel_blocks);
  const int64_t row_blocks_limit = std::max<int64_t>(1, ceil_div(rows, row_threads));
  const int64_t rows_per_block = std::max<int64_t>(1, ceil_div(rows, std::min(wanted_row_blocks, row_blocks_limit)));
  const int64_t row_blocks = std::max<int64_t>(1, ceil_div(rows, rows_per_block));
  return {dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(channel_blocks)),
          dim3(channel_threads, row_threads), rows_per_block};
}

// Calls f(std::integral_constant<int, VEC>) with the vector width picked for these rows.
template <typename scalar_t, typename F>
void with_vector_width(int vec, F&& f) {
  constexpr int kWidest = 16 / sizeof(scalar_t);
  if (vec == kWidest) {
    f(std::integral_constant<int, kWidest>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

__device__ __forceinline__ float relu_grad(float grad, float out) { return out <= 0.f ? 0.f : grad; }

// Merges the Welford summaries of the threads owning the same channels (same threadIdx.x): butterfly
// shuffles inside each warp, then the warps in order through shared memory. Valid where threadIdx.y == 0.
template <int VEC>
__device__ void block_welford_merge(float& count, float (&mean)[VEC], float (&m2)[VEC]) {
  __shared__ float s_count[kThreads];
  __shared__ float s_mean[kThreads * VEC];
  __shared__ float s_m2[kThreads * VEC];
  for (int offset = kWarpSize / 2; offset >= static_cast<int>(blockDim.x); offset >>= 1) {
    const float other_count = __shfl_xor_sync(0xffffffffu, count, offset);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float other_mean = __shfl_xor_sync(0xffffffffu, mean[i], offset);
      const float other_m2 = __shfl_xor_sync(0xffffffffu, m2[i], offset);
      welford_combine(count, other_count, mean[i], m2[i], other_mean, other_m2);
    }
    count += other_count;
  }
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  if (lane < static_cast<int>(blockDim.x)) {
    const int slot = warp * kMaxChannelThreads + lane;
    s_count[slot] = count;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      s_mean[slot * VEC + i] = mean[i];
      s_m2[slot * VEC + i] = m2[i];
    }
  }
  __syncthreads();
  if (threadIdx.y == 0) {  // lane threadIdx.x of warp 0: already holds warp 0's summary
    for (int w = 1; w < kWarps; ++w) {
      const int slot = w * kMaxChannelThreads + threadIdx.x;
      const float other_count = s_count[slot];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        welford_combine(count, other_count, mean[i], m2[i], s_mean[slot * VEC + i], s_m2[slot * VEC + i]);
      }
      count += other_count;
    }
  }
}

// Sums a and b over the threads owning the same channels, like block_welford_merge.
template <int VEC>
__device__ void block_sum_pair(float (&a)[VEC], float (&b)[VEC]) {
  __shared__ float s_a[kThreads * VEC];
  __shared__ float s_b[kThreads * VEC];
  for (int offset = kWarpSize / 2; offset >= static_cast<int>(blockDim.x); offset >>= 1) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      a[i] += __shfl_xor_sync(0xffffffffu, a[i], offset);
      b[i] += __shfl_xor_sync(0xffffffffu, b[i], offset);
    }
  }
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  if (lane < static_cast<int>(blockDim.x)) {
    const int slot = warp * kMaxChannelThreads + lane;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      s_a[slot * VEC + i] = a[i];
      s_b[slot * VEC + i] = b[i];
    }
  }
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int w = 1; w < kWarps; ++w) {
      const int slot = w * kMaxChannelThreads + threadIdx.x;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        a[i] += s_a[slot * VEC + i];
        b[i] += s_b[slot * VEC + i];
      }
    }
  }
}

// Per (row block, channel): Welford mean and M2 of y - shift, shift = y[0, c].
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    channel_stats_partial_kernel(const scalar_t* __restrict__ y, int64_t rows, int64_t channels,
                                 int64_t rows_per_block, float* __restrict__ partial_mean,
                                 float* __restrict__ partial_m2) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < channels;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t row_end = min(rows, row_begin + rows_per_block);
  float count = 0.f, mean[VEC], m2[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) mean[i] = m2[i] = 0.f;
  if (active) {
    float shift[VEC];
    load_as_float<scalar_t, VEC>(y + c0, shift);
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += blockDim.y) {
      float v[VEC];
      load_as_float<scalar_t, VEC>(y + r * channels + c0, v);
      count += 1.f;
      const float inv_count = 1.f / count;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float d = v[i] - shift[i];
        const float delta = d - mean[i];
        mean[i] += delta * inv_count;
        m2[i] += delta * (d - mean[i]);
      }
    }
  }
  block_welford_merge<VEC>(count, mean, m2);
  if (active && threadIdx.y == 0) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      partial_mean[blockIdx.x * channels + c0 + i] = mean[i];
      partial_m2[blockIdx.x * channels + c0 + i] = m2[i];
    }
  }
}

// Merges the row-block partials of channel_stats_partial_kernel: mean = shift + merged mean, var = M2 / M.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    channel_stats_finalize_kernel(const scalar_t* __restrict__ y, const float* __restrict__ partial_mean,
                                  const float* __restrict__ partial_m2, int64_t num_partials, int64_t rows,
                                  int64_t rows_per_block, int64_t channels, float* __restrict__ mean_out,
                                  float* __restrict__ var_out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = c < channels;
  float count = 0.f, mean[1] = {0.f}, m2[1] = {0.f};
  if (active) {
    for (int64_t p = threadIdx.y; p < num_partials; p += blockDim.y) {
      const float part_count = static_cast<float>(min(rows_per_block, rows - p * rows_per_block));
      welford_combine(count, part_count, mean[0], m2[0], partial_mean[p * channels + c], partial_m2[p * channels + c]);
      count += part_count;
    }
  }
  block_welford_merge<1>(count, mean, m2);
  if (active && threadIdx.y == 0) {
    mean_out[c] = static_cast<float>(y[c]) + mean[0];
    var_out[c] = m2[0] / count;
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_apply_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ residual,
                    scalar_t* __restrict__ out, const float* __restrict__ mean, const float* __restrict__ var,
                    const float* __restrict__ weight, const float* __restrict__ bias, float eps, bool relu,
                    int64_t rows, int64_t channels, int64_t rows_per_block) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= channels) return;
  float mu[VEC], scale[VEC], shift[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    mu[i] = mean[c0 + i];
    scale[i] = rsqrtf(var[c0 + i] + eps);
    if (weight != nullptr) scale[i] *= weight[c0 + i];
    shift[i] = bias != nullptr ? bias[c0 + i] : 0.f;
  }
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t row_end = min(rows, row_begin + rows_per_block);
  for (int64_t r = row_begin + threadIdx.y; r < row_end; r += blockDim.y) {
    const int64_t offset = r * channels + c0;
    float z[VEC];
    load_as_float<scalar_t, VEC>(y + offset, z);
#pragma unroll
    for (int i = 0; i < VEC; ++i) z[i] = (z[i] - mu[i]) * scale[i] + shift[i];
    if (residual != nullptr) {
      float res[VEC];
      load_as_float<scalar_t, VEC>(residual + offset, res);
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] += res[i];
    }
    if (relu) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = z[i] < 0.f ? 0.f : z[i];
    }
    store_from_float<scalar_t, VEC>(out + offset, z);
  }
}

// Per (row block, channel): sum of g and of g * (y - mean).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_backward_reduce_partial_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                                      const scalar_t* __restrict__ y, const float* __restrict__ mean,
                                      int64_t rows, int64_t channels, int64_t rows_per_block,
                                      float* __restrict__ partial_g, float* __restrict__ partial_g_centered) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < channels;
  float acc_g[VEC], acc_gc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc_g[i] = acc_gc[i] = 0.f;
  if (active) {
    float mu[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) mu[i] = mean[c0 + i];
    const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
    const int64_t row_end = min(rows, row_begin + rows_per_block);
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += blockDim.y) {
      const int64_t offset = r * channels + c0;
      float g[VEC], v[VEC];
      load_as_float<scalar_t, VEC>(grad_out + offset, g);
      load_as_float<scalar_t, VEC>(y + offset, v);
      if (out != nullptr) {
        float o[VEC];
        load_as_float<scalar_t, VEC>(out + offset, o);
#pragma unroll
        for (int i = 0; i < VEC; ++i) g[i] = relu_grad(g[i], o[i]);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc_g[i] += g[i];
        acc_gc[i] += g[i] * (v[i] - mu[i]);
      }
    }
  }
  block_sum_pair<VEC>(acc_g, acc_gc);
  if (active && threadIdx.y == 0) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      partial_g[blockIdx.x * channels + c0 + i] = acc_g[i];
      partial_g_centered[blockIdx.x * channels + c0 + i] = acc_gc[i];
    }
  }
}

// sum_g = sum of the partials; sum_g_xhat = (sum of the centered partials) * rsqrt(var + eps).
__global__ void __launch_bounds__(kThreads)
    bn_backward_reduce_finalize_kernel(const float* __restrict__ partial_g,
                                       const float* __restrict__ partial_g_centered, const float* __restrict__ var,
                                       float eps, int64_t num_partials, int64_t channels,
                                       float* __restrict__ sum_g, float* __restrict__ sum_g_xhat) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = c < channels;
  float total_g[1] = {0.f}, total_gc[1] = {0.f};
  if (active) {
    for (int64_t p = threadIdx.y; p < num_partials; p += blockDim.y) {
      total_g[0] += partial_g[p * channels + c];
      total_gc[0] += partial_g_centered[p * channels + c];
    }
  }
  block_sum_pair<1>(total_g, total_gc);
  if (active && threadIdx.y == 0) {
    sum_g[c] = total_g[0];
    sum_g_xhat[c] = total_gc[0] * rsqrtf(var[c] + eps);
  }
}

// grad_y = scale * (g - offset - (y - mean) * slope); offset = slope = 0 without batch statistics.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_backward_apply_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                             const scalar_t* __restrict__ y, const float* __restrict__ mean,
                             const float* __restrict__ var, const float* __restrict__ weight,
                             const float* __restrict__ sum_g, const float* __restrict__ sum_g_xhat, float eps,
                             int64_t rows, int64_t channels, int64_t rows_per_block, scalar_t* __restrict__ grad_y,
                             scalar_t* __restrict__ grad_residual) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= channels) return;
  const float inv_rows = 1.f / static_cast<float>(rows);
  float mu[VEC], scale[VEC], offset_g[VEC], slope[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    mu[i] = mean[c0 + i];
    const float invstd = rsqrtf(var[c0 + i] + eps);
    scale[i] = weight != nullptr ? weight[c0 + i] * invstd : invstd;
    offset_g[i] = sum_g != nullptr ? sum_g[c0 + i] * inv_rows : 0.f;
    slope[i] = sum_g_xhat != nullptr ? sum_g_xhat[c0 + i] * invstd * inv_rows : 0.f;
  }
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t row_end = min(rows, row_begin + rows_per_block);
  for (int64_t r = row_begin + threadIdx.y; r < row_end; r += blockDim.y) {
    const int64_t offset = r * channels + c0;
    float g[VEC], gy[VEC];
    load_as_float<scalar_t, VEC>(grad_out + offset, g);
    if (out != nullptr) {
      float o[VEC];
      load_as_float<scalar_t, VEC>(out + offset, o);
#pragma unroll
      for (int i = 0; i < VEC; ++i) g[i] = relu_grad(g[i], o[i]);
    }
    if (sum_g != nullptr) {
      float v[VEC];
      load_as_float<scalar_t, VEC>(y + offset, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) gy[i] = scale[i] * (g[i] - offset_g[i] - (v[i] - mu[i]) * slope[i]);
    } else {  // running statistics: eager's g * scale (no 0 * (y - mean) term, which a NaN / Inf would poison)
#pragma unroll
      for (int i = 0; i < VEC; ++i) gy[i] = scale[i] * g[i];
    }
    store_from_float<scalar_t, VEC>(grad_y + offset, gy);
    if (grad_residual != nullptr) store_from_float<scalar_t, VEC>(grad_residual + offset, g);
  }
}

void bn_channel_stats_cuda(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var) {
  check_channel_stats_args(y, mean, var);
  const c10::cuda::CUDAGuard device_guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = y.size(0), channels = y.size(1);
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "bn_channel_stats_cuda", [&] {
    const scalar_t* y_ptr = y.data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(channels, {y_ptr});
    const RowsLaunch launch = make_rows_launch(rows, channels, vec);
    const int64_t num_partials = launch.grid.x;
    const at::Tensor partial_mean = at::empty({num_partials, channels}, y.options().dtype(at::kFloat));
    const at::Tensor partial_m2 = at::empty({num_partials, channels}, y.options().dtype(at::kFloat));
    with_vector_width<scalar_t>(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      channel_stats_partial_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(
          y_ptr, rows, channels, launch.rows_per_block, partial_mean.data_ptr<float>(), partial_m2.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    channel_stats_finalize_kernel<scalar_t>
        <<<static_cast<unsigned>(ceil_div(channels, kMergeChannels)), dim3(kMergeChannels, kMergeRows), 0, stream>>>(
            y_ptr, partial_mean.data_ptr<float>(), partial_m2.data_ptr<float>(), num_partials, rows,
            launch.rows_per_block, channels, mean.data_ptr<float>(), var.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_apply_cuda(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                   const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out) {
  check_bn_apply_args(y, mean, var, weight, bias, residual, out);
  const int64_t rows = y.size(0), channels = y.size(1);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard device_guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "bn_apply_cuda", [&] {
    const scalar_t* y_ptr = y.data_ptr<scalar_t>();
    const scalar_t* residual_ptr = optional_data<scalar_t>(residual);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(channels, {y_ptr, residual_ptr, out_ptr});
    const RowsLaunch launch = make_rows_launch(rows, channels, vec);
    with_vector_width<scalar_t>(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      bn_apply_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(
          y_ptr, residual_ptr, out_ptr, mean.data_ptr<float>(), var.data_ptr<float>(), optional_data<float>(weight),
          optional_data<float>(bias), static_cast<float>(eps), relu, rows, channels, launch.rows_per_block);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void bn_backward_reduce_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& y,
                             const at::Tensor& mean, const at::Tensor& var, double eps, bool relu,
                             const at::Tensor& sum_g, const at::Tensor& sum_g_xhat) {
  check_bn_backward_reduce_args(grad_out, out, y, mean, var, relu, sum_g, sum_g_xhat);
  const int64_t rows = y.size(0), channels = y.size(1);
  const c10::cuda::CUDAGuard device_guard(y.device());
  if (rows == 0) {
    sum_g.zero_();
    sum_g_xhat.zero_();
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "bn_backward_reduce_cuda", [&] {
    const scalar_t* grad_ptr = grad_out.data_ptr<scalar_t>();
    const scalar_t* out_ptr = relu ? out->data_ptr<scalar_t>() : nullptr;
    const scalar_t* y_ptr = y.data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(channels, {grad_ptr, out_ptr, y_ptr});
    const RowsLaunch launch = make_rows_launch(rows, channels, vec);
    const int64_t num_partials = launch.grid.x;
    const at::Tensor partial_g = at::empty({num_partials, channels}, y.options().dtype(at::kFloat));
    const at::Tensor partial_g_centered = at::empty({num_partials, channels}, y.options().dtype(at::kFloat));
    with_vector_width<scalar_t>(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      bn_backward_reduce_partial_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(
          grad_ptr, out_ptr, y_ptr, mean.data_ptr<float>(), rows, channels, launch.rows_per_block,
          partial_g.data_ptr<float>(), partial_g_centered.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    bn_backward_reduce_finalize_kernel<<<static_cast<unsigned>(ceil_div(channels, kMergeChannels)),
                                         dim3(kMergeChannels, kMergeRows), 0, stream>>>(
        partial_g.data_ptr<float>(), partial_g_centered.data_ptr<float>(), var.data_ptr<float>(),
        static_cast<float>(eps), num_partials, channels, sum_g.data_ptr<float>(), sum_g_xhat.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_backward_apply_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& y,
                            const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& sum_g, const std::optional<at::Tensor>& sum_g_xhat,
                            double eps, bool relu, const at::Tensor& grad_y,
                            const std::optional<at::Tensor>& grad_residual) {
  check_bn_backward_apply_args(grad_out, out, y, mean, var, weight, sum_g, sum_g_xhat, relu, grad_y, grad_residual);
  const int64_t rows = y.size(0), channels = y.size(1);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard device_guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "bn_backward_apply_cuda", [&] {
    const scalar_t* grad_ptr = grad_out.data_ptr<scalar_t>();
    const scalar_t* out_ptr = relu ? out->data_ptr<scalar_t>() : nullptr;
    const scalar_t* y_ptr = y.data_ptr<scalar_t>();
    scalar_t* grad_y_ptr = grad_y.data_ptr<scalar_t>();
    scalar_t* grad_residual_ptr = optional_mutable_data<scalar_t>(grad_residual);
    const int vec = vector_width<scalar_t>(channels, {grad_ptr, out_ptr, y_ptr, grad_y_ptr, grad_residual_ptr});
    const RowsLaunch launch = make_rows_launch(rows, channels, vec);
    with_vector_width<scalar_t>(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      bn_backward_apply_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(
          grad_ptr, out_ptr, y_ptr, mean.data_ptr<float>(), var.data_ptr<float>(), optional_data<float>(weight),
          optional_data<float>(sum_g), optional_data<float>(sum_g_xhat), static_cast<float>(eps), rows, channels,
          launch.rows_per_block, grad_y_ptr, grad_residual_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace dla_fast

TORCH_LIBRARY_IMPL(dla_fast_C, CUDA, m) {
  m.impl("bn_channel_stats", &dla_fast::bn_channel_stats_cuda);
  m.impl("bn_apply", &dla_fast::bn_apply_cuda);
  m.impl("bn_backward_reduce", &dla_fast::bn_backward_reduce_cuda);
  m.impl("bn_backward_apply", &dla_fast::bn_backward_apply_cuda);
}
