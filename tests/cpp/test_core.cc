// The C++ core on its own (no Python), for every ISA this build compiled and this CPU runs:
// Philox4x32-10 known answers, the mask stream against mask.h, and the kernels bit for bit
// against a per-element computation written here with half.h. Built natively and, by
// tools/cross-aarch64, for aarch64 under qemu. Exits non-zero on any mismatch.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "drop_path.h"
#include "half.h"
#include "isa.h"
#include "mask.h"
#include "params.h"
#include "philox.h"
#include "thread_pool.h"

using namespace stochdepth;

namespace {

int g_failures = 0;

// Prints the first few failures in full; every one counts.
void fail(const std::string& what) {
  if (++g_failures <= 20) std::fprintf(stderr, "MISMATCH %s\n", what.c_str());
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%" PRIx64, v);
  return buf;
}

struct SplitMix {  // the test's own inputs; nothing to do with the mask stream
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
};

// ---- Philox4x32-10: the Random123 known answers (docs/design.md, "The mask stream")

struct Kat {
  uint32_t ctr[4], key[2], out[4];
};
constexpr Kat kKats[] = {
    {{0, 0, 0, 0}, {0, 0}, {0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8}},
    {{0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF},
     {0xFFFFFFFF, 0xFFFFFFFF},
     {0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD}},
    {{0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344},
     {0xA4093822, 0x299F31D0},
     {0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1}},
};

int check_philox(Isa isa) {
  int checks = 0;
  auto compare = [&](const uint32_t ctr[4], const uint32_t key[2], const uint32_t want[4],
                     const char* what) {
    uint32_t got[4];
    philox_block(isa, ctr, key, got);
    ++checks;
    for (int w = 0; w < 4; ++w) {
      if (got[w] != want[w]) {
        fail(std::string(isa_name(isa)) + " philox " + what + " ctr=" + hex(ctr[0]) + ".. word " +
             std::to_string(w) + ": got " + hex(got[w]) + ", want " + hex(want[w]));
      }
    }
  };
  for (const Kat& k : kKats) compare(k.ctr, k.key, k.out, "known answer");
  SplitMix rng{42};
  for (int i = 0; i < 256; ++i) {
    uint32_t ctr[4], key[2];
    for (uint32_t& c : ctr) c = static_cast<uint32_t>(rng.next());
    for (uint32_t& k : key) k = static_cast<uint32_t>(rng.next());
    const Philox4x32 want =
        philox4x32_10(Philox4x32{{ctr[0], ctr[1], ctr[2], ctr[3]}}, key[0], key[1]);
    compare(ctr, key, want.v, "random block vs philox.h");
  }
  return checks;
}

// ---- the mask stream: compute_mask (the active ISA's) against keep_sample (mask.h)

int check_mask(Isa isa) {
  const uint64_t seeds[] = {0, 1, 0x123456789ABCDEF0ull, ~0ull};
  const uint64_t offsets[] = {0, 7, (1ull << 40) | 3, ~0ull};
  const double ps[] = {0.0, 0.3, 0.5, 0.999, 1.0};
  const int64_t batches[] = {1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000};
  int checks = 0;
  for (uint64_t seed : seeds)
    for (uint64_t offset : offsets)
      for (double p : ps)
        for (int64_t batch : batches)
          for (bool batch_mode : {false, true}) {
            const uint64_t t = keep_threshold(p);
            std::vector<uint8_t> keep(static_cast<size_t>(batch) + 1, 0xEE);
            compute_mask(keep.data(), batch, seed, offset, t, batch_mode);
            ++checks;
            for (int64_t b = 0; b < batch; ++b) {
              const uint8_t want = keep_sample(seed, offset, batch_mode ? 0 : b, t) ? 1 : 0;
              if (keep[b] != want) {
                fail(std::string(isa_name(isa)) + " mask seed=" + hex(seed) + " offset=" +
                     hex(offset) + " p=" + std::to_string(p) + " batch=" + std::to_string(batch) +
                     (batch_mode ? " batch-mode" : "") + " b=" + std::to_string(b) + ": got " +
                     std::to_string(keep[b]) + ", want " + std::to_string(want));
                break;
              }
            }
            if (keep[batch] != 0xEE) fail(std::string(isa_name(isa)) + " mask wrote past batch");
          }
  return checks;
}

// ---- the kernels: per-dtype storage, conversions (half.h) and special values

struct F16 {
  using Bits = uint16_t;
  using C = float;
  static constexpr DType kType = DType::kFloat16;
  static constexpr const char* kName = "f16";
  static C to_c(Bits b) { return half_to_float(b); }
  static Bits from_c(C c) { return float_to_half(c); }
  static bool is_nan(Bits b) { return (b & 0x7FFF) > 0x7C00; }
  static constexpr Bits kOne = 0x3C00;
  // 1 + x is exactly half-way between two halves: 2^-11 ties down to 1, 3 * 2^-11 up to 1 + 2^-9.
  static constexpr Bits kHalfway[] = {0x1000, 0x1600, 0x9000};
  static constexpr Bits kSpecial[] = {
      0x7E00, 0x7E01, 0xFE3F, 0x7C01, 0x7D00, 0xFD55,   // NaNs, quiet and signalling, payloads
      0x7C00, 0xFC00, 0x0001, 0x83FF, 0x03FF, 0x0400,   // +-Inf, subnormals, the smallest normal
      0x8000, 0x0000, 0x7BFF, 0xFBFF, 0x3C00, 0x3555};  // -0, +0, +-65504, 1, 1/3
};

struct BF16 {
  using Bits = uint16_t;
  using C = float;
  static constexpr DType kType = DType::kBFloat16;
  static constexpr const char* kName = "bf16";
  static C to_c(Bits b) { return bf16_to_float(b); }
  static Bits from_c(C c) { return float_to_bf16(c); }
  static bool is_nan(Bits b) { return (b & 0x7FFF) > 0x7F80; }
  static constexpr Bits kOne = 0x3F80;
  static constexpr Bits kHalfway[] = {0x3B80, 0x3C40, 0xBB80};  // 2^-8, 3 * 2^-8, -2^-8
  static constexpr Bits kSpecial[] = {0x7FC0, 0x7FC1, 0xFFA5, 0x7F81, 0xFFC0, 0x7FFF,
                                      0x7F80, 0xFF80, 0x0001, 0x807F, 0x0080, 0x8000,
                                      0x0000, 0x7F7F, 0xFF7F, 0x3F80, 0x3EAB};
};

template <class B, class C>
B bit_cast_to(C c) {
  B b;
  std::memcpy(&b, &c, sizeof b);
  return b;
}

struct F32 {
  using Bits = uint32_t;
  using C = float;
  static constexpr DType kType = DType::kFloat32;
  static constexpr const char* kName = "f32";
  static C to_c(Bits b) { return bit_cast_to<float>(b); }
  static Bits from_c(C c) { return bit_cast_to<uint32_t>(c); }
  static bool is_nan(Bits b) { return (b & 0x7FFFFFFFu) > 0x7F800000u; }
  static constexpr Bits kOne = 0x3F800000;
  static constexpr Bits kHalfway[] = {0x33800000, 0x34400000, 0xB3800000};  // 2^-24, 3 * 2^-24
  static constexpr Bits kSpecial[] = {0x7FC00000, 0x7FC00001, 0xFFC12345, 0x7F800001, 0x7FA00000,
                                      0xFFBFFFFF, 0x7F800000, 0xFF800000, 0x00000001, 0x807FFFFF,
                                      0x00800000, 0x80000000, 0x00000000, 0x7F7FFFFF, 0xFF7FFFFF,
                                      0x3F800000, 0x3EAAAAAB, 0x33800000};
};

struct F64 {
  using Bits = uint64_t;
  using C = double;
  static constexpr DType kType = DType::kFloat64;
  static constexpr const char* kName = "f64";
  static C to_c(Bits b) { return bit_cast_to<double>(b); }
  static Bits from_c(C c) { return bit_cast_to<uint64_t>(c); }
  static bool is_nan(Bits b) { return (b & 0x7FFFFFFFFFFFFFFFull) > 0x7FF0000000000000ull; }
  static constexpr Bits kOne = 0x3FF0000000000000ull;
  static constexpr Bits kHalfway[] = {0x3CA0000000000000ull, 0x3CB8000000000000ull,
                                      0xBCA0000000000000ull};  // 2^-53, 3 * 2^-53, -2^-53
  static constexpr Bits kSpecial[] = {
      0x7FF8000000000000ull, 0x7FF8000000000001ull, 0xFFF0000000000001ull, 0x7FF4000000000000ull,
      0x7FF0000000000000ull, 0xFFF0000000000000ull, 0x0000000000000001ull, 0x800FFFFFFFFFFFFFull,
      0x0010000000000000ull, 0x8000000000000000ull, 0x0000000000000000ull, 0x7FEFFFFFFFFFFFFFull,
      0x3FF0000000000000ull, 0x3FD5555555555555ull};
};

// Inputs: a mix of special values, random bit patterns (every exponent, NaN payloads) and
// moderate values, where the rounding of the result matters most.
template <class Ty>
void fill(std::vector<typename Ty::Bits>& v, SplitMix& rng) {
  using Bits = typename Ty::Bits;
  constexpr size_t kNs = sizeof(Ty::kSpecial) / sizeof(Ty::kSpecial[0]);
  for (Bits& b : v) {
    const uint64_t r = rng.next();
    switch (r % 8) {
      case 0:
        b = Ty::kSpecial[(r >> 8) % kNs];
        break;
      case 1:
      case 2:
      case 3:
        b = static_cast<Bits>(r >> 8);
        break;
      default:
        b = Ty::from_c(static_cast<typename Ty::C>(rng.uniform() * 16.0 - 8.0));
    }
  }
}

enum class Layout { kFull, kCompactInput, kCompactOutput };

struct Case {
  int64_t outer = 1, batch = 1, inner = 1;
  bool training = true, shortcut = true, in_place = false, batch_mode = false;
  Layout layout = Layout::kFull;
  double p = 0.5;
  Scaling scaling = Scaling::kTraining;
  uint64_t seed = 0, offset = 0;
  int64_t mis_x = 0, mis_sc = 0, mis_out = 0;  // elements off the allocation's alignment
  bool threads = false;  // split over the pool and write with streaming stores even when small
  int64_t channels = 0;  // the layer scale's length (dividing inner), 0: no gamma

  std::string str() const {
    char buf[320];
    std::snprintf(buf, sizeof buf,
                  "[outer=%" PRId64 " batch=%" PRId64 " inner=%" PRId64
                  " %s%s%s%s%s p=%g scaling=%s seed=%s offset=%s mis=%" PRId64 "/%" PRId64
                  "/%" PRId64 "%s gamma=%" PRId64 "]",
                  outer, batch, inner, training ? "training" : "inference",
                  shortcut ? " shortcut" : " no-shortcut", in_place ? " in-place" : "",
                  batch_mode ? " batch-mode" : "",
                  layout == Layout::kCompactInput    ? " compact-input"
                  : layout == Layout::kCompactOutput ? " compact-output"
                                                     : "",
                  p, scaling == Scaling::kTraining ? "training" : "inference", hex(seed).c_str(),
                  hex(offset).c_str(), mis_x, mis_sc, mis_out, threads ? " threads" : "", channels);
    return buf;
  }
};

constexpr int64_t kGuard = 40;  // elements either side of every buffer: more than a vector

// The `front` elements before a buffer's data and the kGuard after it are as they were.
template <class Bits>
bool same_guards(const std::vector<Bits>& now, const std::vector<Bits>& before, int64_t front) {
  for (int64_t g = 0; g < front; ++g)
    if (now[g] != before[g]) return false;
  for (int64_t g = 0; g < kGuard; ++g)
    if (now.rbegin()[g] != before.rbegin()[g]) return false;
  return true;
}

// Runs one case through drop_path and compares every element, the untouched guards and the
// inputs bit for bit with the straightforward computation. Returns the elements compared.
template <class Ty>
int64_t check_case(Isa isa, const Case& c, SplitMix& rng) {
  using Bits = typename Ty::Bits;
  using C = typename Ty::C;
  const std::string where = std::string(isa_name(isa)) + " " + Ty::kName + " " + c.str();

  DropPathParams params;
  params.outer = c.outer;
  params.batch = c.batch;
  params.inner = c.inner;
  params.dtype = Ty::kType;
  params.training = c.training;
  params.batch_mode = c.batch_mode;
  params.seed = c.seed;
  params.offset = c.offset;
  params.compact_input = c.layout == Layout::kCompactInput;
  params.compact_output = c.layout == Layout::kCompactOutput;
  set_scalars(params, c.p, c.scaling);
  // The threshold and factor from docs/design.md ("The mask stream", "Semantics"), not from
  // set_scalars: T = floor(p * 2^32); s = 1/p (training scaling, p > 0) or 1 when training,
  // p (inference scaling) or 1 at inference; in double, rounded once to float.
  const uint64_t threshold = keep_threshold(c.p);
  const double s64 = c.training ? (c.scaling == Scaling::kTraining && c.p > 0 ? 1.0 / c.p : 1.0)
                                : (c.scaling == Scaling::kInference ? c.p : 1.0);
  const C s = static_cast<C>(s64);
  if (params.threshold != threshold || params.scale_f64 != s64 ||
      params.scale_f32 != static_cast<float>(s64)) {
    fail(where + ": set_scalars gave threshold " + hex(params.threshold) + " and scale " +
         std::to_string(params.scale_f64));
  }

  std::vector<uint8_t> keep(static_cast<size_t>(c.batch));
  std::vector<int64_t> kept_index(keep.size());
  int64_t n_kept = 0;
  for (int64_t b = 0; b < c.batch; ++b) {
    keep[b] = !c.training ||
              keep_sample(c.seed, c.offset, c.batch_mode ? 0 : static_cast<uint64_t>(b), threshold);
    kept_index[b] = n_kept;
    n_kept += keep[b];
  }
  const int64_t full = c.outer * c.batch * c.inner;
  const int64_t compact = c.outer * n_kept * c.inner;
  const int64_t nx = params.compact_input ? compact : full;
  const int64_t nout = params.compact_output ? compact : full;

  std::vector<Bits> xbuf(static_cast<size_t>(2 * kGuard + c.mis_x + nx));
  std::vector<Bits> scbuf(static_cast<size_t>(2 * kGuard + c.mis_sc + full));
  std::vector<Bits> outbuf(static_cast<size_t>(2 * kGuard + c.mis_out + nout));
  fill<Ty>(xbuf, rng);
  fill<Ty>(scbuf, rng);
  for (Bits& b : outbuf) b = static_cast<Bits>(0xA5A5A5A5A5A5A5A5ull);
  Bits* x = xbuf.data() + kGuard + c.mis_x;
  Bits* sc = scbuf.data() + kGuard + c.mis_sc;
  // Pairs whose sum lies exactly half-way between two representable values (with s = 1).
  constexpr size_t kNh = sizeof(Ty::kHalfway) / sizeof(Ty::kHalfway[0]);
  for (int64_t e = 0; e < full && e < nx; e += 7) {
    sc[e] = Ty::kOne;
    x[e] = Ty::kHalfway[static_cast<size_t>(e / 7) % kNh];
  }
  // The layer scale: moderate values with a few specials (docs/design.md, "Layer scale").
  std::vector<Bits> gbuf(static_cast<size_t>(2 * kGuard + c.channels));
  fill<Ty>(gbuf, rng);
  const Bits* gamma = gbuf.data() + kGuard;
  const std::vector<Bits> xbuf0 = xbuf, scbuf0 = scbuf, outbuf0 = outbuf, gbuf0 = gbuf;

  // The expected output, element by element: docs/design.md, "Semantics" and "Arithmetic"; with
  // gamma, "Layer scale": t = gamma * x, then s * t, then the add.
  auto op = [&](const Bits* scp, Bits xb, int64_t e) {
    const C t = c.channels ? Ty::to_c(gamma[e % c.channels]) * Ty::to_c(xb) : Ty::to_c(xb);
    const C scaled = s * t;
    return Ty::from_c(scp ? Ty::to_c(*scp) + scaled : scaled);
  };
  // What each output element is: not written (compact rows only), a copy or zero (bit for
  // bit), or computed (bit for bit, except that a NaN only has to be a NaN: docs/design.md,
  // "NaN and non-finite values").
  enum Kind : uint8_t { kNotWritten, kCopy, kComputed };
  std::vector<Bits> want(static_cast<size_t>(nout));
  std::vector<Kind> kind(static_cast<size_t>(nout), kNotWritten);
  std::vector<int64_t> from(static_cast<size_t>(nout)),
      xfrom(static_cast<size_t>(nout), -1);  // the shortcut and input elements used
  for (int64_t o = 0; o < c.outer; ++o)
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t i = 0; i < c.inner; ++i) {
        const int64_t e = (o * c.batch + b) * c.inner + i;
        const int64_t k = (o * n_kept + kept_index[b]) * c.inner + i;  // compact index if kept
        const Bits* scp = c.shortcut ? sc + e : nullptr;
        if (params.compact_output) {
          if (keep[b])
            want[k] = op(nullptr, x[e], e), kind[k] = kComputed, from[k] = e, xfrom[k] = e;
        } else if (keep[b]) {
          const int64_t xi = params.compact_input ? k : e;
          want[e] = op(scp, x[xi], e), kind[e] = kComputed, from[e] = e, xfrom[e] = xi;
        } else {
          want[e] = scp ? *scp : Bits{0}, kind[e] = kCopy, from[e] = e;
        }
      }

  params.shortcut = c.shortcut ? sc : nullptr;
  params.input = x;
  if (c.channels) {
    params.gamma = gamma;
    params.channels = static_cast<int32_t>(c.channels);
  }
  Bits* out = c.in_place ? sc : outbuf.data() + kGuard + c.mis_out;
  params.out = out;
  const int64_t threshold0 = parallel_threshold_bytes();
  const int64_t stream0 = cpu_stream_threshold_bytes();
  const int threads0 = num_threads();
  if (c.threads) {
    set_parallel_threshold_bytes(0);
    set_cpu_stream_threshold_bytes(0);
    set_num_threads(4);
  }
  try {
    drop_path(params, Device{}, nullptr);
  } catch (const std::exception& ex) {
    fail(where + ": threw " + ex.what());
  }
  set_parallel_threshold_bytes(threshold0);
  set_cpu_stream_threshold_bytes(stream0);
  set_num_threads(threads0);

  int reported = 0;
  for (int64_t e = 0; e < nout; ++e) {
    if (kind[e] == kNotWritten || out[e] == want[e]) continue;
    if (kind[e] == kComputed && Ty::is_nan(want[e]) && Ty::is_nan(out[e])) continue;
    if (reported++ < 3) {
      fail(where + (kind[e] == kCopy ? " dropped" : " kept") + " element " + std::to_string(e) +
           ": got " + hex(out[e]) + ", want " + hex(want[e]) + " (shortcut " +
           (c.shortcut ? hex(scbuf0[static_cast<size_t>(kGuard + c.mis_sc + from[e])]) : "none") +
           ", input " + (xfrom[e] >= 0 ? hex(x[xfrom[e]]) : "not read") + ")");
    }
  }
  if (reported > 3) fail(where + ": " + std::to_string(reported) + " elements differ");
  // Nothing outside the output is written, and the inputs are not (the shortcut only in place).
  if (xbuf != xbuf0) fail(where + ": the input was modified");
  if (gbuf != gbuf0) fail(where + ": gamma was modified");
  if (c.in_place) {
    if (!same_guards(scbuf, scbuf0, kGuard + c.mis_sc))
      fail(where + ": wrote outside the in-place output");
  } else {
    if (scbuf != scbuf0) fail(where + ": the shortcut was modified");
    if (!same_guards(outbuf, outbuf0, kGuard + c.mis_out))
      fail(where + ": wrote outside the output");
  }
  return nout;
}

struct Counts {
  int64_t cases = 0, elements = 0;
};

template <class Ty>
void check_kernels(Isa isa, Counts& n) {
  SplitMix rng{0x5EED0000u + static_cast<uint64_t>(Ty::kType)};
  const double ps[] = {0.5, 0.7, 1.0, 0.0, 0.3};
  int idx = 0;
  auto run = [&](Case c) {
    c.seed = rng.next();
    c.offset = idx % 3 == 0 ? rng.next() : rng.next() % 1000;
    c.mis_x = idx % 4;
    c.mis_sc = (idx / 4) % 4;
    c.mis_out = c.in_place ? c.mis_sc : (idx + 1) % 3;
    n.elements += check_case<Ty>(isa, c, rng);
    ++n.cases;
    // The same case with the layer scale: gamma over the whole row, or over a part of it that
    // repeats (channels dividing inner), so that spans wrap around gamma.
    c.channels = c.inner;
    for (int64_t d : {3, 2, 5})
      if (idx % 2 && c.inner % d == 0 && c.inner > d) c.channels = c.inner / d;
    n.elements += check_case<Ty>(isa, c, rng);
    ++n.cases;
    ++idx;
  };

  // Inference: the whole range is one span. Every length up to and past two vectors of the
  // widest ISA, each with a different misalignment.
  for (int64_t len = 1; len <= 70; ++len) {
    Case c;
    c.training = false;
    c.inner = len;
    c.shortcut = len % 3 != 0;
    c.in_place = c.shortcut && len % 5 == 0;
    c.p = 0.7;
    c.scaling = len % 2 ? Scaling::kInference : Scaling::kTraining;
    run(c);
  }
  // Training: short rows (per-element loop), rows around the vector and cache-line widths
  // (body + tail), long rows; every output form; some split over threads mid-row.
  const int64_t inners[] = {1,  2,  3,  5,  7,  8,  9,  15,  16,  17,  31,
                            32, 33, 34, 47, 63, 64, 65, 100, 129, 1000};
  const int64_t batches[] = {1, 6, 17};
  for (int64_t inner : inners)
    for (int64_t batch : batches)
      for (int variant = 0; variant < 6; ++variant) {
        Case c;
        c.inner = inner;
        c.batch = batch;
        c.outer = inner * batch < 2000 ? 3 : 1;
        c.shortcut = variant != 2 && variant != 4 && variant != 5;
        c.in_place = variant == 1;
        c.layout = variant == 3 || variant == 5 ? Layout::kCompactInput
                   : variant == 4               ? Layout::kCompactOutput
                                                : Layout::kFull;
        c.p = ps[idx % 5];
        c.scaling = idx % 2 ? Scaling::kInference : Scaling::kTraining;
        c.batch_mode = idx % 7 == 0;
        c.threads = idx % 3 == 0;
        run(c);
      }
  // Outputs of 4 MiB and more, with odd row lengths so that rows start anywhere in a cache
  // line: with the default store policy, then streaming and split over the pool.
  const int64_t big =
      (int64_t{4} << 20) / static_cast<int64_t>(sizeof(typename Ty::Bits)) / 16 + 37;
  for (int variant = 0; variant < 6; ++variant) {
    Case c;
    c.threads = variant >= 3;
    c.outer = 2;
    c.batch = 8;
    c.inner = big;
    c.training = variant % 3 != 2;
    c.shortcut = variant % 3 != 1;
    c.p = 0.5;
    run(c);
  }
}

// The backward pass with the layer scale (drop_path_backward_gamma; docs/design.md, "Layer
// scale"): grad_residual element by element, grad_gamma as the pinned column sums written here
// (rows of `channels` cut into blocks of 64 rows; each block sums its kept rows in row order into
// +0; the block sums are added in block order into +0; one rounding), on one thread and split
// over four, bit for bit (a NaN only has to be a NaN). Dropped rows' grad_out and residual are
// NaN here: they must not be read.
template <class Ty>
void check_gamma_backward(Isa isa, Counts& n) {
  using Bits = typename Ty::Bits;
  using C = typename Ty::C;
  SplitMix rng{0x6A77A000u + static_cast<uint64_t>(Ty::kType)};
  struct Shape {
    int64_t outer, batch, inner, channels;
  };
  const Shape shapes[] = {{1, 4, 1, 1},   {1, 7, 5, 5},   {2, 6, 12, 4},    {3, 5, 64, 64},
                          {1, 9, 33, 33}, {2, 3, 96, 32}, {1, 130, 7, 7},   {1, 3, 4096, 16},
                          {4, 65, 3, 3},  {1, 1, 200, 8}, {1, 17, 129, 129}};
  int idx = 0;
  for (const Shape& sh : shapes)
    for (int variant = 0; variant < 4; ++variant) {
      const bool training = variant != 3, threads = variant % 2 == 1;
      const double p = variant == 2 ? 1.0 : 0.6;
      const Scaling scaling = idx % 2 ? Scaling::kTraining : Scaling::kInference;
      const uint64_t seed = rng.next(), offset = rng.next() % 100;
      const bool batch_mode = idx % 5 == 4;
      ++idx;
      char buf[200];
      std::snprintf(buf, sizeof buf,
                    "%s %s gamma backward [outer=%" PRId64 " batch=%" PRId64 " inner=%" PRId64
                    " channels=%" PRId64 " %s p=%g%s%s]",
                    isa_name(isa), Ty::kName, sh.outer, sh.batch, sh.inner, sh.channels,
                    training ? "training" : "inference", p, threads ? " threads" : "",
                    batch_mode ? " batch-mode" : "");
      const std::string where = buf;

      DropPathParams params;
      params.outer = sh.outer;
      params.batch = sh.batch;
      params.inner = sh.inner;
      params.dtype = Ty::kType;
      params.training = training;
      params.batch_mode = batch_mode;
      params.seed = seed;
      params.offset = offset;
      set_scalars(params, p, scaling);
      const double s64 = training ? (scaling == Scaling::kTraining ? 1.0 / p : 1.0)
                                  : (scaling == Scaling::kInference ? p : 1.0);
      const C s = static_cast<C>(s64);
      const int64_t numel = sh.outer * sh.batch * sh.inner, ch = sh.channels;
      const int64_t rows = numel / ch;
      auto kept = [&](int64_t r) {
        const int64_t b = (r * ch / sh.inner) % sh.batch;
        return !training || keep_sample(seed, offset, batch_mode ? 0 : static_cast<uint64_t>(b),
                                        keep_threshold(p));
      };
      const Bits nan = Ty::from_c(std::numeric_limits<C>::quiet_NaN());
      std::vector<Bits> grad(static_cast<size_t>(numel)), res(grad.size()),
          gamma(static_cast<size_t>(ch));
      for (auto* v : {&grad, &res, &gamma})
        for (Bits& b : *v) b = Ty::from_c(static_cast<C>(rng.uniform() * 4.0 - 2.0));
      for (int64_t r = 0; r < rows; ++r)
        if (!kept(r))
          for (int64_t i = 0; i < ch; ++i) grad[r * ch + i] = res[r * ch + i] = nan;

      std::vector<Bits> want(grad.size()), want_gg(gamma.size());
      std::vector<C> total(static_cast<size_t>(ch), C(0));
      for (int64_t b0 = 0; b0 < rows; b0 += 64) {
        std::vector<C> part(static_cast<size_t>(ch), C(0));
        for (int64_t r = b0; r < std::min(rows, b0 + 64); ++r) {
          for (int64_t i = 0; i < ch; ++i) {
            const int64_t e = r * ch + i;
            if (!kept(r)) {
              want[e] = Bits{0};
              continue;
            }
            const C v = s * Ty::to_c(grad[e]);
            want[e] = Ty::from_c(Ty::to_c(gamma[i]) * v);
            part[i] = part[i] + v * Ty::to_c(res[e]);
          }
        }
        for (int64_t i = 0; i < ch; ++i) total[i] = total[i] + part[i];
      }
      for (int64_t i = 0; i < ch; ++i) want_gg[i] = Ty::from_c(total[i]);

      std::vector<Bits> out(grad.size(), static_cast<Bits>(0xA5A5A5A5A5A5A5A5ull));
      std::vector<Bits> gg(gamma.size(), static_cast<Bits>(0xA5A5A5A5A5A5A5A5ull));
      params.input = grad.data();
      params.out = out.data();
      params.gamma = gamma.data();
      params.channels = static_cast<int32_t>(ch);
      const int64_t threshold0 = parallel_threshold_bytes();
      const int threads0 = num_threads();
      if (threads) {
        set_parallel_threshold_bytes(0);
        set_num_threads(4);
      }
      try {
        drop_path_backward_gamma(params, res.data(), gg.data(), Device{}, nullptr);
      } catch (const std::exception& ex) {
        fail(where + ": threw " + ex.what());
      }
      set_parallel_threshold_bytes(threshold0);
      set_num_threads(threads0);
      int reported = 0;
      auto same = [](Bits a, Bits b) { return a == b || (Ty::is_nan(a) && Ty::is_nan(b)); };
      for (int64_t e = 0; e < numel; ++e)
        if (!same(out[e], want[e]) && reported++ < 3)
          fail(where + " grad_residual element " + std::to_string(e) + ": got " + hex(out[e]) +
               ", want " + hex(want[e]));
      for (int64_t i = 0; i < ch; ++i)
        if (!same(gg[i], want_gg[i]) && reported++ < 6)
          fail(where + " grad_gamma[" + std::to_string(i) + "]: got " + hex(gg[i]) + ", want " +
               hex(want_gg[i]));
      ++n.cases;
      n.elements += numel;
    }
  // No rows: grad_gamma is +0.
  DropPathParams empty;
  empty.batch = 0;
  empty.inner = 3;
  empty.dtype = Ty::kType;
  empty.channels = 3;
  std::vector<Bits> gamma(3, Ty::kOne), gg(3, static_cast<Bits>(0xA5A5A5A5A5A5A5A5ull));
  empty.gamma = gamma.data();
  set_scalars(empty, 0.5, Scaling::kTraining);
  drop_path_backward_gamma(empty, nullptr, gg.data(), Device{}, nullptr);
  for (Bits b : gg)
    if (b != Bits{0}) fail(std::string(isa_name(isa)) + " " + Ty::kName + ": no rows, grad_gamma");
}

// stream_copy: the bytes, nothing outside them, through copy_range with and without streaming.
int check_copy(Isa isa) {
  const size_t sizes[] = {1, 63, 64, 65, 4095, (size_t{4} << 20) + 13};
  SplitMix rng{7};
  int checks = 0;
  const int64_t stream0 = cpu_stream_threshold_bytes();
  for (int64_t threshold : {stream0, int64_t{0}})  // the default policy, then always streaming
    for (size_t bytes : sizes)
      for (size_t mis = 0; mis < 3; ++mis) {
        set_cpu_stream_threshold_bytes(threshold);
        std::vector<uint8_t> src(bytes + 128), dst(bytes + 128, 0x5A);
        for (uint8_t& b : src) b = static_cast<uint8_t>(rng.next());
        const std::vector<uint8_t> dst0 = dst;
        stream_copy(dst.data() + 64 + mis, src.data() + 64 + 2 * mis, bytes, Device{}, nullptr);
        ++checks;
        if (std::memcmp(dst.data() + 64 + mis, src.data() + 64 + 2 * mis, bytes) != 0 ||
            std::memcmp(dst.data(), dst0.data(), 64 + mis) != 0 ||
            std::memcmp(dst.data() + 64 + mis + bytes, dst0.data() + 64 + mis + bytes, 64 - mis) !=
                0) {
          fail(std::string(isa_name(isa)) + " stream_copy of " + std::to_string(bytes) +
               " bytes, misaligned by " + std::to_string(mis) + ", stream threshold " +
               std::to_string(threshold));
        }
      }
  set_cpu_stream_threshold_bytes(stream0);
  return checks;
}

// params_from_raw: the checks of a raw call (std::invalid_argument), then the fields as given and
// the scalars of set_scalars.
void check_params_from_raw() {
  alignas(8) uint64_t words[2] = {0, 0};
  const auto w = reinterpret_cast<uintptr_t>(words);
  auto raw = [&](double p, int64_t batch, uintptr_t rng_words) {
    return params_from_raw(16, 32, 48, 2, batch, 5, DType::kBFloat16, p, true, true,
                           Scaling::kTraining, 7, 9, true, false, rng_words);
  };
  auto refused = [&](double p, int64_t batch, uintptr_t rng_words, const char* what) {
    try {
      raw(p, batch, rng_words);
      fail(std::string("params_from_raw accepted ") + what);
    } catch (const std::invalid_argument&) {
    }
  };
  refused(1.5, 3, 0, "survival_prob 1.5");
  refused(-1e-9, 3, 0, "a negative survival_prob");
  refused(std::numeric_limits<double>::quiet_NaN(), 3, 0, "a NaN survival_prob");
  refused(0.5, -1, 0, "batch -1");
  refused(0.5, 3, w + 4, "a misaligned rng_words");
  const DropPathParams p = raw(0.8, 3, w);
  DropPathParams want;
  set_scalars(want, 0.8, Scaling::kTraining);
  if (p.shortcut != reinterpret_cast<const void*>(16) || p.input != reinterpret_cast<void*>(32) ||
      p.out != reinterpret_cast<void*>(48) || p.outer != 2 || p.batch != 3 || p.inner != 5 ||
      p.dtype != DType::kBFloat16 || !p.training || !p.batch_mode || p.seed != 7 || p.offset != 9 ||
      !p.compact_input || p.compact_output || p.rng_words != words ||
      p.threshold != want.threshold || p.scale_f64 != want.scale_f64 ||
      p.scale_f32 != want.scale_f32) {
    fail("params_from_raw: the fields differ from its arguments");
  }
}

bool contains(const std::vector<Isa>& v, Isa isa) {
  for (Isa i : v)
    if (i == isa) return true;
  return false;
}

std::string names(const std::vector<Isa>& v) {
  std::string s;
  for (Isa i : v) s += (s.empty() ? "" : ", ") + std::string(isa_name(i));
  return s;
}

// The ISA lists: this architecture's best ISA compiled (and, on aarch64, supported and active).
void check_isa_lists(Isa active) {
  const std::vector<Isa> compiled = compiled_isas(), supported = supported_isas();
  std::printf("compiled ISAs: %s\nsupported ISAs: %s\nactive ISA: %s\n", names(compiled).c_str(),
              names(supported).c_str(), isa_name(active));
  if (compiled.empty() || compiled.back() != Isa::kScalar)
    fail("compiled ISAs must end with scalar");
  for (Isa i : supported)
    if (!contains(compiled, i)) fail(std::string("supported but not compiled: ") + isa_name(i));
#if defined(__aarch64__)
  if (!contains(compiled, Isa::kNeon)) fail("aarch64: neon is not compiled");
  if (!contains(supported, Isa::kNeon)) fail("aarch64: neon is not supported");
  const char* forced = std::getenv("STOCHDEPTH_CPU");
  if (!(forced && *forced) && active != Isa::kNeon) fail("aarch64: the active ISA is not neon");
#elif defined(__x86_64__)
  if (!contains(compiled, Isa::kAvx2)) fail("x86_64: avx2 is not compiled");
#endif
  if (const char* expect = std::getenv("STOCHDEPTH_EXPECT_ISA"); expect && *expect) {
    if (std::string(isa_name(active)) != expect) {
      fail(std::string("active ISA is ") + isa_name(active) + ", STOCHDEPTH_EXPECT_ISA=" + expect);
    }
  }
}

}  // namespace

int main() {
  try {
    const Isa active = active_isa();
    check_isa_lists(active);
    check_params_from_raw();
    for (Isa isa : supported_isas()) {
      const int before = g_failures;
      set_isa(isa);
      const int philox = check_philox(isa);
      const int mask = check_mask(isa);
      Counts n;
      check_kernels<F16>(isa, n);
      check_kernels<BF16>(isa, n);
      check_kernels<F32>(isa, n);
      check_kernels<F64>(isa, n);
      check_gamma_backward<F16>(isa, n);
      check_gamma_backward<BF16>(isa, n);
      check_gamma_backward<F32>(isa, n);
      check_gamma_backward<F64>(isa, n);
      const int copies = check_copy(isa);
      std::printf("%-12s philox %d blocks, masks %d, kernels %" PRId64 " cases / %" PRId64
                  " elements, copies %d: %s\n",
                  isa_name(isa), philox, mask, n.cases, n.elements, copies,
                  g_failures == before ? "ok" : "FAILED");
    }
    set_isa(active);
  } catch (const std::exception& ex) {
    fail(std::string("exception: ") + ex.what());
  }
  if (g_failures) {
    std::fprintf(stderr, "FAILED: %d mismatches\n", g_failures);
    return 1;
  }
  std::printf("all ok\n");
  return 0;
}
