// The package's random stream (definition: localvol_fast/philox.py), shared by the C++ and CUDA kernels.
//
// Element j of direction i under seed s:
//   key     = (s lo, s hi)                                   (64-bit seed as two uint32 words)
//   counter = (block lo, block hi, i lo, i hi),  block = j / 4
//   (x0, x1, x2, x3) = Philox-4x32-10(counter, key)          (Random123 constants)
//   uniform(x) = (float(x >> 8) + 0.5f) * 2^-24              (float32 arithmetic, as the reference)
//   lanes (0, 1) = Box-Muller(x0, x1), lanes (2, 3) = Box-Muller(x2, x3), in float32
//   element j = lane j % 4 of its block.
// The words are bit-identical to the reference; the Gaussians differ only through the platform's
// logf/sinf/cosf, so this header must not be compiled with fast-math (nvcc --use_fast_math).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LOCALVOL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LOCALVOL_HOST_DEVICE inline
#endif

namespace localvol {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
// float32(2 pi): every backend multiplies by this same number.
constexpr float kTwoPiF32 = 6.2831854820251465f;

struct PhiloxWords {
  uint32_t x[4];
};

LOCALVOL_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* high) {
#if defined(__CUDA_ARCH__)
  *high = __umulhi(a, b);
  return a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *high = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
#endif
}

// Philox-4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1).
LOCALVOL_HOST_DEVICE PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                               uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  PhiloxWords out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// The words of 4-element block `block` of direction `index` under `seed`.
LOCALVOL_HOST_DEVICE PhiloxWords philox_block(uint64_t seed, uint64_t index, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// float32 uniform in (0, 1]: (float(x >> 8) + 0.5f) * 2^-24, each step rounded to float32 like the
// reference (the top values round up to exactly 1, where the Box-Muller radius is 0).
LOCALVOL_HOST_DEVICE float uniform_from_bits(uint32_t bits) {
  // An add then a multiply by a power of two: nothing a compiler may fuse into an FMA.
  return (static_cast<float>(bits >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24, exact
}

struct GaussianBlock {
  float z[4];
};

// The four float32 Gaussians of one Philox block (Box-Muller on the word pairs (0, 1) and (2, 3)).
LOCALVOL_HOST_DEVICE GaussianBlock box_muller(const PhiloxWords& w) {
  GaussianBlock out;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int pair = 0; pair < 2; ++pair) {
    const float rho = sqrtf(-2.0f * logf(uniform_from_bits(w.x[2 * pair])));
    const float phi = uniform_from_bits(w.x[2 * pair + 1]) * kTwoPiF32;
    out.z[2 * pair] = rho * cosf(phi);
    out.z[2 * pair + 1] = rho * sinf(phi);
  }
  return out;
}

LOCALVOL_HOST_DEVICE GaussianBlock gaussian_block(uint64_t seed, uint64_t index, uint64_t block) {
  return box_muller(philox_block(seed, index, block));
}

// The Philox blocks covering elements [start, start + length): [first, first + count). Host code only
// (the CPU tasks and the CUDA launchers split work with it), hence plain inline.
struct BlockRange {
  int64_t first;
  int64_t count;
};

inline BlockRange block_range(int64_t start, int64_t length) {
  const int64_t first = start / 4;
  return {first, length == 0 ? 0 : (start + length + 3) / 4 - first};
}

}  // namespace localvol
