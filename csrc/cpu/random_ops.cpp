// CPU kernels of the ops built on the random stream: philox_bits, gaussian, direction_stats, perturb_.
// Work is split into (direction, run of Philox blocks) tasks with at::parallel_for; each Philox block
// yields four consecutive elements, of which those inside [start, start + n) are used.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../op_checks.h"
#include "../philox.h"

namespace localvol {
namespace {

// Philox blocks per parallel task: big enough to amortize scheduling, small enough to balance.
constexpr int64_t kBlocksPerTask = 1 << 12;

at::Tensor checked_cpu_indices(const char* op, const at::Tensor& indices) {
  at::Tensor idx = checked_indices(op, indices);
  if (idx.numel()) {
    const int64_t* p = idx.const_data_ptr<int64_t>();
    const int64_t lowest = *std::min_element(p, p + idx.numel());
    TORCH_CHECK_VALUE(lowest >= 0, op, ": direction indices must be non-negative, got ", lowest);
  }
  return idx;
}

// Calls visit(row, element offset in [0, length), value) for the stream's words or Gaussians of
// elements [start, start + length) of every direction, in parallel over (row, block run) tasks.
template <bool kGaussian, typename Visit>
void for_each_element(uint64_t seed, const at::Tensor& idx, int64_t start, int64_t length, const Visit& visit) {
  const int64_t rows = idx.numel();
  const BlockRange blocks = block_range(start, length);
  if (rows == 0 || blocks.count == 0) return;
  const int64_t runs_per_row = (blocks.count + kBlocksPerTask - 1) / kBlocksPerTask;
  const int64_t* index = idx.const_data_ptr<int64_t>();
  at::parallel_for(0, rows * runs_per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / runs_per_row;
      const int64_t first = blocks.first + (task % runs_per_row) * kBlocksPerTask;
      const int64_t last = std::min(first + kBlocksPerTask, blocks.first + blocks.count);
      for (int64_t block = first; block < last; ++block) {
        const PhiloxWords words = philox_block(seed, static_cast<uint64_t>(index[row]), static_cast<uint64_t>(block));
        const int64_t offset = 4 * block - start;  // element offset of lane 0
        const int lane_lo = offset < 0 ? static_cast<int>(-offset) : 0;
        const int lane_hi = static_cast<int>(std::min<int64_t>(4, length - offset));
        if (kGaussian) {
          const GaussianBlock z = box_muller(words);
          for (int lane = lane_lo; lane < lane_hi; ++lane) visit(row, offset + lane, z.z[lane]);
        } else {
          for (int lane = lane_lo; lane < lane_hi; ++lane) visit(row, offset + lane, words.x[lane]);
        }
      }
    }
  });
}

at::Tensor philox_bits_cpu(int64_t seed, const at::Tensor& indices, int64_t start, int64_t length) {
  check_range("philox_bits", start, length);
  const at::Tensor idx = checked_cpu_indices("philox_bits", indices);
  at::Tensor out = at::empty({idx.numel(), length}, idx.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for_each_element<false>(seed_bits(seed), idx, start, length,
                          [&](int64_t row, int64_t j, uint32_t word) { o[row * length + j] = word; });
  return out;
}

at::Tensor gaussian_cpu(int64_t seed, const at::Tensor& indices, int64_t start, int64_t length) {
  check_range("gaussian", start, length);
  const at::Tensor idx = checked_cpu_indices("gaussian", indices);
  at::Tensor out = at::empty({idx.numel(), length}, idx.options().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  for_each_element<true>(seed_bits(seed), idx, start, length,
                         [&](int64_t row, int64_t j, float z) { o[row * length + j] = z; });
  return out;
}

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

template <typename param_t>
void direction_stats_kernel(uint64_t seed, const at::Tensor& idx, const at::Tensor& anchor, const at::Tensor& precond,
                            const at::Tensor& weights, const at::Tensor& bounds, int64_t start, at::Tensor& out) {
  const int64_t rows = idx.numel(), n = anchor.numel();
  const param_t* x = anchor.const_data_ptr<param_t>();
  const param_t* p = static_cast<const param_t*>(data_or_null(precond));
  const param_t* w = static_cast<const param_t*>(data_or_null(weights));
  const param_t* bound = static_cast<const param_t*>(data_or_null(bounds));
  const BlockRange blocks = block_range(start, n);
  const int64_t runs_per_row = std::max<int64_t>(1, (blocks.count + kBlocksPerTask - 1) / kBlocksPerTask);
  // Partial sums per fixed run of blocks, merged in order: the result does not depend on the thread count.
  std::vector<Stats> partial(rows * runs_per_row);
  const int64_t* index = idx.const_data_ptr<int64_t>();
  at::parallel_for(0, rows * runs_per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / runs_per_row;
      const int64_t first = blocks.first + (task % runs_per_row) * kBlocksPerTask;
      const int64_t last = std::min(first + kBlocksPerTask, blocks.first + blocks.count);
      Stats s;
      for (int64_t block = first; block < last; ++block) {
        const GaussianBlock z = gaussian_block(seed, static_cast<uint64_t>(index[row]), static_cast<uint64_t>(block));
        const int64_t offset = 4 * block - start;
        const int lane_lo = offset < 0 ? static_cast<int>(-offset) : 0;
        const int lane_hi = static_cast<int>(std::min<int64_t>(4, n - offset));
        for (int lane = lane_lo; lane < lane_hi; ++lane) {
          const int64_t j = offset + lane;
          const double g = z.z[lane];
          const double pg = p ? g * static_cast<double>(p[j]) : g;
          const double xj = x[j];
          const double wj = w ? static_cast<double>(w[j]) : 1.0;
          s.sum_g2 += g * g;
          s.sum_pg2 += pg * pg;
          s.sum_pgxw += pg * xj * wj;
          s.sum_pg2w += pg * pg * wj;
          if (bound) {
            const double sign = static_cast<double>((pg > 0) - (pg < 0));
            s.min_with((static_cast<double>(bound[j]) - sign * xj) / std::fabs(pg));
          }
        }
      }
      partial[task] = s;
    }
  });
  double* o = out.mutable_data_ptr<double>();
  for (int64_t row = 0; row < rows; ++row) {
    Stats s;
    for (int64_t r = 0; r < runs_per_row; ++r) s.merge(partial[row * runs_per_row + r]);
    double* dst = o + 5 * row;
    dst[0] = s.sum_g2;
    dst[1] = s.sum_pg2;
    dst[2] = s.sum_pgxw;
    dst[3] = s.sum_pg2w;
    dst[4] = s.exit_factor;
  }
}

at::Tensor direction_stats_cpu(int64_t seed, const at::Tensor& indices, const at::Tensor& anchor,
                               const std::optional<at::Tensor>& precond, const std::optional<at::Tensor>& weights,
                               const std::optional<at::Tensor>& bounds, int64_t start) {
  const char* op = "direction_stats";
  TORCH_CHECK_TYPE(at::isFloatingType(anchor.scalar_type()), op, ": anchor must be floating, got ",
                   anchor.scalar_type());
  const int64_t n = anchor.numel();
  check_range(op, start, n);
  const at::Tensor idx = checked_cpu_indices(op, indices);
  const at::ScalarType dtype = working_dtype(anchor, {precond, weights, bounds});
  const at::Tensor x = anchor.reshape({-1}).to(dtype).contiguous();
  const at::Tensor p = checked_vector(op, "precond", precond, n, dtype, anchor);
  const at::Tensor w = checked_vector(op, "weights", weights, n, dtype, anchor);
  const at::Tensor b = checked_vector(op, "bounds", bounds, n, dtype, anchor);
  at::Tensor out = at::empty({idx.numel(), 5}, idx.options().dtype(at::kDouble));
  if (dtype == at::kDouble) {
    direction_stats_kernel<double>(seed_bits(seed), idx, x, p, w, b, start, out);
  } else {
    direction_stats_kernel<float>(seed_bits(seed), idx, x, p, w, b, start, out);
  }
  return out;
}

template <typename out_t, typename param_t>
void perturb_kernel(at::Tensor& out, RowLayout layout, const at::Tensor& anchor, const at::Tensor& precond,
                    uint64_t seed, const at::Tensor& idx, const at::Tensor& scales, int64_t start) {
  out_t* o = out.mutable_data_ptr<out_t>();
  const param_t* x = anchor.const_data_ptr<param_t>();
  const param_t* p = static_cast<const param_t*>(data_or_null(precond));
  const double* scale = scales.const_data_ptr<double>();
  // Computed in float64 like the reference, rounded once to out's dtype.
  for_each_element<true>(seed, idx, start, anchor.numel(), [&](int64_t row, int64_t j, float z) {
    const double pg = p ? static_cast<double>(z) * static_cast<double>(p[j]) : static_cast<double>(z);
    o[row * layout.row_stride + j * layout.col_stride] = static_cast<out_t>(static_cast<double>(x[j]) + scale[row] * pg);
  });
}

at::Tensor& perturb_cpu(at::Tensor& out, const at::Tensor& anchor, const std::optional<at::Tensor>& precond,
                        int64_t seed, const at::Tensor& indices, const at::Tensor& scales, int64_t start) {
  const char* op = "perturb_";
  TORCH_CHECK_TYPE(at::isFloatingType(anchor.scalar_type()), op, ": anchor must be floating, got ",
                   anchor.scalar_type());
  const int64_t n = anchor.numel();
  check_range(op, start, n);
  const at::Tensor idx = checked_cpu_indices(op, indices);
  TORCH_CHECK_VALUE(scales.numel() == idx.numel(), op, ": scales must have one value per direction (", idx.numel(),
                    "), got shape ", scales.sizes());
  check_same_device(op, "scales", scales, out);
  check_same_device(op, "anchor", anchor, out);
  const RowLayout layout = perturb_out_layout(out, idx.numel(), n);
  const at::ScalarType dtype = working_dtype(anchor, {precond});
  const at::Tensor x = anchor.reshape({-1}).to(dtype).contiguous();
  const at::Tensor p = checked_vector(op, "precond", precond, n, dtype, anchor);
  const at::Tensor s = scales.reshape({-1}).to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "perturb_", [&] {
    if (dtype == at::kDouble) {
      perturb_kernel<scalar_t, double>(out, layout, x, p, seed_bits(seed), idx, s, start);
    } else {
      perturb_kernel<scalar_t, float>(out, layout, x, p, seed_bits(seed), idx, s, start);
    }
  });
  return out;
}

}  // namespace
}  // namespace localvol

TORCH_LIBRARY_IMPL(localvol, CPU, m) {
  m.impl("philox_bits", &localvol::philox_bits_cpu);
  m.impl("gaussian", &localvol::gaussian_cpu);
  m.impl("direction_stats", &localvol::direction_stats_cpu);
  m.impl("perturb_", &localvol::perturb_cpu);
}
