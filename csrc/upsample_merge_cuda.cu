// CUDA kernels of the fused IDA upsample-merge. The op schema, the argument checks and the C++ CPU kernels are
// in upsample_merge.cpp; the math is described in dla_fast/ops/upsample_merge.py.
//
// Layout: low, high, out, grad_out, grad_low are channels_last, seen as row-major [rows = N*H*W, channels]
// matrices; the weight (C, 1, 2f, 2f) is transposed once per call to weight_t [(2f)^2, C]. Each thread works on
// VEC consecutive channels of a row with 16-byte loads and stores (VEC = 16 / sizeof(scalar_t)) when every
// channel count, channel offset and base pointer allows it, one channel at a time otherwise. Sums in float32;
// row offsets in int64. Launches go to the current stream (c10::cuda::getCurrentCUDAStream, which ATen re-exports
// as at::cuda::getCurrentCUDAStream; its header does not need the cuSPARSE headers that ATen/cuda/CUDAContext.h
// pulls in).
//
// Forward:  a thread per (output row, channel vector), rows along threadIdx.y, channel vectors along threadIdx.x
//           (coalesced): up to 2 x 2 taps of low times weight_t, merged with high (add), or the high row copied
//           beside it (concat).
// Backward: a block per group of pixel tiles and channel range; per kernel tap k it accumulates grad_low in
//           registers and reduces low * grad_up over the tile's pixels (warp shuffles across the lanes of a warp
//           that hold the same channels, then the 8 warp sums in order through shared memory: one barrier per
//           tap) into the block's own row of fp32 partials [rows, (2f)^2, C]; a second kernel sums the rows in a
//           fixed order into grad_weight. No atomics: the result is deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "common.h"
#include "vec.cuh"

namespace dla_fast {

// Defined in upsample_merge.cpp.
void check_upsample_merge_forward_args(const at::Tensor& low, const at::Tensor& weight, const at::Tensor& high,
                                       int64_t factor, bool concat);
void check_upsample_merge_backward_args(const at::Tensor& grad_out, int64_t channel_offset, const at::Tensor& low,
                                        const at::Tensor& weight, int64_t factor);
at::Tensor upsample_merge_forward_output(const at::Tensor& low, const at::Tensor& high, int64_t factor,
                                         bool concat);

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Low pixels per thread in the backward kernel (a tile is blockDim.y * pixels_per_thread of them): 2 with
// 16-byte vectors, 4 with scalars; each thread then holds 8 to 16 grad_low sums and stays near 90-110
// registers without spilling.
constexpr int pixels_per_thread(int vec) { return vec > 1 ? 2 : 4; }
// grad_weight partial rows at most; tiles are grouped by shape only, so the reduction order is fixed.
constexpr int64_t kMaxPartialRows = 1024;
constexpr int kReduceColumns = 32;
constexpr int kReduceRows = 8;

// low (N, C, h, w); upsampled / merged side (H, W) = (f*h, f*w).
struct Geometry {
  int64_t N, C, h, w, H, W, factor;
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    upsample_merge_forward_kernel(const scalar_t* __restrict__ low, const scalar_t* __restrict__ weight_t,
                                  const scalar_t* __restrict__ high, scalar_t* __restrict__ out, Geometry g,
                                  int64_t C_high, bool concat) {
  const int64_t M_out = g.N * g.H * g.W;
  const int64_t C_out = concat ? C_high + g.C : g.C;
  const int64_t high_vectors = concat ? C_high / VEC : 0;
  const int64_t row_vectors = high_vectors + g.C / VEC;
  const int64_t K = 2 * g.factor, pad = g.factor / 2;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; m < M_out;
       m += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t n = m / (g.H * g.W), rem = m - n * (g.H * g.W);
    const int64_t oy = rem / g.W, ox = rem - oy * g.W;
    const int64_t iy0 = (oy + pad) / g.factor, ky0 = oy + pad - iy0 * g.factor;
    const int64_t ix0 = (ox + pad) / g.factor, kx0 = ox + pad - ix0 * g.factor;
    bool tap_ok[4];
    int64_t tap_low[4], tap_weight[4];
#pragma unroll
    for (int a = 0; a < 2; ++a) {
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int64_t iy = iy0 - a, ix = ix0 - b;
        tap_ok[2 * a + b] = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
        tap_low[2 * a + b] = ((n * g.h + iy) * g.w + ix) * g.C;
        tap_weight[2 * a + b] = ((ky0 + a * g.factor) * K + kx0 + b * g.factor) * g.C;
      }
    }
    for (int64_t j = threadIdx.x; j < row_vectors; j += blockDim.x) {
      if (j < high_vectors) {
        using V = AlignedVector<scalar_t, VEC>;
        *reinterpret_cast<V*>(out + m * C_out + j * VEC) = *reinterpret_cast<const V*>(high + m * C_high + j * VEC);
        continue;
      }
      const int64_t c = (j - high_vectors) * VEC;
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        if (!tap_ok[t]) continue;
        float x[VEC], wt[VEC];
        load_as_float<scalar_t, VEC>(low + tap_low[t] + c, x);
        load_as_float<scalar_t, VEC>(weight_t + tap_weight[t] + c, wt);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += x[i] * wt[i];
      }
      if (!concat) {
        float hv[VEC];
        load_as_float<scalar_t, VEC>(high + m * g.C + c, hv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += hv[i];
      }
      store_from_float<scalar_t, VEC>(out + m * C_out + (concat ? C_high : 0) + c, acc);
    }
  }
}

// grid (partial rows, channel blocks), block (TX channel vectors, TY pixel lanes) with TX a power of two <= 32
// and TX * TY = kThreads; dynamic shared memory 2 * kWarps * VEC * TX floats. Block row r handles the pixel
// tiles [r * tiles_per_block, (r + 1) * tiles_per_block).
template <typename scalar_t, int VEC, int PIX>
__global__ void __launch_bounds__(kThreads)
    upsample_merge_backward_kernel(const scalar_t* __restrict__ grad, int64_t grad_row_stride,
                                   int64_t channel_offset, const scalar_t* __restrict__ low,
                                   const scalar_t* __restrict__ weight_t, scalar_t* __restrict__ grad_low,
                                   float* __restrict__ partial, Geometry g, int64_t tiles_per_block) {
  extern __shared__ float warp_sums[];  // two buffers (alternate taps) of [kWarps][VEC][TX]
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int linear = ty * TX + tx, lane = linear & 31, warp = linear >> 5;  // lane == tx when lane < TX
  int buffer = 0;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * TX + tx) * VEC;
  const bool channel_ok = c < g.C;
  const int64_t M_low = g.N * g.h * g.w;
  const int64_t K = 2 * g.factor, pad = g.factor / 2;
  const int64_t tile_pixels = static_cast<int64_t>(TY) * PIX;
  float* partial_row = partial + static_cast<int64_t>(blockIdx.x) * K * K * g.C;
  for (int64_t tile = 0; tile < tiles_per_block; ++tile) {
    const int64_t tile_start = (static_cast<int64_t>(blockIdx.x) * tiles_per_block + tile) * tile_pixels;
    if (tile_start >= M_low) break;  // the same for the whole block
    bool pixel_ok[PIX];
    int64_t pixel[PIX], grad_row0[PIX], oy0[PIX], ox0[PIX];
    float x[PIX][VEC], acc_low[PIX][VEC];
#pragma unroll
    for (int p = 0; p < PIX; ++p) {
      const int64_t m = tile_start + static_cast<int64_t>(p) * TY + ty;
      pixel[p] = m;
      pixel_ok[p] = channel_ok && m < M_low;
      const int64_t n = m / (g.h * g.w), rem = m - n * (g.h * g.w);
      const int64_t iy = rem / g.w, ix = rem - iy * g.w;
      grad_row0[p] = n * g.H;
      oy0[p] = iy * g.factor - pad;
      ox0[p] = ix * g.factor - pad;
#pragma unroll
      for (int i = 0; i < VEC; ++i) x[p][i] = acc_low[p][i] = 0.f;
      if (pixel_ok[p]) load_as_float<scalar_t, VEC>(low + m * g.C + c, x[p]);
    }
    for (int64_t ky = 0; ky < K; ++ky) {
      for (int64_t kx = 0; kx < K; ++kx) {
        const int64_t k = ky * K + kx;
        float wt[VEC], gw[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) wt[i] = gw[i] = 0.f;
        if (channel_ok) load_as_float<scalar_t, VEC>(weight_t + k * g.C + c, wt);
#pragma unroll
        for (int p = 0; p < PIX; ++p) {
          const int64_t oy = oy0[p] + ky, ox = ox0[p] + kx;
          if (!pixel_ok[p] || oy < 0 || oy >= g.H || ox < 0 || ox >= g.W) continue;
          float gv[VEC];
          const int64_t grad_row = (grad_row0[p] + oy) * g.W + ox;
          load_as_float<scalar_t, VEC>(grad + grad_row * grad_row_stride + channel_offset + c, gv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            acc_low[p][i] += gv[i] * wt[i];
            gw[i] += gv[i] * x[p][i];
          }
        }
        // Lanes tx, tx + TX, ... of a warp hold the same channels: a butterfly leaves their sum in each.
        for (int offset = 16; offset >= TX; offset >>= 1) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) gw[i] += __shfl_xor_sync(0xffffffffu, gw[i], offset);
        }
        // Alternating buffers: a warp writes this tap's sums while thread row 0 may still read the previous
        // tap's from the other buffer; the one barrier per tap orders everything else.
        float* sums = warp_sums + buffer * kWarps * VEC * TX;
        buffer ^= 1;
        if (lane < TX) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) sums[(warp * VEC + i) * TX + tx] = gw[i];
        }
        __syncthreads();
        // Thread (0, tx) alone reads and writes these partial entries.
        if (ty == 0 && channel_ok) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            float sum = 0.f;
            for (int w = 0; w < kWarps; ++w) sum += sums[(w * VEC + i) * TX + tx];
            partial_row[k * g.C + c + i] += sum;
          }
        }
      }
    }
#pragma unroll
    for (int p = 0; p < PIX; ++p) {
      if (pixel_ok[p]) store_from_float<scalar_t, VEC>(grad_low + pixel[p] * g.C + c, acc_low[p]);
    }
  }
}

// grad_weight[c, k] = sum over rows r (in a fixed tree order) of partial[r, k, c]. block (kReduceColumns,
// kReduceRows), a block per kReduceColumns consecutive elements of [taps, C].
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceColumns* kReduceRows)
    grad_weight_reduce_kernel(const float* __restrict__ partial, scalar_t* __restrict__ grad_weight, int64_t rows,
                              int64_t taps, int64_t C) {
  __shared__ float buffer[kReduceRows][kReduceColumns];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kReduceColumns + tx;
  const int64_t elements = taps * C;
  float sum = 0.f;
  if (e < elements) {
    for (int64_t r = ty; r < rows; r += kReduceRows) sum += partial[r * elements + e];
  }
  buffer[ty][tx] = sum;
  __syncthreads();
  for (int stride = kReduceRows / 2; stride > 0; stride >>= 1) {
    if (ty < stride) buffer[ty][tx] += buffer[ty + stride][tx];
    __syncthreads();
  }
  if (ty == 0 && e < elements) {
    const int64_t k = e / C, c = e - k * C;
    grad_weight[c * taps + k] = static_cast<scalar_t>(buffer[0][tx]);
  }
}

int next_power_of_two(int64_t v) {
  int p = 1;
  while (p < v && p < kThreads) p <<= 1;
  return p;
}

at::Tensor transposed_weight(const at::Tensor& weight) {
  return weight.reshape({weight.size(0), -1}).t().contiguous();
}

Geometry geometry_of(const at::Tensor& low, int64_t factor) {
  return Geometry{low.size(0), low.size(1), low.size(2), low.size(3), factor * low.size(2), factor * low.size(3),
                  factor};
}

template <typename scalar_t, int VEC>
void launch_forward(const at::Tensor& low, const at::Tensor& weight_t, const at::Tensor& high, at::Tensor& out,
                    const Geometry& g, bool concat) {
  const int64_t C_high = high.size(1);
  const int64_t row_vectors = (concat ? C_high / VEC : 0) + g.C / VEC;
  const int tx = std::min(32, next_power_of_two(row_vectors));
  const dim3 block(tx, kThreads / tx);
  const int64_t M_out = g.N * g.H * g.W;
  const int64_t blocks = std::min<int64_t>(ceil_div(M_out, block.y), INT_MAX);
  upsample_merge_forward_kernel<scalar_t, VEC><<<static_cast<unsigned>(blocks), block, 0,
                                                 c10::cuda::getCurrentCUDAStream()>>>(
      low.const_data_ptr<scalar_t>(), weight_t.const_data_ptr<scalar_t>(), high.const_data_ptr<scalar_t>(),
      out.mutable_data_ptr<scalar_t>(), g, C_high, concat);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_backward(const at::Tensor& grad_out, int64_t channel_offset, const at::Tensor& low,
                     const at::Tensor& weight_t, at::Tensor& grad_low, at::Tensor& grad_weight, const Geometry& g) {
  const int64_t taps = 4 * g.factor * g.factor;
  const int64_t channel_vectors = g.C / VEC;
  const int tx = std::min(16, next_power_of_two(channel_vectors));
  const dim3 block(tx, kThreads / tx);
  const int64_t M_low = g.N * g.h * g.w;
  constexpr int kPixels = pixels_per_thread(VEC);
  const int64_t tile_pixels = static_cast<int64_t>(block.y) * kPixels;
  const int64_t tiles = ceil_div(M_low, tile_pixels);
  const int64_t tiles_per_block = std::max<int64_t>(1, ceil_div(tiles, kMaxPartialRows));
  const int64_t rows = ceil_div(tiles, tiles_per_block);
  at::Tensor partial = at::zeros({rows, taps, g.C}, low.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (M_low > 0) {
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(channel_vectors, tx)));
    const size_t shared_bytes = sizeof(float) * 2 * kWarps * VEC * tx;
    upsample_merge_backward_kernel<scalar_t, VEC, kPixels><<<grid, block, shared_bytes, stream>>>(
        grad_out.const_data_ptr<scalar_t>(), grad_out.size(1), channel_offset, low.const_data_ptr<scalar_t>(),
        weight_t.const_data_ptr<scalar_t>(), grad_low.mutable_data_ptr<scalar_t>(),
        partial.mutable_data_ptr<float>(), g, tiles_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t reduce_blocks = ceil_div(taps * g.C, kReduceColumns);
  grad_weight_reduce_kernel<scalar_t><<<static_cast<unsigned>(reduce_blocks), dim3(kReduceColumns, kReduceRows),
                                        0, stream>>>(partial.const_data_ptr<float>(),
                                                     grad_weight.mutable_data_ptr<scalar_t>(), rows, taps, g.C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor upsample_merge_forward_cuda(const at::Tensor& low, const at::Tensor& weight, const at::Tensor& high,
                                       int64_t factor, bool concat) {
  check_upsample_merge_forward_args(low, weight, high, factor, concat);
  TORCH_CHECK(low.is_cuda(), "upsample_merge_forward_cuda: expected CUDA tensors, got ", low.device());
  const c10::cuda::CUDAGuard device_guard(low.device());
  at::Tensor out = upsample_merge_forward_output(low, high, factor, concat);
  if (out.numel() == 0) return out;
  const at::Tensor weight_t = transposed_weight(weight);
  const Geometry g = geometry_of(low, factor);
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(low.scalar_type(), "upsample_merge_forward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vectorized = (!concat || high.size(1) % kVec == 0) &&
                            vector_width<scalar_t>(g.C, {low.const_data_ptr(), high.const_data_ptr(),
                                                         out.const_data_ptr(), weight_t.const_data_ptr()}) == kVec;
    if (vectorized) {
      launch_forward<scalar_t, kVec>(low, weight_t, high, out, g, concat);
    } else {
      launch_forward<scalar_t, 1>(low, weight_t, high, out, g, concat);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> upsample_merge_backward_cuda(const at::Tensor& grad_out, int64_t channel_offset,
                                                                const at::Tensor& low, const at::Tensor& weight,
                                                                int64_t factor) {
  check_upsample_merge_backward_args(grad_out, channel_offset, low, weight, factor);
  TORCH_CHECK(low.is_cuda(), "upsample_merge_backward_cuda: expected CUDA tensors, got ", low.device());
  const c10::cuda::CUDAGuard device_guard(low.device());
  at::Tensor grad_low = at::empty_like(low, at::MemoryFormat::ChannelsLast);
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  if (low.size(1) == 0) return {grad_low, grad_weight};
  const at::Tensor weight_t = transposed_weight(weight);
  const Geometry g = geometry_of(low, factor);
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(low.scalar_type(), "upsample_merge_backward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vectorized = channel_offset % kVec == 0 && grad_out.size(1) % kVec == 0 &&
                            vector_width<scalar_t>(g.C, {grad_out.const_data_ptr(), low.const_data_ptr(),
                                                         weight_t.const_data_ptr(), grad_low.const_data_ptr()}) == kVec;
    if (vectorized) {
      launch_backward<scalar_t, kVec>(grad_out, channel_offset, low, weight_t, grad_low, grad_weight, g);
    } else {
      launch_backward<scalar_t, 1>(grad_out, channel_offset, low, weight_t, grad_low, grad_weight, g);
    }
  });
  return {grad_low, grad_weight};
}

}  // namespace

}  // namespace dla_fast

TORCH_LIBRARY_IMPL(dla_fast_C, CUDA, m) {
  m.impl("upsample_merge_forward", &dla_fast::upsample_merge_forward_cuda);
  m.impl("upsample_merge_backward", &dla_fast::upsample_merge_backward_cuda);
}
