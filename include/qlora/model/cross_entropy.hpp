#pragma once
// Next-token cross-entropy as transformers' ForCausalLMLoss: logits[:, :-1] against labels[:, 1:]
// (the last position has no target), ignore_index -100, mean over the targets that count.
//
// The logits are fp32 (transformers upcasts them); log-sum-exp, the sum over targets and the mean
// are taken in double, so the result is the correctly rounded fp32 of the exact loss (transformers'
// fp32 reductions land within a few ulps of it). The gradient wrt the logits is
//   dlogits[b, t, :] = (softmax(logits[b, t, :]) − onehot(label[b, t + 1])) / count
// and 0 on rows without a target.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "qlora/core/error.hpp"

namespace qlora {

constexpr std::int64_t kIgnoreIndex = -100;

// logits (B·T, V); labels (B, T); dlogits (B·T, V), overwritten, or null for the loss only.
inline float causal_lm_loss(const float* logits, const std::int64_t* labels, std::int64_t B, std::int64_t T,
                            std::int64_t V, float* dlogits) {
  std::int64_t count = 0;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 1; t < T; ++t) {
      const std::int64_t y = labels[b * T + t];
      QLORA_CHECK(y == kIgnoreIndex || (y >= 0 && y < V), "causal_lm_loss: label [", b, ", ", t, "] is ", y,
                  ", expected -100 or a token id in [0, ", V, ")");
      if (y != kIgnoreIndex) ++count;
    }
  // torch gives NaN (0 / 0) when no target counts; an Error says why instead
  QLORA_CHECK(count > 0, "causal_lm_loss: every label is -100, no target to compute a loss on");
  double total = 0;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t) {
      const float* z = logits + (b * T + t) * V;
      float* dz = dlogits ? dlogits + (b * T + t) * V : nullptr;
      const std::int64_t y = t + 1 < T ? labels[b * T + t + 1] : kIgnoreIndex;
      if (y == kIgnoreIndex) {
        if (dz)
          for (std::int64_t i = 0; i < V; ++i) dz[i] = 0.0f;
        continue;
      }
      double mx = z[0];
      for (std::int64_t i = 1; i < V; ++i) mx = std::max(mx, double(z[i]));
      double se = 0;
      for (std::int64_t i = 0; i < V; ++i) se += std::exp(double(z[i]) - mx);
      const double lse = mx + std::log(se);
      total += lse - double(z[y]);
      if (dz) {
        for (std::int64_t i = 0; i < V; ++i) {
          const double p = std::exp(double(z[i]) - lse);
          dz[i] = float((i == y ? p - 1.0 : p) / double(count));
        }
      }
    }
  return float(total / double(count));
}

}  // namespace qlora
