// The pinned arithmetic (docs/design.md, "Arithmetic") on the GPU, for every kernel in cuda/:
// storage type T, compute type C (float for the half types, else T), conversions that round once to
// nearest even, and a multiply and an add that nvcc never fuses (__fmul_rn / __fadd_rn).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace stochdepth {

template <typename T>
struct Arith;

template <>
struct Arith<float> {
  using C = float;
  __device__ static __forceinline__ C load(float x) { return x; }
  __device__ static __forceinline__ float store(C x) { return x; }
  __device__ static __forceinline__ C mul(C a, C b) { return __fmul_rn(a, b); }
  __device__ static __forceinline__ C add(C a, C b) { return __fadd_rn(a, b); }
  // The host rounded the scale once to float and kept the double: pick the compute type's.
  __device__ static __forceinline__ C scale(float s32, double) { return s32; }
};

template <>
struct Arith<double> {
  using C = double;
  __device__ static __forceinline__ C load(double x) { return x; }
  __device__ static __forceinline__ double store(C x) { return x; }
  __device__ static __forceinline__ C mul(C a, C b) { return __dmul_rn(a, b); }
  __device__ static __forceinline__ C add(C a, C b) { return __dadd_rn(a, b); }
  __device__ static __forceinline__ C scale(float, double s64) { return s64; }
};

template <>
struct Arith<__half> : Arith<float> {
  __device__ static __forceinline__ float load(__half x) { return __half2float(x); }
  __device__ static __forceinline__ __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Arith<__nv_bfloat16> : Arith<float> {
  __device__ static __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

}  // namespace stochdepth
