// CUDA kernels of the ops built on the random stream: philox_bits, gaussian, direction_stats, perturb_.
// Generation and perturbation: grid-stride loops in which a thread owns one Philox block (four
// consecutive elements) of one direction. direction_stats: blocks of 256 threads each reduce a strided
// share of one direction in float64 into a partial, then one block per direction merges the partials
// in a fixed order (deterministic on a given GPU). Host glue: register.cpp.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>

#include "../philox.h"
#include "launchers.h"

namespace localvol {
namespace {

constexpr int kThreads = 256;

int multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Enough blocks to fill the GPU a few times over; the grid-stride loops cover the rest.
unsigned int grid_for(int64_t work) {
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(wanted, 8 * multiprocessor_count())));
}

// Where a Philox block's lane 0 lands, and which of its four lanes fall inside [0, length).
struct BlockSpan {
  int64_t offset;
  int lo, hi;
};

__device__ __forceinline__ BlockSpan block_span(int64_t block, int64_t start, int64_t length) {
  const int64_t offset = 4 * block - start;
  BlockSpan s;
  s.offset = offset;
  s.lo = offset < 0 ? static_cast<int>(-offset) : 0;
  s.hi = static_cast<int>(length - offset < 4 ? length - offset : 4);
  return s;
}

// One Philox block's four values as the output type: the uint32 words (held in int64) or the Gaussians.
__device__ __forceinline__ void block_values(uint64_t seed, uint64_t index, uint64_t block, int64_t (&v)[4]) {
  const PhiloxWords w = philox_block(seed, index, block);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = w.x[i];
}

__device__ __forceinline__ void block_values(uint64_t seed, uint64_t index, uint64_t block, float (&v)[4]) {
  const GaussianBlock z = gaussian_block(seed, index, block);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = z.z[i];
}

// philox_bits (out_t int64_t) and gaussian (out_t float): out[row, j] = value j - start of direction index[row].
template <typename out_t>
__global__ void stream_kernel(uint64_t seed, const int64_t* __restrict__ index, int64_t rows, int64_t start,
                              int64_t length, int64_t first_block, int64_t blocks, out_t* __restrict__ out) {
  const int64_t work = rows * blocks;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < work;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = k / blocks, block = first_block + k % blocks;
    out_t v[4];
    block_values(seed, static_cast<uint64_t>(index[row]), static_cast<uint64_t>(block), v);
    const BlockSpan s = block_span(block, start, length);
    for (int lane = s.lo; lane < s.hi; ++lane) out[row * length + s.offset + lane] = v[lane];
  }
}

// out[row, j] = anchor[j] + scale[row] * p[j] * g_j, in float64, rounded once to out_t.
template <typename out_t, typename param_t>
__global__ void perturb_kernel(uint64_t seed, const int64_t* __restrict__ index, int64_t rows, int64_t start,
                               int64_t n, int64_t first_block, int64_t blocks, const param_t* __restrict__ anchor,
                               const param_t* __restrict__ precond, const double* __restrict__ scale, out_t* out,
                               int64_t row_stride, int64_t col_stride) {
  const int64_t work = rows * blocks;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < work;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = k / blocks, block = first_block + k % blocks;
    const GaussianBlock z = gaussian_block(seed, static_cast<uint64_t>(index[row]), static_cast<uint64_t>(block));
    const BlockSpan s = block_span(block, start, n);
    const double sc = scale[row];
    for (int lane = s.lo; lane < s.hi; ++lane) {
      const int64_t j = s.offset + lane;
      const double g = static_cast<double>(z.z[lane]);
      const double pg = precond ? g * static_cast<double>(precond[j]) : g;
      out[row * row_stride + j * col_stride] = static_cast<out_t>(static_cast<double>(anchor[j]) + sc * pg);
    }
  }
}

// The five statistics of SPEC.md; the exit factor's min propagates NaN like torch.amin.
struct Stats {
  double v[5];
};

__device__ __forceinline__ double nan_min(double a, double b) { return (a != a || a < b) ? a : b; }

__device__ __forceinline__ void merge(Stats& a, const Stats& b) {
#pragma unroll
  for (int i = 0; i < 4; ++i) a.v[i] += b.v[i];
  a.v[4] = nan_min(a.v[4], b.v[4]);
}

// Block-wide merge of every thread's Stats (blockDim.x == kThreads); the result is valid in thread 0.
__device__ Stats block_merge(Stats s) {
  __shared__ Stats warp_results[kThreads / 32];
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) {
    Stats other;
#pragma unroll
    for (int i = 0; i < 5; ++i) other.v[i] = __shfl_down_sync(0xffffffffu, s.v[i], delta);
    merge(s, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_results[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = warp_results[lane < kThreads / 32 ? lane : 0];
    if (lane >= kThreads / 32) {  // identity elements for the unused lanes
      for (int i = 0; i < 4; ++i) s.v[i] = 0.0;
      s.v[4] = CUDART_INF;
    }
#pragma unroll
    for (int delta = 16; delta > 0; delta /= 2) {
      Stats other;
#pragma unroll
      for (int i = 0; i < 5; ++i) other.v[i] = __shfl_down_sync(0xffffffffu, s.v[i], delta);
      merge(s, other);
    }
  }
  return s;
}

// Grid (rows, parts): block (row, part) covers the direction's Philox blocks part, part + parts, ...
// (in steps of kThreads) and writes partial[row, part].
template <typename param_t>
__global__ void direction_stats_partial_kernel(uint64_t seed, const int64_t* __restrict__ index, int64_t start,
                                               int64_t n, int64_t first_block, int64_t blocks,
                                               const param_t* __restrict__ anchor, const param_t* __restrict__ precond,
                                               const param_t* __restrict__ weights, const param_t* __restrict__ bounds,
                                               Stats* __restrict__ partial) {
  const int64_t row = blockIdx.x;
  const int64_t parts = gridDim.y;
  Stats s = {{0.0, 0.0, 0.0, 0.0, CUDART_INF}};
  for (int64_t k = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; k < blocks; k += parts * kThreads) {
    const int64_t block = first_block + k;
    const GaussianBlock z = gaussian_block(seed, static_cast<uint64_t>(index[row]), static_cast<uint64_t>(block));
    const BlockSpan span = block_span(block, start, n);
    for (int lane = span.lo; lane < span.hi; ++lane) {
      const int64_t j = span.offset + lane;
      const double g = static_cast<double>(z.z[lane]);
      const double pg = precond ? g * static_cast<double>(precond[j]) : g;
      const double x = static_cast<double>(anchor[j]);
      const double w = weights ? static_cast<double>(weights[j]) : 1.0;
      s.v[0] += g * g;
      s.v[1] += pg * pg;
      s.v[2] += pg * x * w;
      s.v[3] += pg * pg * w;
      if (bounds) {
        const double sign = static_cast<double>((pg > 0.0) - (pg < 0.0));
        s.v[4] = nan_min(s.v[4], (static_cast<double>(bounds[j]) - sign * x) / fabs(pg));
      }
    }
  }
  s = block_merge(s);
  if (threadIdx.x == 0) partial[row * parts + blockIdx.y] = s;
}

// One block per direction merges its partials into out[row, 0:5].
__global__ void direction_stats_final_kernel(const Stats* __restrict__ partial, int64_t parts, double* __restrict__ out) {
  const int64_t row = blockIdx.x;
  Stats s = {{0.0, 0.0, 0.0, 0.0, CUDART_INF}};
  for (int64_t part = threadIdx.x; part < parts; part += kThreads) merge(s, partial[row * parts + part]);
  s = block_merge(s);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 5; ++i) out[row * 5 + i] = s.v[i];
  }
}

template <typename out_t>
void launch_stream(uint64_t seed, const int64_t* index, int64_t rows, int64_t start, int64_t length, out_t* out,
                   cudaStream_t stream) {
  const BlockRange range = block_range(start, length);
  if (rows == 0 || range.count == 0) return;
  stream_kernel<out_t><<<grid_for(rows * range.count), kThreads, 0, stream>>>(seed, index, rows, start, length,
                                                                             range.first, range.count, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace cuda {

void launch_philox_bits(uint64_t seed, const int64_t* index, int64_t rows, int64_t start, int64_t length,
                        int64_t* out, cudaStream_t stream) {
  launch_stream(seed, index, rows, start, length, out, stream);
}

void launch_gaussian(uint64_t seed, const int64_t* index, int64_t rows, int64_t start, int64_t length, float* out,
                     cudaStream_t stream) {
  launch_stream(seed, index, rows, start, length, out, stream);
}

template <typename out_t, typename param_t>
void launch_perturb(uint64_t seed, const int64_t* index, int64_t rows, int64_t start, int64_t n,
                    const param_t* anchor, const param_t* precond, const double* scale, out_t* out,
                    int64_t row_stride, int64_t col_stride, cudaStream_t stream) {
  const BlockRange range = block_range(start, n);
  if (rows == 0 || range.count == 0) return;
  perturb_kernel<out_t, param_t><<<grid_for(rows * range.count), kThreads, 0, stream>>>(
      seed, index, rows, start, n, range.first, range.count, anchor, precond, scale, out, row_stride, col_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t direction_stats_parts(int64_t rows, int64_t n) {
  // Enough blocks in all to fill the GPU a few times, at most one per kThreads Philox blocks.
  const int64_t blocks = block_range(0, n).count + 1;  // + 1: a start that is not a multiple of 4
  const int64_t wanted = (8 * static_cast<int64_t>(multiprocessor_count()) + rows - 1) / std::max<int64_t>(rows, 1);
  return std::max<int64_t>(1, std::min<int64_t>({wanted, (blocks + kThreads - 1) / kThreads, 65535}));
}

template <typename param_t>
void launch_direction_stats(uint64_t seed, const int64_t* index, int64_t rows, int64_t start, int64_t n,
                            const param_t* anchor, const param_t* precond, const param_t* weights,
                            const param_t* bounds, int64_t parts, double* workspace, double* out,
                            cudaStream_t stream) {
  static_assert(sizeof(Stats) == 5 * sizeof(double), "the workspace holds 5 doubles per partial");
  if (rows == 0) return;
  const BlockRange range = block_range(start, n);
  Stats* partial = reinterpret_cast<Stats*>(workspace);
  const dim3 grid(static_cast<unsigned int>(rows), static_cast<unsigned int>(parts));
  direction_stats_partial_kernel<param_t><<<grid, kThreads, 0, stream>>>(
      seed, index, start, n, range.first, range.count, anchor, precond, weights, bounds, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  direction_stats_final_kernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(partial, parts, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define LOCALVOL_PERTURB(out_t, param_t)                                                                        \
  template void launch_perturb<out_t, param_t>(uint64_t, const int64_t*, int64_t, int64_t, int64_t,            \
                                               const param_t*, const param_t*, const double*, out_t*, int64_t, \
                                               int64_t, cudaStream_t);
#define LOCALVOL_PERTURB_ALL(param_t) \
  LOCALVOL_PERTURB(float, param_t)    \
  LOCALVOL_PERTURB(double, param_t)   \
  LOCALVOL_PERTURB(c10::Half, param_t) \
  LOCALVOL_PERTURB(c10::BFloat16, param_t)
LOCALVOL_PERTURB_ALL(float)
LOCALVOL_PERTURB_ALL(double)
#undef LOCALVOL_PERTURB_ALL
#undef LOCALVOL_PERTURB

template void launch_direction_stats<float>(uint64_t, const int64_t*, int64_t, int64_t, int64_t, const float*,
                                            const float*, const float*, const float*, int64_t, double*, double*,
                                            cudaStream_t);
template void launch_direction_stats<double>(uint64_t, const int64_t*, int64_t, int64_t, int64_t, const double*,
                                             const double*, const double*, const double*, int64_t, double*, double*,
                                             cudaStream_t);

}  // namespace cuda
}  // namespace localvol
