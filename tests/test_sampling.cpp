// Sampling (model/sampling.hpp): greedy is argmax, top-k / top-p keep exactly the tokens they
// should, sampled frequencies follow the softmax, a seed gives one sequence, bad options are named
// Errors; generate() on the tiny Llama of tests/data/llama equals a greedy loop written by hand.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "qlora/model/llama.hpp"
#include "qlora/model/sampling.hpp"
#include "test_util.hpp"

using namespace qlora;

namespace {
std::string data(const std::string& name) { return std::string(QLORA_TEST_DATA_DIR) + "/llama/" + name; }

SamplingOptions opts(float temperature, int top_k = 0, float top_p = 1, std::uint64_t seed = 0) {
  SamplingOptions o;
  o.temperature = temperature;
  o.top_k = top_k;
  o.top_p = top_p;
  o.seed = seed;
  return o;
}

// Draws n tokens and returns how often each id came.
std::vector<double> frequencies(const std::vector<float>& z, const SamplingOptions& o, int n) {
  std::mt19937_64 rng(o.seed);
  std::vector<double> f(z.size(), 0.0);
  for (int i = 0; i < n; ++i) f[std::size_t(sample_next(z.data(), std::int64_t(z.size()), o, rng))] += 1;
  return f;
}

// Pearson's chi-square of counts against probabilities p (ids with p = 0 must have no count).
double chi_square(const std::vector<double>& counts, const std::vector<double>& p, int n) {
  double chi = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (p[i] == 0) {
      REQUIRE(counts[i] == 0);
      continue;
    }
    const double e = p[i] * n;
    chi += (counts[i] - e) * (counts[i] - e) / e;
  }
  return chi;
}

std::vector<double> softmax(const std::vector<float>& z, double t) {
  double m = -INFINITY, s = 0;
  for (float v : z) m = std::max(m, double(v) / t);
  std::vector<double> p(z.size());
  for (std::size_t i = 0; i < z.size(); ++i) s += p[i] = std::exp(double(z[i]) / t - m);
  for (auto& v : p) v /= s;
  return p;
}

std::string error_of(const std::vector<float>& z, const SamplingOptions& o) {
  std::mt19937_64 rng(0);
  try {
    sample_next(z.data(), std::int64_t(z.size()), o, rng);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}
}  // namespace

TEST_CASE("greedy sampling is argmax, the first one on ties") {
  std::mt19937_64 rng(1);
  const std::vector<float> z = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f};
  CHECK(sample_next(z.data(), 5, opts(0), rng) == 1);
  CHECK(argmax(z.data(), 5) == 1);
  const auto g = testutil::gaussian(1000, 7, 1.0f);
  const std::int64_t best = std::max_element(g.begin(), g.end()) - g.begin();
  CHECK(sample_next(g.data(), 1000, opts(0), rng) == best);
  // greedy draws nothing from the generator
  std::mt19937_64 fresh(1), used(1);
  sample_next(g.data(), 1000, opts(0), used);
  CHECK(fresh() == used());
}

TEST_CASE("top_k = 1 and a tiny top_p are greedy whatever the temperature") {
  const auto g = testutil::gaussian(500, 11, 1.0f);
  const std::int64_t best = argmax(g.data(), 500);
  std::mt19937_64 rng(5);
  for (float t : {0.1f, 1.0f, 10.0f, 1000.0f}) {
    INFO("temperature " << t);
    for (int i = 0; i < 50; ++i) {
      REQUIRE(sample_next(g.data(), 500, opts(t, 1), rng) == best);
      REQUIRE(sample_next(g.data(), 500, opts(t, 0, 1e-6f), rng) == best);
    }
  }
}

TEST_CASE("sampled frequencies follow the softmax of logits / temperature") {
  const std::vector<double> p = {0.4, 0.3, 0.15, 0.1, 0.05};
  std::vector<float> z;
  for (double v : p) z.push_back(float(std::log(v)) + 1.5f);  // a shift changes nothing
  const int n = 200000;
  for (float t : {1.0f, 0.7f, 2.0f}) {
    const auto want = softmax(z, t);
    const double chi = chi_square(frequencies(z, opts(t, 0, 1, 42), n), want, n);
    std::printf("temperature %.1f: chi-square %.2f (4 degrees of freedom)\n", double(t), chi);
    CHECK(chi < 25.0);  // P(chi2_4 > 25) ~ 5e-5
  }
}

TEST_CASE("top-k keeps exactly the k most likely tokens, ties at the boundary included") {
  const std::vector<float> z = {1.0f, 4.0f, 2.0f, 3.0f, 0.0f, -2.0f};
  auto c = sampling_candidates(z.data(), 6, opts(1, 2));
  REQUIRE(c.size() == 2);
  CHECK(c[0].first == 1);
  CHECK(c[1].first == 3);
  CHECK(c[0].second == Approx(std::exp(1.0) / (1 + std::exp(1.0))).epsilon(1e-12));
  const int n = 100000;
  std::vector<double> want(6, 0.0);
  want[1] = c[0].second;
  want[3] = c[1].second;
  CHECK(chi_square(frequencies(z, opts(1, 2, 1, 3), n), want, n) < 20.0);
  // transformers keeps every token whose score equals the k-th largest
  const std::vector<float> tie = {2.0f, 5.0f, 2.0f, 1.0f};
  c = sampling_candidates(tie.data(), 4, opts(1, 2));
  REQUIRE(c.size() == 3);
  CHECK(c[1].first == 0);
  CHECK(c[2].first == 2);
  // k >= V keeps everything
  CHECK(sampling_candidates(z.data(), 6, opts(1, 100)).size() == 6);
}

TEST_CASE("top-p keeps the smallest set of most likely tokens reaching the mass") {
  const std::vector<double> p = {0.1, 0.5, 0.15, 0.25};
  std::vector<float> z;
  for (double v : p) z.push_back(float(std::log(v)));
  auto ids = [&](float top_p, int top_k = 0) {
    std::vector<std::int64_t> out;
    for (auto& c : sampling_candidates(z.data(), 4, opts(1, top_k, top_p))) out.push_back(c.first);
    return out;
  };
  CHECK(ids(0.3f) == std::vector<std::int64_t>{1});
  CHECK(ids(0.5f - 1e-4f) == std::vector<std::int64_t>{1});
  CHECK(ids(0.7f) == std::vector<std::int64_t>{1, 3});
  CHECK(ids(0.8f) == std::vector<std::int64_t>{1, 3, 2});
  CHECK(ids(0.95f) == std::vector<std::int64_t>{1, 3, 2, 0});
  CHECK(ids(1.0f) == std::vector<std::int64_t>{1, 3, 2, 0});
  // after top-k the mass is that of the renormalized k tokens: 0.5 / 0.75 = 0.667 >= 0.6
  CHECK(ids(0.6f, 2) == std::vector<std::int64_t>{1});
  CHECK(ids(0.7f, 2) == std::vector<std::int64_t>{1, 3});
  const int n = 100000;
  const std::vector<double> want = {0, 0.5 / 0.9, 0.15 / 0.9, 0.25 / 0.9};
  CHECK(chi_square(frequencies(z, opts(1, 0, 0.8f, 9), n), want, n) < 20.0);
}

TEST_CASE("-inf logits are never sampled") {
  const std::vector<float> z = {-INFINITY, 0.0f, -INFINITY, 0.0f};
  const auto f = frequencies(z, opts(1.0f, 0, 1, 4), 1000);
  CHECK(f[0] == 0);
  CHECK(f[2] == 0);
  CHECK(f[1] + f[3] == 1000);
  CHECK(sampling_candidates(z.data(), 4, opts(1, 3)).size() == 2);
}

TEST_CASE("the same seed gives the same tokens, another seed others") {
  const auto g = testutil::gaussian(300, 3, 2.0f);
  auto draw = [&](std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<std::int64_t> out;
    for (int i = 0; i < 64; ++i) out.push_back(sample_next(g.data(), 300, opts(1.0f, 50, 0.9f), rng));
    return out;
  };
  CHECK(draw(123) == draw(123));
  CHECK(draw(123) != draw(124));
  // The generator's output is fixed by the standard (10000th value of the default-seeded
  // mt19937_64), and the uniform double is built from its bits, so this holds on every platform.
  std::mt19937_64 rng;
  rng.discard(9999);
  CHECK(rng() == 9981545732273789042ull);
  std::mt19937_64 r0(0);
  const std::uint64_t first = r0();
  std::mt19937_64 r1(0);
  CHECK(uniform01(r1) == double(first >> 11) / 9007199254740992.0);
}

TEST_CASE("bad sampling options and logits are Errors naming them") {
  const std::vector<float> z = {1, 2, 3};
  CHECK_THAT(error_of(z, opts(-0.5f)), Catch::Contains("temperature") && Catch::Contains("-0.5"));
  CHECK_THAT(error_of(z, opts(std::numeric_limits<float>::quiet_NaN())), Catch::Contains("temperature"));
  CHECK_THAT(error_of(z, opts(1, -3)), Catch::Contains("top_k") && Catch::Contains("-3"));
  CHECK_THAT(error_of(z, opts(1, 0, 0)), Catch::Contains("top_p") && Catch::Contains("(0, 1]"));
  CHECK_THAT(error_of(z, opts(1, 0, 1.5f)), Catch::Contains("top_p") && Catch::Contains("1.5"));
  // options are checked even when greedy would not use them
  CHECK_THAT(error_of(z, opts(0, 0, 2)), Catch::Contains("top_p"));
  const std::vector<float> bad = {1, std::numeric_limits<float>::quiet_NaN(), 3};
  CHECK_THAT(error_of(bad, opts(0)), Catch::Contains("logits[1] is NaN"));
  CHECK_THAT(error_of(bad, opts(1)), Catch::Contains("logits[1] is NaN"));
  CHECK_THAT(error_of({-INFINITY, -INFINITY}, opts(1)), Catch::Contains("-inf"));
  CHECK_THAT(error_of({}, opts(1)), Catch::Contains("at least 1"));
}

TEST_CASE("generate: window, stop token, streaming") {
  // A fake model: the next token is (length of what it sees) % 7, greedy.
  std::vector<std::size_t> seen;
  auto logits_of = [&](const std::vector<std::int64_t>& ids) {
    seen.push_back(ids.size());
    std::vector<float> z(7, 0.0f);
    z[ids.size() % 7] = 1.0f;
    return z;
  };
  GenerateOptions o;
  o.max_new_tokens = 6;
  o.window = 4;
  std::vector<std::int64_t> streamed;
  const auto out = generate(logits_of, {5, 5}, o, [&](std::int64_t id) { streamed.push_back(id); });
  CHECK(out == std::vector<std::int64_t>{2, 3, 4, 4, 4, 4});
  CHECK(streamed == out);
  CHECK(seen == std::vector<std::size_t>{2, 3, 4, 4, 4, 4});
  o.window = 0;
  o.stop_token = 4;
  CHECK(generate(logits_of, {5, 5}, o) == std::vector<std::int64_t>{2, 3, 4});
  o.max_new_tokens = 0;
  CHECK(generate(logits_of, {5}, o).empty());
  CHECK_THROWS_WITH(generate(logits_of, {}, o), Catch::Contains("prompt has no tokens"));
  o.sampling.top_p = 0;
  CHECK_THROWS_WITH(generate(logits_of, {1}, o), Catch::Contains("top_p"));
}

TEST_CASE("greedy generate on the tiny Llama equals argmax of model.logits each step") {
  auto model = LlamaModel<format::F32>::load(data("tiny_untied"));
  const std::int64_t V = model.config().vocab_size, max_pos = model.config().max_position_embeddings;
  const auto ids = safetensors::File::open(data("ids.safetensors")).get("ids").copy_as<std::int64_t>();
  for (std::size_t prompt_len : {std::size_t(5), std::size_t(max_pos - 3)}) {
    INFO("prompt of " << prompt_len << " tokens");
    std::vector<std::int64_t> prompt;
    for (std::size_t i = 0; i < prompt_len; ++i) prompt.push_back(ids[i % ids.size()]);
    GenerateOptions o;
    o.max_new_tokens = 8;
    const auto got = generate_with(model, prompt, o);
    std::vector<std::int64_t> seq = prompt, want;
    for (int s = 0; s < 8; ++s) {
      // the oldest tokens drop out once the sequence is longer than max_position_embeddings
      const std::int64_t T = std::min<std::int64_t>(std::int64_t(seq.size()), max_pos);
      const auto z = model.logits(seq.data() + seq.size() - std::size_t(T), 1, T);
      const std::int64_t id = argmax(z.data() + (T - 1) * V, V);
      seq.push_back(id);
      want.push_back(id);
    }
    CHECK(got == want);
  }
  // sampling with a seed is reproducible through the model too
  GenerateOptions o;
  o.max_new_tokens = 10;
  o.sampling = opts(0.8f, 20, 0.9f, 77);
  CHECK(generate_with(model, {1, 2, 3}, o) == generate_with(model, {1, 2, 3}, o));
}
