// The CPU LoraLinear reproduces PEFT's numbers: forward and backward of PEFT's LoRA Linear computed in
// float64 by PyTorch (tests/data/peft/linear_reference.safetensors, make_reference.py), and every
// module of an adapter saved by PEFT (adapter_peft/) loaded into layers.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "qlora/backend/cpu/lora_linear.hpp"
#include "qlora/io/peft_adapter.hpp"
#include "qlora/lora/adapter.hpp"

using namespace qlora;

namespace {
std::string data(const std::string& name) { return std::string(QLORA_TEST_DATA_DIR) + "/peft/" + name; }

std::vector<float> f32(const safetensors::File& f, const std::string& k) {
  const auto v = f.get(k);
  if (v.dtype == DType::F64) {
    const auto d = v.copy_as<double>();
    return std::vector<float>(d.begin(), d.end());
  }
  return v.to_f32();
}

double rel_err(const float* got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);  // B = 0 (PEFT's init) makes dA exactly 0
}
}  // namespace

TEST_CASE("LoraLinear forward/backward equal PEFT's (float64 torch)", "[lora][peft]") {
  const auto f = safetensors::File::open(data("linear_reference.safetensors"));
  for (const char* name : {"r4", "r4_b", "rslora_r8"}) {
    const std::string p = std::string(name) + ".";
    INFO(name);
    const auto Av = f.get(p + "A");
    const int r = int(Av.shape[0]);
    const std::int64_t in = Av.shape[1];
    const std::int64_t out = f.get(p + "B").shape[0];
    const std::int64_t M = f.get(p + "x").shape[0];
    const double scaling = f.get(p + "scaling").copy_as<double>()[0];
    LoraConfig cfg;
    cfg.r = r;
    cfg.rslora = std::string(name) == "rslora_r8";
    cfg.alpha = float(cfg.rslora ? scaling * std::sqrt(double(r)) : scaling * r);
    REQUIRE(double(cfg.scaling()) == Approx(scaling).epsilon(1e-7));
    LoraLinear<format::F32, Dynamic, Cpu> L(BaseWeight<format::F32>(f32(f, p + "W0"), out, in), cfg,
                                            f32(f, p + "bias"), BiasMode::Frozen);
    const auto A = f32(f, p + "A"), B = f32(f, p + "B");
    for (int k = 0; k < r; ++k)
      for (std::int64_t i = 0; i < in; ++i) L.A()(k, i) = A[std::size_t(k * in + i)];
    for (std::int64_t o = 0; o < out; ++o)
      for (int k = 0; k < r; ++k) L.B()(o, k) = B[std::size_t(o * r + k)];
    const auto x = f32(f, p + "x"), dy = f32(f, p + "dy");
    std::vector<float> y(std::size_t(M * out)), dx(std::size_t(M * in));
    decltype(L)::Context ctx;
    L.forward(x.data(), M, y.data(), ctx);
    L.backward(ctx, dy.data(), dx.data(), GradMode::Overwrite);
    // fp32 here against float64 there: a few ulps of fp32 over sums of 48 terms
    CHECK(rel_err(y.data(), f32(f, p + "y")) < 1e-6);
    CHECK(rel_err(dx.data(), f32(f, p + "dx")) < 1e-6);
    CHECK(rel_err(L.dA().data(), f32(f, p + "dA")) < 1e-6);
    std::vector<float> dB;
    for (std::int64_t o = 0; o < out; ++o)
      for (int k = 0; k < r; ++k) dB.push_back(L.dB()(o, k));
    CHECK(rel_err(dB.data(), f32(f, p + "dB")) < 1e-6);
  }
}

TEST_CASE("a PEFT-saved adapter loaded into layers gives PEFT's module outputs", "[lora][peft]") {
  const auto adapter = peft::load_adapter(data("adapter_peft"));
  const auto io = safetensors::File::open(data("adapter_peft_io.safetensors"));
  REQUIRE(adapter.modules.size() == 6);
  for (const auto& kv : adapter.modules) {
    const std::string& module = kv.first;
    INFO(module);
    const auto w = io.get("base." + module + ".weight");
    std::vector<float> bias;
    if (io.contains("base." + module + ".bias")) bias = io.get("base." + module + ".bias").to_f32();
    LoraLinear<format::F32, Dynamic, Cpu> L(BaseWeight<format::F32>(w.to_f32(), w.shape[0], w.shape[1]),
                                            config_for(adapter.config, module), bias);
    REQUIRE(L.rank() == io.get("peft." + module + ".r").copy_as<std::int64_t>()[0]);
    REQUIRE(double(L.scaling()) ==
            Approx(io.get("peft." + module + ".scaling").copy_as<double>()[0]).epsilon(1e-7));
    load_weights(L, kv.second);
    const auto x = io.get("io." + module + ".x").to_f32();
    const auto want = io.get("io." + module + ".y").to_f32();
    std::vector<float> y(want.size());
    L.forward(x.data(), std::int64_t(x.size()) / L.in_features(), y.data());
    CHECK(rel_err(y.data(), want) < 1e-5);
    // and back out: the same numbers PEFT saved
    const auto back = weights_of(L, module);
    CHECK(back.A == kv.second.A);
    CHECK(back.B == kv.second.B);
  }
}

TEST_CASE("loading weights that do not fit the layer is an error", "[lora][peft]") {
  const auto adapter = peft::load_adapter(data("adapter_peft"));
  const auto& w = adapter.modules.at("model.layers.0.self_attn.q_proj");
  LoraConfig cfg = config_for(adapter.config, "model.layers.0.self_attn.q_proj");
  std::vector<float> base(32 * 20, 0.0f);
  LoraLinear<format::F32, Dynamic, Cpu> narrow(BaseWeight<format::F32>(base, 32, 20), cfg);
  REQUIRE_THROWS_WITH(
      load_weights(narrow, w),
      Catch::Contains("adapter model.layers.0.self_attn.q_proj: lora_A has 24 columns, base weight has 20"));
  cfg.r = 2;
  LoraLinear<format::F32, Dynamic, Cpu> low(BaseWeight<format::F32>(std::vector<float>(32 * 24), 32, 24),
                                            cfg);
  REQUIRE_THROWS_WITH(load_weights(low, w), Catch::Contains("rank 4, the layer has rank 2"));
}
