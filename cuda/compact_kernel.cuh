// The compact-row kernel body behind StochasticResidual (docs/design.md, "Skipping dropped
// samples"): the forward scatter-add of a residual computed for the kept samples only, and the
// backward gather of grad_out at the kept samples. Host/device phases, launched by drop_path.cu
// and emulated on the CPU by emulator.cu. Not here: the dense op and validation.
#pragma once
#include <cstdint>

#include "kernel_common.cuh"

namespace stochdepth {

struct CompactArgs {
  const void* shortcut;  // [batch, inner] or nullptr
  const void* input;     // forward: [n_kept, inner]; backward: [batch, inner]
  void* out;             // forward: [batch, inner]; backward: [n_kept, inner]
  int64_t batch, inner, tiles_per_row;
  uint64_t seed, offset, threshold;
  const uint64_t* words;  // [seed, offset] in device memory, read by the kernel; or nullptr
  float scale_f32;
  double scale_f64;
  bool batch_mode, compact_input, in_place;
};

inline CompactArgs compact_args(const DropPathParams& p, const launch::CompactConfig& cfg) {
  CompactArgs a{};
  a.shortcut = p.shortcut;
  a.input = p.input;
  a.out = p.out;
  a.batch = p.batch;
  a.inner = p.inner;
  a.tiles_per_row = cfg.tiles_per_row;
  a.seed = p.seed;
  a.offset = p.offset;
  a.threshold = p.threshold;
  a.words = p.rng_words;
  a.scale_f32 = p.scale_f32;
  a.scale_f64 = p.scale_f64;
  a.batch_mode = p.batch_mode;
  a.compact_input = p.compact_input;
  a.in_place = p.shortcut != nullptr && p.shortcut == p.out;
  return a;
}

// One block per tile of one row of the full tensor. The block computes its sample's keep bit and
// its index among the kept samples (the kept samples before it, counted from the same Philox
// stream), so there is no mask or index tensor and no host sync. The count is a barrier-phased
// reduction with no atomics: each thread's count to shared memory (phase 0), one thread per warp
// sums its warp's 32 (phase 1), every thread sums the kWarps partials (phase 2). Each thread moves
// kChunks chunks of V elements; all its loads are issued before its first store. Vector chunks
// need inner % V == 0 (launch::compact_config), so a chunk is wholly inside the row or outside.
template <typename T, int V>
struct CompactKernel {
  using Args = CompactArgs;
  using A = Arith<T>;
  using C = typename A::C;
  using P = Packed<T, V>;
  static constexpr int kPhases = 3;
  static constexpr int kChunks = launch::kChunksPerThread;
  static constexpr int64_t kTile = launch::tile_elems(V);

  struct Shared {
    uint64_t count[launch::kThreads];
    uint64_t warp[launch::kWarps];
    bool keep;
  };
  struct Thread {
    int64_t row, col0;
    P s[kChunks];  // the shortcut's chunks (forward, out of place), loaded in phase 0
  };

  STOCHDEPTH_KERNEL_FN static int64_t col(const Thread& t, int u, Idx id) {
    return t.col0 + (int64_t{u} * launch::kThreads + id.thread) * V;
  }

  STOCHDEPTH_KERNEL_FN static void phase(int ph, const Args& a, Idx id, Shared& sh, Thread& t) {
    if (ph == 0) {
      load_and_count(a, id, sh, t);
    } else if (ph == 1) {
      if (!a.batch_mode && id.thread < launch::kWarps) {
        uint64_t sum = 0;
        for (int i = 0; i < 32; ++i) sum += sh.count[id.thread * 32 + i];
        sh.warp[id.thread] = sum;
      }
    } else {
      move(a, id, sh, t);
    }
  }

  STOCHDEPTH_KERNEL_FN static void load_and_count(const Args& a, Idx id, Shared& sh, Thread& t) {
    t.row = static_cast<int64_t>(id.block) / a.tiles_per_row;
    t.col0 = (static_cast<int64_t>(id.block) - t.row * a.tiles_per_row) * kTile;
    const RngWords key = rng_words(a.seed, a.offset, a.words);
    if (id.thread == 0) {
      // DrawCache selects the word with compares: keep_sample's v[b & 3] would go to local memory.
      DrawCache draw;
      sh.keep = draw.keep(key.seed, key.offset, a.batch_mode ? 0 : static_cast<uint64_t>(t.row),
                          a.threshold);
    }
    // Forward out of place: the shortcut is read whatever the mask says; load it now.
    const T* sc = static_cast<const T*>(a.shortcut);
    if (a.compact_input && sc != nullptr && !a.in_place) {
      const int64_t full = t.row * a.inner;
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (col(t, u, id) < a.inner) t.s[u] = load_once<T, V>(sc + full + col(t, u, id));
      }
    }
    if (a.batch_mode) return;
    // Kept samples among [0, row) (row mode), this thread's share of the Philox blocks.
    uint64_t mine = 0;
    const auto row = static_cast<uint64_t>(t.row);
    for (uint64_t q = id.thread; 4 * q < row; q += launch::kThreads) {
      const Philox4x32 w = mask_block(key.seed, key.offset, q);
#pragma unroll
      for (int j = 0; j < 4; ++j) mine += (4 * q + j < row && w.v[j] < a.threshold) ? 1 : 0;
    }
    sh.count[id.thread] = mine;
  }

  STOCHDEPTH_KERNEL_FN static void move(const Args& a, Idx id, const Shared& sh, Thread& t) {
    const T* sc = static_cast<const T*>(a.shortcut);
    const T* STOCHDEPTH_RESTRICT in = static_cast<const T*>(a.input);
    T* out = static_cast<T*>(a.out);
    const int64_t full = t.row * a.inner;
    if (!sh.keep) {
      // Backward: a dropped sample has no compact row. Forward in place: already the shortcut.
      if (!a.compact_input || a.in_place) return;
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (col(t, u, id) >= a.inner) continue;
        P o = t.s[u];
        if (sc == nullptr) {
#pragma unroll
          for (int j = 0; j < V; ++j) o.set(j, A::store(C(0)));
        }
        store_vec<T, V>(out + full + col(t, u, id), o);
      }
      return;
    }
    int64_t kidx = t.row;
    if (!a.batch_mode) {
      uint64_t k = 0;
#pragma unroll
      for (int w = 0; w < launch::kWarps; ++w) k += sh.warp[w];
      kidx = static_cast<int64_t>(k);
    }
    const int64_t compact = kidx * a.inner;
    const C s = A::scale(a.scale_f32, a.scale_f64);
    P x[kChunks];
    if (a.compact_input) {  // forward: out[full] = shortcut[full] + s * input[compact]
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (col(t, u, id) >= a.inner) continue;
        x[u] = load_once<T, V>(in + compact + col(t, u, id));
        if (sc != nullptr && a.in_place) t.s[u] = load_once<T, V>(sc + full + col(t, u, id));
      }
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (col(t, u, id) >= a.inner) continue;
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const C scaled = A::mul(s, A::load(x[u].get(j)));
          o.set(j, A::store(sc != nullptr ? A::add(A::load(t.s[u].get(j)), scaled) : scaled));
        }
        store_vec<T, V>(out + full + col(t, u, id), o);
      }
    } else {  // backward: out[compact] = s * input[full]
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (col(t, u, id) < a.inner) x[u] = load_once<T, V>(in + full + col(t, u, id));
      }
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (col(t, u, id) >= a.inner) continue;
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.set(j, A::store(A::mul(s, A::load(x[u].get(j)))));
        store_vec<T, V>(out + compact + col(t, u, id), o);
      }
    }
  }
};

}  // namespace stochdepth
