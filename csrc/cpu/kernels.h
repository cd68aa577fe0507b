// The CPU kernels of the localvol ops (schemas: ../ops.cpp; contract: localvol_fast/ops/SPEC.md),
// one definition file each (stream_ops.cpp holds philox_bits and gaussian), registered in register.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace localvol {
namespace cpu {

at::Tensor philox_bits(int64_t seed, const at::Tensor& indices, int64_t start, int64_t length);

at::Tensor gaussian(int64_t seed, const at::Tensor& indices, int64_t start, int64_t length);

at::Tensor direction_stats(int64_t seed, const at::Tensor& indices, const at::Tensor& anchor,
                           const std::optional<at::Tensor>& precond, const std::optional<at::Tensor>& weights,
                           const std::optional<at::Tensor>& bounds, int64_t start);

void perturb(at::Tensor& out, const at::Tensor& anchor, const std::optional<at::Tensor>& precond, int64_t seed,
             const at::Tensor& indices, const at::Tensor& scales, int64_t start);

at::Tensor kl_against_anchor(const at::Tensor& logits, const at::Tensor& anchor_logprobs,
                             const std::optional<at::Tensor>& mask);

}  // namespace cpu
}  // namespace localvol
