// The compact-row kernel body behind StochasticResidual (docs/design.md, "Skipping dropped
// samples"): the forward scatter-add of a residual computed for the kept samples only, and the
// backward gather of grad_out at the kept samples. Host/device phases, launched by drop_path.cu
// and emulated on the CPU by emulator.cu. Not here: the dense op and validation.
#pragma once
#include <cstdint>

#include "kernel_common.cuh"

namespace stochdepth {

// One block per tile of one row of the full tensor. The block computes its sample's keep bit and
// its index among the kept samples (the kept samples before it, counted from the same Philox
// stream), so there is no mask or index tensor and no host sync. The count is a barrier-phased
// reduction with no atomics: each thread's count to shared memory (phase 0), one thread per warp
// sums its warp's 32 (phase 1), every thread sums the kWarps partials (phase 2). Each thread moves
// kChunks chunks of V elements; all its loads are issued before its first store. Vector chunks
// need inner % V == 0 (launch::compact_config), so a chunk is wholly inside the row or outside.
template <typename T, int V>
struct CompactKernel {
  using Args = KernelParams;
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
      if (!a.p.batch_mode && id.thread < launch::kWarps) {
        uint64_t sum = 0;
        for (int i = 0; i < 32; ++i) sum += sh.count[id.thread * 32 + i];
        sh.warp[id.thread] = sum;
      }
    } else {
      move(a, id, sh, t);
    }
  }

  STOCHDEPTH_KERNEL_FN static void load_and_count(const Args& a, Idx id, Shared& sh, Thread& t) {
    // launch::compact_config's grid: ceil(inner / kTile) blocks per row.
    const int64_t tiles_per_row = launch::ceil_div(a.p.inner, kTile);
    t.row = static_cast<int64_t>(id.block) / tiles_per_row;
    t.col0 = (static_cast<int64_t>(id.block) - t.row * tiles_per_row) * kTile;
    const RngWords key = rng_words(a.p.seed, a.p.offset, a.p.rng_words);
    if (id.thread == 0) {
      // DrawCache selects the word with compares: keep_sample's v[b & 3] would go to local memory.
      DrawCache draw;
      sh.keep = draw.keep(key.seed, key.offset, a.p.batch_mode ? 0 : static_cast<uint64_t>(t.row),
                          a.p.threshold);
    }
    // Forward out of place: the shortcut is read whatever the mask says; load it now.
    const T* sc = static_cast<const T*>(a.p.shortcut);
    if (a.p.compact_input && sc != nullptr && !a.in_place) {
      const int64_t full = t.row * a.p.inner;
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (col(t, u, id) < a.p.inner) t.s[u] = load_once<T, V>(sc + full + col(t, u, id));
      }
    }
    if (a.p.batch_mode) return;
    // Kept samples among [0, row) (row mode), this thread's share of the Philox blocks.
    uint64_t mine = 0;
    const auto row = static_cast<uint64_t>(t.row);
    for (uint64_t q = id.thread; 4 * q < row; q += launch::kThreads) {
      const Philox4x32 w = mask_block(key.seed, key.offset, q);
#pragma unroll
      for (int j = 0; j < 4; ++j) mine += (4 * q + j < row && w.v[j] < a.p.threshold) ? 1 : 0;
    }
    sh.count[id.thread] = mine;
  }

  STOCHDEPTH_KERNEL_FN static void move(const Args& a, Idx id, const Shared& sh, Thread& t) {
    const T* sc = static_cast<const T*>(a.p.shortcut);
    const T* STOCHDEPTH_RESTRICT in = static_cast<const T*>(a.p.input);
    T* out = static_cast<T*>(a.p.out);
    const int64_t full = t.row * a.p.inner;
    if (!sh.keep) {
      // Backward: a dropped sample has no compact row. Forward in place: already the shortcut.
      if (!a.p.compact_input || a.in_place) return;
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (col(t, u, id) >= a.p.inner) continue;
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
    if (!a.p.batch_mode) {
      uint64_t k = 0;
#pragma unroll
      for (int w = 0; w < launch::kWarps; ++w) k += sh.warp[w];
      kidx = static_cast<int64_t>(k);
    }
    const int64_t compact = kidx * a.p.inner;
    const C s = scale_in<C>(a.p);
    P x[kChunks];
    if (a.p.compact_input) {  // forward: out[full] = shortcut[full] + s * input[compact]
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (col(t, u, id) >= a.p.inner) continue;
        x[u] = load_once<T, V>(in + compact + col(t, u, id));
        if (sc != nullptr && a.in_place) t.s[u] = load_once<T, V>(sc + full + col(t, u, id));
      }
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (col(t, u, id) >= a.p.inner) continue;
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
        if (col(t, u, id) < a.p.inner) x[u] = load_once<T, V>(in + full + col(t, u, id));
      }
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        if (col(t, u, id) >= a.p.inner) continue;
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.set(j, A::store(A::mul(s, A::load(x[u].get(j)))));
        store_vec<T, V>(out + compact + col(t, u, id), o);
      }
    }
  }
};

}  // namespace stochdepth
