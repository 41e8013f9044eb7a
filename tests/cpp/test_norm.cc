// The fused norm of the C++ core (norm.h) on its own, for every ISA this build compiled and this
// CPU runs, on one thread and on several: forward and backward bit for bit against a
// per-element computation written here from docs/design.md, "Fused residual and norm" (lane
// sums with i % 16, plain loops over rows), with half.h. Exits non-zero on any mismatch.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "drop_path.h"
#include "half.h"
#include "isa.h"
#include "mask.h"
#include "norm.h"
#include "thread_pool.h"

using namespace stochdepth;

namespace {

int g_failures = 0;
void fail(const std::string& what) {
  if (++g_failures <= 20) std::fprintf(stderr, "MISMATCH %s\n", what.c_str());
}

struct SplitMix {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double normal() {  // rough, enough for inputs
    double u = 0;
    for (int i = 0; i < 4; ++i) u += static_cast<double>(next() >> 11) * 0x1.0p-53;
    return (u - 2.0) * 1.7;
  }
};

// Storage types as bits, with their compute type.
struct F16 {
  using S = uint16_t;
  using A = float;
  static constexpr DType kType = DType::kFloat16;
  static A load(S x) { return half_to_float(x); }
  static S store(A v) { return float_to_half(v); }
};
struct BF16 {
  using S = uint16_t;
  using A = float;
  static constexpr DType kType = DType::kBFloat16;
  static A load(S x) { return bf16_to_float(x); }
  static S store(A v) { return float_to_bf16(v); }
};
struct F32 {
  using S = float;
  using A = float;
  static constexpr DType kType = DType::kFloat32;
  static A load(S x) { return x; }
  static S store(A v) { return v; }
};
struct F64 {
  using S = double;
  using A = double;
  static constexpr DType kType = DType::kFloat64;
  static A load(S x) { return x; }
  static S store(A v) { return v; }
};

template <class A, class F>
A lane_sum(int64_t c, F term) {
  A acc[16] = {};
  for (int64_t i = 0; i < c; ++i) acc[i % 16] = acc[i % 16] + term(i);
  for (int h = 8; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) acc[j] = acc[j] + acc[j + h];
  return acc[0];
}

struct Case {
  int64_t batch, per, c;
  bool layer, gamma, weight, bias, training, batch_mode;
  double p;
};

template <class D>
void check_case(const Case& k, Isa isa, int threads, SplitMix& rng) {
  using S = typename D::S;
  using A = typename D::A;
  const int64_t rows = k.batch * k.per, c = k.c, n = rows * c;
  auto fill = [&](int64_t m, double mul, double add) {
    std::vector<S> v(static_cast<size_t>(m));
    for (auto& x : v) x = D::store(static_cast<A>(rng.normal() * mul + add));
    return v;
  };
  const std::vector<S> sc = fill(n, 1, 0.3), res = fill(n, 2, 0), gy = fill(n, 1, 0),
                       gn = fill(n, 1, 0), gamma = fill(c, 0.2, 1), w = fill(c, 0.2, 1),
                       b = fill(c, 0.1, 0);
  NormParams p;
  p.batch = k.batch;
  p.rows_per_sample = k.per;
  p.width = c;
  p.dtype = D::kType;
  p.kind = k.layer ? NormKind::kLayer : NormKind::kRms;
  p.eps = 1e-5;
  p.training = k.training;
  p.batch_mode = k.batch_mode;
  p.seed = 1234;
  p.offset = 7;
  set_norm_scalars(p, k.p, Scaling::kTraining);
  std::vector<S> y(n), nn(n), gs(n), gr(n), gg(c), gw(c), gb(c);
  p.shortcut = sc.data();
  p.residual = res.data();
  p.gamma = k.gamma ? gamma.data() : nullptr;
  p.weight = k.weight ? w.data() : nullptr;
  p.bias = k.bias ? b.data() : nullptr;
  p.y = y.data();
  p.n = nn.data();
  norm_forward(p, Device{}, nullptr);
  p.grad_y = gy.data();
  p.grad_n = gn.data();
  p.y_in = y.data();
  p.grad_shortcut = gs.data();
  p.grad_residual = gr.data();
  p.grad_gamma = k.gamma ? gg.data() : nullptr;
  p.grad_weight = k.weight ? gw.data() : nullptr;
  p.grad_bias = k.bias ? gb.data() : nullptr;
  norm_backward(p, Device{}, nullptr);

  // The expectation, element by element.
  const A s = std::is_same_v<A, double> ? static_cast<A>(p.scale_f64) : static_cast<A>(p.scale_f32);
  const A eps = static_cast<A>(p.eps), count = static_cast<A>(c);
  std::vector<A> tw(c, 0), tb(c, 0), tg(c, 0), pw(c), pb(c), pg(c);
  std::string where = std::string(isa_name(isa)) + " threads " + std::to_string(threads) +
                      " dtype " + std::to_string(static_cast<int>(D::kType)) + " c " +
                      std::to_string(c) + (k.layer ? " layer" : " rms");
  auto same = [](S a, S b) { return std::memcmp(&a, &b, sizeof(S)) == 0; };
  for (int64_t r = 0; r < rows; ++r) {
    if (r % 64 == 0) std::fill(pw.begin(), pw.end(), 0), pb = pw, pg = pw;
    const int64_t sample = r / k.per;
    const bool kept =
        !k.training || keep_sample(p.seed, p.offset, k.batch_mode ? 0 : sample, p.threshold);
    std::vector<A> yr(c);
    for (int64_t i = 0; i < c; ++i) {
      const int64_t e = r * c + i;
      S ye = sc[e];
      if (kept) {
        A t = D::load(res[e]);
        if (k.gamma) t = D::load(gamma[i]) * t;
        const A u = s * t;
        ye = D::store(D::load(sc[e]) + u);
      }
      if (!same(ye, y[e])) fail(where + " y at " + std::to_string(e));
      yr[i] = D::load(ye);
    }
    A mean = 0, var;
    if (k.layer) {
      mean = lane_sum<A>(c, [&](int64_t i) { return yr[i]; }) / count;
      var = lane_sum<A>(c,
                        [&](int64_t i) {
                          A d = yr[i] - mean;
                          return d * d;
                        }) /
            count;
    } else {
      var = lane_sum<A>(c, [&](int64_t i) { return yr[i] * yr[i]; }) / count;
    }
    const A rstd = A(1) / std::sqrt(var + eps);
    std::vector<A> xh(c), dx(c);
    for (int64_t i = 0; i < c; ++i) {
      xh[i] = k.layer ? (yr[i] - mean) * rstd : yr[i] * rstd;
      A v = xh[i];
      if (k.weight) v = v * D::load(w[i]);
      if (k.bias) v = v + D::load(b[i]);
      if (!same(D::store(v), nn[r * c + i])) fail(where + " n at " + std::to_string(r * c + i));
      const A g = D::load(gn[r * c + i]);
      dx[i] = k.weight ? g * D::load(w[i]) : g;
    }
    const A mb = lane_sum<A>(c, [&](int64_t i) { return dx[i] * xh[i]; }) / count;
    const A ma = lane_sum<A>(c, [&](int64_t i) { return dx[i]; }) / count;
    for (int64_t i = 0; i < c; ++i) {
      const int64_t e = r * c + i;
      const A dn = k.layer ? rstd * ((dx[i] - ma) - xh[i] * mb) : rstd * (dx[i] - xh[i] * mb);
      const A dy = D::load(gy[e]) + dn;
      if (!same(D::store(dy), gs[e])) fail(where + " grad_shortcut at " + std::to_string(e));
      S ger = D::store(0);
      if (kept) {
        const A v = s * dy;
        ger = D::store(k.gamma ? D::load(gamma[i]) * v : v);
        pg[i] = pg[i] + v * D::load(res[e]);
      }
      if (!same(ger, gr[e])) fail(where + " grad_residual at " + std::to_string(e));
      const A g = D::load(gn[e]);
      pw[i] = pw[i] + g * xh[i];
      pb[i] = pb[i] + g;
    }
    if (r % 64 == 63 || r == rows - 1) {
      for (int64_t i = 0; i < c; ++i)
        tw[i] = tw[i] + pw[i], tb[i] = tb[i] + pb[i], tg[i] = tg[i] + pg[i];
    }
  }
  for (int64_t i = 0; i < c; ++i) {
    if (k.weight && !same(D::store(tw[i]), gw[i]))
      fail(where + " grad_weight at " + std::to_string(i));
    if (k.bias && !same(D::store(tb[i]), gb[i])) fail(where + " grad_bias at " + std::to_string(i));
    if (k.gamma && !same(D::store(tg[i]), gg[i]))
      fail(where + " grad_gamma at " + std::to_string(i));
  }
}

int check_isa(Isa isa, int threads) {
  SplitMix rng{static_cast<uint64_t>(threads) * 77 + static_cast<uint64_t>(isa)};
  int cases = 0;
  const int64_t widths[] = {1, 2, 3, 15, 16, 17, 63, 65, 768, 1023};
  for (int64_t c : widths) {
    for (int variant = 0; variant < 4; ++variant) {
      const bool layer = variant % 2 == 0;
      Case k{5,
             c > 100 ? 3 : 30,
             c,
             layer,
             variant >= 2,
             variant != 3,
             layer && variant != 2,
             variant != 1,
             variant == 2,
             variant == 0 ? 0.5 : (variant == 1 ? 1.0 : 0.0)};
      check_case<F16>(k, isa, threads, rng);
      check_case<BF16>(k, isa, threads, rng);
      check_case<F32>(k, isa, threads, rng);
      check_case<F64>(k, isa, threads, rng);
      cases += 4;
    }
  }
  return cases;
}

}  // namespace

int main() {
  try {
    const Isa active = active_isa();
    const int64_t old_threshold = parallel_threshold_bytes();
    for (Isa isa : supported_isas()) {
      set_isa(isa);
      for (int threads : {1, 3}) {
        const int before = g_failures;
        set_num_threads(threads);
        set_parallel_threshold_bytes(0);
        const int cases = check_isa(isa, threads);
        std::printf("norm %-12s threads %d: %d cases: %s\n", isa_name(isa), threads, cases,
                    g_failures == before ? "ok" : "FAILED");
      }
    }
    set_isa(active);
    set_parallel_threshold_bytes(old_threshold);
  } catch (const std::exception& ex) {
    fail(std::string("exception: ") + ex.what());
  }
  if (g_failures) {
    std::fprintf(stderr, "FAILED: %d mismatches\n", g_failures);
    return 1;
  }
  std::printf("norm: all ok\n");
  return 0;
}
