// CPU kernel of direction_stats: per direction, the five float64 statistics of SPEC.md over its
// Gaussians (tasks.h: one partial per run of kBlocksPerTask blocks, merged in order, so the result
// depends neither on the thread count nor on the ISA path).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../op_checks.h"
#include "../philox.h"
#include "isa.h"
#include "kernels.h"
#include "stream.h"
#include "tasks.h"

namespace localvol {
namespace cpu {
namespace {

// The five per-direction statistics of SPEC.md, accumulated in float64. `min` propagates NaN like amin.
struct Stats {
  double sum_g2 = 0, sum_pg2 = 0, sum_pgxw = 0, sum_pg2w = 0;
  double exit_factor = std::numeric_limits<double>::infinity();

  void min_with(double v) {
    if (!std::isnan(exit_factor) && (std::isnan(v) || v < exit_factor)) exit_factor = v;
  }
  void merge(const Stats& o) {
    sum_g2 += o.sum_g2;
    sum_pg2 += o.sum_pg2;
    sum_pgxw += o.sum_pgxw;
    sum_pg2w += o.sum_pg2w;
    min_with(o.exit_factor);
  }
};

// A task's statistics in kLanes interleaved partial sums: element e of the task (counted from its first
// element inside the range) goes to lane e % kLanes. The lanes are GCC vector-extension vectors, so the
// loop runs in SIMD on any ISA without reassociating anything: the order of every sum is fixed by the
// task alone, and the scalar head and tail do the same IEEE operations as the vector body.
constexpr int kLanes = 8;

// kLanes lanes as kLanes / W vectors of W lanes: W is the ISA's width (2 for SSE2, 4 for AVX2, 8 for
// AVX-512), so that no vector is wider than the registers (GCC lowers the masks of wider ones poorly).
template <int W>
struct LaneTypes {
  typedef double Vec __attribute__((vector_size(W * sizeof(double))));
  typedef float VecF __attribute__((vector_size(W * sizeof(float))));
  typedef int64_t Mask __attribute__((vector_size(W * sizeof(int64_t))));
};

template <typename Vec, typename VecF>
LOCALVOL_ALWAYS_INLINE void load_lanes(const float* p, Vec& out) {
  VecF f;
  std::memcpy(&f, p, sizeof f);
  out = __builtin_convertvector(f, Vec);
}

template <typename Vec, typename VecF>
LOCALVOL_ALWAYS_INLINE void load_lanes(const double* p, Vec& out) {
  std::memcpy(&out, p, sizeof out);
}

struct LaneStats {
  // exit: the lane's min of the finite-or-infinite values; nan: -1 where a NaN came (min_with's NaN).
  alignas(64) double g2[kLanes], pg2[kLanes], pgxw[kLanes], pg2w[kLanes], exit[kLanes];
  alignas(64) int64_t nan[kLanes];
  int next = 0;  // lane of the next element

  LaneStats() {
    for (int l = 0; l < kLanes; ++l) {
      g2[l] = pg2[l] = pgxw[l] = pg2w[l] = 0;
      exit[l] = std::numeric_limits<double>::infinity();
      nan[l] = 0;
    }
  }

  // The lanes summed pairwise in a fixed tree; the exit factor's min over them.
  Stats total() const {
    auto tree = [](const double* v) {
      double t[kLanes];
      for (int l = 0; l < kLanes; ++l) t[l] = v[l];
      for (int width = kLanes / 2; width >= 1; width /= 2) {
        for (int l = 0; l < width; ++l) t[l] += t[l + width];
      }
      return t[0];
    };
    Stats s;
    s.sum_g2 = tree(g2);
    s.sum_pg2 = tree(pg2);
    s.sum_pgxw = tree(pgxw);
    s.sum_pg2w = tree(pg2w);
    for (int l = 0; l < kLanes; ++l) s.min_with(nan[l] ? std::numeric_limits<double>::quiet_NaN() : exit[l]);
    return s;
  }
};

// Adds elements 0 .. m - 1 (Gaussians z, anchor x, precond p, weights w, bounds b; p, w, b may be unused).
// Without weights wj = 1 and the products by it are left out (exact either way).
template <int W, typename param_t, bool kPrecond, bool kWeights, bool kBounds>
LOCALVOL_ALWAYS_INLINE void stats_run_impl(LaneStats& s, const float* __restrict z, const param_t* __restrict x,
                                           const param_t* __restrict p, const param_t* __restrict w,
                                           const param_t* __restrict b, size_t m) {
  auto one = [&](int l, size_t k) {
    const double g = z[k];
    const double pg = kPrecond ? g * static_cast<double>(p[k]) : g;
    const double xj = x[k];
    s.g2[l] += g * g;
    s.pg2[l] += pg * pg;
    if (kWeights) {
      const double wj = w[k];
      s.pgxw[l] += pg * xj * wj;
      s.pg2w[l] += pg * pg * wj;
    } else {
      s.pgxw[l] += pg * xj;
      s.pg2w[l] += pg * pg;
    }
    if (kBounds) {
      const double sign = static_cast<double>((pg > 0) - (pg < 0));
      const double v = (static_cast<double>(b[k]) - sign * xj) / std::fabs(pg);
      if (v < s.exit[l]) s.exit[l] = v;
      if (v != v) s.nan[l] = -1;
    }
  };
  size_t k = 0;
  for (; k < m && s.next != 0; ++k, s.next = (s.next + 1) % kLanes) one(s.next, k);
  if (k + kLanes <= m) {
    using Vec = typename LaneTypes<W>::Vec;
    using VecF = typename LaneTypes<W>::VecF;
    using Mask = typename LaneTypes<W>::Mask;
    constexpr int kVecs = kLanes / W;
    Vec g2[kVecs], pg2[kVecs], pgxw[kVecs], pg2w[kVecs], exit[kVecs];
    Mask nan[kVecs];
    std::memcpy(g2, s.g2, sizeof g2);
    std::memcpy(pg2, s.pg2, sizeof pg2);
    std::memcpy(pgxw, s.pgxw, sizeof pgxw);
    std::memcpy(pg2w, s.pg2w, sizeof pg2w);
    std::memcpy(exit, s.exit, sizeof exit);
    std::memcpy(nan, s.nan, sizeof nan);
    const Vec ones = Vec{} + 1.0, zeros = Vec{};
    const Mask abs_mask = Mask{} + INT64_MAX;
    for (; k + kLanes <= m; k += kLanes) {
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        const size_t at = k + static_cast<size_t>(v * W);
        Vec g, pg, xj;
        load_lanes<Vec, VecF>(z + at, g);
        pg = g;
        if (kPrecond) {
          Vec pj;
          load_lanes<Vec, VecF>(p + at, pj);
          pg = g * pj;
        }
        load_lanes<Vec, VecF>(x + at, xj);
        g2[v] += g * g;
        pg2[v] += pg * pg;
        if (kWeights) {
          Vec wj;
          load_lanes<Vec, VecF>(w + at, wj);
          pgxw[v] += pg * xj * wj;
          pg2w[v] += pg * pg * wj;
        } else {
          pgxw[v] += pg * xj;
          pg2w[v] += pg * pg;
        }
        if (kBounds) {
          Vec bj;
          load_lanes<Vec, VecF>(b + at, bj);
          const Vec sign = (pg > 0 ? ones : zeros) - (pg < 0 ? ones : zeros);
          const Vec val = (bj - sign * xj) / reinterpret_cast<Vec>(reinterpret_cast<Mask>(pg) & abs_mask);
          exit[v] = val < exit[v] ? val : exit[v];
          nan[v] |= val != val;
        }
      }
    }
    std::memcpy(s.g2, g2, sizeof g2);
    std::memcpy(s.pg2, pg2, sizeof pg2);
    std::memcpy(s.pgxw, pgxw, sizeof pgxw);
    std::memcpy(s.pg2w, pg2w, sizeof pg2w);
    std::memcpy(s.exit, exit, sizeof exit);
    std::memcpy(s.nan, nan, sizeof nan);
  }
  for (; k < m; ++k, s.next = (s.next + 1) % kLanes) one(s.next, k);
}

template <typename param_t, bool kPrecond, bool kWeights, bool kBounds>
struct StatsRun {
#define LOCALVOL_STATS_RUN(attributes, name, width)                                                             \
  attributes static void name(LaneStats& s, const float* z, const param_t* x, const param_t* p, const param_t* w, \
                              const param_t* b, size_t m) {                                                     \
    stats_run_impl<width, param_t, kPrecond, kWeights, kBounds>(s, z, x, p, w, b, m);                           \
  }
  LOCALVOL_ISA_PATHS(LOCALVOL_STATS_RUN, run, 2, 4, 8)
#undef LOCALVOL_STATS_RUN
  static auto pick() { return LOCALVOL_PICK(run); }
};

template <typename param_t, bool kPrecond, bool kWeights, bool kBounds>
void direction_stats_kernel(uint64_t seed, const at::Tensor& idx, const param_t* x, const param_t* p,
                            const param_t* w, const param_t* bound, int64_t start, int64_t n, at::Tensor& out) {
  const int64_t rows = idx.numel();
  const int64_t* index = idx.const_data_ptr<int64_t>();
  const GaussiansFn gaussians = stream_gaussians();
  const auto run = StatsRun<param_t, kPrecond, kWeights, kBounds>::pick();
  const BlockRange blocks = block_range(start, n);
  const int64_t runs = runs_per_row(blocks);
  // Partial sums per fixed run of blocks, merged in order: the result does not depend on the thread count.
  std::vector<Stats> partial(rows * runs);
  parallel_tasks(rows, start, n, [&](int64_t id, int64_t row, int64_t first, int64_t last, StreamChunk& chunk) {
    LaneStats lanes;
    walk_chunks(
        first, last, start, n,
        [&](uint64_t block, int count) { gaussians(seed, static_cast<uint64_t>(index[row]), block, count, chunk); },
        [&](int64_t j, int64_t k0, int64_t m) {
          run(lanes, chunk.z + k0, x + j, p ? p + j : nullptr, w ? w + j : nullptr, bound ? bound + j : nullptr,
              static_cast<size_t>(m));
        });
    partial[id] = lanes.total();
  });
  double* o = out.mutable_data_ptr<double>();
  for (int64_t row = 0; row < rows; ++row) {
    Stats s;
    for (int64_t r = 0; r < runs; ++r) s.merge(partial[row * runs + r]);
    double* dst = o + 5 * row;
    dst[0] = s.sum_g2;
    dst[1] = s.sum_pg2;
    dst[2] = s.sum_pgxw;
    dst[3] = s.sum_pg2w;
    dst[4] = s.exit_factor;
  }
}

template <typename param_t>
void direction_stats_dispatch(uint64_t seed, const at::Tensor& idx, const at::Tensor& anchor, const at::Tensor& precond,
                              const at::Tensor& weights, const at::Tensor& bounds, int64_t start, at::Tensor& out) {
  const param_t* x = anchor.const_data_ptr<param_t>();
  const param_t* p = static_cast<const param_t*>(data_or_null(precond));
  const param_t* w = static_cast<const param_t*>(data_or_null(weights));
  const param_t* b = static_cast<const param_t*>(data_or_null(bounds));
  const int64_t n = anchor.numel();
  const int which = (p ? 4 : 0) | (w ? 2 : 0) | (b ? 1 : 0);
  switch (which) {
#define LOCALVOL_STATS_CASE(k, P, W, B) \
  case k:                               \
    return direction_stats_kernel<param_t, P, W, B>(seed, idx, x, p, w, b, start, n, out);
    LOCALVOL_STATS_CASE(0, false, false, false)
    LOCALVOL_STATS_CASE(1, false, false, true)
    LOCALVOL_STATS_CASE(2, false, true, false)
    LOCALVOL_STATS_CASE(3, false, true, true)
    LOCALVOL_STATS_CASE(4, true, false, false)
    LOCALVOL_STATS_CASE(5, true, false, true)
    LOCALVOL_STATS_CASE(6, true, true, false)
    LOCALVOL_STATS_CASE(7, true, true, true)
#undef LOCALVOL_STATS_CASE
  }
}

}  // namespace

at::Tensor direction_stats(int64_t seed, const at::Tensor& indices, const at::Tensor& anchor,
                           const std::optional<at::Tensor>& precond, const std::optional<at::Tensor>& weights,
                           const std::optional<at::Tensor>& bounds, int64_t start) {
  const char* op = "direction_stats";
  checked_anchor(op, anchor, start);
  const at::Tensor idx = checked_cpu_indices(op, indices);
  const ParamVectors v = param_vectors(op, anchor, precond, weights, bounds);
  at::Tensor out = at::empty({idx.numel(), 5}, idx.options().dtype(at::kDouble));
  if (v.dtype == at::kDouble) {
    direction_stats_dispatch<double>(seed_bits(seed), idx, v.x, v.p, v.w, v.b, start, out);
  } else {
    direction_stats_dispatch<float>(seed_bits(seed), idx, v.x, v.p, v.w, v.b, start, out);
  }
  return out;
}

}  // namespace cpu
}  // namespace localvol
