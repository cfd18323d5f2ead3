// LlamaModel reproduces transformers 5.17's LlamaForCausalLM (fp32, eager attention) and PEFT's LoRA
// on it: logits, hidden states, losses and the adapter's gradients against tests/data/llama
// (make_reference.py; README.md there lists what each file holds). The maximum differences are
// printed so a regression shows how far it moved, not only that it failed.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "qlora/model/llama.hpp"
#include "test_util.hpp"

using namespace qlora;

namespace {
std::string data(const std::string& name) { return std::string(QLORA_TEST_DATA_DIR) + "/llama/" + name; }

struct Ids {
  std::int64_t B = 0, T = 0;
  std::vector<std::int64_t> v;
};
Ids read_ids(const safetensors::File& f, const std::string& key) {
  const auto t = f.get(key);
  REQUIRE(t.shape.size() == 2);
  return {t.shape[0], t.shape[1], t.copy_as<std::int64_t>()};
}

double max_abs_diff(const float* got, const std::vector<float>& want) {
  double m = 0;
  for (std::size_t i = 0; i < want.size(); ++i) m = std::max(m, std::fabs(double(got[i]) - double(want[i])));
  return m;
}
double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::fabs(double(x)));
  return m;
}

template <class Model>
void check_forward(Model& m, const std::string& expected, const Ids& ids, bool check_hidden) {
  const auto e = safetensors::File::open(data(expected));
  const std::int64_t M = ids.B * ids.T, D = m.config().hidden_size, V = m.config().vocab_size;
  typename Model::Activations acts;
  std::vector<float> logits(std::size_t(M * V));
  m.forward(ids.v.data(), ids.B, ids.T, logits.data(), &acts);
  const double dl = max_abs_diff(logits.data(), e.get("logits").to_f32());
  std::printf("%-42s logits max |diff| %.3g\n", expected.c_str(), dl);
  CHECK(dl <= 1e-4);
  // the inference forward computes the same numbers
  const std::vector<float> li = m.logits(ids.v.data(), ids.B, ids.T);
  CHECK(max_abs_diff(li.data(), e.get("logits").to_f32()) <= 1e-4);

  if (check_hidden) {
    // hidden_0 = input of layer 0, hidden_1 = input of layer 1, hidden_2 = model.norm's output
    double dh = 0;
    for (std::size_t l = 0; l < acts.layers.size(); ++l)
      dh = std::max(dh, max_abs_diff(acts.layers[l].x.data(), e.get("hidden_" + std::to_string(l)).to_f32()));
    dh = std::max(dh, max_abs_diff(acts.final_in.data(), e.get("hidden_2_prenorm").to_f32()));
    dh = std::max(dh, max_abs_diff(acts.final_out.data(), e.get("hidden_2").to_f32()));
    std::printf("%-42s hidden states max |diff| %.3g\n", expected.c_str(), dh);
    CHECK(dh <= 1e-4);
    REQUIRE(acts.final_out.size() == std::size_t(M * D));
  }

  const float loss = m.loss(ids.v.data(), ids.v.data(), ids.B, ids.T);
  const double want = e.get("loss").to_f32()[0];
  std::printf("%-42s loss %.7f, |diff| %.3g\n", expected.c_str(), double(loss), std::fabs(loss - want));
  CHECK(std::fabs(loss - want) <= 1e-5);

  const auto base = safetensors::File::open(data("tiny_untied_expected.safetensors"));
  const Ids labels = read_ids(base, "labels_masked");
  const float lm = m.loss(ids.v.data(), labels.v.data(), ids.B, ids.T);
  const double want_m = e.get("loss_masked").to_f32()[0];
  std::printf("%-42s loss_masked %.7f, |diff| %.3g\n", expected.c_str(), double(lm), std::fabs(lm - want_m));
  CHECK(std::fabs(lm - want_m) <= 1e-5);
}
// The relative difference between p's largest-magnitude gradient element (where a central
// difference is most accurate) and the central difference of the loss there, h = 1e-2.
template <class Model>
double fd_rel_diff(Model& m, const optim::Param& p, const Ids& ids) {
  std::size_t at = 0;
  for (std::size_t i = 1; i < p.size; ++i)
    if (std::fabs(p.grad[i]) > std::fabs(p.grad[at])) at = i;
  REQUIRE(p.grad[at] != 0.0f);
  const float g = p.grad[at], v0 = p.value[at], h = 1e-2f;
  p.value[at] = v0 + h;
  const double lp = m.loss(ids.v.data(), ids.v.data(), ids.B, ids.T);
  p.value[at] = v0 - h;
  const double lm = m.loss(ids.v.data(), ids.v.data(), ids.B, ids.T);
  p.value[at] = v0;
  const double fd = (lp - lm) / (2.0 * double(h));
  return std::fabs(fd - double(g)) / std::fabs(double(g));
}
}  // namespace

TEST_CASE("LlamaConfig reads both RoPE forms and the defaults", "[llama]") {
  const auto untied = LlamaConfig::from_folder(hf::ModelFolder::open(data("tiny_untied")));
  CHECK(untied.rope_theta == 10000.0);
  CHECK(untied.num_key_value_heads == 2);
  CHECK(untied.head_dim == 16);
  CHECK(!untied.tie_word_embeddings);
  const auto tied = LlamaConfig::from_folder(hf::ModelFolder::open(data("tiny_tied")));
  CHECK(tied.rope_theta == 500000.0);
  CHECK(tied.num_key_value_heads == 4);
  CHECK(tied.tie_word_embeddings);
  CHECK(tied.rms_norm_eps == 1e-5);

  nlohmann::json j = hf::read_json(data("tiny_tied/config.json"));
  j.erase("head_dim");
  j.erase("num_key_value_heads");
  const auto d = LlamaConfig::from_json(j, "cfg");
  CHECK(d.head_dim == 16);
  CHECK(d.num_key_value_heads == 4);
}

TEST_CASE("LlamaConfig refuses what it does not compute, naming the key and file", "[llama]") {
  const nlohmann::json base = hf::read_json(data("tiny_tied/config.json"));
  auto err = [&](nlohmann::json j, const std::string& msg) {
    INFO(j.dump());
    REQUIRE_THROWS_WITH(LlamaConfig::from_json(j, "'x/config.json'"), Catch::Contains(msg));
  };
  nlohmann::json j = base;
  j["rope_parameters"]["rope_type"] = "llama3";
  err(j, "'x/config.json': \"rope_parameters.rope_type\" is \"llama3\", expected \"default\"");
  j = base;
  j.erase("rope_parameters");
  j["rope_theta"] = 10000.0;
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  err(j, "\"rope_scaling.rope_type\" is \"linear\"");
  j = base;
  j.erase("hidden_size");
  err(j, "'x/config.json': missing \"hidden_size\"");
  j = base;
  j["hidden_size"] = "64";
  err(j, "\"hidden_size\" is \"64\", expected an integer");
  j = base;
  j.erase("rope_parameters");
  err(j, "missing \"rope_theta\"");
  j = base;
  j["hidden_act"] = "gelu";
  err(j, "\"hidden_act\" is \"gelu\", expected \"silu\"");
  j = base;
  j["attention_bias"] = true;
  err(j, "\"attention_bias\" is true");
  j = base;
  j["mlp_bias"] = true;
  err(j, "\"mlp_bias\" is true");
  j = base;
  j["num_key_value_heads"] = 3;
  err(j, "\"num_attention_heads\" 4 is not a multiple of \"num_key_value_heads\" 3");

  // and through a folder: the message names the file
  testutil::TempDir dir;
  j = base;
  j.erase("hidden_size");
  std::ofstream(dir / "config.json") << j.dump();
  std::ifstream src(data("tiny_tied/model.safetensors"), std::ios::binary);
  std::ofstream(dir / "model.safetensors", std::ios::binary) << src.rdbuf();
  REQUIRE_THROWS_WITH(LlamaModel<format::F32>::load(dir.path),
                      Catch::Contains(dir / "config.json") && Catch::Contains("missing \"hidden_size\""));
}

TEST_CASE("RoPE tables equal transformers' cos / sin", "[llama]") {
  for (const char* name : {"tiny_untied", "tiny_tied"}) {
    const auto c = LlamaConfig::from_folder(hf::ModelFolder::open(data(name)));
    const auto e = safetensors::File::open(data(std::string(name) + "_expected.safetensors"));
    const RopeTable r = RopeTable::make(c.rope_theta, c.head_dim, 24);
    const double dc = max_abs_diff(r.cos.data(), e.get("rope_cos").to_f32());
    const double ds = max_abs_diff(r.sin.data(), e.get("rope_sin").to_f32());
    std::printf("%-42s rope cos / sin max |diff| %.3g / %.3g\n", name, dc, ds);
    CHECK(dc <= 1e-6);
    CHECK(ds <= 1e-6);
  }
}

TEST_CASE("LlamaModel equals transformers: logits, hidden states, losses", "[llama]") {
  const Ids ids = read_ids(safetensors::File::open(data("ids.safetensors")), "ids");
  REQUIRE(ids.B == 2);
  REQUIRE(ids.T == 24);
  SECTION("tiny_untied (GQA, legacy rope_theta)") {
    auto m = LlamaModel<format::F32>::load(data("tiny_untied"));
    check_forward(m, "tiny_untied_expected.safetensors", ids, true);
  }
  SECTION("tiny_tied (tied embeddings, rope_parameters)") {
    auto m = LlamaModel<format::F32>::load(data("tiny_tied"));
    check_forward(m, "tiny_tied_expected.safetensors", ids, true);
  }
  SECTION("tiny_untied with the PEFT adapter") {
    auto m = LlamaModel<format::F32>::load_with_adapter(data("tiny_untied"), data("tiny_untied_adapter"));
    REQUIRE(m.params().size() == 28);
    check_forward(m, "tiny_untied_adapter_expected.safetensors", ids, true);
  }
}

TEST_CASE("LlamaModel backward gives PEFT's LoRA gradients", "[llama]") {
  const Ids ids = read_ids(safetensors::File::open(data("ids.safetensors")), "ids");
  const auto e = safetensors::File::open(data("tiny_untied_adapter_expected.safetensors"));
  auto m = LlamaModel<format::F32>::load_with_adapter(data("tiny_untied"), data("tiny_untied_adapter"));
  const float loss = m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Overwrite);
  CHECK(std::fabs(loss - e.get("loss").to_f32()[0]) <= 1e-5);
  double worst = 0;
  const auto params = m.params();
  REQUIRE(params.size() == 28);
  for (const auto& p : params) {
    INFO(p.name);
    const auto want = e.get("grad." + std::string(peft::kPrefix) + p.name).to_f32();
    REQUIRE(want.size() == p.size);
    const double rel = max_abs_diff(p.grad, want) / max_abs(want);
    worst = std::max(worst, rel);
    CHECK(rel <= 1e-4);
  }
  std::printf("%-42s LoRA gradients max |diff| / max |grad| %.3g (28 tensors)\n", "tiny_untied_adapter",
              worst);

  // Accumulate adds a second micro-batch's gradients on top
  std::vector<float> first(params[0].grad, params[0].grad + params[0].size);
  m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Accumulate);
  for (std::size_t i = 0; i < first.size(); ++i)
    CHECK(params[0].grad[i] == Approx(2 * first[i]).margin(1e-7));
}

TEST_CASE("LlamaModel with fresh LoRA targets and an NF4 base", "[llama]") {
  const Ids ids = read_ids(safetensors::File::open(data("ids.safetensors")), "ids");
  const auto e = safetensors::File::open(data("tiny_untied_expected.safetensors"));
  LlamaLoraOptions opt;
  opt.target_modules = {"q_proj", "v_proj"};
  opt.lora.r = 4;
  opt.lora.alpha = 8;
  auto m = LlamaModel<format::F32>::load(data("tiny_untied"), opt);
  CHECK(m.params().size() == 2 * 2 * 2);
  // B = 0 at init (PEFT's default): the model is the base model
  const auto z = m.logits(ids.v.data(), ids.B, ids.T);
  CHECK(max_abs_diff(z.data(), e.get("logits").to_f32()) <= 1e-4);
  opt.target_modules = {"all-linear"};
  CHECK(LlamaModel<format::F32>::load(data("tiny_untied"), opt).params().size() == 2 * 7 * 2);

  // NF4 projections: the same model as an fp32 one whose projections hold the dequantized NF4
  // weights (blocksize 64, double quantization, as make_base quantizes them)
  auto q = LlamaModel<format::NF4>::load(data("tiny_untied"), opt);
  testutil::TempDir dir;
  {
    const auto src = hf::ModelFolder::open(data("tiny_untied"));
    safetensors::Writer w;
    std::vector<std::vector<float>> keep;
    for (const auto& name : src.names()) {
      const auto v = src.get(name);
      keep.push_back(v.to_f32());
      if (v.shape.size() == 2 && name.find("_proj") != std::string::npos) {
        const auto b = make_base<format::NF4>(keep.back(), v.shape[0], v.shape[1]);
        b.dequantize(keep.back().data());
      }
      w.add(name, DType::F32, v.shape, keep.back().data(), keep.back().size() * sizeof(float));
    }
    w.write(dir / "model.safetensors");
    std::ifstream cfg(data("tiny_untied/config.json"));
    std::ofstream(dir / "config.json") << cfg.rdbuf();
  }
  auto deq = LlamaModel<format::F32>::load(dir.path, opt);
  const auto zd = deq.logits(ids.v.data(), ids.B, ids.T);
  // the default int16 activations of few-token 4-bit products add ~5e-5 relative error per product
  const auto zq16 = q.logits(ids.v.data(), ids.B, ids.T);
  q.set_act_quant(cpu::ActQuant::None);
  const auto zq = q.logits(ids.v.data(), ids.B, ids.T);
  const double dq = max_abs_diff(zq.data(), zd), dq16 = max_abs_diff(zq16.data(), zd);
  std::printf(
      "%-42s NF4 logits max |diff| vs dequantized fp32: %.3g exact path, %.3g int16 (vs the fp32 "
      "model %.3g)\n",
      "tiny_untied", dq, dq16, max_abs_diff(zq.data(), e.get("logits").to_f32()));
  CHECK(dq <= 1e-4);
  CHECK(dq16 <= 2e-3);
  const float lq = q.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Overwrite);
  CHECK(std::isfinite(lq));
}

// Layer 0 of weights() for a model whose LoRA targets are q_proj and v_proj: q carries LoRA with
// the A, B of `lora_src` (the model itself, or the one whose adapter was loaded), k is frozen and
// hands out the base weight of `m`.
static void check_layer0_weights(const LlamaWeights<format::F32>& w, LlamaModel<format::F32>& m,
                                 LlamaModel<format::F32>& lora_src) {  // find() is not const
  const auto& q = w.layers[0].proj[kQ];
  const auto& k = w.layers[0].proj[kK];
  REQUIRE(q.lora.has_value());
  CHECK(!k.lora.has_value());
  REQUIRE(k.base != nullptr);
  CHECK(k.base->w == m.find("model.layers.0.self_attn.k_proj")->frozen_base().w);
  const auto& lo = lora_src.find("model.layers.0.self_attn.q_proj")->lora_layer();
  CHECK(q.A == std::vector<float>(lo.A().data(), lo.A().data() + lo.A().size()));
  CHECK(q.B == std::vector<float>(lo.B().data(), lo.B().data() + lo.B().size()));
}

// weights() is what another backend (cuda::LlamaModel) is built from; set_lora takes trained A, B
// back. Frozen projections hand out their base weights only when the model was loaded to keep them.
TEST_CASE("LlamaModel::weights hands out the model; set_lora takes A, B back", "[llama]") {
  LlamaLoraOptions opt;
  opt.target_modules = {"q_proj", "v_proj"};
  opt.lora.r = 4;
  opt.lora.init = LoraInit::NonZero;
  auto plain = LlamaModel<format::F32>::load(data("tiny_untied"), opt);
  REQUIRE_THROWS_WITH(plain.weights(), Catch::Contains("keep_frozen_bases"));
  opt.keep_frozen_bases = true;
  auto m = LlamaModel<format::F32>::load(data("tiny_untied"), opt);
  const LlamaWeights<format::F32> w = m.weights();
  REQUIRE(w.layers.size() == std::size_t(m.config().num_hidden_layers));
  check_layer0_weights(w, m, m);
  const auto& q = w.layers[0].proj[kQ];

  std::vector<float> A2(q.A.size(), 0.25f), B2(q.B.size(), -0.5f);
  m.set_lora({{"model.layers.0.self_attn.q_proj", A2, B2, 7}});
  CHECK(m.weights().layers[0].proj[kQ].A == A2);
  CHECK(m.weights().layers[0].proj[kQ].B == B2);
  CHECK(m.weights().layers[0].proj[kQ].dropout_calls == 7);
  REQUIRE_THROWS_WITH(m.set_lora({{"model.layers.0.self_attn.k_proj", A2, B2, 0}}),
                      Catch::Contains("'model.layers.0.self_attn.k_proj' is not a LoRA layer"));
  REQUIRE_THROWS_WITH(m.set_lora({{"model.layers.0.self_attn.q_proj", {1.0f}, B2, 0}}),
                      Catch::Contains("has A, B of 1, "));
}

// A GPU run resumed from its checkpoint loads the adapter with the frozen bases kept (weights() needs
// them), and gets the adapter's A, B.
TEST_CASE("LlamaModel::load_with_adapter keeps the frozen bases on request", "[llama]") {
  LlamaLoraOptions opt;
  opt.target_modules = {"q_proj", "v_proj"};
  opt.lora.r = 4;
  opt.lora.init = LoraInit::NonZero;
  auto trained = LlamaModel<format::F32>::load(data("tiny_untied"), opt);
  testutil::TempDir dir;
  peft::save_adapter(dir.path, trained.adapter("tiny_untied"));
  auto plain = LlamaModel<format::F32>::load_with_adapter(data("tiny_untied"), dir.path);
  REQUIRE_THROWS_WITH(plain.weights(), Catch::Contains("keep_frozen_bases"));
  auto m = LlamaModel<format::F32>::load_with_adapter(data("tiny_untied"), dir.path, 0, true);
  check_layer0_weights(m.weights(), m, trained);
}

TEST_CASE("LlamaModel refuses bad token ids and labels", "[llama]") {
  auto m = LlamaModel<format::F32>::load(data("tiny_tied"));
  std::vector<std::int64_t> ids = {1, 2, 256};
  REQUIRE_THROWS_WITH(m.logits(ids.data(), 1, 3), Catch::Contains("token id 256 at [0, 2]"));
  ids = {1, 2, 3};
  std::vector<std::int64_t> labels = {1, -100, -100};
  REQUIRE_THROWS_WITH(m.loss(ids.data(), labels.data(), 1, 3), Catch::Contains("every label is -100"));
}

TEST_CASE("LlamaModel backward through frozen projections matches finite differences", "[llama]") {
  // Only k_proj and up_proj carry LoRA, so the gradient reaches them through frozen o_proj, q_proj,
  // v_proj, gate_proj and down_proj (cpu::QMatrix backward) and both layers. B != 0 so that dA is
  // not trivially 0.
  const Ids ids = read_ids(safetensors::File::open(data("ids.safetensors")), "ids");
  LlamaLoraOptions opt;
  opt.target_modules = {"k_proj", "up_proj"};
  opt.lora.r = 2;
  opt.lora.alpha = 4;
  opt.lora.init = LoraInit::NonZero;
  opt.lora.seed = 7;
  auto m = LlamaModel<format::F32>::load(data("tiny_untied"), opt);
  m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Overwrite);
  const auto params = m.params();
  REQUIRE(params.size() == 8);
  double worst = 0;
  for (const auto& p : params) {
    INFO(p.name);
    const double rel = fd_rel_diff(m, p, ids);
    worst = std::max(worst, rel);
    CHECK(rel <= 5e-3);  // measured 7e-4 (fp32 losses, h = 1e-2)
  }
  std::printf("%-42s k/up LoRA gradients vs central differences: max relative diff %.3g\n", "tiny_untied",
              worst);
}

TEST_CASE("LlamaModel trains with LoRA dropout: same masks, gradients of the masked model", "[llama]") {
  const Ids ids = read_ids(safetensors::File::open(data("ids.safetensors")), "ids");
  LlamaLoraOptions opt;
  opt.target_modules = {"all-linear"};
  opt.lora.r = 2;
  opt.lora.alpha = 4;
  opt.lora.dropout = 0.25f;
  opt.lora.init = LoraInit::NonZero;
  opt.lora.seed = 11;
  using Model = LlamaModel<format::F32>;
  auto m = Model::load(data("tiny_untied"), opt);
  const std::int64_t V = m.config().vocab_size, M = ids.B * ids.T;
  // every layer's dropout stream back to call 0: the next training forward draws the same masks
  auto rewind = [&] {
    for (std::int64_t l = 0; l < m.config().num_hidden_layers; ++l)
      for (int p = 0; p < kNumProj; ++p) m.find(llama_module(l, p))->lora_layer().set_dropout_calls(0);
  };
  auto train_loss = [&] {
    rewind();
    Model::Activations a;
    std::vector<float> z(std::size_t(M * V));
    m.forward(ids.v.data(), ids.B, ids.T, z.data(), &a);
    return double(causal_lm_loss(z.data(), ids.v.data(), ids.B, ids.T, V, nullptr));
  };
  const double inference = m.loss(ids.v.data(), ids.v.data(), ids.B, ids.T);
  const double train = train_loss();
  CHECK(train != inference);  // dropout acts in training only
  CHECK(train_loss() == train);
  rewind();
  CHECK(double(m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Overwrite)) == train);
  const auto params = m.params();
  REQUIRE(params.size() == 28);
  double worst = 0;
  for (std::size_t k = 0; k < params.size(); k += 5) {  // a spread of modules, A and B
    const auto& p = params[k];
    INFO(p.name);
    std::size_t at = 0;
    for (std::size_t i = 1; i < p.size; ++i)
      if (std::fabs(p.grad[i]) > std::fabs(p.grad[at])) at = i;
    const float g = p.grad[at], v0 = p.value[at], h = 1e-2f;
    p.value[at] = v0 + h;
    const double lp = train_loss();
    p.value[at] = v0 - h;
    const double lm = train_loss();
    p.value[at] = v0;
    const double rel = std::fabs((lp - lm) / (2.0 * double(h)) - double(g)) / std::fabs(double(g));
    worst = std::max(worst, rel);
    CHECK(rel <= 1e-2);  // measured 2.1e-3: fp32 losses, h = 1e-2
  }
  std::printf("%-42s LoRA gradients with dropout 0.25 vs central differences: max relative diff %.3g\n",
              "tiny_untied", worst);
}

TEST_CASE("an adapter that does not fit the model is an error naming the module", "[llama]") {
  // tiny_tied has 4 KV heads: k_proj / v_proj are (64, 64) there, the adapter's lora_B (32, 4)
  REQUIRE_THROWS_WITH(
      LlamaModel<format::F32>::load_with_adapter(data("tiny_tied"), data("tiny_untied_adapter")),
      Catch::Contains("adapter model.layers.0.self_attn.k_proj: lora_B has 32 rows, base weight has 64"));

  // weights for a layer the model does not have, none for one it has
  peft::Adapter a = peft::load_adapter(data("tiny_untied_adapter"));
  auto node = a.modules.extract("model.layers.1.mlp.up_proj");
  node.key() = "model.layers.5.mlp.up_proj";
  node.mapped().module = node.key();
  a.modules.insert(std::move(node));
  testutil::TempDir dir;
  peft::save_adapter(dir.path, a);
  REQUIRE_THROWS_WITH(LlamaModel<format::F32>::load_with_adapter(data("tiny_untied"), dir.path),
                      Catch::Contains("targets 'model.layers.1.mlp.up_proj' but has no weights for it"));
}

TEST_CASE("LlamaModel full-parameter training: every weight's gradient matches finite differences",
          "[llama][full]") {
  const Ids ids = read_ids(safetensors::File::open(data("ids.safetensors")), "ids");
  for (const char* name : {"tiny_untied", "tiny_tied"}) {
    auto m = LlamaModel<format::F32>::load(data(name));
    m.enable_full_training();
    m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Overwrite);
    const auto params = m.params();
    // embedding, 2 norms + 7 projections per layer, final norm, lm_head when untied
    const std::size_t layers = std::size_t(m.config().num_hidden_layers);
    REQUIRE(params.size() == 1 + 9 * layers + 1 + (m.config().tie_word_embeddings ? 0 : 1));
    double worst = 0;
    for (const auto& p : params) {
      INFO(name << ": " << p.name);
      const double rel = fd_rel_diff(m, p, ids);
      worst = std::max(worst, rel);
      CHECK(rel <= 1e-2);
    }
    std::printf("%-42s full-training gradients vs central differences: max relative diff %.3g\n", name,
                worst);
    // Accumulate adds a second copy of the same gradient
    std::vector<float> g0(params[0].grad, params[0].grad + params[0].size);
    m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Accumulate);
    for (std::size_t i = 0; i < g0.size(); i += 97)
      CHECK(params[0].grad[i] == Approx(2 * g0[i]).margin(1e-7));
  }
}

TEST_CASE("LlamaModel full training refuses LoRA and quantized models; save round-trips", "[llama][full]") {
  LlamaLoraOptions opt;
  opt.target_modules = {"q_proj"};
  auto lora = LlamaModel<format::F32>::load(data("tiny_untied"), opt);
  CHECK_THROWS_WITH(lora.enable_full_training(), Catch::Contains("q_proj") && Catch::Contains("LoRA"));
  auto nf4 = LlamaModel<format::NF4>::load(data("tiny_untied"));
  CHECK_THROWS_WITH(nf4.enable_full_training(), Catch::Contains("fp32"));

  const Ids ids = read_ids(safetensors::File::open(data("ids.safetensors")), "ids");
  const testutil::TempDir tmp;
  const std::string out = tmp.path;
  for (const char* name : {"tiny_untied", "tiny_tied"}) {
    auto m = LlamaModel<format::F32>::load(data(name));
    const std::vector<float> z = m.logits(ids.v.data(), ids.B, ids.T);
    m.save(out + "/f32");
    auto back = LlamaModel<format::F32>::load(out + "/f32");
    const std::vector<float> zb = back.logits(ids.v.data(), ids.B, ids.T);
    CHECK(max_abs_diff(zb.data(), z) == 0.0);
    m.save(out + "/bf16", DType::BF16);
    CHECK(hf::ModelFolder::open(out + "/bf16").config()["torch_dtype"] == "bfloat16");
    auto b16 = LlamaModel<format::F32>::load(out + "/bf16");
    const std::vector<float> z16 = b16.logits(ids.v.data(), ids.B, ids.T);
    CHECK(max_abs_diff(z16.data(), z) <= 0.05 * max_abs(z));
  }
  // a LoRA model saves merged: the same logits without any adapter
  opt.lora.init = LoraInit::NonZero;
  auto withlora = LlamaModel<format::F32>::load(data("tiny_untied"), opt);
  const std::vector<float> zl = withlora.logits(ids.v.data(), ids.B, ids.T);
  withlora.save(out + "/merged");
  auto merged = LlamaModel<format::F32>::load(out + "/merged");
  const std::vector<float> zm = merged.logits(ids.v.data(), ids.B, ids.T);
  CHECK(max_abs_diff(zm.data(), zl) <= 1e-5 * max_abs(zl));
  CHECK_THROWS_WITH(withlora.save(out + "/bad", DType::I8), Catch::Contains("I8"));
}

namespace {
// Every trainable parameter's gradient, copied.
template <class Model>
std::vector<std::vector<float>> grads_of(Model& m) {
  std::vector<std::vector<float>> g;
  for (const auto& p : m.params()) g.emplace_back(p.grad, p.grad + p.size);
  return g;
}
}  // namespace

TEST_CASE("gradient checkpointing gives bit-identical losses and gradients", "[llama][checkpointing]") {
  const Ids ids = read_ids(safetensors::File::open(data("ids.safetensors")), "ids");
  SECTION("LoRA with dropout, all-linear and partial targets, fp32 and NF4 bases") {
    for (const std::vector<std::string>& targets :
         {std::vector<std::string>{"all-linear"}, std::vector<std::string>{"q_proj", "down_proj"}}) {
      LlamaLoraOptions opt;
      opt.target_modules = targets;
      opt.lora.r = 2;
      opt.lora.alpha = 4;
      opt.lora.dropout = 0.25f;
      opt.lora.init = LoraInit::NonZero;
      opt.lora.seed = 5;
      auto run = [&](auto& m) {
        INFO(targets[0]);
        const std::vector<std::uint64_t> start = m.dropout_calls();
        const float l0 = m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Overwrite);
        const auto g0 = grads_of(m);
        const std::vector<std::uint64_t> after = m.dropout_calls();
        m.set_dropout_calls(start);
        m.set_gradient_checkpointing(true);
        const float l1 = m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Overwrite);
        m.set_gradient_checkpointing(false);
        CHECK(l1 == l0);
        CHECK(grads_of(m) == g0);
        CHECK(m.dropout_calls() == after);  // the recompute leaves the counters as one forward does
        CHECK(after != start);
      };
      auto f32 = LlamaModel<format::F32>::load(data("tiny_untied"), opt);
      run(f32);
      auto nf4 = LlamaModel<format::NF4>::load(data("tiny_untied"), opt);
      run(nf4);
    }
  }
  SECTION("full-parameter training") {
    for (const char* name : {"tiny_untied", "tiny_tied"}) {
      INFO(name);
      auto m = LlamaModel<format::F32>::load(data(name));
      m.enable_full_training();
      const float l0 = m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Overwrite);
      const auto g0 = grads_of(m);
      m.set_gradient_checkpointing(true);
      const float l1 = m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Overwrite);
      CHECK(l1 == l0);
      CHECK(grads_of(m) == g0);
    }
  }
}

TEST_CASE("gradient checkpointing keeps less than half the activations", "[llama][checkpointing]") {
  LlamaLoraOptions opt;
  opt.target_modules = {"all-linear"};
  opt.lora.dropout = 0.1f;
  using Model = LlamaModel<format::NF4>;
  auto m = Model::load(data("tiny_untied"), opt);
  const std::int64_t B = 2, T = 64, V = m.config().vocab_size;
  std::vector<std::int64_t> ids(std::size_t(B * T));
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = std::int64_t((i * 37 + 11) % std::size_t(V));
  std::vector<float> z(std::size_t(B * T * V));
  Model::Activations full, ckpt;
  m.forward(ids.data(), B, T, z.data(), &full);
  m.set_gradient_checkpointing(true);
  m.forward(ids.data(), B, T, z.data(), &ckpt);
  CHECK(ckpt.checkpointed);
  CHECK_FALSE(full.checkpointed);
  const std::size_t a = activation_bytes(full), c = activation_bytes(ckpt);
  std::printf("%-42s activations B=%lld T=%lld: %zu bytes, checkpointed %zu (%.1f%%)\n", "tiny_untied nf4",
              (long long)B, (long long)T, a, c, 100.0 * double(c) / double(a));
  CHECK(c < a / 2);
  // at least every layer input and the final norm's input and output
  const std::size_t D = std::size_t(m.config().hidden_size), L = std::size_t(m.config().num_hidden_layers);
  CHECK(c >= (L + 2) * std::size_t(B * T) * D * sizeof(float));
}

TEST_CASE("phase timing is opt-in and splits a training step", "[llama][profile]") {
  const Ids ids = read_ids(safetensors::File::open(data("ids.safetensors")), "ids");
  LlamaLoraOptions opt;
  opt.target_modules = {"q_proj", "v_proj"};
  auto m = LlamaModel<format::NF4>::load(data("tiny_untied"), opt);
  m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Overwrite);
  CHECK(m.phase_times().total() == 0.0);  // off by default: nothing timed
  m.set_profiling(true);
  m.forward_backward(ids.v.data(), ids.v.data(), ids.B, ids.T, GradMode::Overwrite);
  const auto t = m.phase_times();
  std::printf("%-42s phases (s): base %.2e lora %.2e attention %.2e lm_head %.2e rest %.2e\n",
              "tiny_untied nf4", t.base_matmul, t.lora, t.attention, t.lm_head, t.rest);
  CHECK(t.base_matmul > 0);
  CHECK(t.lora > 0);
  CHECK(t.attention > 0);
  CHECK(t.lm_head > 0);
  CHECK(t.rest >= 0);
  // inference (evaluation) is not a step's time
  m.reset_phase_times();
  m.loss(ids.v.data(), ids.v.data(), ids.B, ids.T);
  CHECK(m.phase_times().total() == 0.0);
}
