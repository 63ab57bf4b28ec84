// Vectorized access to rows of NHWC activations ([M, C] row-major) for the CUDA kernels of dla_fast._C.
//
// A thread owns VEC consecutive channels and moves them with one 16-byte load/store when VEC > 1 (the host
// picks VEC > 1 only when C is a multiple of VEC and every base pointer is 16-byte aligned), and with scalar
// accesses when VEC == 1. Values are converted to fp32 on load and rounded to the storage dtype on store.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <initializer_list>

namespace dla_fast {

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
};

// The widest vector (elements per 16 bytes) usable for rows of `channels` elements at these addresses;
// null pointers (absent optional tensors) are ignored.
template <typename scalar_t>
inline int vector_width(int64_t channels, std::initializer_list<const void*> pointers) {
  constexpr int kWidest = 16 / sizeof(scalar_t);
  if (channels % kWidest != 0) return 1;
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return kWidest;
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void load_as_float(const scalar_t* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = static_cast<float>(*p);
  } else {
    const AlignedVector<scalar_t, VEC> packed = *reinterpret_cast<const AlignedVector<scalar_t, VEC>*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = static_cast<float>(packed.val[i]);
  }
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_from_float(scalar_t* p, const float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    *p = static_cast<scalar_t>(v[0]);
  } else {
    AlignedVector<scalar_t, VEC> packed;
#pragma unroll
    for (int i = 0; i < VEC; ++i) packed.val[i] = static_cast<scalar_t>(v[i]);
    *reinterpret_cast<AlignedVector<scalar_t, VEC>*>(p) = packed;
  }
}

}  // namespace dla_fast
