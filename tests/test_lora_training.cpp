// LoraLinear + AdamW together: a QLoRA layer learns a low-rank change of its frozen 4-bit weight,
// micro-batch accumulation equals one large batch, and an interrupted run resumes bit-identically.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "qlora/backend/cpu/lora_linear.hpp"
#include "qlora/optim/adamw.hpp"
#include "test_util.hpp"

using namespace qlora;

namespace {
constexpr std::int64_t kOut = 32, kIn = 48;

// Target y* = x · (W0 + ΔW)ᵀ with a rank-2 ΔW: what the adapter has to learn.
struct Task {
  std::vector<float> w = testutil::gaussian(std::size_t(kOut * kIn), 1, 0.05f);
  std::vector<float> delta;
  Task() {
    const auto u = testutil::gaussian(std::size_t(kOut * 2), 2, 0.1f),
               v = testutil::gaussian(std::size_t(2 * kIn), 3, 0.1f);
    delta.assign(std::size_t(kOut * kIn), 0.0f);
    for (std::int64_t o = 0; o < kOut; ++o)
      for (std::int64_t i = 0; i < kIn; ++i)
        for (int k = 0; k < 2; ++k) delta[o * kIn + i] += u[o * 2 + k] * v[k * kIn + i];
  }
  // a batch of M tokens and its targets, from the frozen base as the model sees it plus ΔW
  void batch(const std::vector<float>& w0deq, unsigned seed, std::int64_t M, std::vector<float>& x,
             std::vector<float>& target) const {
    x = testutil::gaussian(std::size_t(M * kIn), seed, 1.0f);
    target.assign(std::size_t(M * kOut), 0.0f);
    for (std::int64_t t = 0; t < M; ++t)
      for (std::int64_t o = 0; o < kOut; ++o) {
        float acc = 0;
        for (std::int64_t i = 0; i < kIn; ++i)
          acc += x[t * kIn + i] * (w0deq[o * kIn + i] + delta[o * kIn + i]);
        target[t * kOut + o] = acc;
      }
  }
};

// Mean squared error over the batch and its gradient dy = 2 (y - t) / (M * out).
double mse(const std::vector<float>& y, const std::vector<float>& t, std::vector<float>& dy) {
  double l = 0;
  dy.resize(y.size());
  for (std::size_t i = 0; i < y.size(); ++i) {
    const double d = double(y[i]) - double(t[i]);
    l += d * d;
    dy[i] = float(2.0 * d / double(y.size()));
  }
  return l / double(y.size());
}

using Layer = LoraLinear<format::NF4, Dynamic, Cpu>;

Layer make_layer(const Task& task, float dropout) {
  LoraConfig cfg;
  cfg.r = 4;
  cfg.alpha = 8;
  cfg.dropout = dropout;
  cfg.seed = 11;
  return Layer(BaseWeight<format::NF4>::quantize(task.w.data(), kOut, kIn), cfg);
}

std::vector<float> w0_of(const Layer& L) {
  std::vector<float> w(std::size_t(kOut * kIn));
  L.base().dequantize(w.data());
  return w;
}

// One optimizer step over `micro` micro-batches of M tokens each, with batch seeds from `seed`.
double train_step(Layer& L, optim::AdamW& opt, const Task& task, unsigned seed, int micro, std::int64_t M) {
  const auto w0 = w0_of(L);
  double loss = 0;
  opt.zero_grad();
  for (int m = 0; m < micro; ++m) {
    std::vector<float> x, t, y(std::size_t(M * kOut)), dy;
    task.batch(w0, seed * 100 + unsigned(m), M, x, t);
    Layer::Context ctx;
    L.forward(x.data(), M, y.data(), ctx);
    loss += mse(y, t, dy) / micro;
    L.backward(ctx, dy.data(), nullptr, GradMode::Accumulate);
  }
  opt.step();
  return loss;
}
}  // namespace

TEST_CASE("QLoRA on one layer learns a low-rank change of its NF4 weight", "[lora][train]") {
  Task task;
  Layer L = make_layer(task, 0.0f);
  optim::AdamWConfig oc;
  oc.lr = 1e-2;
  optim::AdamW opt(L.params("layer"), oc);
  const double first = train_step(L, opt, task, 1, 1, 64);
  double last = first;
  for (unsigned s = 2; s <= 300; ++s) last = train_step(L, opt, task, s, 1, 64);
  INFO("loss " << first << " -> " << last);
  REQUIRE(last < first / 100);
}

TEST_CASE("two accumulated micro-batches equal one batch of both", "[lora][train]") {
  Task task;
  Layer a = make_layer(task, 0.0f), b = make_layer(task, 0.0f);
  a.B().setConstant(0.01f);  // B = 0 would make the first step's dA zero
  b.B().setConstant(0.01f);
  optim::AdamWConfig oc;
  oc.lr = 1e-2;
  oc.max_grad_norm = 0;
  optim::AdamWConfig oa = oc;
  oa.grad_accum_steps = 2;
  optim::AdamW opt_a(a.params("layer"), oa), opt_b(b.params("layer"), oc);
  // a: micro-batches of 32 tokens (seeds 100, 101), loss averaged by the optimizer
  train_step(a, opt_a, task, 1, 2, 32);
  // b: one batch holding the same 64 tokens
  {
    const auto w0 = w0_of(b);
    std::vector<float> x0, t0, x1, t1;
    task.batch(w0, 100, 32, x0, t0);
    task.batch(w0, 101, 32, x1, t1);
    x0.insert(x0.end(), x1.begin(), x1.end());
    t0.insert(t0.end(), t1.begin(), t1.end());
    std::vector<float> y(64 * kOut), dy;
    Layer::Context ctx;
    opt_b.zero_grad();
    b.forward(x0.data(), 64, y.data(), ctx);
    mse(y, t0, dy);
    b.backward(ctx, dy.data(), nullptr, GradMode::Accumulate);
    opt_b.step();
  }
  REQUIRE((a.A() - b.A()).norm() <= 1e-5f * b.A().norm());
  REQUIRE((a.B() - b.B()).norm() <= 1e-5f * b.B().norm());
}

TEST_CASE("an interrupted run resumes bit-identically (dropout and optimizer state)", "[lora][train]") {
  Task task;
  testutil::TempDir dir;
  optim::AdamWConfig oc;
  oc.lr = 5e-3;
  oc.schedule.kind = optim::ScheduleKind::Cosine;
  oc.schedule.warmup_steps = 2;
  oc.schedule.total_steps = 10;
  // uninterrupted
  Layer full = make_layer(task, 0.1f);
  optim::AdamW opt_full(full.params("layer"), oc);
  for (unsigned s = 1; s <= 10; ++s) train_step(full, opt_full, task, s, 2, 16);
  // interrupted after 5 steps: save A, B, the dropout counter and the optimizer state
  std::vector<float> A, B;
  std::uint64_t calls = 0;
  {
    Layer first = make_layer(task, 0.1f);
    optim::AdamW opt(first.params("layer"), oc);
    for (unsigned s = 1; s <= 5; ++s) train_step(first, opt, task, s, 2, 16);
    opt.save_state(dir / "optimizer.safetensors");
    A.assign(first.A().data(), first.A().data() + first.A().size());
    B.assign(first.B().data(), first.B().data() + first.B().size());
    calls = first.dropout_calls();
  }
  Layer resumed = make_layer(task, 0.1f);
  std::copy(A.begin(), A.end(), resumed.A().data());
  std::copy(B.begin(), B.end(), resumed.B().data());
  resumed.set_dropout_calls(calls);
  optim::AdamW opt(resumed.params("layer"), oc);
  opt.load_state(dir / "optimizer.safetensors");
  for (unsigned s = 6; s <= 10; ++s) train_step(resumed, opt, task, s, 2, 16);
  REQUIRE(std::memcmp(resumed.A().data(), full.A().data(), sizeof(float) * std::size_t(full.A().size())) ==
          0);
  REQUIRE(std::memcmp(resumed.B().data(), full.B().data(), sizeof(float) * std::size_t(full.B().size())) ==
          0);
}
