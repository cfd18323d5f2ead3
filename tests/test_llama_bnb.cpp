// LlamaModel loads bitsandbytes folders: a 4-bit (or LLM.int8) projection is taken as stored when
// the model's base format is the file's (the packed bytes unchanged, so the logits equal those of
// quantizing the fp32 folder on load, bit for bit), dequantized for an F32 / BF16 base, and refused
// for another quantized format. Folders: the tiny Llama quantized here by `qlora quantize`'s
// library function, and the transformers + bitsandbytes saves of tests/data/bnb_saved.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "qlora/io/bnb_checkpoint.hpp"
#include "qlora/io/quantize_model.hpp"
#include "qlora/model/llama.hpp"
#include "test_util.hpp"

using namespace qlora;

namespace {
std::string llama(const std::string& name) { return std::string(QLORA_TEST_DATA_DIR) + "/llama/" + name; }
std::string bnb_saved(const std::string& name) {
  return std::string(QLORA_TEST_DATA_DIR) + "/bnb_saved/" + name;
}

struct Ids {
  std::int64_t B = 0, T = 0;
  std::vector<std::int64_t> v;
};
Ids test_ids() {
  const auto f = safetensors::File::open(llama("ids.safetensors"));
  const auto t = f.get("ids");
  REQUIRE(t.shape.size() == 2);
  return {t.shape[0], t.shape[1], t.copy_as<std::int64_t>()};
}

template <class Quant>
std::vector<float> logits_of(LlamaModel<Quant>& m, const Ids& ids) {
  return m.logits(ids.v.data(), ids.B, ids.T);
}

bool bit_equal(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (float_bits(a[i]) != float_bits(b[i])) return false;
  return true;
}

// max |a - b| / max |b|
double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double d = 0, s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, std::fabs(double(a[i]) - double(b[i])));
    s = std::max(s, std::fabs(double(b[i])));
  }
  return d / s;
}

std::string quantized(const testutil::TempDir& tmp, const std::string& name, checkpoint::Format fmt,
                      const std::string& exclude = {}) {
  checkpoint::QuantizeOptions opt;
  opt.format = fmt;
  opt.exclude = exclude;
  const std::string out = tmp / name;
  checkpoint::quantize_model(llama("tiny_untied"), out, opt);
  return out;
}

LlamaLoraOptions all_linear() {
  LlamaLoraOptions o;
  o.target_modules = {"all-linear"};
  return o;
}

template <class Quant>
std::string load_error(const std::string& dir) {
  try {
    LlamaModel<Quant>::load(dir);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}
}  // namespace

TEST_CASE("an NF4 folder loaded as NF4 keeps its bytes and gives the logits of quantizing on load",
          "[llama][bnb]") {
  testutil::TempDir tmp;
  const std::string nf4 = quantized(tmp, "nf4", checkpoint::Format::NF4);
  const Ids ids = test_ids();
  auto from_fp32 = LlamaModel<format::NF4>::load(llama("tiny_untied"));
  auto from_nf4 = LlamaModel<format::NF4>::load(nf4);
  CHECK(bit_equal(logits_of(from_nf4, ids), logits_of(from_fp32, ids)));

  // the bases are the file's tensors, byte for byte (LoRA layers expose their base)
  auto lora = LlamaModel<format::NF4>::load(nf4, all_linear());
  const auto folder = hf::ModelFolder::open(nf4);
  for (std::int64_t l = 0; l < lora.config().num_hidden_layers; ++l)
    for (int p = 0; p < kNumProj; ++p) {
      const std::string name = llama_module(l, p);
      INFO(name);
      const quant::Quantized4bit want = bnb::read_4bit(folder, name + ".weight");
      const quant::Quantized4bit& got = lora.find(name)->lora_layer().base().q;
      REQUIRE(got.type == quant::Quant4Type::NF4);
      CHECK(got.packed == want.packed);
      CHECK(got.nested.codes == want.nested.codes);
      CHECK(got.nested.absmax == want.nested.absmax);
      CHECK(got.code == want.code);
      CHECK(float_bits(got.offset) == float_bits(want.offset));
      CHECK(got.blocksize == want.blocksize);
    }
}

TEST_CASE("modules a bitsandbytes folder left unquantized are read as floats", "[llama][bnb]") {
  testutil::TempDir tmp;
  const std::string nf4 = quantized(tmp, "nf4_skip", checkpoint::Format::NF4, "down_proj");
  const auto folder = hf::ModelFolder::open(nf4);
  REQUIRE_FALSE(bnb::is_4bit(folder, "model.layers.0.mlp.down_proj.weight"));
  REQUIRE(bnb::is_4bit(folder, "model.layers.0.mlp.up_proj.weight"));
  const Ids ids = test_ids();
  auto from_fp32 = LlamaModel<format::NF4>::load(llama("tiny_untied"));
  auto from_nf4 = LlamaModel<format::NF4>::load(nf4);  // down_proj quantized on load, the rest as stored
  CHECK(bit_equal(logits_of(from_nf4, ids), logits_of(from_fp32, ids)));
  auto dense = LlamaModel<format::F32>::load(nf4);
  auto plain = LlamaModel<format::F32>::load(llama("tiny_untied"));
  const std::string down = "model.layers.1.mlp.down_proj";
  CHECK(bit_equal(dense.find(down)->dense_weight(), plain.find(down)->dense_weight()));
}

TEST_CASE("a 4-bit folder loaded as F32 or BF16 computes with the dequantized weights", "[llama][bnb]") {
  testutil::TempDir tmp;
  const std::string nf4 = quantized(tmp, "nf4", checkpoint::Format::NF4);
  const Ids ids = test_ids();
  auto q = LlamaModel<format::NF4>::load(nf4);
  auto f = LlamaModel<format::F32>::load(nf4);
  // every base is the fp32 dequantization of the file's 4-bit weight
  const auto folder = hf::ModelFolder::open(nf4);
  for (std::int64_t l = 0; l < f.config().num_hidden_layers; ++l)
    for (int p = 0; p < kNumProj; ++p) {
      const std::string name = llama_module(l, p);
      INFO(name);
      const quant::Quantized4bit w = bnb::read_4bit(folder, name + ".weight");
      std::vector<float> want(std::size_t(w.numel()));
      quant::dequantize(w, want.data());
      CHECK(bit_equal(f.find(name)->dense_weight(), want));
    }
  // the same model as a dense folder written from those weights, and as NF4 products (exact fp32
  // activations): the same logits up to summation order
  q.save(tmp / "dequantized");
  auto d = LlamaModel<format::F32>::load(tmp / "dequantized");
  const std::vector<float> zf = logits_of(f, ids);
  CHECK(bit_equal(zf, logits_of(d, ids)));
  q.set_act_quant(cpu::ActQuant::None);
  const double rq = rel_diff(zf, logits_of(q, ids));
  std::printf("nf4 folder: F32 vs NF4 logits, max relative diff %.3g\n", rq);
  CHECK(rq <= 1e-4);

  auto b = LlamaModel<format::BF16>::load(nf4);
  const double rb = rel_diff(logits_of(b, ids), zf);
  std::printf("nf4 folder: BF16 vs F32 logits, max relative diff %.3g\n", rb);
  CHECK(rb <= 2e-2);
}

TEST_CASE("a quantized folder is refused in another quantized format", "[llama][bnb]") {
  testutil::TempDir tmp;
  const std::string fp4 = quantized(tmp, "fp4", checkpoint::Format::FP4);
  const std::string nf4 = quantized(tmp, "nf4", checkpoint::Format::NF4);
  const std::string i8 = quantized(tmp, "int8", checkpoint::Format::Int8);
  using Catch::Matchers::Contains;
  const std::string e1 = load_error<format::NF4>(fp4);
  CHECK_THAT(e1, Contains(fp4) && Contains("stored as bitsandbytes fp4") && Contains("requested as nf4"));
  CHECK_THAT(load_error<format::Int8>(nf4),
             Contains(nf4) && Contains("bitsandbytes nf4") && Contains("requested as int8"));
  CHECK_THAT(load_error<format::FP4>(i8),
             Contains(i8) && Contains("bitsandbytes int8") && Contains("requested as fp4"));
  // its own format and the dense ones load
  const Ids ids = test_ids();
  auto a = LlamaModel<format::FP4>::load(fp4);
  auto b = LlamaModel<format::FP4>::load(llama("tiny_untied"));
  CHECK(bit_equal(logits_of(a, ids), logits_of(b, ids)));
  auto c = LlamaModel<format::Int8>::load(i8);
  auto d = LlamaModel<format::Int8>::load(llama("tiny_untied"));
  CHECK(bit_equal(logits_of(c, ids), logits_of(d, ids)));
  auto e = LlamaModel<format::F32>::load(i8);
  auto g = LlamaModel<format::F32>::load(fp4);
  CHECK(rel_diff(logits_of(e, ids), logits_of(c, ids)) <= 1e-2);
  CHECK(rel_diff(logits_of(g, ids), logits_of(a, ids)) <= 1e-3);
}

TEST_CASE("transformers-saved bitsandbytes Llama folders load as stored and dequantized", "[llama][bnb]") {
  const Ids ids = test_ids();  // byte ids: inside the 256-token vocabulary of these folders too
  SECTION("nf4 (double quant, bf16 original)") {
    const std::string dir = bnb_saved("nf4");
    const auto folder = hf::ModelFolder::open(dir);
    const auto expected = safetensors::File::open(dir + "/expected.safetensors");
    auto q = LlamaModel<format::NF4>::load(dir, all_linear());
    auto f = LlamaModel<format::F32>::load(dir);
    for (const std::string& w : expected.names()) {
      INFO(w);
      const std::string module = bnb::module_of(w);
      CHECK(q.find(module)->lora_layer().base().q.packed == bnb::read_4bit(folder, w).packed);
      // bitsandbytes dequantizes to the original bf16; the F32 base keeps the exact fp32 values
      const std::vector<float> got = f.find(module)->dense_weight(), want = expected.get(w).copy_as<float>();
      REQUIRE(got.size() == want.size());
      for (std::size_t i = 0; i < got.size(); ++i) REQUIRE(to_float(to_bf16(got[i])) == want[i]);
    }
    q.set_act_quant(cpu::ActQuant::None);
    const double r = rel_diff(logits_of(q, ids), logits_of(f, ids));
    std::printf("bnb_saved/nf4: NF4 vs F32 logits, max relative diff %.3g\n", r);
    CHECK(r <= 1e-4);
    CHECK_THAT(load_error<format::FP4>(dir), Catch::Matchers::Contains("stored as bitsandbytes nf4"));
  }
  SECTION("int8 (LLM.int8, SCB)") {
    const std::string dir = bnb_saved("int8");
    const auto folder = hf::ModelFolder::open(dir);
    const auto expected = safetensors::File::open(dir + "/expected.safetensors");
    auto q = LlamaModel<format::Int8>::load(dir, all_linear());
    auto f = LlamaModel<format::F32>::load(dir);
    int n = 0;
    for (const std::string& w : expected.names()) {
      if (w.size() < 7 || w.compare(w.size() - 7, 7, ".weight") != 0) continue;
      INFO(w);
      ++n;
      const std::string module = bnb::module_of(w);
      const quant::RowwiseInt8 want_q = bnb::read_int8(folder, w);
      CHECK(q.find(module)->lora_layer().base().q.q == want_q.q);
      CHECK(q.find(module)->lora_layer().base().q.scb == want_q.scb);
      CHECK(bit_equal(f.find(module)->dense_weight(), expected.get(w).copy_as<float>()));
    }
    CHECK(n == 14);
    const double r = rel_diff(logits_of(q, ids), logits_of(f, ids));
    std::printf("bnb_saved/int8: Int8 vs F32 logits, max relative diff %.3g\n", r);
    CHECK(r <= 1e-2);
    CHECK_THAT(load_error<format::NF4>(dir), Catch::Matchers::Contains("stored as bitsandbytes int8"));
  }
}
