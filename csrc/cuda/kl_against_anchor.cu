// CUDA kernels of kl_against_anchor: per row n of (N, T, V) logits, the mean over unmasked positions t of
//   KL(anchor || softmax(logits)) = sum_v exp(a_v) (a_v - log_softmax(logits)_v).
// One block per vocabulary row (n, t): pass 1 an online max / sum of exp in float32 (streaming
// logsumexp) merged across the block, pass 2 the KL terms (the row is re-read, mostly from L2), then a
// block reduction. A second kernel, one block per n, takes the masked mean over t. Nothing of size
// (N, T, V) is allocated: the host glue (register.cpp) passes per-position values and the mask, O(N T).
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include "launchers.h"

namespace localvol {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct LogSumExp {
  float max;
  float sum;  // sum of exp(x - max)
};

__device__ __forceinline__ LogSumExp lse_merge(LogSumExp a, LogSumExp b) {
  if (b.max == -CUDART_INF_F) return a;
  if (a.max == -CUDART_INF_F) return b;
  if (b.max > a.max) return {b.max, a.sum * expf(a.max - b.max) + b.sum};
  return {a.max, a.sum + b.sum * expf(b.max - a.max)};  // also the NaN path: NaN propagates
}

// Merge across the block (blockDim.x == kThreads); every thread gets the result.
__device__ LogSumExp block_lse(LogSumExp s) {
  __shared__ LogSumExp warp_results[kWarps];
  __shared__ LogSumExp result;
  for (int delta = 16; delta > 0; delta /= 2) {
    const LogSumExp other = {__shfl_xor_sync(0xffffffffu, s.max, delta), __shfl_xor_sync(0xffffffffu, s.sum, delta)};
    s = lse_merge(s, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_results[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    LogSumExp total = warp_results[0];
    for (int i = 1; i < kWarps; ++i) total = lse_merge(total, warp_results[i]);
    result = total;
  }
  __syncthreads();
  return result;
}

// Sum across the block (blockDim.x == kThreads); the result is valid in thread 0.
__device__ float block_sum(float v) {
  __shared__ float warp_results[kWarps];
  for (int delta = 16; delta > 0; delta /= 2) v += __shfl_down_sync(0xffffffffu, v, delta);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kWarps; ++i) total += warp_results[i];
  }
  return total;
}

// Grid: one block per position k = n * T + t; writes kl[k] (0 for a masked position, never read).
template <typename logit_t, typename anchor_t>
__global__ void position_kl_kernel(const logit_t* __restrict__ logits, const anchor_t* __restrict__ anchor,
                                   const float* __restrict__ mask, int64_t positions, int64_t vocab,
                                   int64_t logit_stride_n, int64_t logit_stride_t, int64_t anchor_stride_n,
                                   int64_t anchor_stride_t, float* __restrict__ kl) {
  const int64_t k = blockIdx.x;
  if (mask && mask[k] == 0.0f) {  // uniform across the block: no thread reaches a __syncthreads
    if (threadIdx.x == 0) kl[k] = 0.0f;
    return;
  }
  const int64_t n = k / positions, t = k % positions;
  const logit_t* l = logits + n * logit_stride_n + t * logit_stride_t;
  const anchor_t* a = anchor + n * anchor_stride_n + t * anchor_stride_t;

  LogSumExp s = {-CUDART_INF_F, 0.0f};
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float x = static_cast<float>(l[v]);
    if (x > s.max) {
      s.sum = s.sum * expf(s.max - x) + 1.0f;
      s.max = x;
    } else if (x != -CUDART_INF_F) {  // NaN falls through and propagates
      s.sum += expf(x - s.max);
    }
  }
  const LogSumExp total = block_lse(s);
  const float max = total.max, log_sum = logf(total.sum);

  // term_v = exp(a_v) (a_v - ((l_v - max) - log_sum)); a zero-probability anchor entry contributes 0.
  float acc = 0.0f;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float av = static_cast<float>(a[v]);
    const float p = expf(av);
    if (p != 0.0f) acc += p * (av - ((static_cast<float>(l[v]) - max) - log_sum));
  }
  const float sum = block_sum(acc);
  if (threadIdx.x == 0) kl[k] = sum;
}

// One block per row n: out[n] = sum_t m_t kl_t / max(sum_t m_t, 1) (m = 1 without a mask).
__global__ void masked_mean_kernel(const float* __restrict__ kl, const float* __restrict__ mask, int64_t positions,
                                   float* __restrict__ out) {
  const int64_t n = blockIdx.x;
  float total = 0.0f, count = 0.0f;
  for (int64_t t = threadIdx.x; t < positions; t += kThreads) {
    const float weight = mask ? mask[n * positions + t] : 1.0f;
    if (weight != 0.0f) total += weight * kl[n * positions + t];
    count += weight;
  }
  total = block_sum(total);
  __syncthreads();  // block_sum's shared buffer is reused
  count = block_sum(count);
  if (threadIdx.x == 0) out[n] = total / fmaxf(count, 1.0f);
}

}  // namespace

namespace cuda {

template <typename logit_t, typename anchor_t>
void launch_position_kl(const logit_t* logits, const anchor_t* anchor, const float* mask, int64_t rows,
                        int64_t positions, int64_t vocab, int64_t logit_stride_n, int64_t logit_stride_t,
                        int64_t anchor_stride_n, int64_t anchor_stride_t, float* kl, cudaStream_t stream) {
  if (rows * positions == 0) return;
  position_kl_kernel<logit_t, anchor_t><<<static_cast<unsigned int>(rows * positions), kThreads, 0, stream>>>(
      logits, anchor, mask, positions, vocab, logit_stride_n, logit_stride_t, anchor_stride_n, anchor_stride_t, kl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_masked_mean(const float* kl, const float* mask, int64_t rows, int64_t positions, float* out,
                        cudaStream_t stream) {
  if (rows == 0) return;
  masked_mean_kernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(kl, mask, positions, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define LOCALVOL_POSITION_KL(logit_t, anchor_t)                                                                 \
  template void launch_position_kl<logit_t, anchor_t>(const logit_t*, const anchor_t*, const float*, int64_t, \
                                                      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,   \
                                                      float*, cudaStream_t);
#define LOCALVOL_POSITION_KL_ALL(logit_t)   \
  LOCALVOL_POSITION_KL(logit_t, float)      \
  LOCALVOL_POSITION_KL(logit_t, double)     \
  LOCALVOL_POSITION_KL(logit_t, c10::Half)  \
  LOCALVOL_POSITION_KL(logit_t, c10::BFloat16)
LOCALVOL_POSITION_KL_ALL(float)
LOCALVOL_POSITION_KL_ALL(double)
LOCALVOL_POSITION_KL_ALL(c10::Half)
LOCALVOL_POSITION_KL_ALL(c10::BFloat16)
#undef LOCALVOL_POSITION_KL_ALL
#undef LOCALVOL_POSITION_KL

}  // namespace cuda
}  // namespace localvol
