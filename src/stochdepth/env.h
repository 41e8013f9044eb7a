// The one parser of the library's integer environment settings (STOCHDEPTH_NUM_THREADS,
// STOCHDEPTH_CACHE_MB): digits only, range-checked, an error naming the variable
// (docs/design.md, "Errors"). Header-only so that each setting's owner includes it.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace stochdepth {

// The value of the environment variable `name`: `fallback` when unset or empty, else a decimal
// integer of digits only (no sign, no spaces, no suffix) in [lo, hi]; anything else throws
// std::invalid_argument (a ValueError in Python) naming the variable, the range and the text.
inline int64_t env_int(const char* name, int64_t lo, int64_t hi, int64_t fallback) {
  const char* env = std::getenv(name);
  if (!env || !*env) return fallback;
  const std::string text(env);
  auto fail = [&] {
    throw std::invalid_argument(std::string(name) + " must be an integer in [" +
                                std::to_string(lo) + ", " + std::to_string(hi) + "], got '" + text +
                                "'");
  };
  if (text.size() > 18) fail();  // also keeps the accumulation below within int64
  int64_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') fail();
    v = v * 10 + (c - '0');
  }
  if (v < lo || v > hi) fail();
  return v;
}

}  // namespace stochdepth
