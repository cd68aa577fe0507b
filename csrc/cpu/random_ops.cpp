// CPU kernels of the ops built on the random stream: philox_bits, gaussian, direction_stats, perturb_.
// Work is split into (direction, run of Philox blocks) tasks, run by torch.get_num_threads() threads
// (run_workers). Each task walks its run in chunks of up to kChunkBlocks blocks: the chunk's Philox words,
// then its Gaussians, are computed into a small per-thread buffer by loops the compiler vectorizes (see
// "The stream, a chunk at a time"), and the op consumes the chunk's elements inside [start, start + n).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ParallelGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "../op_checks.h"
#include "../philox.h"
#include "isa.h"


namespace localvol {
namespace {

// Philox blocks per parallel task: big enough to amortize scheduling, small enough to balance. Also
// fixes direction_stats' summation order (one partial per task), whatever the thread count.
constexpr int64_t kBlocksPerTask = 1 << 12;
// Philox blocks per chunk of the per-thread buffer (20 KiB: stays in L1).
constexpr int kChunkBlocks = 512;
static_assert(kBlocksPerTask % kChunkBlocks == 0, "a task is whole chunks");

// ------------------------------------------------------------------ the stream, a chunk at a time
//
// The words are those of philox.h, computed for kChunkBlocks blocks at once (AVX2/AVX-512 intrinsics,
// else a loop GCC vectorizes with SSE2's pmuludq). The Gaussians follow philox.h's Box-Muller in
// float32 step by step (uniforms, -2 log u, sqrt, phi = u * float32(2 pi), rho * cos, rho * sin) except
// that log, sin and cos are evaluated in float64 by branch-free polynomials and rounded once to float32:
// on every one of the 2^24 possible uniforms this gives the correctly rounded logf, sinf and cosf
// (checked exhaustively against float(log(double)) etc.), where glibc and SLEEF are within 1 ulp. The
// loops vectorize, and every ISA path gives bit-identical Gaussians.

// One chunk's buffers. The words of block i of a chunk of `count` blocks: radius[i] = x0,
// radius[count + i] = x2, angle[i] = x1, angle[count + i] = x3 (pair p = (radius[p], angle[p])).
struct StreamChunk {
  alignas(64) uint32_t radius[2 * kChunkBlocks];
  alignas(64) uint32_t angle[2 * kChunkBlocks];
  alignas(64) float rho[2 * kChunkBlocks];
  alignas(64) float z[4 * kChunkBlocks];  // element order: z[4 i + lane]
};

// Counter word 1 of block first + i (i < 2^31): the high word, plus the carry out of the low word.
LOCALVOL_ALWAYS_INLINE uint32_t block_hi(uint32_t first_lo, uint32_t first_hi, uint32_t lo) {
  return first_hi + (lo < first_lo ? 1u : 0u);
}

LOCALVOL_ALWAYS_INLINE void philox_words_tail(uint64_t seed, uint64_t index, uint64_t first, int from, int count,
                                              uint32_t* __restrict radius, uint32_t* __restrict angle) {
  for (int i = from; i < count; ++i) {
    const PhiloxWords w = philox_block(seed, index, first + static_cast<uint64_t>(i));
    radius[i] = w.x[0];
    angle[i] = w.x[1];
    radius[count + i] = w.x[2];
    angle[count + i] = w.x[3];
  }
}

// Portable form (GCC vectorizes the 32 x 32 -> 64-bit products with pmuludq).
LOCALVOL_ALWAYS_INLINE void philox_words_generic(uint64_t seed, uint64_t index, uint64_t first, int count,
                                                 uint32_t* __restrict radius, uint32_t* __restrict angle) {
  const uint32_t first_lo = static_cast<uint32_t>(first), first_hi = static_cast<uint32_t>(first >> 32);
  const uint32_t index_lo = static_cast<uint32_t>(index), index_hi = static_cast<uint32_t>(index >> 32);
  const uint32_t seed_lo = static_cast<uint32_t>(seed), seed_hi = static_cast<uint32_t>(seed >> 32);
  const size_t n = static_cast<size_t>(count);
  for (size_t i = 0; i < n; ++i) {
    uint32_t c0 = first_lo + static_cast<uint32_t>(i);
    uint32_t c1 = block_hi(first_lo, first_hi, c0);
    uint32_t c2 = index_lo, c3 = index_hi, k0 = seed_lo, k1 = seed_hi;
#pragma GCC unroll 10
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
      c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    radius[i] = c0;
    angle[i] = c1;
    radius[n + i] = c2;
    angle[n + i] = c3;
  }
}

LOCALVOL_ALWAYS_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

LOCALVOL_ALWAYS_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// log(u) for a float u in (0, 1], in float64 (the reduction and polynomial of musl's log: u = 2^e m,
// m in [sqrt(1/2), sqrt(2)), f = m - 1, s = f / (2 + f); error far below a float32 ulp).
LOCALVOL_ALWAYS_INLINE double log_unit(float u) {
  const uint32_t shifted = float_bits(u) + (0x3f800000u - 0x3f3504f3u);
  const int32_t e = static_cast<int32_t>(shifted >> 23) - 0x7f;
  const float m = bits_float((shifted & 0x007fffffu) + 0x3f3504f3u);
  const double f = static_cast<double>(m) - 1.0;
  const double s = f / (2.0 + f);
  const double z = s * s;
  const double w = z * z;
  const double t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
  const double t2 =
      z * (6.666666666666735130e-01 +
           w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
  const double hfsq = 0.5 * f * f;
  const double k = static_cast<double>(e);
  return s * (hfsq + (t2 + t1)) + k * 1.90821492927058770002e-10 - hfsq + f + k * 6.93147180369123816490e-01;
}

// sin(phi) and cos(phi) for a float phi in [0, 2 pi], in float64: phi = q pi/2 + r (q in 0..4, |r| <= pi/4,
// pi/2 in two parts), then musl's sin and cos kernels on r and the quadrant's swap and signs.
LOCALVOL_ALWAYS_INLINE void sincos_angle(float phi, double* sin_out, double* cos_out) {
  const double d = static_cast<double>(phi);
  const double q = (d * 6.36619772367581382433e-01 + 0x1.8p52) - 0x1.8p52;  // round to nearest, in float64
  const int32_t quadrant = static_cast<int32_t>(q);
  const double r = (d - q * 1.57079632673412561417e+00) - q * 6.07710050650619224932e-11;
  const double z = r * r;
  const double w = z * z;
  const double sin_tail = 8.33333333332248946124e-03 +
                          z * (-1.98412698298579493134e-04 + z * 2.75573137070700676789e-06) +
                          z * w * (-2.50507602534068634195e-08 + z * 1.58969099521155010221e-10);
  const double s = r + z * r * (-1.66666666666666324348e-01 + z * sin_tail);
  const double cos_tail =
      z * (4.16666666666666019037e-02 + z * (-1.38888888888741095749e-03 + z * 2.48015872894767294178e-05)) +
      w * w * (-2.75573143513906633035e-07 + z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11));
  const double hz = 0.5 * z;
  const double one_minus_hz = 1.0 - hz;
  const double c = one_minus_hz + (((1.0 - one_minus_hz) - hz) + z * cos_tail);
  const bool swap = quadrant & 1;
  const double sin_r = swap ? c : s;
  const double cos_r = swap ? s : c;
  *sin_out = (quadrant & 2) ? -sin_r : sin_r;
  *cos_out = ((quadrant + 1) & 2) ? -cos_r : cos_r;
}

// rho2[p] = -2 log(uniform(radius[p])) in float32, for the chunk's 2 count pairs.
LOCALVOL_ALWAYS_INLINE void radius_squared(const uint32_t* __restrict radius, int pairs, float* __restrict rho2) {
  for (size_t p = 0; p < static_cast<size_t>(pairs); ++p) {
    rho2[p] = -2.0f * static_cast<float>(log_unit(uniform_from_bits(radius[p])));
  }
}

// z of the chunk's `count` blocks in element order from rho and the angle words.
LOCALVOL_ALWAYS_INLINE void rotate(const float* __restrict rho, const uint32_t* __restrict angle, int count,
                                   float* __restrict z) {
  const size_t n = static_cast<size_t>(count);
  for (size_t i = 0; i < n; ++i) {
    double s01, c01, s23, c23;
    sincos_angle(uniform_from_bits(angle[i]) * kTwoPiF32, &s01, &c01);
    sincos_angle(uniform_from_bits(angle[n + i]) * kTwoPiF32, &s23, &c23);
    z[4 * i] = rho[i] * static_cast<float>(c01);
    z[4 * i + 1] = rho[i] * static_cast<float>(s01);
    z[4 * i + 2] = rho[n + i] * static_cast<float>(c23);
    z[4 * i + 3] = rho[n + i] * static_cast<float>(s23);
  }
}

// The per-ISA entry points: the words of a chunk, and its Gaussians (into chunk.z).
using WordsFn = void (*)(uint64_t seed, uint64_t index, uint64_t first, int count, StreamChunk& chunk);
using GaussiansFn = void (*)(uint64_t seed, uint64_t index, uint64_t first, int count, StreamChunk& chunk);

LOCALVOL_NO_CONTRACT void words_default(uint64_t seed, uint64_t index, uint64_t first, int count, StreamChunk& chunk) {
  philox_words_generic(seed, index, first, count, chunk.radius, chunk.angle);
}

LOCALVOL_NO_CONTRACT void gaussians_default(uint64_t seed, uint64_t index, uint64_t first, int count,
                                            StreamChunk& chunk) {
  philox_words_generic(seed, index, first, count, chunk.radius, chunk.angle);
  const int pairs = 2 * count;
  radius_squared(chunk.radius, pairs, chunk.rho);
  // sqrt in its own loop: with errno semantics (no -fno-math-errno) GCC does not vectorize sqrtf.
  int p = 0;
#if LOCALVOL_X86_DISPATCH
  for (; p + 4 <= pairs; p += 4) _mm_store_ps(chunk.rho + p, _mm_sqrt_ps(_mm_load_ps(chunk.rho + p)));
#endif
  for (; p < pairs; ++p) chunk.rho[p] = std::sqrt(chunk.rho[p]);
  rotate(chunk.rho, chunk.angle, count, chunk.z);
}

#if LOCALVOL_X86_DISPATCH

// The high and low words of the products of the eight (sixteen) uint32 lanes of c with m: _mul_epu32
// multiplies the even lanes; the odd lanes are shifted down and multiplied separately.
LOCALVOL_TARGET_AVX2 void words_avx2(uint64_t seed, uint64_t index, uint64_t first, int count, StreamChunk& chunk) {
  uint32_t* __restrict radius = chunk.radius;
  uint32_t* __restrict angle = chunk.angle;
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  __m256i key0[kPhiloxRounds], key1[kPhiloxRounds];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    key0[round] = _mm256_set1_epi32(static_cast<int>(k0));
    key1[round] = _mm256_set1_epi32(static_cast<int>(k1));
  }
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i first_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
  const __m256i first_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
  const __m256i first_lo_signed = _mm256_xor_si256(first_lo, sign);
  const __m256i index_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(index)));
  const __m256i index_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(index >> 32)));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int i = 0;
  for (; i + 8 <= count; i += 8) {
    __m256i c0 = _mm256_add_epi32(first_lo, _mm256_add_epi32(lanes, _mm256_set1_epi32(i)));
    // Carry where c0 < first_lo (unsigned compare via flipped sign bits): the mask is -1 there.
    const __m256i carry = _mm256_cmpgt_epi32(first_lo_signed, _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(first_hi, carry);
    __m256i c2 = index_lo, c3 = index_hi;
#pragma GCC unroll 10
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m256i p0_even = _mm256_mul_epu32(c0, m0);
      const __m256i p0_odd = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
      const __m256i p1_even = _mm256_mul_epu32(c2, m1);
      const __m256i p1_odd = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0_even, 32), p0_odd, 0xAA);
      const __m256i lo0 = _mm256_blend_epi32(p0_even, _mm256_slli_epi64(p0_odd, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1_even, 32), p1_odd, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(p1_even, _mm256_slli_epi64(p1_odd, 32), 0xAA);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), key0[round]);
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), key1[round]);
      c1 = lo1;
      c3 = lo0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(radius + i), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(angle + i), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(radius + count + i), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(angle + count + i), c3);
  }
  philox_words_tail(seed, index, first, i, count, radius, angle);
}

// GCC 12 warns that the _mm512_undefined_*() inside _mm512_mul_epu32, _mm512_sqrt_ps etc. "may be used
// uninitialized" (GCC bug 105593): silenced for the AVX-512 functions.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
LOCALVOL_TARGET_AVX512 void words_avx512(uint64_t seed, uint64_t index, uint64_t first, int count,
                                         StreamChunk& chunk) {
  uint32_t* __restrict radius = chunk.radius;
  uint32_t* __restrict angle = chunk.angle;
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  __m512i key0[kPhiloxRounds], key1[kPhiloxRounds];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    key0[round] = _mm512_set1_epi32(static_cast<int>(k0));
    key1[round] = _mm512_set1_epi32(static_cast<int>(k1));
  }
  const __m512i first_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
  const __m512i first_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
  const __m512i index_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(index)));
  const __m512i index_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(index >> 32)));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i one = _mm512_set1_epi32(1);
  const __mmask16 odd = 0xAAAA;
  int i = 0;
  for (; i + 16 <= count; i += 16) {
    __m512i c0 = _mm512_add_epi32(first_lo, _mm512_add_epi32(lanes, _mm512_set1_epi32(i)));
    __m512i c1 = _mm512_mask_add_epi32(first_hi, _mm512_cmplt_epu32_mask(c0, first_lo), first_hi, one);
    __m512i c2 = index_lo, c3 = index_hi;
#pragma GCC unroll 10
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m512i p0_even = _mm512_mul_epu32(c0, m0);
      const __m512i p0_odd = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
      const __m512i p1_even = _mm512_mul_epu32(c2, m1);
      const __m512i p1_odd = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
      const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p0_even, 32), p0_odd);
      const __m512i lo0 = _mm512_mask_blend_epi32(odd, p0_even, _mm512_slli_epi64(p0_odd, 32));
      const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p1_even, 32), p1_odd);
      const __m512i lo1 = _mm512_mask_blend_epi32(odd, p1_even, _mm512_slli_epi64(p1_odd, 32));
      c0 = _mm512_ternarylogic_epi32(hi1, c1, key0[round], 0x96);  // three-way xor
      c2 = _mm512_ternarylogic_epi32(hi0, c3, key1[round], 0x96);
      c1 = lo1;
      c3 = lo0;
    }
    _mm512_storeu_si512(radius + i, c0);
    _mm512_storeu_si512(angle + i, c1);
    _mm512_storeu_si512(radius + count + i, c2);
    _mm512_storeu_si512(angle + count + i, c3);
  }
  philox_words_tail(seed, index, first, i, count, radius, angle);
}

LOCALVOL_TARGET_AVX2 void gaussians_avx2(uint64_t seed, uint64_t index, uint64_t first, int count,
                                         StreamChunk& chunk) {
  words_avx2(seed, index, first, count, chunk);
  const int pairs = 2 * count;
  radius_squared(chunk.radius, pairs, chunk.rho);
  int p = 0;
  for (; p + 8 <= pairs; p += 8) _mm256_store_ps(chunk.rho + p, _mm256_sqrt_ps(_mm256_load_ps(chunk.rho + p)));
  for (; p < pairs; ++p) chunk.rho[p] = std::sqrt(chunk.rho[p]);
  rotate(chunk.rho, chunk.angle, count, chunk.z);
}

LOCALVOL_TARGET_AVX512 void gaussians_avx512(uint64_t seed, uint64_t index, uint64_t first, int count,
                                             StreamChunk& chunk) {
  words_avx512(seed, index, first, count, chunk);
  const int pairs = 2 * count;
  radius_squared(chunk.radius, pairs, chunk.rho);
  int p = 0;
  for (; p + 16 <= pairs; p += 16) _mm512_store_ps(chunk.rho + p, _mm512_sqrt_ps(_mm512_load_ps(chunk.rho + p)));
  for (; p < pairs; ++p) chunk.rho[p] = std::sqrt(chunk.rho[p]);
  rotate(chunk.rho, chunk.angle, count, chunk.z);
}
#pragma GCC diagnostic pop
#endif  // LOCALVOL_X86_DISPATCH


WordsFn stream_words() { return LOCALVOL_PICK(words); }
GaussiansFn stream_gaussians() { return LOCALVOL_PICK(gaussians); }

// ------------------------------------------------------------------ tasks

at::Tensor checked_cpu_indices(const char* op, const at::Tensor& indices) {
  at::Tensor idx = checked_indices(op, indices);
  if (idx.numel()) {
    const int64_t* p = idx.const_data_ptr<int64_t>();
    const int64_t lowest = *std::min_element(p, p + idx.numel());
    TORCH_CHECK_VALUE(lowest >= 0, op, ": direction indices must be non-negative, got ", lowest);
  }
  return idx;
}

// Calls run(next) on `workers` threads (this one included), where next() hands out task ids 0, 1, ...
// (then values >= tasks). The parallel path of this file: at::parallel_for is a header template that only
// runs in parallel when the including file is compiled with OpenMP (-fopenmp), which torch's extension
// build does not add, so without INTRA_OP_PARALLEL it would run everything on the calling thread. Tasks
// are handed out dynamically, which also balances a machine shared with other processes.
constexpr int64_t kMinTasksPerThread = 4;

template <typename Run>
void run_workers(int64_t tasks, const Run& run) {
  std::atomic<int64_t> counter{0};
  auto next = [&counter] { return counter.fetch_add(1, std::memory_order_relaxed); };
#if defined(INTRA_OP_PARALLEL)
  // One task list; parallel_for's ranges each run a worker that draws from it.
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), tasks), 1,
                   [&](int64_t begin, int64_t end) {
                     for (int64_t worker = begin; worker < end; ++worker) run(next);
                   });
#else
  at::internal::lazy_init_num_threads();
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks / kMinTasksPerThread);
  if (workers <= 1 || at::in_parallel_region()) {
    run(next);
    return;
  }
  std::vector<std::exception_ptr> errors(workers);
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int64_t w = 1; w < workers; ++w) {
    try {
      threads.emplace_back([&, w] {
        try {
          c10::ParallelGuard guard(true);
          run(next);
        } catch (...) {
          errors[w] = std::current_exception();
          counter.store(tasks);  // the others stop at their next task
        }
      });
    } catch (const std::system_error&) {
      break;  // no more threads to be had: the ones running (and this one) do all the tasks
    }
  }
  try {
    c10::ParallelGuard guard(true);
    run(next);
  } catch (...) {
    errors[0] = std::current_exception();
    counter.store(tasks);
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
#endif
}

// Runs task(task_id, row, first_block, last_block, chunk) over the (row, run of kBlocksPerTask blocks)
// tasks covering elements [start, start + length) of every row, in parallel, with a chunk buffer per
// worker. Returns the number of runs per row (at least 1; tasks are numbered row * runs + run).
template <typename Task>
int64_t parallel_tasks(int64_t rows, int64_t start, int64_t length, const Task& task) {
  const BlockRange blocks = block_range(start, length);
  const int64_t runs_per_row = std::max<int64_t>(1, (blocks.count + kBlocksPerTask - 1) / kBlocksPerTask);
  if (rows == 0 || blocks.count == 0) return runs_per_row;
  const int64_t tasks = rows * runs_per_row;
  run_workers(tasks, [&](const auto& next) {
    std::unique_ptr<StreamChunk> chunk(new StreamChunk);
    for (int64_t id = next(); id < tasks; id = next()) {
      const int64_t row = id / runs_per_row;
      const int64_t first = blocks.first + (id % runs_per_row) * kBlocksPerTask;
      const int64_t last = std::min(first + kBlocksPerTask, blocks.first + blocks.count);
      task(id, row, first, last, *chunk);
    }
  });
  return runs_per_row;
}

// Walks blocks [first, last) of direction `index` chunk by chunk: fill(chunk's first block, block count)
// computes the chunk, then consume(j, k0, m) gets its elements j .. j + m - 1 of [0, length), which are
// entries k0 .. k0 + m - 1 of the chunk (element 4 i + lane is entry 4 i + lane, i counted from the chunk).
template <typename Fill, typename Consume>
void walk_chunks(int64_t first, int64_t last, int64_t start, int64_t length, const Fill& fill, const Consume& consume) {
  for (int64_t block = first; block < last; block += kChunkBlocks) {
    const int count = static_cast<int>(std::min<int64_t>(kChunkBlocks, last - block));
    fill(static_cast<uint64_t>(block), count);
    const int64_t offset = 4 * block - start;  // element offset of the chunk's entry 0
    const int64_t lo = std::max<int64_t>(0, -offset);
    const int64_t hi = std::min<int64_t>(4 * count, length - offset);
    if (hi > lo) consume(offset + lo, lo, hi - lo);
  }
}

at::Tensor philox_bits_cpu(int64_t seed, const at::Tensor& indices, int64_t start, int64_t length) {
  check_range("philox_bits", start, length);
  const at::Tensor idx = checked_cpu_indices("philox_bits", indices);
  at::Tensor out = at::empty({idx.numel(), length}, idx.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  const int64_t* index = idx.const_data_ptr<int64_t>();
  const uint64_t s = seed_bits(seed);
  const WordsFn fill_words = stream_words();
  const int64_t rows = idx.numel();
  parallel_tasks(rows, start, length, [&](int64_t, int64_t row, int64_t first, int64_t last, StreamChunk& chunk) {
    int count = 0;
    walk_chunks(
        first, last, start, length,
        [&](uint64_t block, int n) {
          count = n;
          fill_words(s, static_cast<uint64_t>(index[row]), block, n, chunk);
        },
        [&](int64_t j, int64_t k0, int64_t m) {
          int64_t* dst = o + row * length + j;
          for (int64_t k = k0; k < k0 + m; ++k) {
            const int64_t i = k >> 2;
            const int lane = static_cast<int>(k & 3);
            const uint32_t* words = (lane & 1) ? chunk.angle : chunk.radius;
            *dst++ = words[(lane & 2 ? count : 0) + i];
          }
        });
  });
  return out;
}

at::Tensor gaussian_cpu(int64_t seed, const at::Tensor& indices, int64_t start, int64_t length) {
  check_range("gaussian", start, length);
  const at::Tensor idx = checked_cpu_indices("gaussian", indices);
  at::Tensor out = at::empty({idx.numel(), length}, idx.options().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  const int64_t* index = idx.const_data_ptr<int64_t>();
  const uint64_t s = seed_bits(seed);
  const GaussiansFn gaussians = stream_gaussians();
  const int64_t rows = idx.numel();
  parallel_tasks(rows, start, length, [&](int64_t, int64_t row, int64_t first, int64_t last, StreamChunk& chunk) {
    walk_chunks(
        first, last, start, length,
        [&](uint64_t block, int n) { gaussians(s, static_cast<uint64_t>(index[row]), block, n, chunk); },
        [&](int64_t j, int64_t k0, int64_t m) { std::memcpy(o + row * length + j, chunk.z + k0, m * sizeof(float)); });
  });
  return out;
}

// ------------------------------------------------------------------ direction_stats

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
  const int64_t runs_per_row = std::max<int64_t>(1, (blocks.count + kBlocksPerTask - 1) / kBlocksPerTask);
  // Partial sums per fixed run of blocks, merged in order: the result does not depend on the thread count.
  std::vector<Stats> partial(rows * runs_per_row);
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
    for (int64_t r = 0; r < runs_per_row; ++r) s.merge(partial[row * runs_per_row + r]);
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
    direction_stats_dispatch<double>(seed_bits(seed), idx, x, p, w, b, start, out);
  } else {
    direction_stats_dispatch<float>(seed_bits(seed), idx, x, p, w, b, start, out);
  }
  return out;
}

// ------------------------------------------------------------------ perturb_

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

void perturb_cpu(at::Tensor& out, const at::Tensor& anchor, const std::optional<at::Tensor>& precond,
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

}  // namespace
}  // namespace localvol

TORCH_LIBRARY_IMPL(localvol, CPU, m) {
  m.impl("philox_bits", &localvol::philox_bits_cpu);
  m.impl("gaussian", &localvol::gaussian_cpu);
  m.impl("direction_stats", &localvol::direction_stats_cpu);
  m.impl("perturb_", &localvol::perturb_cpu);
}
