// [cuda] cuda::AdamW's state files, which are optim::AdamW's (optim/adamw_state.hpp):
//   - saved at step k and loaded into a fresh optimizer over the parameter values of step k, the
//     steps k+1..n are bit-identical to the uninterrupted optimizer's (values and moments);
//   - the files cross devices: optim::AdamW's state loads into cuda::AdamW and the other way round,
//     the moments arriving bit for bit; with clipping off both then take the same step (adamw.cuh:
//     the CPU's float operations in the CPU's order), compared in ulps as test_cuda_lora.cu's
//     step-by-step comparison: expected 0, bounded by 4;
//   - a refused file (a parameter missing, another size, a tensor for no parameter, other settings,
//     a truncated file, not a state file) is a qlora::Error naming the file and what differs, and
//     leaves the optimizer (step count and device moments) as it was.
#include <algorithm>
#include <catch2/catch.hpp>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "cuda_test_util.cuh"
#include "qlora/cuda/adamw.cuh"
#include "qlora/io/safetensors.hpp"
#include "qlora/optim/adamw.hpp"

using namespace qlora;

namespace {

struct Spec {
  std::string name;
  std::size_t size;
  optim::ParamGroup group;
};

// Two LoRA-like parameters, one spanning several norm chunks with a partial last one.
const std::vector<Spec>& specs() {
  static const std::vector<Spec> s = {
      {"m.lora_A.weight", 1000, optim::ParamGroup::LoraA},
      {"m.lora_B.weight", 2 * optim::kNormChunk + 77, optim::ParamGroup::LoraB}};
  return s;
}

// Parameters on the device: values and gradients per spec.
struct DeviceParams {
  std::vector<cuda::DeviceBuffer<float>> value, grad;
  explicit DeviceParams(const std::vector<Spec>& sp, const std::vector<std::vector<float>>& init) {
    const cuda::Context& ctx = cudatest::context();
    for (std::size_t k = 0; k < sp.size(); ++k) {
      value.push_back(cuda::DeviceBuffer<float>::from_host(init[k], ctx.stream()));
      grad.emplace_back(sp[k].size);
    }
    ctx.synchronize();
  }
  std::vector<optim::Param> params(const std::vector<Spec>& sp) {
    std::vector<optim::Param> p;
    for (std::size_t k = 0; k < sp.size(); ++k)
      p.push_back({sp[k].name, value[k].data(), grad[k].data(), sp[k].size, sp[k].group});
    return p;
  }
  std::vector<std::vector<float>> values() const {
    std::vector<std::vector<float>> v;
    for (const auto& b : value) v.push_back(b.to_host(cudatest::context().stream()));
    return v;
  }
  void set_grads(const std::vector<std::vector<float>>& g) {
    for (std::size_t k = 0; k < g.size(); ++k)
      grad[k].upload(g[k].data(), g[k].size(), cudatest::context().stream());
    cudatest::context().synchronize();
  }
};

std::vector<std::vector<float>> initial_values(const std::vector<Spec>& sp) {
  std::vector<std::vector<float>> v;
  for (std::size_t k = 0; k < sp.size(); ++k)
    v.push_back(cudatest::gaussian(sp[k].size, 10 + unsigned(k), 0.05f));
  return v;
}
// The gradients of step t (1-based), a pure function of t.
std::vector<std::vector<float>> grads_of_step(const std::vector<Spec>& sp, int t) {
  std::vector<std::vector<float>> g;
  for (std::size_t k = 0; k < sp.size(); ++k)
    g.push_back(cudatest::gaussian(sp[k].size, 1000 + unsigned(t * 10) + unsigned(k), 0.01f * float(t)));
  return g;
}

optim::AdamWConfig config(double max_grad_norm) {
  optim::AdamWConfig c;
  c.lr = 1e-2;
  c.weight_decay = 0.01;
  c.loraplus_lr_ratio = 2.0;
  c.max_grad_norm = max_grad_norm;
  c.schedule.kind = optim::ScheduleKind::Cosine;
  c.schedule.warmup_steps = 2;
  c.schedule.total_steps = 8;
  c.schedule.min_lr_ratio = 0.1;
  return c;
}

std::uint32_t ulp_distance(float a, float b) {
  std::int32_t ia = 0, ib = 0;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  const auto ord = [](std::int64_t i) { return i < 0 ? std::int64_t(INT32_MIN) - i : i; };
  return std::uint32_t(std::llabs(ord(ia) - ord(ib)));
}
std::uint32_t max_ulp(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  std::uint32_t m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, ulp_distance(a[i], b[i]));
  return m;
}

bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void check_moments_equal(const cuda::AdamW& a, const cuda::AdamW& b, std::size_t n) {
  const cuda::Context& ctx = cudatest::context();
  for (std::size_t k = 0; k < n; ++k) {
    INFO("parameter " << k);
    CHECK(bits_equal(a.exp_avg(ctx, k), b.exp_avg(ctx, k)));
    CHECK(bits_equal(a.exp_avg_sq(ctx, k), b.exp_avg_sq(ctx, k)));
  }
}

}  // namespace

TEST_CASE("cuda AdamW: save at step 3, load into a fresh optimizer: steps 4..8 bit-identical",
          "[cuda][adamw]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  const cuda::Context& ctx = cudatest::context();
  testutil::TempDir dir;
  const std::string path = dir / "optimizer.safetensors";
  const int k = 3, n = 8;
  const double clip = GENERATE(0.5, 0.0);  // clipping on (the norm decides) and off
  INFO("max_grad_norm " << clip);
  const optim::AdamWConfig cfg = config(clip);

  DeviceParams a(specs(), initial_values(specs()));
  cuda::AdamW opt(ctx, a.params(specs()), cfg);
  std::vector<std::vector<float>> values_k;
  double lr_k = 0;  // the lr of step k + 1
  for (int t = 1; t <= n; ++t) {
    a.set_grads(grads_of_step(specs(), t));
    opt.step(ctx);
    if (t == k) {
      opt.save_state(ctx, path);
      values_k = a.values();  // what the layers' own checkpoint would hold
      lr_k = opt.lr(optim::ParamGroup::LoraB);
    }
  }

  DeviceParams b(specs(), values_k);
  cuda::AdamW resumed(ctx, b.params(specs()), cfg);
  resumed.load_state(ctx, path);
  CHECK(resumed.step_count() == k);
  CHECK(resumed.lr(optim::ParamGroup::LoraB) == lr_k);  // the schedule continues from step k
  for (int t = k + 1; t <= n; ++t) {
    b.set_grads(grads_of_step(specs(), t));
    resumed.step(ctx);
  }
  CHECK(resumed.step_count() == n);
  const auto va = a.values(), vb = b.values();
  for (std::size_t p = 0; p < specs().size(); ++p) {
    INFO(specs()[p].name);
    CHECK(bits_equal(va[p], vb[p]));
  }
  check_moments_equal(opt, resumed, specs().size());
}

TEST_CASE("cuda AdamW and optim::AdamW read each other's state files", "[cuda][adamw]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  const cuda::Context& ctx = cudatest::context();
  testutil::TempDir dir;
  // Clipping off: the only step difference between the devices is the norm's summation order,
  // which then decides nothing, so both take the same step bit for bit.
  const optim::AdamWConfig cfg = config(0.0);
  std::vector<std::vector<float>> hv = initial_values(specs()), hg;
  for (const Spec& s : specs()) hg.emplace_back(s.size, 0.0f);
  std::vector<optim::Param> hp;
  for (std::size_t k = 0; k < specs().size(); ++k)
    hp.push_back({specs()[k].name, hv[k].data(), hg[k].data(), specs()[k].size, specs()[k].group});
  auto set_host_grads = [&](int t) {
    const auto g = grads_of_step(specs(), t);
    for (std::size_t k = 0; k < g.size(); ++k) std::copy(g[k].begin(), g[k].end(), hg[k].begin());
  };

  // CPU steps 1..3, saved; the GPU loads it and both take step 4.
  optim::AdamW cpu(hp, cfg);
  for (int t = 1; t <= 3; ++t) {
    set_host_grads(t);
    cpu.step();
  }
  cpu.save_state(dir / "cpu.safetensors");
  DeviceParams d(specs(), hv);
  cuda::AdamW gpu(ctx, d.params(specs()), cfg);
  gpu.load_state(ctx, dir / "cpu.safetensors");
  REQUIRE(gpu.step_count() == 3);
  for (std::size_t k = 0; k < specs().size(); ++k) {
    CHECK(bits_equal(gpu.exp_avg(ctx, k), cpu.exp_avg(k)));
    CHECK(bits_equal(gpu.exp_avg_sq(ctx, k), cpu.exp_avg_sq(k)));
  }
  set_host_grads(4);
  d.set_grads(hg);
  cpu.step();
  gpu.step(ctx);
  const auto dv = d.values();
  for (std::size_t k = 0; k < specs().size(); ++k) {
    const std::uint32_t u = std::max({max_ulp(dv[k], hv[k]), max_ulp(gpu.exp_avg(ctx, k), cpu.exp_avg(k)),
                                      max_ulp(gpu.exp_avg_sq(ctx, k), cpu.exp_avg_sq(k))});
    std::printf("AdamW state from the CPU, step 4 on both: %s max ulp distance %u (bound 4)\n",
                specs()[k].name.c_str(), u);
    CHECK(u <= 4);
  }

  // GPU step 5, saved; a fresh CPU optimizer loads it: the same moments and step count.
  set_host_grads(5);
  d.set_grads(hg);
  gpu.step(ctx);
  gpu.save_state(ctx, dir / "gpu.safetensors");
  optim::AdamW back(hp, cfg);
  back.load_state(dir / "gpu.safetensors");
  CHECK(back.step_count() == 5);
  for (std::size_t k = 0; k < specs().size(); ++k) {
    CHECK(bits_equal(back.exp_avg(k), gpu.exp_avg(ctx, k)));
    CHECK(bits_equal(back.exp_avg_sq(k), gpu.exp_avg_sq(ctx, k)));
  }
  // and the two files have one layout: the same tensor names, metadata keys and values but the step
  const auto fc = safetensors::File::open(dir / "cpu.safetensors");
  const auto fg = safetensors::File::open(dir / "gpu.safetensors");
  CHECK(fc.names() == fg.names());
  auto without_step = [](std::map<std::string, std::string> md) {
    md.erase("step");
    return md;
  };
  CHECK(without_step(fc.metadata()) == without_step(fg.metadata()));
}

TEST_CASE("cuda AdamW load_state refuses mismatched or corrupt files with a clear Error", "[cuda][adamw]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  const cuda::Context& ctx = cudatest::context();
  testutil::TempDir dir;
  const std::string path = dir / "opt.safetensors";
  const optim::AdamWConfig cfg = config(1.0);
  const std::vector<Spec> saved = specs();
  {
    DeviceParams d(saved, initial_values(saved));
    cuda::AdamW opt(ctx, d.params(saved), cfg);
    d.set_grads(grads_of_step(saved, 1));
    opt.step(ctx);
    opt.save_state(ctx, path);
  }
  // The target optimizer has taken 2 steps of its own: a refused load must leave them.
  auto check_refused = [&](const std::vector<Spec>& sp, const optim::AdamWConfig& c, const std::string& file,
                           const std::string& what) {
    DeviceParams d(sp, initial_values(sp));
    cuda::AdamW opt(ctx, d.params(sp), c);
    for (int t = 1; t <= 2; ++t) {
      d.set_grads(grads_of_step(sp, t + 10));
      opt.step(ctx);
    }
    const std::vector<float> m0 = opt.exp_avg(ctx, 0), v0 = opt.exp_avg_sq(ctx, 0);
    CHECK_THROWS_AS(opt.load_state(ctx, file), qlora::Error);
    CHECK_THROWS_WITH(opt.load_state(ctx, file),
                      Catch::Contains("cuda::AdamW state '" + file + "'") && Catch::Contains(what));
    CHECK(opt.step_count() == 2);
    CHECK(bits_equal(opt.exp_avg(ctx, 0), m0));
    CHECK(bits_equal(opt.exp_avg_sq(ctx, 0), v0));
  };
  auto with = [&](std::vector<Spec> sp, std::size_t k, const std::string& name, std::size_t size) {
    sp[k].name = name;
    sp[k].size = size;
    return sp;
  };

  SECTION("a parameter missing from the file") {
    std::vector<Spec> sp = saved;
    sp.push_back({"m.lora_C.weight", 2, optim::ParamGroup::LoraA});
    check_refused(sp, cfg, path,
                  "parameter 'm.lora_C.weight' (2 elements) has no tensor 'm.lora_C.weight.exp_avg'");
  }
  SECTION("a parameter of another name") {
    check_refused(with(saved, 0, "x.lora_A.weight", saved[0].size), cfg, path,
                  "parameter 'x.lora_A.weight' (1000 elements) has no tensor 'x.lora_A.weight.exp_avg'");
  }
  SECTION("a parameter of another size") {
    check_refused(with(saved, 0, saved[0].name, 999), cfg, path,
                  "tensor 'm.lora_A.weight.exp_avg' has shape [1000], expected [999] (the size of parameter "
                  "'m.lora_A.weight')");
  }
  SECTION("a tensor for no parameter") {
    check_refused({saved[0]}, cfg, path,
                  "has tensor 'm.lora_B.weight.exp_avg', which belongs to no parameter");
  }
  SECTION("another lr: Error, or KeepCurrent on purpose") {
    optim::AdamWConfig other = cfg;
    other.lr = 0.02;
    check_refused(saved, other, path, "lr = 0.01 (this optimizer: 0.02)");
    DeviceParams d(saved, initial_values(saved));
    cuda::AdamW opt(ctx, d.params(saved), other);
    opt.load_state(ctx, path, optim::ConfigMismatch::KeepCurrent);
    CHECK(opt.step_count() == 1);
    CHECK(opt.config().lr == 0.02);
  }
  SECTION("a truncated file") {
    std::string bytes;
    {
      std::ifstream in(path, std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(in), {});
    }
    const std::string cut = dir / "cut.safetensors";
    {
      std::ofstream out(cut, std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), std::streamsize(bytes.size() - 6));
    }
    check_refused(saved, cfg, cut, "safetensors '" + cut + "'");
  }
  SECTION("not an optimizer state") {
    const std::string other = dir / "weights.safetensors";
    safetensors::Writer w;
    const float x[3] = {1, 2, 3};
    w.add("m.lora_A.weight", DType::F32, {3}, x, sizeof x);
    w.write(other);
    check_refused(saved, cfg, other, "__metadata__ has no 'format', expected an AdamW state file");
  }
  SECTION("a missing file") { check_refused(saved, cfg, dir / "nothing.safetensors", "cannot open"); }
}
