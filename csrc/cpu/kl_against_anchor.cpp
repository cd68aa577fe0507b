// CPU kernel of kl_against_anchor: per row n of (N, T, V) logits, the mean over unmasked positions t of
//   KL(anchor || softmax(logits)) = sum_v exp(a_v) (a_v - log_softmax(logits)_v).
// Each position streams its vocabulary row twice in float32: pass 1 an online max / sum of exp
// (streaming logsumexp), pass 2 the KL terms, each summed as a short cascade. Nothing of size
// (N, T, V) is allocated; the only buffers are the per-position values and the mask, O(N T).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../op_checks.h"

namespace localvol {
namespace {

// Float32 summation error grows with the length of each addition chain, so a row is summed as a
// cascade: kLanes independent accumulators over chunks of kChunk elements, then the chunk totals.
// Chains stay near kChunk / kLanes + vocab / kChunk additions (about 150 for a 50k vocabulary).
constexpr int kLanes = 8;
constexpr int64_t kChunk = 1024;

struct LogSumExp {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;  // sum of exp(x - max)

  void add(float x) {
    if (x > max) {
      sum = sum * std::exp(max - x) + 1.0f;
      max = x;
    } else if (x != -std::numeric_limits<float>::infinity()) {  // NaN falls through and propagates
      sum += std::exp(x - max);
    }
  }
  void merge(const LogSumExp& o) {
    if (o.max == -std::numeric_limits<float>::infinity()) return;
    if (o.max > max) {
      sum = sum * std::exp(max - o.max) + o.sum;
      max = o.max;
    } else {
      sum += o.sum * std::exp(o.max - max);
    }
  }
};

template <typename logit_t, typename anchor_t>
float position_kl(const logit_t* logits, const anchor_t* anchor, int64_t vocab) {
  // Pass 1: streaming logsumexp of the logits.
  LogSumExp total;
  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    const int64_t end = std::min(vocab, begin + kChunk);
    LogSumExp lanes[kLanes];
    int64_t v = begin;
    for (; v + kLanes <= end; v += kLanes) {
      for (int k = 0; k < kLanes; ++k) lanes[k].add(static_cast<float>(logits[v + k]));
    }
    for (; v < end; ++v) lanes[0].add(static_cast<float>(logits[v]));
    for (int k = 0; k < kLanes; ++k) total.merge(lanes[k]);
  }
  const float max = total.max, log_sum = std::log(total.sum);

  // Pass 2: term_v = exp(a_v) (a_v - ((l_v - max) - log_sum)); a zero-probability anchor entry adds 0.
  auto term = [&](int64_t i) {
    const float a = static_cast<float>(anchor[i]);
    const float p = std::exp(a);
    return p == 0.0f ? 0.0f : p * (a - ((static_cast<float>(logits[i]) - max) - log_sum));
  };
  float kl = 0.0f;
  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    const int64_t end = std::min(vocab, begin + kChunk);
    float lanes[kLanes] = {};
    int64_t v = begin;
    for (; v + kLanes <= end; v += kLanes) {
      for (int k = 0; k < kLanes; ++k) lanes[k] += term(v + k);
    }
    for (; v < end; ++v) lanes[0] += term(v);
    float chunk = 0.0f;
    for (int k = 0; k < kLanes; ++k) chunk += lanes[k];
    kl += chunk;
  }
  return kl;
}

at::Tensor kl_against_anchor_cpu(const at::Tensor& logits_in, const at::Tensor& anchor_in,
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
      const logit_t* l = logits.const_data_ptr<logit_t>();
      const anchor_t* a = anchor.const_data_ptr<anchor_t>();
      at::parallel_for(0, rows * positions, grain, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          if (m && m[k] == 0.0f) continue;  // padding: never read
          const int64_t n = k / positions, t = k % positions;
          kl[k] = position_kl(l + n * logits.stride(0) + t * logits.stride(1),
                              a + n * anchor.stride(0) + t * anchor.stride(1), vocab);
        }
      });
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

}  // namespace
}  // namespace localvol

TORCH_LIBRARY_IMPL(localvol, CPU, m) { m.impl("kl_against_anchor", &localvol::kl_against_anchor_cpu); }
