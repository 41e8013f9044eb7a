// What this CPU and its OS support, read once with CPUID + XGETBV (cpu_features.cc). No
// intrinsics, no ISA flags, no choice: isa.cc decides what runs.
#pragma once

namespace stochdepth {

// AVX2 + FMA + F16C in the CPU *and* YMM state enabled by the OS (XCR0 bits 1 and 2).
bool cpu_has_avx2_fma_f16c();

}  // namespace stochdepth
