#pragma once
// Choosing the next token from a row of logits, and a generation loop, with the semantics of
// transformers' generate (do_sample with TemperatureLogitsWarper -> TopKLogitsWarper ->
// TopPLogitsWarper, in that order):
//
//   z = logits / temperature                       temperature 0: greedy argmax, no draw
//   top-k: keep the tokens whose z is >= the k-th largest z (ties at the boundary are kept, as
//          transformers' `scores < topk(scores, k)[..., -1]` does)
//   p = softmax(z over the kept tokens)
//   top-p: keep the smallest set of most probable tokens whose mass reaches top_p (at least one)
//   sample from p renormalized over the kept tokens
//
// Reproducibility: the caller holds a std::mt19937_64 (its output sequence is fixed by the C++
// standard) and the uniform draw is made here from its raw 64 bits (53 bits -> [0, 1)), not through
// std::uniform_real_distribution, whose algorithm each standard library chooses. Reductions are in
// double, candidates are ordered by (z descending, id ascending), so a seed gives the same tokens
// on every platform for the same logits.
//
// generate() recomputes the whole sequence each step (the model has no KV cache), keeping the last
// `window` tokens (the model's max_position_embeddings) when the sequence grows longer.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "qlora/core/error.hpp"

namespace qlora {

struct SamplingOptions {
  float temperature = 0;   // 0: greedy argmax; > 0 divides the logits
  int top_k = 0;           // 0: off
  float top_p = 1;         // 1: off; in (0, 1]
  std::uint64_t seed = 0;  // for the std::mt19937_64 that generate() makes
};

inline void check_sampling(const SamplingOptions& o) {
  QLORA_CHECK(std::isfinite(o.temperature) && o.temperature >= 0,
              "sampling: temperature must be a finite number >= 0 (0 = greedy), got ", o.temperature);
  QLORA_CHECK(o.top_k >= 0, "sampling: top_k must be >= 0 (0 = off), got ", o.top_k);
  QLORA_CHECK(o.top_p > 0 && o.top_p <= 1, "sampling: top_p must be in (0, 1] (1 = off), got ", o.top_p);
}

// A uniform double in [0, 1) from the top 53 bits of one draw: the same on every platform.
inline double uniform01(std::mt19937_64& rng) { return double(rng() >> 11) * 0x1.0p-53; }

namespace detail {
inline void check_logits(const float* logits, std::int64_t V) {
  QLORA_CHECK(V > 0, "sampling: a logits row of ", V, " values, expected at least 1");
  bool any = false;
  for (std::int64_t i = 0; i < V; ++i) {
    const float z = logits[i];
    QLORA_CHECK(!std::isnan(z), "sampling: logits[", i, "] is NaN");
    QLORA_CHECK(z != INFINITY, "sampling: logits[", i, "] is +inf");
    any = any || z != -INFINITY;
  }
  QLORA_CHECK(any, "sampling: every one of the ", V, " logits is -inf");
}
}  // namespace detail

// The index of the largest logit, the first one on ties (as torch.argmax).
inline std::int64_t argmax(const float* logits, std::int64_t V) {
  std::int64_t best = 0;
  for (std::int64_t i = 1; i < V; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

// The tokens sampling may return and their probabilities (summing to 1), most probable first:
// what sample_next draws from. Greedy (temperature 0) gives the argmax with probability 1.
inline std::vector<std::pair<std::int64_t, double>> sampling_candidates(const float* logits, std::int64_t V,
                                                                        const SamplingOptions& o) {
  check_sampling(o);
  detail::check_logits(logits, V);
  if (o.temperature == 0) return {{argmax(logits, V), 1.0}};
  std::vector<std::int64_t> order(static_cast<std::size_t>(V));
  for (std::int64_t i = 0; i < V; ++i) order[std::size_t(i)] = i;
  // z = logits / temperature keeps the order of the logits, so order by the logits themselves.
  auto before = [&](std::int64_t a, std::int64_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::sort(order.begin(), order.end(), before);
  std::size_t keep = order.size();
  // -inf logits (masked tokens) never count, and never reach sampling
  while (keep > 1 && logits[order[keep - 1]] == -INFINITY) --keep;
  if (o.top_k > 0 && std::size_t(o.top_k) < keep) {
    const float kth = logits[order[std::size_t(o.top_k) - 1]];
    keep = std::size_t(o.top_k);
    while (keep < order.size() && logits[order[keep]] == kth) ++keep;
  }
  const double inv_t = 1.0 / double(o.temperature);
  const double zmax = double(logits[order[0]]) * inv_t;
  std::vector<std::pair<std::int64_t, double>> c(keep);
  double total = 0;
  for (std::size_t i = 0; i < keep; ++i) {
    const double e = std::exp(double(logits[order[i]]) * inv_t - zmax);
    c[i] = {order[i], e};
    total += e;
  }
  for (auto& x : c) x.second /= total;
  if (o.top_p < 1) {
    // The smallest prefix whose mass reaches top_p; ties across the cut follow the id order.
    double mass = 0;
    std::size_t n = 0;
    while (n < c.size()) {
      mass += c[n++].second;
      if (mass >= double(o.top_p)) break;
    }
    c.resize(n);
    for (auto& x : c) x.second /= mass;
  }
  return c;
}

// The next token id from one row of logits (V values). Draws one number from rng unless greedy.
inline std::int64_t sample_next(const float* logits, std::int64_t V, const SamplingOptions& o,
                                std::mt19937_64& rng) {
  const auto c = sampling_candidates(logits, V, o);
  if (o.temperature == 0) return c[0].first;
  const double u = uniform01(rng);
  double cum = 0;
  for (const auto& x : c) {
    cum += x.second;
    if (u < cum) return x.first;
  }
  return c.back().first;  // u within rounding of 1
}

struct GenerateOptions {
  std::int64_t max_new_tokens = 200;
  std::optional<std::int64_t> stop_token;  // generation ends after producing it (it is returned)
  std::int64_t window = 0;                 // the most tokens given to the model per step; 0: all
  SamplingOptions sampling;
};

namespace detail {
struct NoTokenCallback {
  void operator()(std::int64_t) const {}
};
}  // namespace detail

// logits_of(const std::vector<std::int64_t>& ids) -> std::vector<float>: the logits of the token
// after ids (the last position's row, V values). Returns the new ids; on_token(id) is called as
// each one is chosen (for streaming).
template <class LogitsOf, class OnToken = detail::NoTokenCallback>
std::vector<std::int64_t> generate(LogitsOf&& logits_of, const std::vector<std::int64_t>& prompt,
                                   const GenerateOptions& opt, OnToken&& on_token = {}) {
  check_sampling(opt.sampling);
  QLORA_CHECK(!prompt.empty(), "generate: the prompt has no tokens, expected at least one");
  QLORA_CHECK(opt.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0, got ", opt.max_new_tokens);
  QLORA_CHECK(opt.window >= 0, "generate: window must be >= 0 (0 = all), got ", opt.window);
  std::mt19937_64 rng(opt.sampling.seed);
  std::vector<std::int64_t> seq = prompt, out, ctx;
  for (std::int64_t step = 0; step < opt.max_new_tokens; ++step) {
    const bool cut = opt.window > 0 && std::int64_t(seq.size()) > opt.window;
    if (cut) ctx.assign(seq.end() - opt.window, seq.end());
    const std::vector<float> z = logits_of(cut ? ctx : seq);
    const std::int64_t id = sample_next(z.data(), std::int64_t(z.size()), opt.sampling, rng);
    seq.push_back(id);
    out.push_back(id);
    on_token(id);
    if (opt.stop_token && id == *opt.stop_token) break;
  }
  return out;
}

// logits_of for a model with `std::vector<float> logits(const std::int64_t* ids, B, T)` returning
// (B·T, V) and config().vocab_size (LlamaModel): the last row of a batch-1 forward.
template <class Model>
auto last_logits_of(Model& model) {
  return [&model](const std::vector<std::int64_t>& ids) {
    const std::int64_t T = std::int64_t(ids.size()), V = model.config().vocab_size;
    std::vector<float> z = model.logits(ids.data(), 1, T);  // (T, V)
    return std::vector<float>(z.end() - V, z.end());
  };
}

// generate() on a model, the window capped at its max_position_embeddings.
template <class Model, class OnToken = detail::NoTokenCallback>
std::vector<std::int64_t> generate_with(Model& model, const std::vector<std::int64_t>& prompt,
                                        GenerateOptions opt, OnToken&& on_token = {}) {
  const std::int64_t max_pos = model.config().max_position_embeddings;
  if (opt.window == 0 || opt.window > max_pos) opt.window = max_pos;
  return generate(last_logits_of(model), prompt, opt, std::forward<OnToken>(on_token));
}

}  // namespace qlora
