// The CUDA kernels' host side: argument checks, allocation, dtype dispatch, the current stream, and
// TORCH_LIBRARY_IMPL(localvol, CUDA, m). Plain C++ (the host compiler), so that the torch dispatcher
// headers are parsed once by g++ instead of by nvcc in every .cu file (the kernels: *.cu, launchers.h).
// Direction indices are not checked for negative values here: that would synchronize with the GPU
// (a negative index is read as its uint64 bits).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_checks.h"
#include "launchers.h"

namespace localvol {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

at::Tensor philox_bits_cuda(int64_t seed, const at::Tensor& indices, int64_t start, int64_t length) {
  check_range("philox_bits", start, length);
  const c10::cuda::CUDAGuard guard(indices.device());
  const at::Tensor idx = checked_indices("philox_bits", indices);
  at::Tensor out = at::empty({idx.numel(), length}, idx.options().dtype(at::kLong));
  cuda::launch_philox_bits(seed_bits(seed), idx.const_data_ptr<int64_t>(), idx.numel(), start, length,
                           out.mutable_data_ptr<int64_t>(), current_stream());
  return out;
}

at::Tensor gaussian_cuda(int64_t seed, const at::Tensor& indices, int64_t start, int64_t length) {
  check_range("gaussian", start, length);
  const c10::cuda::CUDAGuard guard(indices.device());
  const at::Tensor idx = checked_indices("gaussian", indices);
  at::Tensor out = at::empty({idx.numel(), length}, idx.options().dtype(at::kFloat));
  cuda::launch_gaussian(seed_bits(seed), idx.const_data_ptr<int64_t>(), idx.numel(), start, length,
                        out.mutable_data_ptr<float>(), current_stream());
  return out;
}

at::Tensor direction_stats_cuda(int64_t seed, const at::Tensor& indices, const at::Tensor& anchor,
                                const std::optional<at::Tensor>& precond, const std::optional<at::Tensor>& weights,
                                const std::optional<at::Tensor>& bounds, int64_t start) {
  const char* op = "direction_stats";
  const int64_t n = checked_anchor(op, anchor, start);
  check_same_device(op, "indices", indices, anchor);
  const c10::cuda::CUDAGuard guard(anchor.device());
  const at::Tensor idx = checked_indices(op, indices);
  const int64_t rows = idx.numel();
  TORCH_CHECK_VALUE(rows <= INT32_MAX, op, ": at most 2^31 - 1 directions per call, got ", rows);
  const ParamVectors v = param_vectors(op, anchor, precond, weights, bounds);
  const at::ScalarType dtype = v.dtype;
  const at::Tensor &x = v.x, &p = v.p, &w = v.w, &b = v.b;
  at::Tensor out = at::empty({rows, 5}, idx.options().dtype(at::kDouble));
  if (rows == 0) return out;
  const int64_t parts = cuda::direction_stats_parts(rows, n);
  at::Tensor workspace = at::empty({rows, parts, 5}, idx.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(dtype, "direction_stats", [&] {
    cuda::launch_direction_stats<scalar_t>(
        seed_bits(seed), idx.const_data_ptr<int64_t>(), rows, start, n, x.const_data_ptr<scalar_t>(),
        static_cast<const scalar_t*>(data_or_null(p)), static_cast<const scalar_t*>(data_or_null(w)),
        static_cast<const scalar_t*>(data_or_null(b)), parts, workspace.mutable_data_ptr<double>(),
        out.mutable_data_ptr<double>(), current_stream());
  });
  return out;
}

void perturb_cuda(at::Tensor& out, const at::Tensor& anchor, const std::optional<at::Tensor>& precond,
                  int64_t seed, const at::Tensor& indices, const at::Tensor& scales, int64_t start) {
  const char* op = "perturb_";
  const int64_t n = checked_anchor(op, anchor, start);
  check_same_device(op, "anchor", anchor, out);
  check_same_device(op, "indices", indices, out);
  check_same_device(op, "scales", scales, out);
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor idx = checked_indices(op, indices);
  const int64_t rows = idx.numel();
  TORCH_CHECK_VALUE(scales.numel() == rows, op, ": scales must have one value per direction (", rows,
                    "), got shape ", scales.sizes());
  const RowLayout layout = perturb_out_layout(out, rows, n);
  const ParamVectors v = param_vectors(op, anchor, precond);
  const at::ScalarType dtype = v.dtype;
  const at::Tensor &x = v.x, &p = v.p;
  const at::Tensor s = scales.reshape({-1}).to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "perturb_", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(dtype, "perturb_", [&] {
      cuda::launch_perturb<out_t, scalar_t>(seed_bits(seed), idx.const_data_ptr<int64_t>(), rows, start, n,
                                            x.const_data_ptr<scalar_t>(),
                                            static_cast<const scalar_t*>(data_or_null(p)), s.const_data_ptr<double>(),
                                            out.mutable_data_ptr<out_t>(), layout.row_stride, layout.col_stride,
                                            current_stream());
    });
  });
}

at::Tensor kl_against_anchor_cuda(const at::Tensor& logits_in, const at::Tensor& anchor_in,
                                  const std::optional<at::Tensor>& mask_in) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const KLInputs in = prepare_kl_inputs(logits_in, anchor_in, mask_in);
  const at::Tensor &logits = in.logits, &anchor = in.anchor, &mask = in.mask;
  const int64_t rows = in.rows, positions = in.positions, vocab = in.vocab;
  TORCH_CHECK_VALUE(rows * positions <= INT32_MAX, "kl_against_anchor: at most 2^31 - 1 positions, got ",
                    rows * positions);
  const float* m = mask.defined() ? mask.const_data_ptr<float>() : nullptr;
  at::Tensor per_position = at::empty({rows, positions}, logits.options().dtype(at::kFloat));
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "kl_against_anchor", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, anchor.scalar_type(), "kl_against_anchor", [&] {
      cuda::launch_position_kl<logit_t, scalar_t>(logits.const_data_ptr<logit_t>(), anchor.const_data_ptr<scalar_t>(),
                                                  m, rows, positions, vocab, logits.stride(0), logits.stride(1),
                                                  anchor.stride(0), anchor.stride(1),
                                                  per_position.mutable_data_ptr<float>(), current_stream());
    });
  });
  cuda::launch_masked_mean(per_position.const_data_ptr<float>(), m, rows, positions, out.mutable_data_ptr<float>(),
                           current_stream());
  return out;
}

}  // namespace
}  // namespace localvol

TORCH_LIBRARY_IMPL(localvol, CUDA, m) {
  m.impl("philox_bits", &localvol::philox_bits_cuda);
  m.impl("gaussian", &localvol::gaussian_cuda);
  m.impl("direction_stats", &localvol::direction_stats_cuda);
  m.impl("perturb_", &localvol::perturb_cuda);
  m.impl("kl_against_anchor", &localvol::kl_against_anchor_cuda);
}
