// Macros that let one header serve the host compiler and nvcc.
// Nothing here selects an ISA: that happens once, in isa.cc.
#pragma once

#if defined(__CUDACC__)
#define STOCHDEPTH_HOST_DEVICE __host__ __device__
#define STOCHDEPTH_FORCEINLINE __forceinline__
#else
#define STOCHDEPTH_HOST_DEVICE
#if defined(__GNUC__) || defined(__clang__)
#define STOCHDEPTH_FORCEINLINE inline __attribute__((always_inline))
#else
#define STOCHDEPTH_FORCEINLINE inline
#endif
#endif

#if defined(__GNUC__) || defined(__clang__) || defined(__CUDACC__)
#define STOCHDEPTH_RESTRICT __restrict__
#else
#define STOCHDEPTH_RESTRICT
#endif
