// The CUDA kernels' launchers: raw pointers and a stream in, kernels queued out (each launch checked
// with C10_CUDA_KERNEL_LAUNCH_CHECK). Defined in csrc/cuda/*.cu, which include no torch dispatcher or
// Tensor headers so that nvcc stays fast; argument checks, allocation, dtype dispatch and the
// TORCH_LIBRARY_IMPL(localvol, CUDA, m) registration are host C++ in csrc/cuda/register.cpp.
// Element types: out_t, logit_t, anchor_t in {float, double, c10::Half, c10::BFloat16}; param_t in
// {float, double}.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace localvol {
namespace cuda {

// out[row, j] = word j of elements [start, start + length) of direction index[row]: (rows, length).
void launch_philox_bits(uint64_t seed, const int64_t* index, int64_t rows, int64_t start, int64_t length,
                        int64_t* out, cudaStream_t stream);

// out[row, j] = Gaussian j of elements [start, start + length) of direction index[row]: (rows, length).
void launch_gaussian(uint64_t seed, const int64_t* index, int64_t rows, int64_t start, int64_t length, float* out,
                     cudaStream_t stream);

// out[row * row_stride + j * col_stride] = anchor[j] + scale[row] * precond[j] * g_j (float64, rounded once).
template <typename out_t, typename param_t>
void launch_perturb(uint64_t seed, const int64_t* index, int64_t rows, int64_t start, int64_t n,
                    const param_t* anchor, const param_t* precond, const double* scale, out_t* out,
                    int64_t row_stride, int64_t col_stride, cudaStream_t stream);

// How many partial results per direction direction_stats uses: its workspace holds rows * parts * 5 doubles.
int64_t direction_stats_parts(int64_t rows, int64_t n);

// out (rows, 5) float64: the statistics of SPEC.md; precond, weights, bounds may be null.
template <typename param_t>
void launch_direction_stats(uint64_t seed, const int64_t* index, int64_t rows, int64_t start, int64_t n,
                            const param_t* anchor, const param_t* precond, const param_t* weights,
                            const param_t* bounds, int64_t parts, double* workspace, double* out,
                            cudaStream_t stream);

// kl[k] for positions k = n * positions + t of (rows, positions, vocab) inputs whose vocabulary is
// contiguous (outer strides given); 0 where mask (rows * positions floats, may be null) is 0.
template <typename logit_t, typename anchor_t>
void launch_position_kl(const logit_t* logits, const anchor_t* anchor, const float* mask, int64_t rows,
                        int64_t positions, int64_t vocab, int64_t logit_stride_n, int64_t logit_stride_t,
                        int64_t anchor_stride_n, int64_t anchor_stride_t, float* kl, cudaStream_t stream);

// out[n] = sum_t m_t kl[n, t] / max(sum_t m_t, 1), m = mask or ones.
void launch_masked_mean(const float* kl, const float* mask, int64_t rows, int64_t positions, float* out,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace localvol
