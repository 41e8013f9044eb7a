// CPU ISA selection (isa.cc): the Isa enum, what this build compiled and this CPU supports, the
// active kernel table and the conversion of ISA names, which happens once, at the edge (the
// bindings, STOCHDEPTH_CPU). No kernels and no threading here (docs/design.md, "CPU kernels,
// threads and memory").
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace stochdepth {

// In priority order: the first one this CPU supports is the default. x86-64 builds compile
// avx512_bf16, avx512 and avx2; aarch64 builds compile neon; every build compiles scalar.
enum class Isa : uint8_t { kAvx512Bf16, kAvx512, kAvx2, kNeon, kScalar };

const char* isa_name(Isa isa);  // "avx512_bf16", "avx512", "avx2", "neon", "scalar"
// The ISA named `name` if this build compiled it and this CPU supports it; otherwise throws
// std::invalid_argument naming the supported ones.
Isa supported_isa(const std::string& name);

std::vector<Isa> compiled_isas();   // best first; always ends with kScalar
std::vector<Isa> supported_isas();  // the compiled ones this CPU runs, best first
bool isa_supported(Isa isa);

// The active ISA: the best supported one, or STOCHDEPTH_CPU (read once, at first use; an
// unknown or unsupported name throws std::invalid_argument then). Switching is atomic: a call
// already running keeps the table it started with.
Isa active_isa();
void set_isa(Isa isa);  // throws std::invalid_argument if unsupported

// One Philox4x32-10 block computed by the given ISA's code (known-answer tests).
void philox_block(Isa isa, const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]);

}  // namespace stochdepth
