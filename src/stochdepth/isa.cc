// ISA selection: which CPU kernel table runs, chosen from what this build compiled, what CPUID
// says this CPU supports and STOCHDEPTH_CPU. Kernel tables are filled in cpu_<isa>.cc; this
// file runs none of them except through philox_block.
#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "cpu_features.h"
#include "cpu_kernels.h"

namespace stochdepth {
namespace {

constexpr Isa kPriority[] = {Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2, Isa::kNeon, Isa::kScalar};

// The table this build compiled for `isa`, or nullptr.
const CpuKernels* compiled_kernels(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return &scalar::kernels();
    case Isa::kAvx2:
#if defined(STOCHDEPTH_HAVE_AVX2)
      return &avx2::kernels();
#endif
      return nullptr;
    case Isa::kAvx512:
#if defined(STOCHDEPTH_HAVE_AVX512)
      return &avx512::kernels();
#endif
      return nullptr;
    case Isa::kAvx512Bf16:
#if defined(STOCHDEPTH_HAVE_AVX512)
      return &avx512_bf16::kernels();
#endif
      return nullptr;
    case Isa::kNeon:
#if defined(STOCHDEPTH_HAVE_NEON)
      return &neon::kernels();
#endif
      return nullptr;
  }
  return nullptr;
}

// Whether this CPU (and its OS) can run `isa`'s instructions.
bool cpu_runs(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return cpu_has_avx2_fma_f16c();
    case Isa::kAvx512:
      return cpu_has_avx512();
    case Isa::kAvx512Bf16:
      return cpu_has_avx512_bf16();
    case Isa::kNeon:
      // NEON (Advanced SIMD) is part of the aarch64 baseline: a build that compiled it runs it.
#if defined(__aarch64__)
      return true;
#else
      return false;
#endif
  }
  return false;
}

// The table for `isa`, or nullptr when this build lacks it or this CPU cannot run it.
const CpuKernels* kernels_for(Isa isa) { return cpu_runs(isa) ? compiled_kernels(isa) : nullptr; }

bool compiled(Isa isa) { return compiled_kernels(isa) != nullptr; }

// Accepts any compiled or uncompiled name; callers check support.
bool isa_from_name(const std::string& name, Isa& isa) {
  for (Isa i : kPriority) {
    if (name == isa_name(i)) {
      isa = i;
      return true;
    }
  }
  return false;
}

std::string supported_list() {
  std::string s;
  for (Isa i : supported_isas()) s += (s.empty() ? "" : ", ") + std::string(isa_name(i));
  return s;
}

[[noreturn]] void unsupported(const std::string& name) {
  throw std::invalid_argument("isa must be one of the ISAs this build and CPU support (" +
                              supported_list() + "), got '" + name + "'");
}

const CpuKernels* initial_kernels() {
  if (const char* env = std::getenv("STOCHDEPTH_CPU"); env && *env) {
    Isa isa;
    if (!isa_from_name(env, isa) || !isa_supported(isa)) {
      throw std::invalid_argument(
          std::string("STOCHDEPTH_CPU=") + env +
          " is not an ISA this build and CPU support; expected one of: " + supported_list());
    }
    return kernels_for(isa);
  }
  return kernels_for(supported_isas().front());
}

// Initialised on first use, so that a bad STOCHDEPTH_CPU raises from a call (the package's
// import calls get_isa()) and not while the library loads.
std::atomic<const CpuKernels*>& active_slot() {
  static std::atomic<const CpuKernels*> slot{initial_kernels()};
  return slot;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kNeon:
      return "neon";
    case Isa::kScalar:
      return "scalar";
  }
  return "?";
}

Isa supported_isa(const std::string& name) {
  Isa isa;
  if (!isa_from_name(name, isa) || !isa_supported(isa)) unsupported(name);
  return isa;
}

std::vector<Isa> compiled_isas() {
  std::vector<Isa> v;
  for (Isa i : kPriority)
    if (compiled(i)) v.push_back(i);
  return v;
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> v;
  for (Isa i : kPriority)
    if (kernels_for(i)) v.push_back(i);
  return v;
}

bool isa_supported(Isa isa) { return kernels_for(isa) != nullptr; }

Isa active_isa() { return active_slot().load()->isa; }

void set_isa(Isa isa) {
  const CpuKernels* k = kernels_for(isa);
  if (!k) unsupported(isa_name(isa));
  active_slot().store(k);
}

const CpuKernels& active_kernels() { return *active_slot().load(); }

void philox_block(Isa isa, const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
  const CpuKernels* k = kernels_for(isa);
  if (!k) unsupported(isa_name(isa));
  k->philox(counter, key, out);
}

}  // namespace stochdepth
