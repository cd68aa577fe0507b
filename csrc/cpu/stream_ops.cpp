// CPU kernels of philox_bits and gaussian: the stream itself, (B, length) of int64 words or float32
// Gaussians. They differ only in the chunk they compute and in how they copy it out.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <cstring>

#include "../op_checks.h"
#include "kernels.h"
#include "stream.h"
#include "tasks.h"

namespace localvol {
namespace cpu {
namespace {

// out[row, j] = value j of elements [start, start + length) of direction indices[row]: fill computes a
// chunk, then copy(dst, chunk, count, k0, m) writes its entries k0 .. k0 + m - 1 (count: its blocks).
template <typename out_t, typename Copy>
at::Tensor stream_op(const char* op, int64_t seed, const at::Tensor& indices, int64_t start, int64_t length,
                     WordsFn fill, const Copy& copy) {
  check_range(op, start, length);
  const at::Tensor idx = checked_cpu_indices(op, indices);
  at::Tensor out = at::empty({idx.numel(), length}, idx.options().dtype(c10::CppTypeToScalarType<out_t>::value));
  out_t* o = out.mutable_data_ptr<out_t>();
  const int64_t* index = idx.const_data_ptr<int64_t>();
  const uint64_t s = seed_bits(seed);
  parallel_tasks(idx.numel(), start, length,
                 [&](int64_t, int64_t row, int64_t first, int64_t last, StreamChunk& chunk) {
                   int count = 0;
                   walk_chunks(
                       first, last, start, length,
                       [&](uint64_t block, int n) {
                         count = n;
                         fill(s, static_cast<uint64_t>(index[row]), block, n, chunk);
                       },
                       [&](int64_t j, int64_t k0, int64_t m) { copy(o + row * length + j, chunk, count, k0, m); });
                 });
  return out;
}

}  // namespace

at::Tensor philox_bits(int64_t seed, const at::Tensor& indices, int64_t start, int64_t length) {
  return stream_op<int64_t>("philox_bits", seed, indices, start, length, stream_words(),
                            [](int64_t* dst, const StreamChunk& chunk, int count, int64_t k0, int64_t m) {
                              for (int64_t k = k0; k < k0 + m; ++k) {
                                const int64_t i = k >> 2;
                                const int lane = static_cast<int>(k & 3);
                                const uint32_t* words = (lane & 1) ? chunk.angle : chunk.radius;
                                *dst++ = words[(lane & 2 ? count : 0) + i];
                              }
                            });
}

at::Tensor gaussian(int64_t seed, const at::Tensor& indices, int64_t start, int64_t length) {
  return stream_op<float>("gaussian", seed, indices, start, length, stream_gaussians(),
                          [](float* dst, const StreamChunk& chunk, int, int64_t k0, int64_t m) {
                            std::memcpy(dst, chunk.z + k0, m * sizeof(float));
                          });
}

}  // namespace cpu
}  // namespace localvol
