// Fused IDA upsample-merge (see dla_fast/ops/upsample_merge.py for the math): schema, argument checks and the
// C++ CPU kernels. The CUDA kernels are in upsample_merge_cuda.cu and reuse the checks defined here.
//
//   upsample_merge_forward(low, weight, high, factor, concat) -> out
//     up  = conv_transpose2d(low, weight, stride=factor, padding=factor/2, groups=C)
//     out = up + high              (concat=false; high (N, C, f*h, f*w), out (N, C, f*h, f*w))
//     out = cat([high, up], 1)     (concat=true;  high (N, Ch, f*h, f*w), out (N, Ch + C, f*h, f*w))
//   upsample_merge_backward(grad_out, channel_offset, low, weight, factor) -> (grad_low, grad_weight)
//     grad_up = grad_out[:, channel_offset : channel_offset + C]
//
// Activations are channels_last (NHWC) tensors, seen as row-major [rows = N*H*W, channels] matrices; outputs
// and grad_low are channels_last, grad_weight is (C, 1, 2f, 2f) contiguous. Dtypes float32, float16, bfloat16,
// accumulated in float32. grad_weight is reduced in a fixed order (per-block partials, then a sum over
// blocks in block order): deterministic, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace dla_fast {

namespace {

void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "upsample_merge: ", name, " must be 4-D (N, C, H, W), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "upsample_merge: ", name,
              " must be channels_last contiguous (NHWC); call .contiguous(memory_format=torch.channels_last)");
}

void check_common(const at::Tensor& low, const at::Tensor& weight, int64_t factor) {
  TORCH_CHECK(factor >= 2 && factor % 2 == 0, "upsample_merge: factor must be an even integer >= 2, got ", factor);
  check_activation(low, "low");
  TORCH_CHECK(is_supported_activation_dtype(low.scalar_type()),
              "upsample_merge: expected float32, float16 or bfloat16 tensors, got ", low.scalar_type());
  TORCH_CHECK(weight.scalar_type() == low.scalar_type(), "upsample_merge: weight dtype ", weight.scalar_type(),
              " differs from low dtype ", low.scalar_type());
  TORCH_CHECK(weight.device() == low.device(), "upsample_merge: weight is on ", weight.device(), ", low on ",
              low.device());
  const int64_t k = 2 * factor;
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == low.size(1) && weight.size(1) == 1 && weight.size(2) == k &&
                  weight.size(3) == k,
              "upsample_merge: weight must have shape (C, 1, 2f, 2f) = (", low.size(1), ", 1, ", k, ", ", k,
              "), got ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "upsample_merge: weight must be contiguous");
}

void check_level(const at::Tensor& t, const char* name, const at::Tensor& low, int64_t factor) {
  check_activation(t, name);
  TORCH_CHECK(t.scalar_type() == low.scalar_type(), "upsample_merge: ", name, " dtype ", t.scalar_type(),
              " differs from low dtype ", low.scalar_type());
  TORCH_CHECK(t.device() == low.device(), "upsample_merge: ", name, " is on ", t.device(), ", low on ",
              low.device());
  TORCH_CHECK(t.size(0) == low.size(0), "upsample_merge: batch sizes differ: low ", low.size(0), ", ", name, " ",
              t.size(0));
  TORCH_CHECK(t.size(2) == factor * low.size(2) && t.size(3) == factor * low.size(3), "upsample_merge: ", name,
              " must be exactly factor x low spatially: low ", low.size(2), "x", low.size(3), " x ", factor, " = ",
              factor * low.size(2), "x", factor * low.size(3), ", got ", t.size(2), "x", t.size(3));
}

}  // namespace

void check_upsample_merge_forward_args(const at::Tensor& low, const at::Tensor& weight, const at::Tensor& high,
                                       int64_t factor, bool concat) {
  check_common(low, weight, factor);
  check_level(high, "high", low, factor);
  TORCH_CHECK(concat || high.size(1) == low.size(1), "upsample_merge: add needs high with the channels of low (",
              low.size(1), "), got ", high.size(1));
}

void check_upsample_merge_backward_args(const at::Tensor& grad_out, int64_t channel_offset, const at::Tensor& low,
                                        const at::Tensor& weight, int64_t factor) {
  check_common(low, weight, factor);
  check_level(grad_out, "grad_out", low, factor);
  TORCH_CHECK(channel_offset >= 0 && channel_offset + low.size(1) <= grad_out.size(1),
              "upsample_merge: channels [", channel_offset, ", ", channel_offset + low.size(1),
              ") of the up part are outside grad_out's ", grad_out.size(1), " channels");
}

at::Tensor upsample_merge_forward_output(const at::Tensor& low, const at::Tensor& high, int64_t factor,
                                         bool concat) {
  const int64_t channels = concat ? high.size(1) + low.size(1) : low.size(1);
  return at::empty({low.size(0), channels, factor * low.size(2), factor * low.size(3)},
                   low.options().memory_format(at::MemoryFormat::ChannelsLast));
}

namespace {

// (C, 1, 2f, 2f) -> float [(2f)^2, C], so the inner loops over channels read the weight contiguously.
at::Tensor transposed_weight_float(const at::Tensor& weight) {
  return weight.reshape({weight.size(0), -1}).t().to(at::kFloat).contiguous();
}

template <typename scalar_t>
void forward_cpu_kernel(const scalar_t* low, const float* weight_t, const scalar_t* high, scalar_t* out,
                        int64_t N, int64_t C, int64_t h, int64_t w, int64_t C_high, int64_t factor, bool concat) {
  const int64_t H = factor * h, W = factor * w, K = 2 * factor, pad = factor / 2;
  const int64_t C_out = concat ? C_high + C : C;
  at::parallel_for(0, N * H * W, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(C);
    for (int64_t m = begin; m < end; ++m) {
      const int64_t n = m / (H * W), rem = m % (H * W), oy = rem / W, ox = rem % W;
      const int64_t iy0 = (oy + pad) / factor, ky0 = (oy + pad) % factor;
      const int64_t ix0 = (ox + pad) / factor, kx0 = (ox + pad) % factor;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t a = 0; a < 2; ++a) {
        const int64_t iy = iy0 - a;
        if (iy < 0 || iy >= h) continue;
        for (int64_t b = 0; b < 2; ++b) {
          const int64_t ix = ix0 - b;
          if (ix < 0 || ix >= w) continue;
          const scalar_t* x = low + ((n * h + iy) * w + ix) * C;
          const float* wt = weight_t + ((ky0 + a * factor) * K + kx0 + b * factor) * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<float>(x[c]) * wt[c];
        }
      }
      scalar_t* out_row = out + m * C_out;
      if (concat) {
        const scalar_t* high_row = high + m * C_high;
        std::copy(high_row, high_row + C_high, out_row);
        for (int64_t c = 0; c < C; ++c) out_row[C_high + c] = static_cast<scalar_t>(acc[c]);
      } else {
        const scalar_t* high_row = high + m * C;
        for (int64_t c = 0; c < C; ++c) out_row[c] = static_cast<scalar_t>(acc[c] + static_cast<float>(high_row[c]));
      }
    }
  });
}

// Low pixels per grad_weight partial block (fixed: the reduction order must not depend on the thread count).
constexpr int64_t kBackwardBlockPixels = 64;

template <typename scalar_t>
void backward_cpu_kernel(const scalar_t* grad, int64_t grad_row_stride, int64_t channel_offset, const scalar_t* low,
                         const float* weight_t, scalar_t* grad_low, scalar_t* grad_weight, int64_t N, int64_t C,
                         int64_t h, int64_t w, int64_t factor) {
  const int64_t H = factor * h, W = factor * w, K = 2 * factor, taps = K * K, pad = factor / 2;
  const int64_t M_low = N * h * w;
  const int64_t n_blocks = ceil_div(M_low, kBackwardBlockPixels);
  std::vector<float> partial(static_cast<size_t>(n_blocks * taps * C), 0.f);  // [n_blocks, taps, C]
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> acc_low(C), x(C);
    for (int64_t block = block_begin; block < block_end; ++block) {
      float* block_partial = partial.data() + block * taps * C;
      const int64_t m_end = std::min(M_low, (block + 1) * kBackwardBlockPixels);
      for (int64_t m = block * kBackwardBlockPixels; m < m_end; ++m) {
        const int64_t n = m / (h * w), rem = m % (h * w), iy = rem / w, ix = rem % w;
        for (int64_t c = 0; c < C; ++c) x[c] = static_cast<float>(low[m * C + c]);
        std::fill(acc_low.begin(), acc_low.end(), 0.f);
        for (int64_t ky = 0; ky < K; ++ky) {
          const int64_t oy = iy * factor - pad + ky;
          if (oy < 0 || oy >= H) continue;
          for (int64_t kx = 0; kx < K; ++kx) {
            const int64_t ox = ix * factor - pad + kx;
            if (ox < 0 || ox >= W) continue;
            const scalar_t* g = grad + ((n * H + oy) * W + ox) * grad_row_stride + channel_offset;
            const float* wt = weight_t + (ky * K + kx) * C;
            float* tap_partial = block_partial + (ky * K + kx) * C;
            for (int64_t c = 0; c < C; ++c) {
              const float gv = static_cast<float>(g[c]);
              acc_low[c] += gv * wt[c];
              tap_partial[c] += gv * x[c];
            }
          }
        }
        for (int64_t c = 0; c < C; ++c) grad_low[m * C + c] = static_cast<scalar_t>(acc_low[c]);
      }
    }
  });
  at::parallel_for(0, taps * C, 256, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      float sum = 0.f;
      for (int64_t block = 0; block < n_blocks; ++block) sum += partial[block * taps * C + e];
      const int64_t k = e / C, c = e % C;
      grad_weight[c * taps + k] = static_cast<scalar_t>(sum);
    }
  });
}

at::Tensor upsample_merge_forward_cpu(const at::Tensor& low, const at::Tensor& weight, const at::Tensor& high,
                                      int64_t factor, bool concat) {
  check_upsample_merge_forward_args(low, weight, high, factor, concat);
  TORCH_CHECK(low.device().is_cpu(), "upsample_merge_forward_cpu: expected CPU tensors, got ", low.device());
  at::Tensor out = upsample_merge_forward_output(low, high, factor, concat);
  if (out.numel() == 0) return out;
  const at::Tensor weight_t = transposed_weight_float(weight);
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(low.scalar_type(), "upsample_merge_forward_cpu", [&] {
    forward_cpu_kernel<scalar_t>(low.const_data_ptr<scalar_t>(), weight_t.const_data_ptr<float>(),
                                 high.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), low.size(0),
                                 low.size(1), low.size(2), low.size(3), high.size(1), factor, concat);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> upsample_merge_backward_cpu(const at::Tensor& grad_out, int64_t channel_offset,
                                                               const at::Tensor& low, const at::Tensor& weight,
                                                               int64_t factor) {
  check_upsample_merge_backward_args(grad_out, channel_offset, low, weight, factor);
  TORCH_CHECK(low.device().is_cpu(), "upsample_merge_backward_cpu: expected CPU tensors, got ", low.device());
  at::Tensor grad_low = at::empty_like(low, at::MemoryFormat::ChannelsLast);
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  if (low.size(1) == 0) return {grad_low, grad_weight};
  const at::Tensor weight_t = transposed_weight_float(weight);
  DLA_FAST_DISPATCH_FLOAT_HALF_BF16(low.scalar_type(), "upsample_merge_backward_cpu", [&] {
    backward_cpu_kernel<scalar_t>(grad_out.const_data_ptr<scalar_t>(), grad_out.size(1), channel_offset,
                                  low.const_data_ptr<scalar_t>(), weight_t.const_data_ptr<float>(),
                                  grad_low.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(),
                                  low.size(0), low.size(1), low.size(2), low.size(3), factor);
  });
  return {grad_low, grad_weight};
}

}  // namespace

}  // namespace dla_fast

TORCH_LIBRARY_FRAGMENT(dla_fast_C, m) {
  m.def("upsample_merge_forward(Tensor low, Tensor weight, Tensor high, int factor, bool concat) -> Tensor");
  m.def(
      "upsample_merge_backward(Tensor grad_out, int channel_offset, Tensor low, Tensor weight, int factor) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dla_fast_C, CPU, m) {
  m.impl("upsample_merge_forward", &dla_fast::upsample_merge_forward_cpu);
  m.impl("upsample_merge_backward", &dla_fast::upsample_merge_backward_cpu);
}
