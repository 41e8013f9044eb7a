// The fused residual + norm kernel bodies (docs/design.md, "Fused residual and norm"), as
// host/device phases split at their barriers, in the style of drop_path_kernel.cuh: launched on
// the GPU by cuda/norm.cu and run block by block, thread by thread on the CPU by
// cuda/norm_emulator.cu. A block holds 16 rows of 16 threads: thread j of a row is lane j of the
// pinned row sum (elements j, j + 16, ... in order); the lanes' partial sums meet in shared
// memory after a barrier and every thread of the row adds them in the pinned tree order (no
// shuffles, so that the CPU emulation, which runs a phase thread by thread, runs this very code).
// Every operation is rounded on its own (__f*_rn / __d*_rn on the device; -ffp-contract=off on
// the host pass).
#pragma once
#include <cmath>
#include <cstdint>

#include "kernel_common.cuh"
#include "stochdepth/norm.h"

namespace stochdepth {
namespace norm_cuda {

constexpr int kLanes = 16;
constexpr int kRowsPerBlock = launch::kThreads / kLanes;  // 16
constexpr int kColThreads = launch::kThreads;

// The operations of the pinned order beyond Arith's mul and add.
template <typename A>
struct Ops;
template <>
struct Ops<float> {
#ifdef __CUDA_ARCH__
  STOCHDEPTH_ARITH static float sub(float a, float b) { return __fsub_rn(a, b); }
  STOCHDEPTH_ARITH static float div(float a, float b) { return __fdiv_rn(a, b); }
  STOCHDEPTH_ARITH static float sqrt(float a) { return __fsqrt_rn(a); }
#else
  static float sub(float a, float b) { return a - b; }
  static float div(float a, float b) { return a / b; }
  static float sqrt(float a) { return std::sqrt(a); }
#endif
};
template <>
struct Ops<double> {
#ifdef __CUDA_ARCH__
  STOCHDEPTH_ARITH static double sub(double a, double b) { return __dsub_rn(a, b); }
  STOCHDEPTH_ARITH static double div(double a, double b) { return __ddiv_rn(a, b); }
  STOCHDEPTH_ARITH static double sqrt(double a) { return __dsqrt_rn(a); }
#else
  static double sub(double a, double b) { return a - b; }
  static double div(double a, double b) { return a / b; }
  static double sqrt(double a) { return std::sqrt(a); }
#endif
};

// Everything the kernels need, by value. Pointers as in NormParams; `stats` and `partials` are
// the backward pass's scratch ([rows][4] and [blocks][3][width], compute type).
struct NormArgs {
  const void *shortcut, *residual, *gamma, *weight, *bias;
  void *y, *n;
  const void *grad_y, *grad_n, *y_in;
  void *grad_shortcut, *grad_residual, *grad_gamma, *grad_weight, *grad_bias;
  void* stats;
  void* partials;
  int64_t rows, rows_per_sample, width, row_blocks;
  uint64_t seed, offset, threshold;
  const uint64_t* rng_words;  // NormParams::rng_words: nullptr, or [seed, offset] in device memory
  float scale_f32, eps_f32;
  double scale_f64, eps_f64;
  bool training, batch_mode, layer;
};

inline NormArgs norm_args(const NormParams& p) {
  NormArgs a{};
  a.shortcut = p.shortcut;
  a.residual = p.residual;
  a.gamma = p.gamma;
  a.weight = p.weight;
  a.bias = p.bias;
  a.y = p.y;
  a.n = p.n;
  a.grad_y = p.grad_y;
  a.grad_n = p.grad_n;
  a.y_in = p.y_in;
  a.grad_shortcut = p.grad_shortcut;
  a.grad_residual = p.grad_residual;
  a.grad_gamma = p.grad_gamma;
  a.grad_weight = p.grad_weight;
  a.grad_bias = p.grad_bias;
  a.rows = p.rows();
  a.rows_per_sample = p.rows_per_sample;
  a.width = p.width;
  a.row_blocks = (a.rows + kNormRowBlock - 1) / kNormRowBlock;
  a.seed = p.seed;
  a.offset = p.offset;
  a.rng_words = p.rng_words;
  a.threshold = p.threshold;
  a.scale_f32 = p.scale_f32;
  a.scale_f64 = p.scale_f64;
  a.eps_f32 = static_cast<float>(p.eps);
  a.eps_f64 = p.eps;
  a.training = p.training;
  a.batch_mode = p.batch_mode;
  a.layer = p.kind == NormKind::kLayer;
  return a;
}

template <typename T>
struct Row {
  using A = typename Arith<T>::C;
  using R = Arith<T>;
  using O = Ops<A>;

  // The host rounded each scalar once to float and kept the double: the compute type's.
  STOCHDEPTH_KERNEL_FN static A pick(float s32, double s64) {
    return sizeof(A) == sizeof(double) ? static_cast<A>(s64) : static_cast<A>(s32);
  }
  STOCHDEPTH_KERNEL_FN static A eps(const NormArgs& a) { return pick(a.eps_f32, a.eps_f64); }
  STOCHDEPTH_KERNEL_FN static A scale(const NormArgs& a) { return pick(a.scale_f32, a.scale_f64); }
  STOCHDEPTH_KERNEL_FN static bool kept(const NormArgs& a, int64_t row) {
    if (!a.training) return true;
    const uint64_t b = a.batch_mode ? 0 : static_cast<uint64_t>(row / a.rows_per_sample);
    const RngWords key = rng_words(a.seed, a.offset, a.rng_words);
    return keep_sample(key.seed, key.offset, b, a.threshold);
  }
  // The pinned tree over the 16 lanes' sums of one row.
  STOCHDEPTH_KERNEL_FN static A tree(const A* lanes) {
    A acc[kLanes];
    for (int j = 0; j < kLanes; ++j) acc[j] = lanes[j];
    for (int h = kLanes / 2; h >= 1; h /= 2) {
      for (int j = 0; j < h; ++j) acc[j] = R::add(acc[j], acc[j + h]);
    }
    return acc[0];
  }
  STOCHDEPTH_KERNEL_FN static A param(const void* v, int64_t i) {
    return R::load(static_cast<const T*>(v)[i]);
  }
  STOCHDEPTH_KERNEL_FN static A xhat(const NormArgs& a, A y, A mean, A rstd) {
    return a.layer ? R::mul(O::sub(y, mean), rstd) : R::mul(y, rstd);
  }
};

// ---- forward: y, then the row statistics, then n

template <typename T>
struct NormFwdKernel {
  using A = typename Arith<T>::C;
  using W = Row<T>;
  using R = Arith<T>;
  using O = Ops<A>;
  using Args = NormArgs;
  struct Shared {
    A sum1[kRowsPerBlock][kLanes];
    A sum2[kRowsPerBlock][kLanes];
  };
  struct Thread {
    A mean, rstd;
  };
  static constexpr int kPhases = 3;

  STOCHDEPTH_KERNEL_FN static void phase(int ph, const Args& a, Idx id, Shared& sh, Thread& t) {
    const int lr = static_cast<int>(id.thread) / kLanes, j = static_cast<int>(id.thread) % kLanes;
    const int64_t row = static_cast<int64_t>(id.block) * kRowsPerBlock + lr;
    if (row >= a.rows) return;
    const int64_t c = a.width, base = row * c;
    const T* sc = static_cast<const T*>(a.shortcut) + base;
    T* y = static_cast<T*>(a.y) + base;
    const A count = static_cast<A>(c);
    if (ph == 0) {
      const bool kept = W::kept(a, row);
      const A s = W::scale(a);
      A acc = 0;
      for (int64_t i = j; i < c; i += kLanes) {
        T yi = sc[i];  // a dropped row: the shortcut bit for bit, the residual not read
        if (kept) {
          A tv = R::load(static_cast<const T*>(a.residual)[base + i]);
          if (a.gamma) tv = R::mul(W::param(a.gamma, i), tv);
          yi = R::store(R::add(R::load(sc[i]), R::mul(s, tv)));
        }
        y[i] = yi;
        const A yv = R::load(yi);  // the norm reads the stored y
        acc = R::add(acc, a.layer ? yv : R::mul(yv, yv));
      }
      sh.sum1[lr][j] = acc;
    } else if (ph == 1) {
      const A total = W::tree(sh.sum1[lr]);
      if (a.layer) {
        t.mean = O::div(total, count);
        A acc = 0;
        for (int64_t i = j; i < c; i += kLanes) {
          const A d = O::sub(R::load(y[i]), t.mean);
          acc = R::add(acc, R::mul(d, d));
        }
        sh.sum2[lr][j] = acc;
      } else {
        t.mean = 0;
        t.rstd = O::div(A(1), O::sqrt(R::add(O::div(total, count), W::eps(a))));
        write_n(a, row, j, t);
      }
    } else if (a.layer) {
      const A var = O::div(W::tree(sh.sum2[lr]), count);
      t.rstd = O::div(A(1), O::sqrt(R::add(var, W::eps(a))));
      write_n(a, row, j, t);
    }
  }

  STOCHDEPTH_KERNEL_FN static void write_n(const Args& a, int64_t row, int j, const Thread& t) {
    const int64_t c = a.width, base = row * c;
    const T* y = static_cast<const T*>(a.y) + base;
    T* n = static_cast<T*>(a.n) + base;
    for (int64_t i = j; i < c; i += kLanes) {
      A v = W::xhat(a, R::load(y[i]), t.mean, t.rstd);
      if (a.weight) v = R::mul(v, W::param(a.weight, i));
      if (a.bias) v = R::add(v, W::param(a.bias, i));
      n[i] = R::store(v);
    }
  }
};

// ---- backward, per row: the statistics from y, the sums of dxhat and dxhat * xhat, then
// grad_shortcut and grad_residual; each row's (mean, rstd, ma, mb) go to `stats` for the column
// kernel, which recomputes the same per-element values from them.

template <typename T>
struct NormBwdRowKernel {
  using A = typename Arith<T>::C;
  using W = Row<T>;
  using R = Arith<T>;
  using O = Ops<A>;
  using Args = NormArgs;
  struct Shared {
    A sum1[kRowsPerBlock][kLanes];
    A sum2[kRowsPerBlock][kLanes];
    A sum_a[kRowsPerBlock][kLanes];
    A sum_b[kRowsPerBlock][kLanes];
  };
  struct Thread {
    A mean, rstd;
  };
  static constexpr int kPhases = 4;

  STOCHDEPTH_KERNEL_FN static A dxhat(const Args& a, int64_t e, int64_t i) {
    const A g = R::load(static_cast<const T*>(a.grad_n)[e]);
    return a.weight ? R::mul(g, W::param(a.weight, i)) : g;
  }

  // Lane j's sums of dxhat and dxhat * xhat.
  STOCHDEPTH_KERNEL_FN static void sums(const Args& a, int64_t row, int lr, int j, Shared& sh,
                                        const Thread& t) {
    const int64_t c = a.width, base = row * c;
    const T* y = static_cast<const T*>(a.y_in) + base;
    A acc_a = 0, acc_b = 0;
    for (int64_t i = j; i < c; i += kLanes) {
      const A xh = W::xhat(a, R::load(y[i]), t.mean, t.rstd);
      const A dx = dxhat(a, base + i, i);
      acc_a = R::add(acc_a, dx);
      acc_b = R::add(acc_b, R::mul(dx, xh));
    }
    sh.sum_a[lr][j] = acc_a;
    sh.sum_b[lr][j] = acc_b;
  }

  STOCHDEPTH_KERNEL_FN static void outputs(const Args& a, int64_t row, int lr, int j, Shared& sh,
                                           const Thread& t) {
    const int64_t c = a.width, base = row * c;
    const A count = static_cast<A>(c);
    const A ma = O::div(W::tree(sh.sum_a[lr]), count);
    const A mb = O::div(W::tree(sh.sum_b[lr]), count);
    if (j == 0) {
      A* st = static_cast<A*>(a.stats) + row * 4;
      st[0] = t.mean;
      st[1] = t.rstd;
      st[2] = ma;
      st[3] = mb;
    }
    const bool kept = W::kept(a, row);
    const A s = W::scale(a);
    const T* y = static_cast<const T*>(a.y_in) + base;
    const T* gy = static_cast<const T*>(a.grad_y) + base;
    T* gs = static_cast<T*>(a.grad_shortcut) + base;
    T* gr = static_cast<T*>(a.grad_residual) + base;
    for (int64_t i = j; i < c; i += kLanes) {
      const A dy = grad_y_total(a, R::load(y[i]), R::load(gy[i]), dxhat(a, base + i, i), t.mean,
                                t.rstd, ma, mb);
      gs[i] = R::store(dy);
      if (kept) {
        const A v = R::mul(s, dy);
        gr[i] = R::store(a.gamma ? R::mul(W::param(a.gamma, i), v) : v);
      } else {
        gr[i] = R::store(A(0));
      }
    }
  }

  // dy_i = grad_y_i + dn_i in the pinned order.
  STOCHDEPTH_KERNEL_FN static A grad_y_total(const Args& a, A yv, A gyv, A dx, A mean, A rstd, A ma,
                                             A mb) {
    const A xh = W::xhat(a, yv, mean, rstd);
    const A t2 = R::mul(xh, mb);
    const A t3 = a.layer ? O::sub(O::sub(dx, ma), t2) : O::sub(dx, t2);
    return R::add(gyv, R::mul(rstd, t3));
  }

  STOCHDEPTH_KERNEL_FN static void phase(int ph, const Args& a, Idx id, Shared& sh, Thread& t) {
    const int lr = static_cast<int>(id.thread) / kLanes, j = static_cast<int>(id.thread) % kLanes;
    const int64_t row = static_cast<int64_t>(id.block) * kRowsPerBlock + lr;
    if (row >= a.rows) return;
    const int64_t c = a.width, base = row * c;
    const T* y = static_cast<const T*>(a.y_in) + base;
    const A count = static_cast<A>(c);
    if (ph == 0) {
      A acc = 0;
      for (int64_t i = j; i < c; i += kLanes) {
        const A yv = R::load(y[i]);
        acc = R::add(acc, a.layer ? yv : R::mul(yv, yv));
      }
      sh.sum1[lr][j] = acc;
    } else if (ph == 1) {
      const A total = W::tree(sh.sum1[lr]);
      if (a.layer) {
        t.mean = O::div(total, count);
        A acc = 0;
        for (int64_t i = j; i < c; i += kLanes) {
          const A d = O::sub(R::load(y[i]), t.mean);
          acc = R::add(acc, R::mul(d, d));
        }
        sh.sum2[lr][j] = acc;
      } else {
        t.mean = 0;
        t.rstd = O::div(A(1), O::sqrt(R::add(O::div(total, count), W::eps(a))));
        sums(a, row, lr, j, sh, t);
      }
    } else if (ph == 2) {
      if (a.layer) {
        const A var = O::div(W::tree(sh.sum2[lr]), count);
        t.rstd = O::div(A(1), O::sqrt(R::add(var, W::eps(a))));
        sums(a, row, lr, j, sh, t);
      } else {
        outputs(a, row, lr, j, sh, t);
      }
    } else if (a.layer) {
      outputs(a, row, lr, j, sh, t);
    }
  }
};

// ---- the column sums' scheme, shared with the layer scale of the plain op
// (layer_scale_kernel.cuh): thread (block of kNormRowBlock rows, column) sums its block's rows in
// row order into +0 (partials[block][k][column]), then ColumnTotalsKernel adds the block sums in
// block order.

// The cell of a column kernel's thread: row block rb (rows [r_begin, r_end)) and column i; the
// grid holds ceil(width / kColThreads) blocks of threads per row block (column_grid). False for a
// thread past the last column.
struct ColumnCell {
  int64_t rb, i, r_begin, r_end;
};
STOCHDEPTH_KERNEL_FN bool column_cell(Idx id, int64_t rows, int64_t width, ColumnCell& cell) {
  const int64_t col_tiles = (width + kColThreads - 1) / kColThreads;
  const int64_t row_blocks = (rows + kNormRowBlock - 1) / kNormRowBlock;
  cell.rb = static_cast<int64_t>(id.block) / col_tiles;
  cell.i = (static_cast<int64_t>(id.block) % col_tiles) * kColThreads + id.thread;
  if (cell.i >= width || cell.rb >= row_blocks) return false;
  cell.r_begin = cell.rb * kNormRowBlock;
  cell.r_end = rows < cell.r_begin + kNormRowBlock ? rows : cell.r_begin + kNormRowBlock;
  return true;
}

// The column sums' last step: partials ([row_blocks][kinds][width], compute type) added in block
// order into +0, one thread per (k, column), rounded once on store to outs[k] (nullptr: not
// wanted).
struct ColumnTotalsArgs {
  const void* partials;
  void* outs[3];
  int64_t width, row_blocks;
  int32_t kinds;
};

template <typename T>
struct ColumnTotalsKernel {
  using A = typename Arith<T>::C;
  using R = Arith<T>;
  using Args = ColumnTotalsArgs;
  struct Shared {};
  struct Thread {};
  static constexpr int kPhases = 1;

  STOCHDEPTH_KERNEL_FN static void phase(int, const Args& a, Idx id, Shared&, Thread&) {
    const int64_t c = a.width;
    const int64_t k_i = static_cast<int64_t>(id.block) * kColThreads + id.thread;
    if (k_i >= a.kinds * c) return;
    T* out = static_cast<T*>(a.outs[k_i / c]);
    if (!out) return;
    A total = 0;
    for (int64_t rb = 0; rb < a.row_blocks; ++rb) {
      total = R::add(total, static_cast<const A*>(a.partials)[rb * a.kinds * c + k_i]);
    }
    out[k_i % c] = R::store(total);
  }
};

inline uint32_t grid_of(int64_t blocks) {
  return launch::checked_grid(blocks, blocks * launch::kThreads, "the fused norm");
}
inline int64_t column_blocks(int64_t rows, int64_t width) {
  return launch::ceil_div(rows, kNormRowBlock) * launch::ceil_div(width, kColThreads);
}
inline ColumnTotalsArgs column_totals_args(const void* partials, int64_t rows, int64_t width,
                                           int32_t kinds, void* out0, void* out1, void* out2) {
  return ColumnTotalsArgs{
      partials, {out0, out1, out2}, width, launch::ceil_div(rows, kNormRowBlock), kinds};
}

// ---- backward, the column sums of the fused norm: k = weight, bias, gamma.

template <typename T>
struct NormColKernel {
  using A = typename Arith<T>::C;
  using W = Row<T>;
  using R = Arith<T>;
  using Args = NormArgs;
  struct Shared {};
  struct Thread {};
  static constexpr int kPhases = 1;

  STOCHDEPTH_KERNEL_FN static void phase(int, const Args& a, Idx id, Shared&, Thread&) {
    ColumnCell cell;
    if (!column_cell(id, a.rows, a.width, cell)) return;
    const int64_t c = a.width, rb = cell.rb, i = cell.i;
    const A s = W::scale(a);
    A pw = 0, pb = 0, pg = 0;
    for (int64_t r = cell.r_begin; r < cell.r_end; ++r) {
      const A* st = static_cast<const A*>(a.stats) + r * 4;
      const int64_t e = r * c + i;
      const A yv = R::load(static_cast<const T*>(a.y_in)[e]);
      const A g = R::load(static_cast<const T*>(a.grad_n)[e]);
      const A xh = W::xhat(a, yv, st[0], st[1]);
      if (a.grad_weight) pw = R::add(pw, R::mul(g, xh));
      if (a.grad_bias) pb = R::add(pb, g);
      if (a.grad_gamma && W::kept(a, r)) {
        const A dx = NormBwdRowKernel<T>::dxhat(a, e, i);
        const A dy = NormBwdRowKernel<T>::grad_y_total(
            a, yv, R::load(static_cast<const T*>(a.grad_y)[e]), dx, st[0], st[1], st[2], st[3]);
        const A v = R::mul(s, dy);
        pg = R::add(pg, R::mul(v, R::load(static_cast<const T*>(a.residual)[e])));
      }
    }
    A* part = static_cast<A*>(a.partials) + rb * 3 * c;
    part[i] = pw;
    part[c + i] = pb;
    part[2 * c + i] = pg;
  }
};

// ---- launches, written once for the GPU and the CPU emulation. A launcher L has
// `template <class K> void run(uint32_t grid, const typename K::Args&)`; `scratch(bytes)` gives
// device (or host) memory for the backward pass that lives until the launches are done.

template <typename T, class L>
void forward_typed(const NormArgs& a, L& launcher) {
  launcher.template run<NormFwdKernel<T>>(grid_of(launch::ceil_div(a.rows, kRowsPerBlock)), a);
}

template <typename T, class L>
void backward_typed(NormArgs a, L& launcher) {
  launcher.template run<NormBwdRowKernel<T>>(grid_of(launch::ceil_div(a.rows, kRowsPerBlock)), a);
  if (!a.grad_weight && !a.grad_bias && !a.grad_gamma) return;
  launcher.template run<NormColKernel<T>>(grid_of(column_blocks(a.rows, a.width)), a);
  launcher.template run<ColumnTotalsKernel<T>>(
      grid_of(launch::ceil_div(3 * a.width, kColThreads)),
      column_totals_args(a.partials, a.rows, a.width, 3, a.grad_weight, a.grad_bias, a.grad_gamma));
}

inline size_t compute_size(DType d) { return d == DType::kFloat64 ? 8 : 4; }
inline size_t stats_bytes(const NormParams& p) {
  return static_cast<size_t>(p.rows()) * 4 * compute_size(p.dtype);
}
inline size_t partials_bytes(const NormParams& p) {
  const int64_t blocks = (p.rows() + kNormRowBlock - 1) / kNormRowBlock;
  return static_cast<size_t>(blocks * 3 * p.width) * compute_size(p.dtype);
}

// The caller checked rows > 0 and width > 0. Backward: `stats` and `partials` hold
// stats_bytes(p) and partials_bytes(p).
template <class L>
void dispatch_norm(const NormParams& p, bool backward, void* stats, void* partials, L& launcher) {
  NormArgs a = norm_args(p);
  a.stats = stats;
  a.partials = partials;
  switch (p.dtype) {
    case DType::kFloat16:
      return backward ? backward_typed<__half>(a, launcher) : forward_typed<__half>(a, launcher);
    case DType::kBFloat16:
      return backward ? backward_typed<__nv_bfloat16>(a, launcher)
                      : forward_typed<__nv_bfloat16>(a, launcher);
    case DType::kFloat32:
      return backward ? backward_typed<float>(a, launcher) : forward_typed<float>(a, launcher);
    case DType::kFloat64:
      return backward ? backward_typed<double>(a, launcher) : forward_typed<double>(a, launcher);
  }
}

}  // namespace norm_cuda
}  // namespace stochdepth
