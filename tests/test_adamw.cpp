// AdamW against torch's algorithm (a double-precision mirror of torch.optim.AdamW's single-tensor
// step, and hand-computed values), LoRA+, clipping, accumulation, NaN refusal and bit-identical
// resume from a saved state.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "qlora/io/safetensors.hpp"
#include "qlora/optim/adamw.hpp"
#include "test_util.hpp"

using qlora::optim::AdamW;
using qlora::optim::AdamWConfig;
using qlora::optim::ConfigMismatch;
using qlora::optim::Param;
using qlora::optim::ParamGroup;

namespace {

// A parameter with its own buffers, as a layer would own them.
struct Buffer {
  std::string name;
  ParamGroup group;
  std::vector<float> value, grad;
  Buffer(std::string n, ParamGroup g, std::vector<float> v)
      : name(std::move(n)), group(g), value(std::move(v)), grad(value.size(), 0.0f) {}
  Param param() { return Param{name, value.data(), grad.data(), value.size(), group}; }
};

std::vector<Param> params_of(std::vector<Buffer>& bufs) {
  std::vector<Param> ps;
  for (Buffer& b : bufs) ps.push_back(b.param());
  return ps;
}

AdamWConfig plain(double lr) {
  AdamWConfig c;
  c.lr = lr;
  c.max_grad_norm = 0.0;  // torch.optim.AdamW alone does not clip
  return c;
}

// torch.optim.AdamW's single-tensor step for one element, in double.
struct RefAdamW {
  double b1, b2, eps, wd;
  double p, m = 0.0, v = 0.0;
  int t = 0;
  void step(double g, double lr) {
    ++t;
    p *= 1.0 - lr * wd;
    m = b1 * m + (1.0 - b1) * g;
    v = b2 * v + (1.0 - b2) * g * g;
    const double step_size = lr / (1.0 - std::pow(b1, t));
    const double denom = std::sqrt(v) / std::sqrt(1.0 - std::pow(b2, t)) + eps;
    p -= step_size * m / denom;
  }
};

bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("defaults are torch's AdamW with the QLoRA lr and the Trainer's clipping") {
  const AdamWConfig c;
  CHECK(c.lr == 2e-4);
  CHECK(c.beta1 == 0.9);
  CHECK(c.beta2 == 0.999);
  CHECK(c.eps == 1e-8);
  CHECK(c.weight_decay == 0.0);
  CHECK(c.loraplus_lr_ratio == 1.0);
  CHECK(c.max_grad_norm == 1.0);
  CHECK(c.grad_accum_steps == 1);
}

TEST_CASE("a constant gradient moves the weight by lr per step (hand-computed)") {
  // m_t / (1 - b1^t) = g and sqrt(v_t / (1 - b2^t)) = |g| for a constant g, so each step moves p by
  // lr * g / (|g| + eps) = 0.1 * 0.5 / 0.50000001.
  std::vector<Buffer> bufs{{"w", ParamGroup::LoraA, {1.0f}}};
  AdamW opt(params_of(bufs), plain(0.1));
  bufs[0].grad[0] = 0.5f;
  opt.step();
  CHECK(opt.exp_avg(0)[0] == Approx(0.05).epsilon(1e-7));        // 0.1 * 0.5
  CHECK(opt.exp_avg_sq(0)[0] == Approx(0.00025).epsilon(1e-7));  // 0.001 * 0.25
  CHECK(bufs[0].value[0] == Approx(0.90000002).epsilon(1e-7));
  opt.step();                                                       // the grad buffer still holds 0.5
  CHECK(opt.exp_avg(0)[0] == Approx(0.095).epsilon(1e-7));          // 0.9 * 0.05 + 0.05
  CHECK(opt.exp_avg_sq(0)[0] == Approx(0.00049975).epsilon(1e-7));  // 0.999 * 0.00025 + 0.00025
  CHECK(bufs[0].value[0] == Approx(0.80000004).epsilon(1e-7));
  CHECK(opt.step_count() == 2);
}

TEST_CASE("steps match torch's AdamW algorithm computed in double") {
  // Odd sizes (the vector loops' tails), a LoRA+ B matrix, weight decay, gradients of fixed sign
  // per element (no cancellation in m, so a relative tolerance is meaningful).
  AdamWConfig cfg = plain(0.01);
  cfg.weight_decay = 0.05;
  cfg.loraplus_lr_ratio = 4.0;
  std::vector<Buffer> bufs{{"a", ParamGroup::LoraA, testutil::gaussian(7, 1, 1.0f)},
                           {"b", ParamGroup::LoraB, testutil::gaussian(19, 2, 1.0f)}};
  std::vector<std::vector<RefAdamW>> ref(bufs.size());
  for (std::size_t k = 0; k < bufs.size(); ++k)
    for (float p : bufs[k].value) ref[k].push_back({cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, p});
  AdamW opt(params_of(bufs), cfg);
  for (int t = 1; t <= 6; ++t) {
    for (std::size_t k = 0; k < bufs.size(); ++k)
      for (std::size_t i = 0; i < bufs[k].grad.size(); ++i) {
        const float mag = 0.1f + 0.05f * std::sin(float(i + 3 * t));
        bufs[k].grad[i] = (i % 2 ? -mag : mag) * (k + 1);
      }
    opt.step();
    for (std::size_t k = 0; k < bufs.size(); ++k) {
      const double lr = k == 1 ? cfg.lr * 4.0 : cfg.lr;
      for (std::size_t i = 0; i < bufs[k].value.size(); ++i) {
        RefAdamW& r = ref[k][i];
        r.step(bufs[k].grad[i], lr);
        INFO("step " << t << ", " << bufs[k].name << "[" << i << "]");
        // Relative to the weights' scale (1), not to the result: a weight passing near 0 has
        // lost its leading digits to cancellation, in torch as here.
        CHECK(bufs[k].value[i] == Approx(r.p).epsilon(1e-6).margin(1e-6));
        CHECK(opt.exp_avg(k)[i] == Approx(r.m).epsilon(1e-6));
        CHECK(opt.exp_avg_sq(k)[i] == Approx(r.v).epsilon(1e-6));
      }
    }
  }
}

TEST_CASE("weight decay is decoupled: a zero gradient still shrinks the weight by lr * wd") {
  AdamWConfig cfg = plain(0.01);
  cfg.weight_decay = 0.1;
  std::vector<Buffer> bufs{{"w", ParamGroup::LoraA, {2.0f, -3.0f}}};
  AdamW opt(params_of(bufs), cfg);
  const float d = float(1.0 - 0.01 * 0.1);
  for (int t = 0; t < 3; ++t) opt.step();
  // Exactly three multiplications by float(1 - lr*wd): the Adam part is 0 * step / eps = 0, and
  // the moments stay 0 (coupled L2 decay would have put wd * p into the gradient).
  CHECK(bufs[0].value[0] == 2.0f * d * d * d);
  CHECK(bufs[0].value[1] == -3.0f * d * d * d);
  CHECK(opt.exp_avg(0)[0] == 0.0f);
  CHECK(opt.exp_avg_sq(0)[0] == 0.0f);
}

TEST_CASE("LoRA+: only lora_B gets lr * ratio; biases are not decayed") {
  AdamWConfig cfg = plain(0.01);
  cfg.loraplus_lr_ratio = 16.0;
  std::vector<Buffer> bufs{{"A", ParamGroup::LoraA, {1.0f}},
                           {"B", ParamGroup::LoraB, {1.0f}},
                           {"bias", ParamGroup::Bias, {1.0f}},
                           {"other", ParamGroup::Other, {1.0f}}};
  SECTION("learning rates") {
    AdamW opt(params_of(bufs), cfg);
    CHECK(opt.lr(ParamGroup::LoraA) == 0.01);
    CHECK(opt.lr(ParamGroup::LoraB) == 0.16);
    CHECK(opt.lr(ParamGroup::Bias) == 0.01);
    CHECK(opt.lr(ParamGroup::Other) == 0.01);
    for (Buffer& b : bufs) b.grad[0] = 1.0f;
    opt.step();  // a first step moves each weight by its lr (see the hand-computed case)
    CHECK(1.0f - bufs[0].value[0] == Approx(0.01).epsilon(1e-5));
    CHECK(1.0f - bufs[1].value[0] == Approx(0.16).epsilon(1e-5));
    CHECK(1.0f - bufs[2].value[0] == Approx(0.01).epsilon(1e-5));
    CHECK(1.0f - bufs[3].value[0] == Approx(0.01).epsilon(1e-5));
  }
  SECTION("weight decay uses the group's lr and skips biases") {
    cfg.weight_decay = 0.5;
    AdamW opt(params_of(bufs), cfg);
    opt.step();  // zero gradients: only the decay acts
    CHECK(bufs[0].value[0] == float(1.0 - 0.01 * 0.5));
    CHECK(bufs[1].value[0] == float(1.0 - 0.16 * 0.5));
    CHECK(bufs[2].value[0] == 1.0f);
    CHECK(bufs[3].value[0] == float(1.0 - 0.01 * 0.5));
  }
}

TEST_CASE("clipping by the global norm over all parameters") {
  std::vector<Buffer> bufs{{"a", ParamGroup::LoraA, {0.0f}}, {"b", ParamGroup::LoraB, {0.0f}}};
  AdamWConfig cfg = plain(0.01);
  SECTION("above max_norm: every gradient scaled by max_norm / (norm + 1e-6)") {
    cfg.max_grad_norm = 1.0;
    AdamW opt(params_of(bufs), cfg);
    bufs[0].grad[0] = 3.0f;
    bufs[1].grad[0] = 4.0f;
    CHECK(opt.step() == 5.0);  // the norm before clipping; each parameter alone is below 5
    const float c = float(1.0 / (5.0 + 1e-6));
    CHECK(bufs[0].grad[0] == 3.0f * c);
    CHECK(bufs[1].grad[0] == 4.0f * c);
    CHECK(opt.exp_avg(0)[0] == Approx(0.1 * 0.6).epsilon(1e-6));  // the moments saw clipped grads
  }
  SECTION("below max_norm, or max_norm <= 0: untouched, norm still returned") {
    cfg.max_grad_norm = GENERATE(10.0, 0.0, -1.0);
    AdamW opt(params_of(bufs), cfg);
    bufs[0].grad[0] = 3.0f;
    bufs[1].grad[0] = 4.0f;
    CHECK(opt.step() == 5.0);
    CHECK(bufs[0].grad[0] == 3.0f);
    CHECK(bufs[1].grad[0] == 4.0f);
  }
  SECTION("stand-alone clip_grad_norm, norm accumulated in double") {
    std::vector<Buffer> big{{"x", ParamGroup::Other, std::vector<float>(100000, 0.0f)}};
    big[0].grad = testutil::gaussian(100000, 7, 1.0f);
    double ref = 0.0;
    for (float g : big[0].grad) ref += double(g) * double(g);
    ref = std::sqrt(ref);
    const std::vector<float> before = big[0].grad;
    CHECK(qlora::optim::clip_grad_norm(params_of(big), 2.0) == Approx(ref).epsilon(1e-12));
    const float c = float(2.0 / (ref + 1e-6));
    for (std::size_t i = 0; i < before.size(); i += 997) CHECK(big[0].grad[i] == before[i] * c);
    CHECK(qlora::optim::global_grad_norm(params_of(big)) == Approx(2.0).epsilon(1e-6));
  }
}

TEST_CASE("gradient accumulation: step() averages the summed micro-batch gradients") {
  // Two optimizers on the same weights: one is given the sum of 4 micro-batches and told
  // grad_accum_steps = 4, the other the average. Dividing by 4 is exact, so they agree bit for bit.
  AdamWConfig cfg = plain(0.01);
  cfg.max_grad_norm = 0.3;
  AdamWConfig accum_cfg = cfg;
  accum_cfg.grad_accum_steps = 4;
  std::vector<Buffer> a{{"w", ParamGroup::LoraA, testutil::gaussian(33, 3, 1.0f)}};
  std::vector<Buffer> b = a;
  AdamW opt_a(params_of(a), accum_cfg), opt_b(params_of(b), cfg);
  for (int t = 0; t < 3; ++t) {
    opt_a.zero_grad();
    for (int micro = 0; micro < 4; ++micro) {
      const std::vector<float> g = testutil::gaussian(33, unsigned(100 + 10 * t + micro), 0.2f);
      for (std::size_t i = 0; i < g.size(); ++i) a[0].grad[i] += g[i];  // layers add into grad
    }
    for (std::size_t i = 0; i < 33; ++i) b[0].grad[i] = a[0].grad[i] * 0.25f;
    const double na = opt_a.step(), nb = opt_b.step();
    CHECK(na == nb);
    REQUIRE(bits_equal(a[0].value, b[0].value));
  }
  SECTION("the returned norm is that of the averaged gradient") {
    AdamWConfig three = plain(0.01);
    three.grad_accum_steps = 3;
    std::vector<Buffer> c{{"w", ParamGroup::LoraA, {0.0f, 0.0f}}};
    AdamW opt(params_of(c), three);
    c[0].grad = {9.0f, 12.0f};
    CHECK(opt.step() == Approx(5.0).epsilon(1e-7));
    CHECK(c[0].grad[0] == 9.0f * float(1.0 / 3.0));  // the buffer holds what was applied
    opt.zero_grad();
    CHECK(c[0].grad == std::vector<float>{0.0f, 0.0f});
  }
}

TEST_CASE("a NaN or inf gradient is an Error naming it, and changes nothing") {
  const float bad = GENERATE(std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity());
  AdamWConfig cfg = plain(0.01);
  cfg.grad_accum_steps = 2;
  std::vector<Buffer> bufs{{"layers.0.q_proj.lora_A", ParamGroup::LoraA, {1.0f, 2.0f}},
                           {"layers.0.q_proj.lora_B", ParamGroup::LoraB, {3.0f, 4.0f, 5.0f}}};
  AdamW opt(params_of(bufs), cfg);
  bufs[0].grad = {0.5f, 0.5f};
  opt.step();
  const auto values = bufs, grads_before = bufs;
  bufs[1].grad = {0.1f, bad, 0.1f};
  const std::vector<float> grads = bufs[1].grad;
  CHECK_THROWS_WITH(opt.step(), Catch::Contains("AdamW step 2") &&
                                    Catch::Contains("'layers.0.q_proj.lora_B' has grad[1] = ") &&
                                    Catch::Contains("expected a finite number"));
  CHECK(opt.step_count() == 1);
  CHECK(bits_equal(bufs[0].value, values[0].value));
  CHECK(bits_equal(bufs[1].value, values[1].value));
  CHECK(bits_equal(bufs[0].grad, grads_before[0].grad));  // not even scaled by 1/accum
  CHECK(std::isnan(bufs[1].grad[1]) == std::isnan(bad));
  CHECK(opt.exp_avg(1) == std::vector<float>(3, 0.0f));
}

namespace {

// A small quadratic problem: loss = sum c_i (p_i - target_i)^2 / 2 plus a deterministic "noise"
// per step and micro-batch, three parameters of odd sizes.
struct Model {
  std::vector<Buffer> bufs{{"q.lora_A", ParamGroup::LoraA, testutil::gaussian(37, 11, 1.0f)},
                           {"q.lora_B", ParamGroup::LoraB, testutil::gaussian(64, 12, 1.0f)},
                           {"q.bias", ParamGroup::Bias, testutil::gaussian(5, 13, 1.0f)}};

  void backward(std::int64_t step, int micro) {
    for (std::size_t k = 0; k < bufs.size(); ++k) {
      Buffer& b = bufs[k];
      for (std::size_t i = 0; i < b.value.size(); ++i) {
        const float c = 0.5f + 0.1f * float(i % 7), target = 0.01f * float(i);
        const float noise = 0.05f * std::sin(float(step * 31 + micro * 7 + std::int64_t(i) + 100 * k));
        b.grad[i] += c * (b.value[i] - target) + noise;
      }
    }
  }
};

AdamWConfig resume_config() {
  AdamWConfig cfg;
  cfg.lr = 0.05;
  cfg.weight_decay = 0.01;
  cfg.loraplus_lr_ratio = 4.0;
  cfg.max_grad_norm = 2.0;  // active in the early steps
  cfg.grad_accum_steps = 2;
  cfg.schedule.kind = qlora::optim::ScheduleKind::Cosine;
  cfg.schedule.warmup_steps = 2;
  cfg.schedule.total_steps = 10;
  cfg.schedule.min_lr_ratio = 0.1;
  return cfg;
}

void train(Model& model, AdamW& opt, std::int64_t until, std::vector<double>* norms = nullptr) {
  while (opt.step_count() < until) {
    opt.zero_grad();
    for (int micro = 0; micro < 2; ++micro) model.backward(opt.step_count(), micro);
    const double n = opt.step();
    if (norms) norms->push_back(n);
  }
}

}  // namespace

TEST_CASE("save at step 5, load into a fresh optimizer: the resumed run is bit-identical") {
  testutil::TempDir dir;
  Model straight;
  AdamW opt_straight(params_of(straight.bufs), resume_config());
  std::vector<double> norms;
  train(straight, opt_straight, 10, &norms);
  CHECK(norms[0] > 2.0);  // clipping did act

  {
    Model first;
    AdamW opt(params_of(first.bufs), resume_config());
    train(first, opt, 5);
    opt.save_state(dir / "optimizer.safetensors");
    qlora::safetensors::Writer w;  // the layers' own checkpoint, as a trainer would write it
    for (Buffer& b : first.bufs)
      w.add(b.name, qlora::DType::F32, {std::int64_t(b.value.size())}, b.value.data(), b.value.size() * 4);
    w.write(dir / "params.safetensors");
  }

  Model resumed;  // fresh buffers, overwritten from the file
  const auto pf = qlora::safetensors::File::open(dir / "params.safetensors");
  for (Buffer& b : resumed.bufs) b.value = pf.get(b.name).copy_as<float>();
  AdamW opt(params_of(resumed.bufs), resume_config());
  opt.load_state(dir / "optimizer.safetensors");
  CHECK(opt.step_count() == 5);
  CHECK(opt.lr(ParamGroup::LoraB) == opt_straight.config().lr * 4.0 * resume_config().schedule.factor(5));
  train(resumed, opt, 10);

  for (std::size_t k = 0; k < straight.bufs.size(); ++k) {
    INFO(straight.bufs[k].name);
    CHECK(bits_equal(resumed.bufs[k].value, straight.bufs[k].value));
    CHECK(bits_equal(opt.exp_avg(k), opt_straight.exp_avg(k)));
    CHECK(bits_equal(opt.exp_avg_sq(k), opt_straight.exp_avg_sq(k)));
  }
}

TEST_CASE("state files: metadata keeps every setting exactly") {
  testutil::TempDir dir;
  AdamWConfig cfg = plain(0.1 + 0.2);  // 0.30000000000000004: needs 17 digits
  cfg.weight_decay = 1.0 / 3.0;
  std::vector<Buffer> bufs{{"w", ParamGroup::LoraB, {1.0f}}};
  AdamW opt(params_of(bufs), cfg);
  opt.save_state(dir / "s.safetensors");
  const auto f = qlora::safetensors::File::open(dir / "s.safetensors");
  const auto& md = f.metadata();
  CHECK(md.at("format") == "qlora.optim.adamw");
  CHECK(md.at("step") == "0");
  CHECK(md.at("lr") == "0.30000000000000004");
  CHECK(std::stod(md.at("weight_decay")) == 1.0 / 3.0);
  CHECK(md.at("group.w") == "lora_B");
  CHECK(md.at("schedule") == "constant");
  CHECK(f.names() == std::vector<std::string>{"w.exp_avg", "w.exp_avg_sq"});
}

TEST_CASE("load_state refuses mismatched or corrupt files with a clear Error") {
  testutil::TempDir dir;
  const std::string path = dir / "opt.safetensors";
  AdamWConfig cfg = plain(0.01);
  auto make = [](std::vector<std::pair<std::string, std::size_t>> spec, ParamGroup g_b = ParamGroup::LoraB) {
    std::vector<Buffer> bufs;
    for (auto& [name, n] : spec)
      bufs.emplace_back(name, name == "b" ? g_b : ParamGroup::LoraA, std::vector<float>(n, 1.0f));
    return bufs;
  };
  {
    auto bufs = make({{"a", 4}, {"b", 3}});
    AdamW opt(params_of(bufs), cfg);
    for (Buffer& b : bufs) std::fill(b.grad.begin(), b.grad.end(), 0.5f);
    opt.step();
    opt.save_state(path);
  }
  // The target optimizer has taken 2 steps of its own: a refused load must leave them.
  auto check_refused = [&](std::vector<Buffer>& bufs, const AdamWConfig& c, const std::string& what) {
    AdamW opt(params_of(bufs), c);
    for (Buffer& b : bufs) std::fill(b.grad.begin(), b.grad.end(), 0.25f);
    opt.step();
    opt.step();
    const std::vector<float> m0 = opt.exp_avg(0);
    CHECK_THROWS_WITH(opt.load_state(path),
                      Catch::Contains("AdamW state '" + path + "'") && Catch::Contains(what));
    CHECK(opt.step_count() == 2);
    CHECK(bits_equal(opt.exp_avg(0), m0));
  };

  SECTION("a parameter missing from the file") {
    auto bufs = make({{"a", 4}, {"b", 3}, {"c", 2}});
    check_refused(bufs, cfg, "parameter 'c' (2 elements) has no tensor 'c.exp_avg'");
  }
  SECTION("a parameter of another size") {
    auto bufs = make({{"a", 4}, {"b", 5}});
    check_refused(bufs, cfg, "tensor 'b.exp_avg' has shape [3], expected [5] (the size of parameter 'b')");
  }
  SECTION("a tensor for no parameter") {
    auto bufs = make({{"a", 4}});
    check_refused(bufs, cfg, "has tensor 'b.exp_avg', which belongs to no parameter");
  }
  SECTION("another lr: Error, or KeepCurrent on purpose") {
    auto bufs = make({{"a", 4}, {"b", 3}});
    AdamWConfig other = cfg;
    other.lr = 0.02;
    check_refused(bufs, other, "lr = 0.01 (this optimizer: 0.02)");
    AdamW opt(params_of(bufs), other);
    opt.load_state(path, ConfigMismatch::KeepCurrent);
    CHECK(opt.step_count() == 1);
    CHECK(opt.config().lr == 0.02);
    CHECK(opt.exp_avg(1)[0] == Approx(0.05).epsilon(1e-6));
  }
  SECTION("another grouping or schedule") {
    auto bufs = make({{"a", 4}, {"b", 3}}, ParamGroup::Bias);
    check_refused(bufs, cfg, "group.b = lora_B (this optimizer: bias)");
    auto same = make({{"a", 4}, {"b", 3}});
    AdamWConfig sched = cfg;
    sched.schedule.kind = qlora::optim::ScheduleKind::Linear;
    sched.schedule.total_steps = 100;
    check_refused(same, sched, "schedule = constant (this optimizer: linear)");
  }
  SECTION("a truncated file") {
    std::string bytes;
    {
      std::ifstream in(path, std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(in), {});
    }
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), std::streamsize(bytes.size() - 6));
    }
    auto bufs = make({{"a", 4}, {"b", 3}});
    check_refused(bufs, cfg, "safetensors '" + path + "'");
  }
  SECTION("not an optimizer state") {
    qlora::safetensors::Writer w;
    const float x[3] = {1, 2, 3};
    w.add("b", qlora::DType::F32, {3}, x, sizeof x);
    w.write(path);
    auto bufs = make({{"a", 4}, {"b", 3}});
    check_refused(bufs, cfg, "__metadata__ has no 'format', expected an AdamW state file");
  }
  SECTION("a non-finite or negative moment") {
    const auto good = qlora::safetensors::File::open(path);
    const bool nan = GENERATE(true, false);
    qlora::safetensors::Writer w;
    for (const std::string& name : good.names()) {
      std::vector<float> x = good.get(name).copy_as<float>();
      if (name == "b.exp_avg_sq") x[2] = nan ? std::numeric_limits<float>::quiet_NaN() : -1.0f;
      w.add_copy(name, qlora::DType::F32, good.get(name).shape, x.data(), x.size() * 4);
    }
    for (const auto& [k, v] : good.metadata()) w.set_metadata(k, v);
    w.write(dir / "bad.safetensors");
    auto bufs = make({{"a", 4}, {"b", 3}});
    AdamW opt(params_of(bufs), cfg);
    CHECK_THROWS_WITH(opt.load_state(dir / "bad.safetensors"),
                      Catch::Contains("tensor 'b.exp_avg_sq' element 2 is ") &&
                          Catch::Contains(nan ? "expected a finite number" : "expected >= 0"));
    CHECK(opt.step_count() == 0);
  }
}

TEST_CASE("bad settings and parameter lists are refused") {
  std::vector<Buffer> bufs{{"w", ParamGroup::LoraA, {1.0f}}};
  AdamWConfig c;
  c.beta1 = 1.0;
  CHECK_THROWS_WITH(AdamW(params_of(bufs), c), Catch::Contains("beta1 is 1, expected a number in [0, 1)"));
  c = AdamWConfig{};
  c.grad_accum_steps = 0;
  CHECK_THROWS_WITH(AdamW(params_of(bufs), c), Catch::Contains("grad_accum_steps is 0"));
  c = AdamWConfig{};
  c.lr = -1e-4;
  CHECK_THROWS_WITH(AdamW(params_of(bufs), c), Catch::Contains("lr is -0.0001"));

  std::vector<Param> twice = params_of(bufs);
  twice.push_back(twice[0]);
  CHECK_THROWS_WITH(AdamW(twice, AdamWConfig{}), Catch::Contains("parameter 'w' is listed twice"));
  std::vector<Param> null_grad = params_of(bufs);
  null_grad[0].grad = nullptr;
  CHECK_THROWS_WITH(AdamW(null_grad, AdamWConfig{}), Catch::Contains("'w' has a null grad pointer"));
}

TEST_CASE("warmup: the first step runs at lr 0, as under the Trainer") {
  AdamWConfig cfg = plain(0.01);
  cfg.schedule.kind = qlora::optim::ScheduleKind::Linear;
  cfg.schedule.warmup_steps = 2;
  cfg.schedule.total_steps = 4;
  std::vector<Buffer> bufs{{"w", ParamGroup::LoraA, {1.0f}}};
  AdamW opt(params_of(bufs), cfg);
  bufs[0].grad[0] = 1.0f;
  CHECK(opt.lr(ParamGroup::LoraA) == 0.0);
  opt.step();
  CHECK(bufs[0].value[0] == 1.0f);  // but the moments moved
  CHECK(opt.exp_avg(0)[0] > 0.0f);
  CHECK(opt.lr(ParamGroup::LoraA) == 0.005);
  opt.step();
  CHECK(opt.lr(ParamGroup::LoraA) == 0.01);
}
