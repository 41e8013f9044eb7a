// IeeeSubnormals: for its lifetime, the calling thread computes with subnormals kept (no FTZ,
// no DAZ). XLA:CPU and TensorFlow run their kernels with subnormals flushed; the op keeps them
// (docs/design.md, "Arithmetic"), so a framework's thread that runs the first chunk of a call
// computes in IEEE mode for that call. The core's own worker threads never change their mode.
#pragma once
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace stochdepth {

class IeeeSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  IeeeSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~kFlushBits); }
  ~IeeeSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushBits = 0x8040;  // FTZ (bit 15) and DAZ (bit 6)
  unsigned saved_;
#elif defined(__aarch64__)
  IeeeSubnormals() {
    __asm__ volatile("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t cleared = saved_ & ~(uint64_t{1} << 24);  // FZ
    __asm__ volatile("msr fpcr, %0" : : "r"(cleared));
  }
  ~IeeeSubnormals() { __asm__ volatile("msr fpcr, %0" : : "r"(saved_)); }

 private:
  uint64_t saved_;
#endif
  IeeeSubnormals(const IeeeSubnormals&) = delete;
  IeeeSubnormals& operator=(const IeeeSubnormals&) = delete;
};

}  // namespace stochdepth
