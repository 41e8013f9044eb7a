// The dense drop-path kernel body (forward, inference, backward and the single-input form), as
// host/device phases split at its one barrier: launched on the GPU by drop_path.cu and run block
// by block, thread by thread on the CPU by emulator.cu (the CI tests of this very code).
#pragma once
#include <cstdint>

#include "kernel_common.cuh"

namespace stochdepth {

// out = shortcut + (scale * input) per row (o, b) of [outer, batch, inner], or the dropped form
// (drop_path.h). The flat tensor is cut into tiles; tile k covers elements
// [k * kTile - lead, (k + 1) * kTile - lead), so that with V > 1 every full chunk is 16-byte
// aligned in all three tensors. Phase 0: the shortcut's loads go out (out of place, every
// shortcut element is read whatever the mask says, so DRAM is busy while Philox runs) and the
// keep bit of every row the tile touches goes to shared memory (one draw per row, one Philox
// block per 4 consecutive samples). Phase 1: all kept -> vector loads and store; all dropped ->
// the shortcut's bits (or zeros), input not read, and nothing at all in place; a chunk across a
// row boundary -> input read only for kept elements, and in place only kept elements stored.
// Chunks cut by the ends of the tensor go element by element. kG: the layer scale (docs/design.md,
// "Layer scale"), out = shortcut + (scale * (gamma[e % channels] * input)); gamma is read for the
// kept elements only. kG = false is the op without gamma, its code unchanged.
template <typename T, int V, bool kG = false>
struct DenseKernel {
  using Args = KernelParams;
  using A = Arith<T>;
  using C = typename A::C;
  using P = Packed<T, V>;
  static constexpr int kPhases = 2;
  static constexpr int kChunks = launch::kChunksPerThread;
  static constexpr int64_t kTile = launch::tile_elems(V);
  static constexpr uint32_t kFull = (1u << V) - 1u;

  // A tile of kTile elements touches at most kTile rows (inner = 1); one byte per row.
  struct Shared {
    uint8_t keep[kTile];
  };
  struct Thread {
    int64_t tile_start, origin, nrows;
    bool uniform;
    // Chunk u starts at element e[u]; bit u of `whole` says it lies inside the tensor (a bit set
    // rather than bool[]: predicate registers are few and bools spill).
    int64_t e[kChunks];
    uint32_t whole;
    P s[kChunks];
  };

  // Local row of element offset `off` (0 <= off < inner + kTile) from row r0's start.
  STOCHDEPTH_KERNEL_FN static int64_t local_row(const Args& a, int64_t off) {
    if (a.p.inner >= kTile) return off >= a.p.inner ? 1 : 0;               // off < 2 * inner
    return static_cast<uint32_t>(off) / static_cast<uint32_t>(a.p.inner);  // off < 2 * kTile
  }

  // The layer scale's element: scale * (gamma[ch] * x), each multiply rounded on its own
  // (docs/design.md, "Layer scale").
  STOCHDEPTH_KERNEL_FN static C scaled_gamma(const Args& a, C scale, uint32_t ch, T x) {
    return A::mul(scale, A::mul(A::load(static_cast<const T*>(a.p.gamma)[ch]), A::load(x)));
  }
  // The channel of element e >= 0 (kG only: 0 without gamma, never used).
  STOCHDEPTH_KERNEL_FN static uint32_t channel_of(const Args& a, int64_t e) {
    if constexpr (kG) {
      return static_cast<uint32_t>(static_cast<uint64_t>(e) % static_cast<uint32_t>(a.p.channels));
    } else {
      (void)a;
      (void)e;
      return 0;
    }
  }
  // ch + step modulo channels, both below channels (< 2**31): no overflow in 32 bits.
  STOCHDEPTH_KERNEL_FN static uint32_t channel_add(const Args& a, uint32_t ch, uint32_t step) {
    ch += step;
    return ch >= static_cast<uint32_t>(a.p.channels) ? ch - a.p.channels : ch;
  }

  STOCHDEPTH_KERNEL_FN static void phase(int ph, const Args& a, Idx id, Shared& sh, Thread& t) {
    if (ph == 0) {
      load_and_draw(a, id, sh, t);
    } else {
      compute_and_store(a, id, sh, t);
    }
  }

  STOCHDEPTH_KERNEL_FN static void load_and_draw(const Args& a, Idx id, Shared& sh, Thread& t) {
    const T* sc = static_cast<const T*>(a.p.shortcut);
    t.tile_start = static_cast<int64_t>(id.block) * kTile - a.lead;
    const int64_t first = t.tile_start > 0 ? t.tile_start : 0;
    const int64_t last = (t.tile_start + kTile < a.numel ? t.tile_start + kTile : a.numel) - 1;
    const int64_t r0 = first / a.p.inner;  // rows (o * batch + b) of the tile: r0 .. r0 + nrows - 1
    t.nrows = last / a.p.inner - r0 + 1;
    t.origin = r0 * a.p.inner;  // element offsets below are taken from row r0's start
    // One decision for the whole tile: inference, "batch" mode, or a tile inside one row.
    t.uniform = !a.p.training || a.p.batch_mode || t.nrows == 1;

    t.whole = 0;
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      t.e[u] = t.tile_start + (int64_t{u} * launch::kThreads + id.thread) * V;
      t.whole |= uint32_t{t.e[u] >= 0 && t.e[u] + V <= a.numel} << u;
    }
    if (sc != nullptr && !a.in_place) {
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (t.whole & (1u << u)) t.s[u] = load_once<T, V>(sc + t.e[u]);
      }
    }

    if (!a.p.training) return;
    const RngWords key = rng_words(a.p.seed, a.p.offset, a.p.rng_words);
    if (a.p.batch_mode) {
      if (id.thread == 0) sh.keep[0] = keep_sample(key.seed, key.offset, 0, a.p.threshold);
      return;
    }
    const uint64_t batch = static_cast<uint64_t>(a.p.batch);
    const uint64_t b_first = static_cast<uint64_t>(r0) % batch;
    // b_first + lr < batch + kTile: 32-bit remainders suffice unless the batch is huge.
    const bool narrow = batch <= (uint64_t{1} << 31);
    // Thread groups of 4 rows start where a Philox block starts (b = 0 mod 4), so each group
    // needs one block (two where the batch wraps inside it).
    const int64_t shift = static_cast<int64_t>(b_first & 3);
    for (int64_t g = id.thread; 4 * g - shift < t.nrows; g += launch::kThreads) {
      DrawCache cache;
      const int64_t lr_begin = 4 * g - shift > 0 ? 4 * g - shift : 0;
      const int64_t lr_end = 4 * g - shift + 4 < t.nrows ? 4 * g - shift + 4 : t.nrows;
      for (int64_t lr = lr_begin; lr < lr_end; ++lr) {
        uint64_t b = b_first + static_cast<uint64_t>(lr);
        if (b >= batch) {
          b = narrow ? static_cast<uint32_t>(b) % static_cast<uint32_t>(batch) : b % batch;
        }
        sh.keep[lr] = cache.keep(key.seed, key.offset, b, a.p.threshold);
      }
    }
  }

  STOCHDEPTH_KERNEL_FN static void compute_and_store(const Args& a, Idx, const Shared& sh,
                                                     Thread& t) {
    const T* sc = static_cast<const T*>(a.p.shortcut);
    const T* STOCHDEPTH_RESTRICT in = static_cast<const T*>(a.p.input);
    T* out = static_cast<T*>(a.p.out);
    const C scale = scale_in<C>(a.p);
    if (a.p.training && t.uniform && a.in_place && !sh.keep[0]) return;  // dropped tile in place

    // The keep bits of the elements of each whole chunk.
    uint32_t km[kChunks];
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      const bool is_whole = (t.whole >> u) & 1u;
      km[u] = kFull;
      if (is_whole && !t.uniform) {
        const int64_t off = t.e[u] - t.origin;
        int64_t lr = local_row(a, off);
        int64_t col = off - lr * a.p.inner;
        if (col + V <= a.p.inner) {
          km[u] = sh.keep[lr] ? kFull : 0u;
        } else {  // the chunk crosses a row boundary
          km[u] = 0u;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (sh.keep[lr]) km[u] |= 1u << j;
            if (++col == a.p.inner) {
              col = 0;
              ++lr;
            }
          }
        }
      } else if (is_whole && a.p.training) {
        km[u] = sh.keep[0] ? kFull : 0u;
      }
    }

    // Every remaining load of the thread before any arithmetic (memory-level parallelism).
    P x[kChunks];
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      if (!(t.whole & (1u << u))) continue;
      if (sc != nullptr && a.in_place && km[u] != 0u) t.s[u] = load_once<T, V>(sc + t.e[u]);
      if (km[u] == kFull) {
        x[u] = load_once<T, V>(in + t.e[u]);
      } else if (km[u] != 0u) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (km[u] & (1u << j)) x[u].set(j, in[t.e[u] + j]);
        }
      }
    }

    // kG: the channel of chunk u's first element, ch_u. Chunks lie kThreads * V elements apart,
    // so one 64-bit remainder per thread (chunk 0; block 0's lead may put it up to V - 1
    // elements before the tensor: shifted by V whole rows of channels) and a 32-bit step per
    // chunk, rather than a 64-bit remainder per chunk.
    uint32_t ch_u = 0, step = 0;
    if constexpr (kG) {
      ch_u = channel_of(a, t.e[0] + (t.e[0] < 0 ? int64_t{a.p.channels} * V : 0));
      step = static_cast<uint32_t>(launch::kThreads * V) % static_cast<uint32_t>(a.p.channels);
    }

    // Arithmetic (multiply rounded, add rounded, one rounding on store) and stores.
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      if constexpr (kG) {
        if (u > 0) ch_u = channel_add(a, ch_u, step);
      }
      if (t.whole & (1u << u)) {
        if (a.in_place && km[u] == 0u) continue;
        P o;
        if constexpr (kG) {
          uint32_t ch = ch_u;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (km[u] & (1u << j)) {
              const C scaled = scaled_gamma(a, scale, ch, x[u].get(j));
              o.set(j, A::store(sc != nullptr ? A::add(A::load(t.s[u].get(j)), scaled) : scaled));
            } else {
              o.set(j, sc != nullptr ? t.s[u].get(j) : A::store(C(0)));
            }
            if (++ch == static_cast<uint32_t>(a.p.channels)) ch = 0;
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (km[u] & (1u << j)) {
              const C scaled = A::mul(scale, A::load(x[u].get(j)));
              o.set(j, A::store(sc != nullptr ? A::add(A::load(t.s[u].get(j)), scaled) : scaled));
            } else {
              o.set(j, sc != nullptr ? t.s[u].get(j) : A::store(C(0)));
            }
          }
        }
        if (!a.in_place || km[u] == kFull) {
          store_vec<T, V>(out + t.e[u], o);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (km[u] & (1u << j)) out[t.e[u] + j] = o.get(j);
          }
        }
      } else {  // a chunk cut by either end of the tensor: element by element
#pragma unroll 1
        for (int j = 0; j < V; ++j) {
          const int64_t idx = t.e[u] + j;
          if (idx < 0 || idx >= a.numel) continue;
          const bool keep = !a.p.training ||
                            (t.uniform ? sh.keep[0] : sh.keep[local_row(a, idx - t.origin)]) != 0;
          if (keep) {
            const C scaled = kG ? scaled_gamma(a, scale, channel_of(a, idx), in[idx])
                                : A::mul(scale, A::load(in[idx]));
            out[idx] = A::store(sc != nullptr ? A::add(A::load(sc[idx]), scaled) : scaled);
          } else if (!a.in_place) {
            out[idx] = sc != nullptr ? sc[idx] : A::store(C(0));
          }
        }
      }
    }
  }
};

// dst[0, bytes) = src[0, bytes), in 16-byte accesses when dst and src are aligned alike (kVector),
// bytes otherwise. Tiles as in DenseKernel, shifted by `lead` bytes so chunks are aligned.
struct CopyArgs {
  uint8_t* dst;
  const uint8_t* src;
  int64_t bytes, lead;
};

template <bool kVector>
struct CopyKernel {
  using Args = CopyArgs;
  static constexpr int kPhases = 1;
  static constexpr int kV = kVector ? launch::kVectorBytes : 1;
  static constexpr int64_t kTile = launch::tile_elems(kV);
  using P = Packed<uint8_t, kV>;
  struct Shared {};
  struct Thread {};

  STOCHDEPTH_KERNEL_FN static void phase(int, const Args& a, Idx id, Shared&, Thread&) {
    const int64_t tile_start = static_cast<int64_t>(id.block) * kTile - a.lead;
    P buf[launch::kChunksPerThread];
#pragma unroll
    for (int u = 0; u < launch::kChunksPerThread; ++u) {
      const int64_t e = tile_start + (int64_t{u} * launch::kThreads + id.thread) * kV;
      if (e >= 0 && e + kV <= a.bytes) buf[u] = load_once<uint8_t, kV>(a.src + e);
    }
#pragma unroll
    for (int u = 0; u < launch::kChunksPerThread; ++u) {
      const int64_t e = tile_start + (int64_t{u} * launch::kThreads + id.thread) * kV;
      if (e >= 0 && e + kV <= a.bytes) {
        store_vec<uint8_t, kV>(a.dst + e, buf[u]);
      } else {
#pragma unroll 1
        for (int j = 0; j < kV; ++j) {
          if (e + j >= 0 && e + j < a.bytes) a.dst[e + j] = a.src[e + j];
        }
      }
    }
  }
};

}  // namespace stochdepth
