// CPUID + XGETBV probing for the ISA selection (isa.cc). Compiled without ISA flags, so that
// it runs on any x86-64; other targets report none of these features.
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

struct Features {
  bool avx2 = false;         // AVX2 + FMA + F16C, YMM state enabled
  bool avx512 = false;       // + AVX-512 F/BW/DQ/VL, opmask and ZMM state enabled
  bool avx512_bf16 = false;  // + AVX512_BF16
};

Features probe() {
  Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return f;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return f;  // XMM and YMM state saved by the OS
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31);
  // Opmask (bit 5), upper halves of ZMM0-15 (bit 6) and ZMM16-31 (bit 7): an OS that does not
  // save them (or a hypervisor that hides them) makes every AVX-512 instruction fault.
  const bool zmm_state = (xcr0 & 0xE6) == 0xE6;
  f.avx512 = f.avx2 && avx512f && avx512dq && avx512bw && avx512vl && zmm_state;
  if (f.avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = a & (1u << 5);
  return f;
}

const Features& features() {
  static const Features f = probe();
  return f;
}
}  // namespace

bool cpu_has_avx2_fma_f16c() { return features().avx2; }
bool cpu_has_avx512() { return features().avx512; }
bool cpu_has_avx512_bf16() { return features().avx512_bf16; }
#else
bool cpu_has_avx2_fma_f16c() { return false; }
bool cpu_has_avx512() { return false; }
bool cpu_has_avx512_bf16() { return false; }
#endif

}  // namespace stochdepth
