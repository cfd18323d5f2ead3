// PEFT LoRA adapters: read what PEFT 0.21 saved (tests/data/peft, made by make_reference.py), reproduce
// its module outputs, resolve targets and rank/alpha patterns as PEFT did, write adapters PEFT reads
// back, and refuse everything this library cannot apply.
//
// QLORA_REGEN_PEFT_DATA=1 also rewrites tests/data/peft/adapter_ours{,_io.safetensors}, the adapter
// tests/compat/check_peft_roundtrip.py loads with PEFT; without it the test only checks that the
// committed files are what this code writes.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "qlora/io/peft_adapter.hpp"
#include "test_util.hpp"

using namespace qlora;
using nlohmann::ordered_json;

namespace {

const std::string kDir = std::string(QLORA_TEST_DATA_DIR) + "/peft";
std::string data(const std::string& name) { return kDir + "/" + name; }

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ordered_json read_ordered(const std::string& path) { return ordered_json::parse(read_text(path)); }

// y = x W0ᵀ + b + s · (x Aᵀ) Bᵀ in double, plain loops. x (tokens, in), W0 (out, in), b (out) or empty.
std::vector<double> lora_forward(const peft::LoraWeights& w, const std::vector<float>& W0,
                                 const std::vector<float>& b, const std::vector<float>& x) {
  const std::int64_t in = w.in, out = w.out, r = w.r, tokens = std::int64_t(x.size()) / in;
  std::vector<double> y(std::size_t(tokens * out));
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::vector<double> xa(std::size_t(r), 0.0);  // (r): x Aᵀ for this token
    for (std::int64_t k = 0; k < r; ++k)
      for (std::int64_t i = 0; i < in; ++i) xa[k] += double(x[t * in + i]) * w.A[k * in + i];
    for (std::int64_t o = 0; o < out; ++o) {
      double base = b.empty() ? 0.0 : b[o];
      for (std::int64_t i = 0; i < in; ++i) base += double(x[t * in + i]) * W0[o * in + i];
      double lora = 0;
      for (std::int64_t k = 0; k < r; ++k) lora += xa[k] * w.B[o * r + k];
      y[t * out + o] = base + double(w.scaling) * lora;
    }
  }
  return y;
}

// max |a - b| / max |b|
template <class A, class B>
double rel_error(const std::vector<A>& a, const std::vector<B>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::fabs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::fabs(double(b[i])));
  }
  return diff / scale;
}

// The tiny model's base weights (adapter_peft_io.safetensors, "base.<module>.weight" / ".bias").
struct Base {
  safetensors::File io = safetensors::File::open(data("adapter_peft_io.safetensors"));
  std::vector<float> weight(const std::string& m) const { return io.get("base." + m + ".weight").to_f32(); }
  std::vector<float> bias(const std::string& m) const {
    return io.contains("base." + m + ".bias") ? io.get("base." + m + ".bias").to_f32() : std::vector<float>{};
  }
  bool shape(const std::string& m, std::int64_t& out, std::int64_t& in) const {
    if (!io.contains("base." + m + ".weight")) return false;
    const auto s = io.get("base." + m + ".weight").shape;
    out = s[0];
    in = s[1];
    return true;
  }
  // Every linear module of the model, in file order.
  std::vector<std::string> linear_modules() const {
    std::vector<std::string> out;
    for (const std::string& n : io.names())
      if (n.rfind("base.", 0) == 0 && n.size() > 12 && n.compare(n.size() - 7, 7, ".weight") == 0)
        out.push_back(n.substr(5, n.size() - 12));
    return out;
  }
};

// A copy of adapter_peft/ with its config and tensors edited, written into `dir`.
struct Tensor {
  DType dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;
};
Tensor f32_tensor(std::vector<std::int64_t> shape, const std::vector<float>& v) {
  Tensor t{DType::F32, std::move(shape), std::vector<std::uint8_t>(v.size() * 4)};
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}
using Edit = std::function<void(ordered_json& cfg, std::map<std::string, Tensor>& tensors)>;
std::string make_variant(const std::string& dir, const Edit& edit) {
  ordered_json cfg = read_ordered(data("adapter_peft/adapter_config.json"));
  std::map<std::string, Tensor> tensors;
  const auto f = safetensors::File::open(data("adapter_peft/adapter_model.safetensors"));
  for (const std::string& n : f.names()) {
    const auto v = f.get(n);
    tensors[n] = Tensor{v.dtype, v.shape, std::vector<std::uint8_t>(v.data, v.data + v.nbytes)};
  }
  edit(cfg, tensors);
  ::mkdir(dir.c_str(), 0777);
  write_text_atomic(dir + "/adapter_config.json", cfg.dump(2));
  safetensors::Writer w;
  for (const auto& [n, t] : tensors) w.add(n, t.dtype, t.shape, t.bytes.data(), t.bytes.size());
  w.write(dir + "/adapter_model.safetensors");
  return dir;
}

const std::string kQ0 = "model.layers.0.self_attn.q_proj";
const std::string kA_q0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const std::string kB_q0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

}  // namespace

TEST_CASE("the key set and defaults are those of the PEFT that made the data", "[io][peft]") {
  const ordered_json info = read_ordered(data("peft_info.json"));
  REQUIRE(info["peft_version"] == peft::kPeftVersion);
  const ordered_json& d = info["lora_config_to_dict"];
  std::vector<std::string> theirs, ours;
  for (auto it = d.begin(); it != d.end(); ++it) theirs.push_back(it.key());
  for (const auto& rule : peft::detail::key_rules()) ours.push_back(rule.key);
  std::sort(theirs.begin(), theirs.end());
  REQUIRE(ours == theirs);  // key_rules() is kept sorted, as PEFT writes the file
  for (const auto& rule : peft::detail::key_rules()) {
    const std::string k = rule.key;
    if (k == "r" || k == "lora_alpha" || k == "target_modules" || k == "peft_version")
      continue;  // set by the call
    INFO(k);
    REQUIRE(ordered_json::parse(rule.default_json) == d[k]);
  }
  // A config of defaults only (PEFT's to_dict with its sets as lists) is accepted.
  ordered_json cfg = d;
  cfg["target_modules"] = {"q_proj", "v_proj"};
  const peft::LoraConfig c = peft::parse_config(cfg, "to_dict");
  REQUIRE(c.r == 8);
  REQUIRE(c.lora_alpha == 16);
  REQUIRE(c.peft_version == peft::kPeftVersion);
}

TEST_CASE("an adapter saved by PEFT: config, patterns, shapes", "[io][peft]") {
  const peft::Adapter a = peft::load_adapter(data("adapter_peft"));
  const peft::LoraConfig& c = a.config;
  REQUIRE(c.r == 4);
  REQUIRE(c.lora_alpha == 8);
  REQUIRE(c.lora_dropout == 0.0);
  REQUIRE(c.bias == "none");
  REQUIRE(!c.use_rslora);
  REQUIRE(c.inference_mode);  // save_pretrained sets it
  REQUIRE(!c.task_type);
  REQUIRE(!c.base_model_name_or_path);
  REQUIRE(c.peft_version == "0.21.0");
  REQUIRE(c.init_lora_weights == true);
  REQUIRE(c.target_modules == peft::ModuleSet::list({"down_proj", "v_proj", "q_proj"}));  // PEFT's set order
  REQUIRE(c.rank_pattern ==
          std::vector<std::pair<std::string, int>>{{"down_proj", 2}, {"model.layers.1.self_attn.q_proj", 6}});
  REQUIRE(c.alpha_pattern ==
          std::vector<std::pair<std::string, double>>{{"layers\\.1\\..*", 4}, {"v_proj", 32}});
  REQUIRE(c.inert["auto_mapping"]["base_model_class"] == "TinyLlamaish");

  // r and scaling per module as PEFT resolved them (stored beside its outputs).
  const Base base;
  REQUIRE(a.modules.size() == 6);
  for (const auto& [m, w] : a.modules) {
    INFO(m);
    REQUIRE(w.module == m);
    REQUIRE(w.r == base.io.get("peft." + m + ".r").copy_as<std::int64_t>()[0]);
    REQUIRE(w.scaling == float(base.io.get("peft." + m + ".scaling").copy_as<double>()[0]));
    std::int64_t out, in;
    REQUIRE(base.shape(m, out, in));
    REQUIRE(w.in == in);
    REQUIRE(w.out == out);
    REQUIRE(w.A.size() == std::size_t(w.r * in));
    REQUIRE(w.B.size() == std::size_t(out * w.r));
  }
  const auto& q1 = a.modules.at("model.layers.1.self_attn.q_proj");  // rank_pattern by full name
  REQUIRE(q1.r == 6);
  REQUIRE(q1.alpha == 4);  // alpha_pattern "layers\.1\..*"
  REQUIRE(a.modules.at("model.layers.0.self_attn.v_proj").alpha == 32);
  REQUIRE(a.modules.at("model.layers.1.self_attn.v_proj").alpha == 4);  // the first matching key wins
  REQUIRE(a.modules.at("model.layers.0.mlp.down_proj").r == 2);
  REQUIRE(a.modules.at("model.layers.0.mlp.down_proj").scaling == 4.0f);
  REQUIRE(a.biases.empty());
  peft::check_fits(
      a, [&](const std::string& m, std::int64_t& out, std::int64_t& in) { return base.shape(m, out, in); });

  // The values: the first elements of layer 0's q_proj, read raw from the file.
  const auto f = safetensors::File::open(data("adapter_peft/adapter_model.safetensors"));
  REQUIRE(a.modules.at(kQ0).A == f.get(kA_q0).to_f32());
  REQUIRE(a.modules.at(kQ0).B == f.get(kB_q0).to_f32());
}

TEST_CASE("each module's output equals PEFT's", "[io][peft]") {
  const peft::Adapter a = peft::load_adapter(data("adapter_peft"));
  const Base base;
  for (const auto& [m, w] : a.modules) {
    const std::vector<float> x = base.io.get("io." + m + ".x").to_f32();
    const std::vector<float> y_peft = base.io.get("io." + m + ".y").to_f32();
    const std::vector<double> y = lora_forward(w, base.weight(m), base.bias(m), x);
    const double err = rel_error(y, y_peft);
    INFO(m << ": relative error " << err);
    CHECK(err <= 1e-5);
    // The LoRA term is not negligible: without it the output would be off by far more.
    peft::LoraWeights zero = w;
    std::fill(zero.B.begin(), zero.B.end(), 0.0f);
    CHECK(rel_error(lora_forward(zero, base.weight(m), base.bias(m), x), y_peft) > 1e-2);
  }
}

TEST_CASE("PEFT's bf16 adapter holds the fp32 values rounded to bf16", "[io][peft]") {
  const peft::Adapter a = peft::load_adapter(data("adapter_peft"));
  const peft::Adapter h = peft::load_adapter(data("adapter_peft_bf16"));
  REQUIRE(h.modules.size() == a.modules.size());
  for (const auto& [m, w] : a.modules) {
    const auto& wh = h.modules.at(m);
    for (std::size_t i = 0; i < w.A.size(); ++i) REQUIRE(wh.A[i] == to_float(to_bf16(w.A[i])));
    for (std::size_t i = 0; i < w.B.size(); ++i) REQUIRE(wh.B[i] == to_float(to_bf16(w.B[i])));
  }
}

TEST_CASE("biases saved with bias \"all\" and \"lora_only\"", "[io][peft]") {
  const Base base;
  for (const char* mode : {"all", "lora_only"}) {
    INFO(mode);
    const peft::Adapter a = peft::load_adapter(data(std::string("adapter_bias_") + mode));
    REQUIRE(a.config.bias == mode);
    REQUIRE(a.modules.size() == 2);
    REQUIRE(a.biases.size() == 2);  // only q_proj has a bias in this model
    for (const auto& [m, b] : a.biases) {
      const std::vector<float> b0 = base.bias(m);
      REQUIRE(b.size() == b0.size());
      for (std::size_t i = 0; i < b.size(); ++i) REQUIRE(b[i] == b0[i] + 1.0f);  // the script's "training"
    }
    peft::check_fits(
        a, [&](const std::string& m, std::int64_t& out, std::int64_t& in) { return base.shape(m, out, in); });
  }
}

TEST_CASE("targets, rank_for, alpha_for and scaling agree with PEFT", "[io][peft]") {
  const ordered_json ref = read_ordered(data("peft_info.json"))["targets_reference"];
  std::vector<std::string> linear;
  for (const auto& n : ref["linear_modules"]) linear.push_back(n.get<std::string>());
  REQUIRE(linear.size() == 15);
  for (auto s = ref["settings"].begin(); s != ref["settings"].end(); ++s) {
    INFO("setting " << s.key());
    ordered_json cfg = {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}};
    for (auto it = s.value()["config"].begin(); it != s.value()["config"].end(); ++it)
      cfg[it.key()] = it.value();
    const peft::LoraConfig c = peft::parse_config(cfg, s.key());
    std::vector<std::string> expected, got;
    for (const auto& n : s.value()["targeted"]) expected.push_back(n.get<std::string>());
    for (const std::string& m : linear)
      if (peft::targets(c, m)) got.push_back(m);
    std::sort(got.begin(), got.end());
    REQUIRE(got == expected);
    if (!s.value().contains("resolved")) continue;
    for (auto it = s.value()["resolved"].begin(); it != s.value()["resolved"].end(); ++it) {
      INFO(it.key());
      REQUIRE(peft::rank_for(c, it.key()) == it.value()["r"].get<int>());
      REQUIRE(peft::scaling(c, it.key()) == float(it.value()["scaling"].get<double>()));
    }
  }
  // The settings above include the cases that tell the rules apart; spelled out:
  const auto& pat = ref["settings"]["patterns"]["resolved"];
  REQUIRE(pat["model.layers.0.self_attn.k_proj"]["r"] == 3);  // model\.layers\.0\..*_proj sorts first
  REQUIRE(pat["model.layers.1.self_attn.k_proj"]["r"] == 7);  // "proj" alone matched nothing
  REQUIRE(ref["settings"]["regex_partial"]["targeted"].empty());
}

TEST_CASE("save then load is the identity, and the config is PEFT's text", "[io][peft]") {
  const peft::Adapter a = peft::load_adapter(data("adapter_peft"));
  // The same key set, order, values and formatting as PEFT's save_pretrained.
  REQUIRE(peft::config_json(a.config) == read_text(data("adapter_peft/adapter_config.json")));

  testutil::TempDir d;
  peft::save_adapter(d / "out", a);
  const peft::Adapter b = peft::load_adapter(d / "out");
  REQUIRE(peft::config_json(b.config) == peft::config_json(a.config));
  REQUIRE(b.modules.size() == a.modules.size());
  for (const auto& [m, w] : a.modules) {
    const auto& v = b.modules.at(m);
    REQUIRE(v.r == w.r);
    REQUIRE(v.alpha == w.alpha);
    REQUIRE(v.scaling == w.scaling);
    REQUIRE(v.in == w.in);
    REQUIRE(v.out == w.out);
    REQUIRE(std::memcmp(v.A.data(), w.A.data(), w.A.size() * 4) == 0);
    REQUIRE(std::memcmp(v.B.data(), w.B.data(), w.B.size() * 4) == 0);
  }
  const auto f = safetensors::File::open(d / "out/adapter_model.safetensors");
  REQUIRE(f.metadata().at("format") == "pt");
  REQUIRE(f.get(kA_q0).dtype == DType::F32);

  // Saving again over an existing folder replaces it.
  peft::save_adapter(d / "out", a, DType::BF16);
  const peft::Adapter h = peft::load_adapter(d / "out");
  const peft::Adapter h_peft = peft::load_adapter(data("adapter_peft_bf16"));
  REQUIRE(safetensors::File::open(d / "out/adapter_model.safetensors").get(kA_q0).dtype == DType::BF16);
  for (const auto& [m, w] : h_peft.modules) {
    REQUIRE(h.modules.at(m).A == w.A);  // our bf16 rounding is PEFT's (torch's .to(bfloat16))
    REQUIRE(h.modules.at(m).B == w.B);
  }

  // Biases round-trip under their PEFT names.
  const peft::Adapter ball = peft::load_adapter(data("adapter_bias_all"));
  peft::save_adapter(d / "bias", ball);
  const auto fb = safetensors::File::open(d / "bias/adapter_model.safetensors");
  REQUIRE(fb.contains("base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"));
  REQUIRE(peft::load_adapter(d / "bias").biases == ball.biases);
}

TEST_CASE("bf16 and fp16 adapters written with the Writer load as widened floats", "[io][peft]") {
  testutil::TempDir d;
  std::vector<float> a_vals;
  const std::string dir = make_variant(d / "bf16", [&](ordered_json&, std::map<std::string, Tensor>& t) {
    for (auto& [name, tensor] : t) {
      const std::size_t n = tensor.bytes.size() / 4;
      std::vector<float> v(n);
      std::memcpy(v.data(), tensor.bytes.data(), n * 4);
      std::vector<bf16> h(n);
      for (std::size_t i = 0; i < n; ++i) h[i] = to_bf16(v[i]);
      if (name == kA_q0)
        for (const bf16& x : h) a_vals.push_back(to_float(x));
      tensor.dtype = DType::BF16;
      tensor.bytes.assign(reinterpret_cast<const std::uint8_t*>(h.data()),
                          reinterpret_cast<const std::uint8_t*>(h.data()) + n * 2);
    }
  });
  const peft::Adapter a = peft::load_adapter(dir);
  REQUIRE(a.modules.at(kQ0).A == a_vals);

  const std::string dir16 = make_variant(d / "fp16", [&](ordered_json&, std::map<std::string, Tensor>& t) {
    std::vector<fp16> h = {to_fp16(0.5f), to_fp16(-2.0f), to_fp16(0.1f)};
    Tensor& A = t[kA_q0];
    std::vector<fp16> all(A.bytes.size() / 4, to_fp16(0.25f));
    std::copy(h.begin(), h.end(), all.begin());
    A.dtype = DType::F16;
    A.bytes.assign(reinterpret_cast<const std::uint8_t*>(all.data()),
                   reinterpret_cast<const std::uint8_t*>(all.data()) + all.size() * 2);
  });
  const std::vector<float> A16 = peft::load_adapter(dir16).modules.at(kQ0).A;
  REQUIRE(A16[0] == 0.5f);
  REQUIRE(A16[1] == -2.0f);
  REQUIRE(A16[2] == to_float(to_fp16(0.1f)));
  REQUIRE(A16[3] == 0.25f);
}

TEST_CASE("the state-dict form with the adapter name is read too", "[io][peft]") {
  testutil::TempDir d;
  const std::string dir = make_variant(d.path + "/v", [&](ordered_json&, std::map<std::string, Tensor>& t) {
    std::map<std::string, Tensor> renamed;
    for (auto& [n, x] : t) {
      std::string m = n;
      for (const char* ab : {".lora_A.weight", ".lora_B.weight"}) {
        const auto at = m.find(ab);
        if (at != std::string::npos) m.replace(at, 14, std::string(ab).substr(0, 7) + ".default.weight");
      }
      renamed[m] = std::move(x);
    }
    t = std::move(renamed);
  });
  REQUIRE(safetensors::File::open(dir + "/adapter_model.safetensors")
              .contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"));
  const peft::Adapter a = peft::load_adapter(dir), b = peft::load_adapter(data("adapter_peft"));
  REQUIRE(a.modules.size() == b.modules.size());
  REQUIRE(a.modules.at(kQ0).A == b.modules.at(kQ0).A);
}

TEST_CASE("configs this library cannot apply are errors naming the key", "[io][peft]") {
  using Catch::Contains;
  REQUIRE_THROWS_WITH(peft::read_config(data("configs/dora")), Contains("use_dora = true is not supported"));
  REQUIRE_THROWS_WITH(peft::read_config(data("configs/ia3")),
                      Contains("peft_type is \"IA3\", expected \"LORA\""));
  const peft::LoraConfig rs = peft::read_config(data("configs/rslora_regex"));  // PEFT's own, accepted
  REQUIRE(rs.use_rslora);
  REQUIRE(rs.target_modules == peft::ModuleSet::pattern(".*\\.(q|v)_proj"));
  REQUIRE(*rs.task_type == "CAUSAL_LM");
  REQUIRE(*rs.base_model_name_or_path == "tiny/llamaish");
  REQUIRE(peft::scaling(rs, "model.layers.0.self_attn.q_proj") == float(16 / std::sqrt(8.0)));

  testutil::TempDir d;
  int n = 0;
  auto config_error = [&](const std::function<void(ordered_json&)>& edit) -> std::string {
    const std::string dir = make_variant(d / std::to_string(n++), [&](ordered_json& c, auto&) { edit(c); });
    try {
      peft::load_adapter(dir);
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  CHECK_THAT(config_error([](ordered_json& c) { c["foo_bar"] = 1; }),
             Contains("unknown key 'foo_bar'") && Contains("adapter_config.json"));
  CHECK_THAT(config_error([](ordered_json& c) { c["use_dora"] = true; }),
             Contains("use_dora = true is not supported: DoRA"));
  CHECK_THAT(config_error([](ordered_json& c) { c["peft_type"] = "IA3"; }), Contains("peft_type is \"IA3\""));
  CHECK_THAT(config_error([](ordered_json& c) { c["fan_in_fan_out"] = true; }),
             Contains("fan_in_fan_out = true is not supported"));
  CHECK_THAT(config_error([](ordered_json& c) { c["layers_to_transform"] = {0}; }),
             Contains("layers_to_transform = [0] is not supported"));
  CHECK_THAT(config_error([](ordered_json& c) { c["lora_bias"] = true; }), Contains("lora_bias = true"));
  CHECK_THAT(config_error([](ordered_json& c) {
               c["megatron_config"] = {{"a", 1}};
             }),
             Contains("megatron_config = {\"a\":1} is not supported"));
  CHECK_THAT(config_error([](ordered_json& c) { c["target_parameters"] = {"x.weight"}; }),
             Contains("target_parameters"));
  CHECK_THAT(config_error([](ordered_json& c) {
               c["trainable_token_indices"] = {1, 2};
             }),
             Contains("trainable_token_indices"));
  CHECK_THAT(config_error([](ordered_json& c) { c["modules_to_save"] = {"lm_head"}; }),
             Contains("modules_to_save = [\"lm_head\"] is not supported"));
  CHECK_THAT(config_error([](ordered_json& c) { c["init_lora_weights"] = "pissa_niter_4"; }),
             Contains("\"pissa_niter_4\" is not supported: it rewrites the base weights"));
  CHECK_THAT(config_error([](ordered_json& c) { c["init_lora_weights"] = "fancy"; }),
             Contains("unknown init_lora_weights \"fancy\""));
  CHECK_THAT(config_error([](ordered_json& c) { c["bias"] = "some"; }), Contains("bias is \"some\""));
  CHECK_THAT(config_error([](ordered_json& c) { c["r"] = "4"; }),
             Contains("r is \"4\", expected a positive"));
  CHECK_THAT(config_error([](ordered_json& c) { c["target_modules"] = nullptr; }),
             Contains("target_modules is null"));
  CHECK_THAT(config_error([](ordered_json& c) {
               c["rank_pattern"] = {{"(?P<x>q)_proj", 2}};
             }),
             Contains("rank_pattern key '(?P<x>q)_proj' is not a regular expression"));
  CHECK_THAT(config_error([](ordered_json& c) { c["task_type"] = "CHAT"; }), Contains("task_type \"CHAT\""));
  // Accepted: default-valued features written as empty containers, and the inert keys with any value.
  CHECK(config_error([](ordered_json& c) {
          c["layers_to_transform"] = ordered_json::array();
          c["modules_to_save"] = ordered_json::array();
          c["eva_config"] = {{"rho", 2.0}};
          c["qalora_group_size"] = 32;
        }) == "no error");
}

TEST_CASE("tensors that do not fit are errors naming the module", "[io][peft]") {
  using Catch::Contains;
  testutil::TempDir d;
  int n = 0;
  auto tensor_error = [&](const std::function<void(ordered_json&, std::map<std::string, Tensor>&)>& edit) {
    const std::string dir = make_variant(d / std::to_string(n++), edit);
    try {
      peft::load_adapter(dir);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK_THAT(tensor_error([](ordered_json&, auto& t) { t.erase(kB_q0); }),
             Contains("module model.layers.0.self_attn.q_proj has lora_A") && Contains("but no lora_B"));
  CHECK_THAT(tensor_error([](ordered_json&, auto& t) { t.erase(kA_q0); }), Contains("has lora_B"));
  // r = 3 where the config says 4
  CHECK_THAT(tensor_error([](ordered_json&, auto& t) {
               t[kA_q0] = f32_tensor({3, 24}, std::vector<float>(72));
             }),
             Contains("adapter model.layers.0.self_attn.q_proj: lora_A has 3 rows, the config gives r = 4"));
  CHECK_THAT(tensor_error([](ordered_json&, auto& t) {
               t[kB_q0] = f32_tensor({32, 3}, std::vector<float>(96));
             }),
             Contains("lora_B has 3 columns, lora_A has r = 4 rows"));
  CHECK_THAT(tensor_error([](ordered_json&, auto& t) {
               t[kA_q0] = f32_tensor({4, 24, 1}, std::vector<float>(96));
             }),
             Contains("lora_A is [4, 24, 1], expected 2 dimensions"));
  CHECK_THAT(tensor_error([](ordered_json&, auto& t) {
               t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] =
                   f32_tensor({32}, std::vector<float>(32));
             }),
             Contains("unexpected tensor") && Contains("DoRA"));
  CHECK_THAT(tensor_error([](ordered_json&, auto& t) {
               t["base_model.model.model.embed_tokens.lora_embedding_A"] =
                   f32_tensor({4, 8}, std::vector<float>(32));
             }),
             Contains("LoRA on an embedding"));
  CHECK_THAT(tensor_error([](ordered_json&, auto& t) {
               t["base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"] =
                   f32_tensor({32}, std::vector<float>(32));
             }),
             Contains("unexpected bias tensor") && Contains("bias is \"none\""));
  CHECK_THAT(tensor_error([](ordered_json&, auto& t) { t["model.layers.0.x"] = f32_tensor({1}, {0.f}); }),
             Contains("does not start with 'base_model.model.'"));
  // A module the config does not target: PEFT would drop its weights silently.
  CHECK_THAT(
      tensor_error([](ordered_json&, auto& t) {
        t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] =
            f32_tensor({4, 24}, std::vector<float>(96));
        t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] =
            f32_tensor({16, 4}, std::vector<float>(64));
      }),
      Contains("adapter model.layers.0.self_attn.k_proj is not selected by the config's target_modules"));
  CHECK_THAT(tensor_error([](ordered_json&, auto& t) {
               Tensor& A = t[kA_q0];
               A.dtype = DType::F64;
               A.bytes.resize(A.bytes.size() * 2);
             }),
             Contains("is F64, expected F32, F16 or BF16"));
  // Both naming forms for one module.
  CHECK_THAT(tensor_error([](ordered_json&, auto& t) {
               t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] = t[kA_q0];
             }),
             Contains("has both"));
}

TEST_CASE("check_fits compares every module with the base model", "[io][peft]") {
  const peft::Adapter a = peft::load_adapter(data("adapter_peft"));
  const Base base;
  using Catch::Contains;
  REQUIRE_THROWS_WITH(
      peft::check_fits(a,
                       [&](const std::string& m, std::int64_t& out, std::int64_t& in) {
                         const bool ok = base.shape(m, out, in);
                         if (m == kQ0) in = 48;
                         return ok;
                       }),
      Contains("adapter model.layers.0.self_attn.q_proj: lora_A has 24 columns, base weight has 48"));
  REQUIRE_THROWS_WITH(
      peft::check_fits(a,
                       [&](const std::string& m, std::int64_t& out, std::int64_t& in) {
                         const bool ok = base.shape(m, out, in);
                         if (m == kQ0) out = 31;
                         return ok;
                       }),
      Contains("adapter model.layers.0.self_attn.q_proj: lora_B has 32 rows, base weight has 31"));
  REQUIRE_THROWS_WITH(peft::check_fits(a,
                                       [&](const std::string& m, std::int64_t& out, std::int64_t& in) {
                                         return m != "model.layers.1.mlp.down_proj" && base.shape(m, out, in);
                                       }),
                      Contains("adapter module 'model.layers.1.mlp.down_proj' not found in the base model"));
}

TEST_CASE("save_adapter refuses what PEFT would read differently", "[io][peft]") {
  using Catch::Contains;
  const peft::Adapter good = peft::load_adapter(data("adapter_peft"));
  testutil::TempDir d;
  {
    // Insertion order "v_proj" first would give layers.1.v_proj alpha 32, but PEFT writes the keys
    // sorted and, reading them back, gives it 4.
    peft::Adapter a = good;
    a.config.alpha_pattern = {{"v_proj", 32}, {"layers\\.1\\..*", 4}};
    auto& v1 = a.modules.at("model.layers.1.self_attn.v_proj");
    v1.alpha = peft::alpha_for(a.config, v1.module);
    REQUIRE(v1.alpha == 32);
    REQUIRE_THROWS_WITH(
        peft::save_adapter(d / "x", a),
        Contains("adapter model.layers.1.self_attn.v_proj: alpha is 32, the config as PEFT reads it "
                 "back (pattern keys sorted) gives 4"));
    REQUIRE(!hf::is_directory(d / "x"));  // nothing written
  }
  {
    peft::Adapter a = good;
    a.config.target_modules = peft::ModuleSet::list({"q_proj", "v_proj"});
    REQUIRE_THROWS_WITH(peft::save_adapter(d / "x", a),
                        Contains("adapter model.layers.0.mlp.down_proj is not selected by target_modules"));
  }
  {
    peft::Adapter a = good;
    a.modules.at(kQ0).B.pop_back();
    REQUIRE_THROWS_WITH(peft::save_adapter(d / "x", a), Contains("B has 127 values, expected out·r = 128"));
  }
  {
    peft::Adapter a = good;
    a.biases[kQ0] = std::vector<float>(32);
    REQUIRE_THROWS_WITH(peft::save_adapter(d / "x", a), Contains("the config's bias is \"none\""));
  }
  {  // a failed save leaves an existing folder as it was
    peft::save_adapter(d / "keep", good);
    peft::Adapter a = good;
    a.modules.at(kQ0).r = 5;
    REQUIRE_THROWS(peft::save_adapter(d / "keep", a));
    REQUIRE(peft::load_adapter(d / "keep").modules.at(kQ0).r == 4);
  }
}

TEST_CASE("linear_reference.safetensors is self-consistent (y, dx, dA, dB by plain loops)", "[io][peft]") {
  // The LoRA layer's reference data: check it here, in double, so a layer test can trust it.
  const auto f = safetensors::File::open(data("linear_reference.safetensors"));
  std::vector<std::string> cases;
  std::stringstream list(f.metadata().at("cases"));
  for (std::string c; std::getline(list, c, ',');) cases.push_back(c);
  REQUIRE(cases == std::vector<std::string>{"r4", "r4_b", "rslora_r8"});
  for (const std::string& c : cases) {
    INFO(c);
    auto get = [&](const std::string& n) {
      const auto v = f.get(c + "." + n);
      REQUIRE(v.dtype == DType::F64);
      return v.copy_as<double>();
    };
    const auto W0 = get("W0"), b = get("bias"), A = get("A"), B = get("B"), x = get("x"), dy = get("dy");
    const auto y_ref = get("y"), dx_ref = get("dx"), dA_ref = get("dA"), dB_ref = get("dB");
    const double s = get("scaling")[0];
    const auto meta = nlohmann::json::parse(f.metadata().at(c));
    const int r = meta["r"];
    const double alpha = meta["lora_alpha"];
    REQUIRE(s == (meta["use_rslora"].get<bool>() ? alpha / std::sqrt(double(r)) : alpha / r));
    const std::int64_t T = 6, in = 48, out = 40;
    REQUIRE(f.get(c + ".A").shape == std::vector<std::int64_t>{r, in});
    REQUIRE(f.get(c + ".B").shape == std::vector<std::int64_t>{out, r});
    // Inputs are float32 numbers, so a float32 layer can be given exactly these.
    for (const auto* v : {&W0, &b, &A, &B, &x, &dy})
      for (double e : *v) REQUIRE(double(float(e)) == e);

    std::vector<double> xa(T * r, 0), y(T * out, 0), g(T * r, 0), dx(T * in, 0), dA(r * in, 0),
        dB(out * r, 0);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t k = 0; k < r; ++k)
        for (std::int64_t i = 0; i < in; ++i) xa[t * r + k] += x[t * in + i] * A[k * in + i];  // (T, r) x Aᵀ
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t o = 0; o < out; ++o) {
        double acc = b[o];
        for (std::int64_t i = 0; i < in; ++i) acc += x[t * in + i] * W0[o * in + i];
        double lora = 0;
        for (std::int64_t k = 0; k < r; ++k) lora += xa[t * r + k] * B[o * r + k];
        y[t * out + o] = acc + s * lora;
      }
    // g = dy B (T, r); dx = dy W0 + s g A; dA = s gᵀ x (r, in); dB = s dyᵀ (x Aᵀ) (out, r)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t k = 0; k < r; ++k)
        for (std::int64_t o = 0; o < out; ++o) g[t * r + k] += dy[t * out + o] * B[o * r + k];
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t i = 0; i < in; ++i) {
        double acc = 0, lora = 0;
        for (std::int64_t o = 0; o < out; ++o) acc += dy[t * out + o] * W0[o * in + i];
        for (std::int64_t k = 0; k < r; ++k) lora += g[t * r + k] * A[k * in + i];
        dx[t * in + i] = acc + s * lora;
      }
    for (std::int64_t k = 0; k < r; ++k)
      for (std::int64_t i = 0; i < in; ++i) {
        for (std::int64_t t = 0; t < T; ++t) dA[k * in + i] += g[t * r + k] * x[t * in + i];
        dA[k * in + i] *= s;
      }
    for (std::int64_t o = 0; o < out; ++o)
      for (std::int64_t k = 0; k < r; ++k) {
        for (std::int64_t t = 0; t < T; ++t) dB[o * r + k] += dy[t * out + o] * xa[t * r + k];
        dB[o * r + k] *= s;
      }
    CHECK(rel_error(y, y_ref) < 1e-13);
    CHECK(rel_error(dx, dx_ref) < 1e-13);
    CHECK(rel_error(dB, dB_ref) < 1e-13);
    if (meta["random_b"].get<bool>()) {
      CHECK(rel_error(dA, dA_ref) < 1e-13);
    } else {  // PEFT's init: B = 0, so A gets no gradient at the first step
      for (double v : B) REQUIRE(v == 0.0);
      for (double v : dA_ref) REQUIRE(v == 0.0);
    }
  }
}

namespace {

// Uniform values k / 2^23 * scale, k in [-2^23, 2^23), from splitmix64: exact floats (scale a power of
// two) with no libm or <random> distribution in between, so every compiler and standard library
// regenerates the committed adapter bit for bit.
std::vector<float> portable_uniform(std::size_t n, std::uint64_t seed, float scale) {
  std::vector<float> v(n);
  for (float& e : v) {
    std::uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    e = float(std::int64_t(z >> 40) - (std::int64_t(1) << 23)) * (scale / float(1 << 23));
  }
  return v;
}

// adapter_ours: what this library writes, for check_peft_roundtrip.py to load with PEFT. Different
// features from adapter_peft: a regex target, exclude_modules, rsLoRA, patterns on r and alpha.
peft::Adapter make_ours(const Base& base) {
  peft::Adapter a;
  peft::LoraConfig& c = a.config;
  c.r = 4;
  c.lora_alpha = 16;
  c.use_rslora = true;
  c.target_modules = peft::ModuleSet::pattern(".*\\.(q_proj|v_proj|up_proj)");
  c.exclude_modules = peft::ModuleSet::list({"layers.1.self_attn.v_proj"});
  c.rank_pattern = {{"model\\.layers\\.0\\.mlp\\.up_proj", 3}, {"q_proj", 2}};
  c.alpha_pattern = {{"q_proj", 6}};
  c.base_model_name_or_path = "qlora-tests/tiny-llamaish";
  c.inference_mode = true;
  std::uint64_t seed = 100;
  for (const std::string& m : base.linear_modules()) {
    if (!peft::targets(c, m)) continue;
    std::int64_t out = 0, in = 0;
    REQUIRE(base.shape(m, out, in));
    peft::LoraWeights w;
    w.module = m;
    w.r = peft::rank_for(c, m);
    w.alpha = peft::alpha_for(c, m);
    w.scaling = peft::scaling(c, m);
    w.in = in;
    w.out = out;
    w.A = portable_uniform(std::size_t(w.r * in), seed++, 0.5f);
    w.B = portable_uniform(std::size_t(out * w.r), seed++, 0.5f);
    a.modules.emplace(m, std::move(w));
  }
  return a;
}

}  // namespace

TEST_CASE("adapter_ours: the committed files are what this code writes", "[io][peft]") {
  const Base base;
  const peft::Adapter ours = make_ours(base);
  std::vector<std::string> names;
  for (const auto& [m, w] : ours.modules) names.push_back(m);
  REQUIRE(names == std::vector<std::string>{"model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj",
                                            "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj",
                                            "model.layers.1.self_attn.q_proj"});
  REQUIRE(ours.modules.at("model.layers.0.mlp.up_proj").r == 3);
  REQUIRE(ours.modules.at("model.layers.1.mlp.up_proj").r == 4);
  REQUIRE(ours.modules.at("model.layers.1.self_attn.q_proj").r == 2);
  REQUIRE(ours.modules.at("model.layers.1.self_attn.q_proj").scaling == float(6 / std::sqrt(2.0)));

  const char* regen = std::getenv("QLORA_REGEN_PEFT_DATA");
  if (regen && std::string(regen) == "1") {
    peft::save_adapter(data("adapter_ours"), ours);
    safetensors::Writer w;
    w.set_metadata("written_by", "tests/test_peft_adapter.cpp with QLORA_REGEN_PEFT_DATA=1");
    for (const auto& [m, lw] : ours.modules) {
      const std::vector<float> x =
          portable_uniform(std::size_t(5 * lw.in), 1000 + std::uint64_t(lw.in + lw.out), 2.0f);
      const std::vector<double> y = lora_forward(lw, base.weight(m), base.bias(m), x);
      const std::vector<float> yf(y.begin(), y.end());
      const std::int64_t r = lw.r;
      const double s = lw.scaling;
      w.add_copy("io." + m + ".x", DType::F32, {5, lw.in}, x.data(), x.size() * 4);
      w.add_copy("io." + m + ".y", DType::F32, {5, lw.out}, yf.data(), yf.size() * 4);
      w.add_copy("ours." + m + ".r", DType::I64, {1}, &r, 8);
      w.add_copy("ours." + m + ".scaling", DType::F64, {1}, &s, 8);
    }
    w.write(data("adapter_ours_io.safetensors"));
  }

  const peft::Adapter back = peft::load_adapter(data("adapter_ours"));
  REQUIRE(peft::config_json(back.config) == peft::config_json(ours.config));
  REQUIRE(read_text(data("adapter_ours/adapter_config.json")) == peft::config_json(ours.config));
  const auto io = safetensors::File::open(data("adapter_ours_io.safetensors"));
  for (const auto& [m, w] : ours.modules) {
    INFO(m);
    const auto& v = back.modules.at(m);
    REQUIRE(v.A == w.A);
    REQUIRE(v.B == w.B);
    REQUIRE(v.scaling == w.scaling);
    REQUIRE(io.get("ours." + m + ".r").copy_as<std::int64_t>()[0] == w.r);
    // Not bitwise: another compiler may contract the double sums into FMAs.
    const std::vector<double> y =
        lora_forward(v, base.weight(m), base.bias(m), io.get("io." + m + ".x").to_f32());
    CHECK(rel_error(y, io.get("io." + m + ".y").to_f32()) <= 1e-7);
  }
}
