// Shared helpers of the dla_fast._C kernels (C++ and CUDA): argument checks and dtype dispatch.
//
// Activations are NHWC tensors seen as 2-D row-major [M = N*H*W, C] views; per-channel vectors (mean,
// variance, affine parameters, reductions) are fp32 [C].
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace dla_fast {

// Dispatch over the activation dtypes the kernels support (fp32, fp16, bf16; fp32 accumulation inside).
// Narrower than AT_DISPATCH_FLOATING_TYPES_AND2: no fp64 instantiations to compile for nothing.
#define DLA_FAST_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool is_supported_activation_dtype(at::ScalarType t) {
  return t == at::ScalarType::Float || t == at::ScalarType::Half || t == at::ScalarType::BFloat16;
}

// A 2-D contiguous [M, C] activation of dtype fp32/fp16/bf16.
inline void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be a 2-D [M, C] view of NHWC activations, got a ",
              t.dim(), "-D tensor of shape ", t.sizes());
  TORCH_CHECK(is_supported_activation_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (row-major [M, C]), got strides ",
              t.strides());
}

// Same shape, dtype and device as `ref`, and contiguous.
inline void check_rows_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                            const char* ref_name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name,
              " has shape ", ref.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (row-major [M, C]), got strides ",
              t.strides());
}

// A contiguous fp32 [C] per-channel vector on the device of `ref`.
inline void check_channel_vector(const at::Tensor& t, int64_t channels, const at::Tensor& ref, const char* op,
                                 const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the activations are on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == at::ScalarType::Float, op, ": ", name,
              " must be a float32 per-channel vector, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape [", channels,
              "] (one value per channel), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_optional_channel_vector(const std::optional<at::Tensor>& t, int64_t channels,
                                          const at::Tensor& ref, const char* op, const char* name) {
  if (t.has_value() && t->defined()) check_channel_vector(*t, channels, ref, op, name);
}

inline bool is_present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Data pointer of an optional tensor, nullptr when absent.
template <typename T>
const T* optional_data(const std::optional<at::Tensor>& t) {
  return is_present(t) ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* optional_mutable_data(const std::optional<at::Tensor>& t) {
  return is_present(t) ? t->data_ptr<T>() : nullptr;
}

}  // namespace dla_fast
