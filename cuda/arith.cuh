// The pinned arithmetic of every kernel in cuda/ (docs/design.md, "Arithmetic"): storage type T,
// compute type C (float for the half types, else T), conversions that round once to nearest even,
// a multiply and an add never fused. The device pass uses __fmul_rn/__fadd_rn (never merged into
// an FMA); the host pass (the CPU emulation of the kernels, cuda/emulator.cu) uses IEEE * and +
// compiled with -ffp-contract=off and the CPU path's exact conversions (half.h).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "stochdepth/portability.h"
#ifndef __CUDA_ARCH__
#include "stochdepth/half.h"
#endif

#if defined(__CUDA_ARCH__)
#define STOCHDEPTH_ARITH __device__ __forceinline__
#else
#define STOCHDEPTH_ARITH STOCHDEPTH_HOST_DEVICE inline
#endif

namespace stochdepth {

template <typename T>
struct Arith;

template <>
struct Arith<float> {
  using C = float;
  STOCHDEPTH_ARITH static C load(float x) { return x; }
  STOCHDEPTH_ARITH static float store(C x) { return x; }
#ifdef __CUDA_ARCH__
  STOCHDEPTH_ARITH static C mul(C a, C b) { return __fmul_rn(a, b); }
  STOCHDEPTH_ARITH static C add(C a, C b) { return __fadd_rn(a, b); }
#else
  STOCHDEPTH_ARITH static C mul(C a, C b) { return a * b; }
  STOCHDEPTH_ARITH static C add(C a, C b) { return a + b; }
#endif
};

template <>
struct Arith<double> {
  using C = double;
  STOCHDEPTH_ARITH static C load(double x) { return x; }
  STOCHDEPTH_ARITH static double store(C x) { return x; }
#ifdef __CUDA_ARCH__
  STOCHDEPTH_ARITH static C mul(C a, C b) { return __dmul_rn(a, b); }
  STOCHDEPTH_ARITH static C add(C a, C b) { return __dadd_rn(a, b); }
#else
  STOCHDEPTH_ARITH static C mul(C a, C b) { return a * b; }
  STOCHDEPTH_ARITH static C add(C a, C b) { return a + b; }
#endif
};

template <>
struct Arith<__half> : Arith<float> {
#ifdef __CUDA_ARCH__
  STOCHDEPTH_ARITH static float load(__half x) { return __half2float(x); }
  STOCHDEPTH_ARITH static __half store(float x) { return __float2half_rn(x); }
#else
  static float load(__half x) { return half_to_float(__half_raw(x).x); }
  static __half store(float x) {
    __half_raw r;
    r.x = float_to_half(x);
    return __half(r);
  }
#endif
};

template <>
struct Arith<__nv_bfloat16> : Arith<float> {
#ifdef __CUDA_ARCH__
  STOCHDEPTH_ARITH static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  STOCHDEPTH_ARITH static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
#else
  static float load(__nv_bfloat16 x) { return bf16_to_float(__nv_bfloat16_raw(x).x); }
  static __nv_bfloat16 store(float x) {
    __nv_bfloat16_raw r;
    r.x = float_to_bf16(x);
    return __nv_bfloat16(r);
  }
#endif
};

}  // namespace stochdepth
