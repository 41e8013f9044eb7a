// CPUID + XGETBV probing for the ISA selection (isa.cc). Compiled without ISA flags, so that
// it runs on any x86-64; other targets report no AVX2.
#include "cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <cstdint>
#endif

namespace stochdepth {

#if defined(__x86_64__) || defined(__i386__)
namespace {
uint64_t xgetbv0() {
  uint32_t eax, edx;
  // XGETBV with ECX = 0 reads XCR0; raw bytes so that no -mxsave flag is needed.
  __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

bool probe() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return false;
  if ((xgetbv0() & 0x6) != 0x6) return false;  // XMM and YMM state saved by the OS
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return b & (1u << 5);  // AVX2
}
}  // namespace

bool cpu_has_avx2_fma_f16c() {
  static const bool has = probe();
  return has;
}
#else
bool cpu_has_avx2_fma_f16c() { return false; }
#endif

}  // namespace stochdepth
