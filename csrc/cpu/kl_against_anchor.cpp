// CPU kernel of kl_against_anchor: per row n of (N, T, V) logits, the mean over unmasked positions t of
//   KL(anchor || softmax(logits)) = sum_v exp(a_v) (a_v - log_softmax(logits)_v).
// Each position streams its vocabulary row in chunks converted to float32 on the stack, in three passes:
// the max, the sum of exp(l_v - max), the KL terms. The passes work on kLanes-wide vectors (GCC vector
// extensions, compiled per instruction set, see isa.h) with a branch-free exp, so a small vocabulary
// costs a few vector operations per position and a large one streams at the exp's speed. Nothing of
// size (N, T, V) is allocated; the only buffers are the per-position values and the mask, O(N T).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "../op_checks.h"
#include "isa.h"
#include "kernels.h"

// The wide vectors only pass between always-inline helpers, never across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace localvol {
namespace cpu {
namespace {

// Every path sums in 16 float32 lanes, held as 16 / W hardware vectors of W lanes (W = 4 SSE, 8 AVX2,
// 16 AVX-512), so the summation order, and with it every result, is the same on every machine. A chunk
// of kChunk elements is summed in the lanes (chains of kChunk / kLanes additions), then the lanes and the
// chunk totals in order: chains stay near 64 + 16 + V / kChunk additions (about 130 for a 50k
// vocabulary), which keeps float32 sums accurate.
constexpr int kLanes = 16;
constexpr int64_t kChunk = 1024;

template <int W>
struct Hw {
  typedef float F __attribute__((vector_size(W * sizeof(float))));
  typedef int32_t I __attribute__((vector_size(W * sizeof(int32_t))));
  static constexpr int kVecs = kLanes / W;

  LOCALVOL_ALWAYS_INLINE static F splat(float x) { return F{} + x; }
  LOCALVOL_ALWAYS_INLINE static F load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  // Lanes 0, 1, ..., 15 of the vectors, added in that order.
  LOCALVOL_ALWAYS_INLINE static float sum(const F (&v)[kVecs]) {
    float total = 0.0f;
    for (int i = 0; i < kVecs; ++i) {
      for (int k = 0; k < W; ++k) total += v[i][k];
    }
    return total;
  }

  // exp in float32 without branches: x = n ln2 + r with n = rint(x / ln2) and |r| <= ln2 / 2 (ln2 in
  // two parts, so r is nearly exact), exp(r) by its degree-7 Taylor polynomial (truncation below 5e-9
  // relative), times 2^n built in the exponent bits. Results below exp(-86.5) (about 3e-38, so
  // n >= -125) are flushed to 0: they are negligible next to the sums they enter. +inf and NaN pass
  // through as for std::exp.
  LOCALVOL_ALWAYS_INLINE static F exp(F x) {
    const F lowest = splat(-86.5f), highest = splat(88.7f);
    const F clamped = x < lowest ? lowest : (x > highest ? highest : x);
    // Adding 1.5 * 2^23 rounds to an integer n, left in the low mantissa bits: bits(t) - bits(shifter) = n.
    const F shifter = splat(12582912.0f);
    const F t = clamped * splat(1.44269504f) + shifter;
    const F n = t - shifter;
    const F r = (clamped - n * splat(0.693359375f)) - n * splat(-2.12194440e-4f);
    F p = splat(1.0f / 5040.0f);
    p = p * r + splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    // 2^n for n in [-125, 128]: 2^(n - 1) * 2 keeps n = 128 (x near 88.7) representable.
    I t_bits, shifter_bits;
    std::memcpy(&t_bits, &t, sizeof t_bits);
    std::memcpy(&shifter_bits, &shifter, sizeof shifter_bits);
    const I bits = (t_bits - shifter_bits + 126) << 23;
    F scale;
    std::memcpy(&scale, &bits, sizeof scale);
    F result = p * scale * splat(2.0f);
    result = x < lowest ? F{} : result;
    result = x > highest ? splat(std::numeric_limits<float>::infinity()) : result;
    return x != x ? x : result;
  }

  // The KL term exp(a) (a - (l - shifted)) of a class, 0 where the anchor gives it probability 0.
  LOCALVOL_ALWAYS_INLINE static F term(F l, F a, F shift) {
    const F p = exp(a);
    return p == F{} ? F{} : p * (a - (l - shift));
  }
};

// Elements [begin, begin + count) of a row as float32, padded with `pad` to whole groups of kLanes.
template <typename T>
LOCALVOL_ALWAYS_INLINE int64_t load_chunk(const T* row, int64_t begin, int64_t count, float pad, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(row[begin + i]);
  const int64_t padded = (count + kLanes - 1) / kLanes * kLanes;
  for (int64_t i = count; i < padded; ++i) out[i] = pad;
  return padded / kLanes;
}

// One position of a large vocabulary, streamed in chunks, three passes: the max, the sum of
// exp(l_v - max), the KL terms with log_softmax(l)_v = (l_v - max) - log_sum. Padding is l = -inf
// (adds exp(-inf) = 0) and a = -inf (probability 0). A NaN is not carried by the max; it propagates
// through the sum.
template <int W, typename logit_t, typename anchor_t>
LOCALVOL_ALWAYS_INLINE float position_kl(const logit_t* logits, const anchor_t* anchor, int64_t vocab) {
  using H = Hw<W>;
  using F = typename H::F;
  constexpr int kVecs = H::kVecs;
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  alignas(64) float l[kChunk], a[kChunk];

  F top[kVecs];
  for (int i = 0; i < kVecs; ++i) top[i] = H::splat(kMinusInf);
  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    const int64_t groups = load_chunk(logits, begin, std::min(kChunk, vocab - begin), kMinusInf, l);
    for (int64_t j = 0; j < groups * kLanes; j += kLanes) {
      for (int i = 0; i < kVecs; ++i) {
        const F x = H::load(l + j + i * W);
        top[i] = x > top[i] ? x : top[i];
      }
    }
  }
  float max = kMinusInf;
  for (int i = 0; i < kVecs; ++i) {
    for (int k = 0; k < W; ++k) max = top[i][k] > max ? top[i][k] : max;
  }
  const F max_lanes = H::splat(max);

  float sum = 0.0f;
  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    const int64_t groups = load_chunk(logits, begin, std::min(kChunk, vocab - begin), kMinusInf, l);
    F acc[kVecs] = {};
    for (int64_t j = 0; j < groups * kLanes; j += kLanes) {
      for (int i = 0; i < kVecs; ++i) acc[i] += H::exp(H::load(l + j + i * W) - max_lanes);
    }
    sum += H::sum(acc);
  }
  const F log_sum = H::splat(std::log(sum));

  float kl = 0.0f;
  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    const int64_t count = std::min(kChunk, vocab - begin);
    const int64_t groups = load_chunk(logits, begin, count, 0.0f, l);
    load_chunk(anchor, begin, count, kMinusInf, a);
    F acc[kVecs] = {};
    for (int64_t j = 0; j < groups * kLanes; j += kLanes) {
      for (int i = 0; i < kVecs; ++i) {
        acc[i] += H::term(H::load(l + j + i * W) - max_lanes, H::load(a + j + i * W), log_sum);
      }
    }
    kl += H::sum(acc);
  }
  return kl;
}

// A small vocabulary (a classifier's handful of classes) would leave most lanes of a row's vectors idle
// and pay the per-row reductions for a few elements, so kLanes positions go through the passes together,
// one per lane, reading their rows transposed into a block on the stack.
constexpr int64_t kSmallVocab = 64;

template <int W, typename logit_t, typename anchor_t>
LOCALVOL_ALWAYS_INLINE void small_vocab_kl(const logit_t* const* logits, const anchor_t* const* anchor, int64_t vocab,
                                           float* out) {
  using H = Hw<W>;
  using F = typename H::F;
  alignas(64) float l[kSmallVocab][kLanes], a[kSmallVocab][kLanes], log_sum[kLanes];
  for (int64_t v = 0; v < vocab; ++v) {
    for (int k = 0; k < kLanes; ++k) {
      l[v][k] = static_cast<float>(logits[k][v]);
      a[v][k] = static_cast<float>(anchor[k][v]);
    }
  }
  for (int i = 0; i < kLanes; i += W) {
    F top = H::splat(-std::numeric_limits<float>::infinity()), sum{};
    for (int64_t v = 0; v < vocab; ++v) {
      const F x = H::load(l[v] + i);
      top = x > top ? x : top;
    }
    for (int64_t v = 0; v < vocab; ++v) sum += H::exp(H::load(l[v] + i) - top);
    for (int k = 0; k < W; ++k) log_sum[i + k] = std::log(sum[k]);
    const F shift = H::load(log_sum + i);
    F kl{};
    for (int64_t v = 0; v < vocab; ++v) kl += H::term(H::load(l[v] + i) - top, H::load(a[v] + i), shift);
    std::memcpy(out + i, &kl, sizeof kl);
  }
}

// One ISA path: KL of the positions k in [begin, end) of a (rows, positions, vocab) view.
template <typename logit_t, typename anchor_t>
struct PositionsKL {
  struct Args {
    const logit_t* logits;
    const anchor_t* anchor;
    int64_t logit_strides[2], anchor_strides[2], positions, vocab;
    const float* mask;
    float* out;

    const logit_t* logit_row(int64_t k) const {
      return logits + k / positions * logit_strides[0] + k % positions * logit_strides[1];
    }
    const anchor_t* anchor_row(int64_t k) const {
      return anchor + k / positions * anchor_strides[0] + k % positions * anchor_strides[1];
    }
  };

  template <int W>
  LOCALVOL_ALWAYS_INLINE static void run_impl(const Args& g, int64_t begin, int64_t end) {
    if (g.vocab > kSmallVocab) {
      for (int64_t k = begin; k < end; ++k) {
        if (g.mask && g.mask[k] == 0.0f) continue;  // padding: never read
        g.out[k] = position_kl<W>(g.logit_row(k), g.anchor_row(k), g.vocab);
      }
      return;
    }
    // Groups of kLanes unmasked positions; a last, partial group repeats its first position.
    int64_t group[kLanes];
    const logit_t* l[kLanes];
    const anchor_t* a[kLanes];
    float kl[kLanes];
    int filled = 0;
    for (int64_t k = begin; k <= end; ++k) {
      const bool last = k == end;
      if (!last && !(g.mask && g.mask[k] == 0.0f)) group[filled++] = k;
      if (filled == kLanes || (last && filled > 0)) {
        for (int j = 0; j < kLanes; ++j) {
          const int64_t position = group[j < filled ? j : 0];
          l[j] = g.logit_row(position);
          a[j] = g.anchor_row(position);
        }
        small_vocab_kl<W>(l, a, g.vocab, kl);
        for (int j = 0; j < filled; ++j) g.out[group[j]] = kl[j];
        filled = 0;
      }
    }
  }

#define LOCALVOL_KL_RUN(attributes, name, width) \
  attributes static void name(const Args& g, int64_t begin, int64_t end) { run_impl<width>(g, begin, end); }
  LOCALVOL_ISA_PATHS(LOCALVOL_KL_RUN, run, 4, 8, 16)
#undef LOCALVOL_KL_RUN
  static auto pick() { return LOCALVOL_PICK(run); }
};

}  // namespace

at::Tensor kl_against_anchor(const at::Tensor& logits_in, const at::Tensor& anchor_in,
                             const std::optional<at::Tensor>& mask_in) {
  const KLInputs in = prepare_kl_inputs(logits_in, anchor_in, mask_in);
  const at::Tensor &logits = in.logits, &anchor = in.anchor, &mask = in.mask;
  const int64_t rows = in.rows, positions = in.positions, vocab = in.vocab;
  const float* m = mask.defined() ? mask.const_data_ptr<float>() : nullptr;

  at::Tensor per_position = at::zeros({rows, positions}, logits.options().dtype(at::kFloat));
  float* kl = per_position.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "kl_against_anchor", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, anchor.scalar_type(), "kl_against_anchor", [&] {
      using anchor_t = scalar_t;
      using Run = PositionsKL<logit_t, anchor_t>;
      const typename Run::Args args{logits.const_data_ptr<logit_t>(),
                                    anchor.const_data_ptr<anchor_t>(),
                                    {logits.stride(0), logits.stride(1)},
                                    {anchor.stride(0), anchor.stride(1)},
                                    positions,
                                    vocab,
                                    m,
                                    kl};
      const auto run = Run::pick();
      at::parallel_for(0, rows * positions, grain, [&](int64_t begin, int64_t end) { run(args, begin, end); });
    });
  });

  // Per row: sum_t m_t kl_t / max(sum_t m_t, 1) (mean over T without a mask), summed in float32.
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float total = 0.0f, count = 0.0f;
      for (int64_t t = 0; t < positions; ++t) {
        const float weight = m ? m[n * positions + t] : 1.0f;
        if (weight != 0.0f) total += weight * kl[n * positions + t];
        count += weight;
      }
      o[n] = total / std::max(count, 1.0f);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace localvol
