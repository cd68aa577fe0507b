// The CPU stream's chunk generators (stream.h), one per ISA path (isa.h: function attributes, picked
// at run time). Everything here is reached only through stream_words() / stream_gaussians().
#include "stream.h"

#include <cmath>
#include <cstring>

#include "../philox.h"
#include "isa.h"

namespace localvol {
namespace cpu {
namespace {

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

}  // namespace

WordsFn stream_words() { return LOCALVOL_PICK(words); }
GaussiansFn stream_gaussians() { return LOCALVOL_PICK(gaussians); }

}  // namespace cpu
}  // namespace localvol
