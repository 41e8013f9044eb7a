// What this CPU and its OS support, read once with CPUID + XGETBV (cpu_features.cc). No
// intrinsics, no ISA flags, no choice: isa.cc decides what runs. Every probe is false on a
// non-x86 target (aarch64 needs none: NEON is part of its baseline).
#pragma once

namespace stochdepth {

// AVX2 + FMA + F16C in the CPU *and* YMM state enabled by the OS (XCR0 bits 1 and 2).
bool cpu_has_avx2_fma_f16c();

// The above plus AVX-512 F, BW, DQ and VL, with the OS saving the opmask and ZMM state
// (XCR0 bits 5, 6 and 7).
bool cpu_has_avx512();

// cpu_has_avx512() plus AVX512_BF16 (native float -> bfloat16 conversion).
bool cpu_has_avx512_bf16();

}  // namespace stochdepth
