// Argument checks and preparation shared by the CPU and CUDA kernels (host code only).
// Errors name the bad value; TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface as ValueError / TypeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>

namespace localvol {

// Seeds live in [0, 2^64) but the schema carries them as int (int64): reinterpret the bits.
inline uint64_t seed_bits(int64_t seed) { return static_cast<uint64_t>(seed); }

inline void check_range(const char* op, int64_t start, int64_t length) {
  TORCH_CHECK_VALUE(start >= 0, op, ": start must be >= 0, got ", start);
  TORCH_CHECK_VALUE(length >= 0, op, ": length must be >= 0, got ", length);
  TORCH_CHECK_VALUE(start <= (INT64_MAX - 4) - length, op, ": start + length overflows int64 (start=", start,
                    ", length=", length, ")");
}

// Direction indices as a contiguous int64 (B,) tensor.
inline at::Tensor checked_indices(const char* op, const at::Tensor& indices) {
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() <= 1, op, ": indices must have shape (B,), got ", indices.sizes());
  return indices.reshape({-1}).contiguous();
}

// checked_indices, and no index below 0. CPU only: on CUDA the check would wait for the GPU (there a
// negative index is read as its uint64 bits).
inline at::Tensor checked_cpu_indices(const char* op, const at::Tensor& indices) {
  at::Tensor idx = checked_indices(op, indices);
  if (idx.numel()) {
    const int64_t* p = idx.const_data_ptr<int64_t>();
    const int64_t lowest = *std::min_element(p, p + idx.numel());
    TORCH_CHECK_VALUE(lowest >= 0, op, ": direction indices must be non-negative, got ", lowest);
  }
  return idx;
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the other inputs are on ",
              like.device(), "; move it there first");
}

// float64 if any per-parameter vector is float64, else float32: the type the kernels read them in.
inline at::ScalarType working_dtype(const at::Tensor& anchor, std::initializer_list<std::optional<at::Tensor>> others) {
  bool any_double = anchor.scalar_type() == at::kDouble;
  for (const auto& t : others) any_double = any_double || (t.has_value() && t->scalar_type() == at::kDouble);
  return any_double ? at::kDouble : at::kFloat;
}

// A per-parameter vector of n elements as a contiguous (n,) tensor of `dtype` on `like`'s device.
// Returns an undefined tensor when `t` is absent. Costs at most one O(n) copy.
inline at::Tensor checked_vector(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t n,
                                 at::ScalarType dtype, const at::Tensor& like) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                   t->scalar_type());
  TORCH_CHECK_VALUE(t->numel() == n, op, ": ", name, " must have ", n, " elements (like anchor), got shape ",
                    t->sizes());
  check_same_device(op, name, *t, like);
  return t->reshape({-1}).to(dtype).contiguous();
}

inline const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// direction_stats' and perturb_'s anchor: floating, and [start, start + numel) a valid range. Returns numel.
inline int64_t checked_anchor(const char* op, const at::Tensor& anchor, int64_t start) {
  TORCH_CHECK_TYPE(at::isFloatingType(anchor.scalar_type()), op, ": anchor must be floating, got ",
                   anchor.scalar_type());
  const int64_t n = anchor.numel();
  check_range(op, start, n);
  return n;
}

// The per-parameter vectors as contiguous (n,) tensors of the working dtype on anchor's device: x the
// anchor; p, w, b the preconditioner, weights and bounds, undefined where absent.
struct ParamVectors {
  at::ScalarType dtype;
  at::Tensor x, p, w, b;
};

inline ParamVectors param_vectors(const char* op, const at::Tensor& anchor, const std::optional<at::Tensor>& precond,
                                  const std::optional<at::Tensor>& weights = std::nullopt,
                                  const std::optional<at::Tensor>& bounds = std::nullopt) {
  const int64_t n = anchor.numel();
  ParamVectors v;
  v.dtype = working_dtype(anchor, {precond, weights, bounds});
  v.x = anchor.reshape({-1}).to(v.dtype).contiguous();
  v.p = checked_vector(op, "precond", precond, n, v.dtype, anchor);
  v.w = checked_vector(op, "weights", weights, n, v.dtype, anchor);
  v.b = checked_vector(op, "bounds", bounds, n, v.dtype, anchor);
  return v;
}

// out[b] viewed as a (B, n) matrix: its two strides, or an error naming the accepted layouts.
struct RowLayout {
  int64_t row_stride;
  int64_t col_stride;
};

inline RowLayout perturb_out_layout(const at::Tensor& out, int64_t rows, int64_t n) {
  TORCH_CHECK_TYPE(at::isFloatingType(out.scalar_type()), "perturb_: out must be a floating tensor, got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.numel() == rows * n, "perturb_: out must hold (B, n) = (", rows, ", ", n,
                    ") elements, got shape ", out.sizes());
  if (out.dim() == 2 && out.size(0) == rows && out.size(1) == n) return {out.stride(0), out.stride(1)};
  if (out.dim() == 1 && rows == 1) return {0, out.stride(0)};
  TORCH_CHECK_VALUE(out.is_contiguous(), "perturb_: out of shape ", out.sizes(),
                    " must be (B, n), (n,) or contiguous; pass out.view(B, n)");
  return {n, 1};
}

// kl_against_anchor's inputs checked and viewed as (N, T, V) with a contiguous vocabulary, and the
// mask as a contiguous float (N, T) tensor (undefined without one). Call under the device's guard.
struct KLInputs {
  at::Tensor logits;
  at::Tensor anchor;
  at::Tensor mask;
  int64_t rows;
  int64_t positions;
  int64_t vocab;
};

inline KLInputs prepare_kl_inputs(const at::Tensor& logits_in, const at::Tensor& anchor_in,
                                  const std::optional<at::Tensor>& mask_in) {
  const char* op = "kl_against_anchor";
  TORCH_CHECK_VALUE(logits_in.dim() == 2 || logits_in.dim() == 3, op, ": logits must be (N, T, V) or (N, V), got ",
                    logits_in.sizes());
  TORCH_CHECK_VALUE(anchor_in.sizes() == logits_in.sizes(), op, ": anchor_logprobs must match logits ",
                    logits_in.sizes(), ", got ", anchor_in.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(logits_in.scalar_type()) && at::isFloatingType(anchor_in.scalar_type()), op,
                   ": logits and anchor_logprobs must be floating, got ", logits_in.scalar_type(), " and ",
                   anchor_in.scalar_type());
  check_same_device(op, "anchor_logprobs", anchor_in, logits_in);
  KLInputs in;
  // (N, V) is (N, 1, V); outer dims keep their strides, only the vocabulary must be contiguous.
  in.logits = logits_in.dim() == 2 ? logits_in.unsqueeze(1) : logits_in;
  in.anchor = anchor_in.dim() == 2 ? anchor_in.unsqueeze(1) : anchor_in;
  if (in.logits.stride(2) != 1) in.logits = in.logits.contiguous();
  if (in.anchor.stride(2) != 1) in.anchor = in.anchor.contiguous();
  in.rows = in.logits.size(0);
  in.positions = in.logits.size(1);
  in.vocab = in.logits.size(2);
  if (mask_in.has_value() && mask_in->defined()) {
    TORCH_CHECK_VALUE(mask_in->numel() == in.rows * in.positions, op, ": mask must be (N, T) = (", in.rows, ", ",
                      in.positions, "), got shape ", mask_in->sizes());
    check_same_device(op, "mask", *mask_in, logits_in);
    in.mask = mask_in->reshape({in.rows, in.positions}).to(at::kFloat).contiguous();
  }
  return in;
}

}  // namespace localvol
