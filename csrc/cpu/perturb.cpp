// CPU kernel of perturb_: out[b, j] = anchor[j] + scales[b] * precond[j] * g_j, in float64, rounded
// once to out's dtype and written through out's strides (no (B, n) temporary).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../op_checks.h"
#include "isa.h"
#include "kernels.h"
#include "stream.h"
#include "tasks.h"

namespace localvol {
namespace cpu {
namespace {

// out[j * stride] = x[j] + scale * p[j] z[j] for j < m, in float64, rounded once to out's dtype.
template <typename out_t, typename param_t, bool kPrecond>
LOCALVOL_ALWAYS_INLINE void perturb_run_impl(out_t* __restrict out, int64_t stride, const float* __restrict z,
                                             const param_t* __restrict x, const param_t* __restrict p, double scale,
                                             size_t m) {
  auto value = [&](size_t k) {
    const double pg = kPrecond ? static_cast<double>(z[k]) * static_cast<double>(p[k]) : static_cast<double>(z[k]);
    return static_cast<out_t>(static_cast<double>(x[k]) + scale * pg);
  };
  if (stride == 1) {
    for (size_t k = 0; k < m; ++k) out[k] = value(k);
  } else {
    for (size_t k = 0; k < m; ++k) out[static_cast<int64_t>(k) * stride] = value(k);
  }
}

template <typename out_t, typename param_t, bool kPrecond>
struct PerturbRun {
#define LOCALVOL_PERTURB_RUN(attributes, name, width)                                                            \
  attributes static void name(out_t* out, int64_t stride, const float* z, const param_t* x, const param_t* p, \
                              double scale, size_t m) {                                                          \
    perturb_run_impl<out_t, param_t, kPrecond>(out, stride, z, x, p, scale, m);                                 \
  }
  LOCALVOL_ISA_PATHS(LOCALVOL_PERTURB_RUN, run, 0, 0, 0)  // no width: the compiler vectorizes the loop per path
#undef LOCALVOL_PERTURB_RUN
  static auto pick() { return LOCALVOL_PICK(run); }
};

template <typename out_t, typename param_t, bool kPrecond>
void perturb_kernel(at::Tensor& out, RowLayout layout, const at::Tensor& anchor, const at::Tensor& precond,
                    uint64_t seed, const at::Tensor& idx, const at::Tensor& scales, int64_t start) {
  out_t* o = out.mutable_data_ptr<out_t>();
  const param_t* x = anchor.const_data_ptr<param_t>();
  const param_t* p = static_cast<const param_t*>(data_or_null(precond));
  const double* scale = scales.const_data_ptr<double>();
  const int64_t* index = idx.const_data_ptr<int64_t>();
  const int64_t n = anchor.numel();
  const GaussiansFn gaussians = stream_gaussians();
  const auto run = PerturbRun<out_t, param_t, kPrecond>::pick();
  parallel_tasks(idx.numel(), start, n, [&](int64_t, int64_t row, int64_t first, int64_t last, StreamChunk& chunk) {
    walk_chunks(
        first, last, start, n,
        [&](uint64_t block, int count) { gaussians(seed, static_cast<uint64_t>(index[row]), block, count, chunk); },
        [&](int64_t j, int64_t k0, int64_t m) {
          run(o + row * layout.row_stride + j * layout.col_stride, layout.col_stride, chunk.z + k0, x + j,
              kPrecond ? p + j : nullptr, scale[row], static_cast<size_t>(m));
        });
  });
}

}  // namespace

void perturb(at::Tensor& out, const at::Tensor& anchor, const std::optional<at::Tensor>& precond, int64_t seed,
             const at::Tensor& indices, const at::Tensor& scales, int64_t start) {
  const char* op = "perturb_";
  const int64_t n = checked_anchor(op, anchor, start);
  const at::Tensor idx = checked_cpu_indices(op, indices);
  TORCH_CHECK_VALUE(scales.numel() == idx.numel(), op, ": scales must have one value per direction (", idx.numel(),
                    "), got shape ", scales.sizes());
  check_same_device(op, "scales", scales, out);
  check_same_device(op, "anchor", anchor, out);
  const RowLayout layout = perturb_out_layout(out, idx.numel(), n);
  const ParamVectors v = param_vectors(op, anchor, precond);
  const at::ScalarType dtype = v.dtype;
  const at::Tensor &x = v.x, &p = v.p;
  const at::Tensor s = scales.reshape({-1}).to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "perturb_", [&] {
    if (dtype == at::kDouble) {
      if (p.defined()) {
        perturb_kernel<scalar_t, double, true>(out, layout, x, p, seed_bits(seed), idx, s, start);
      } else {
        perturb_kernel<scalar_t, double, false>(out, layout, x, p, seed_bits(seed), idx, s, start);
      }
    } else {
      if (p.defined()) {
        perturb_kernel<scalar_t, float, true>(out, layout, x, p, seed_bits(seed), idx, s, start);
      } else {
        perturb_kernel<scalar_t, float, false>(out, layout, x, p, seed_bits(seed), idx, s, start);
      }
    }
  });
}

}  // namespace cpu
}  // namespace localvol
