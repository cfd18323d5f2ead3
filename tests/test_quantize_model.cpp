// quantize_model (what `qlora quantize` runs): selection rules, the output folder transformers
// loads, unchanged pass-through tensors, atomic output, and errors.
#include <catch2/catch.hpp>
#include <cmath>

#include "qlora/io/quantize_model.hpp"
#include "test_util.hpp"

using namespace qlora;
using namespace qlora::checkpoint;

namespace {
struct Toy {
  std::vector<float> emb = testutil::gaussian(64 * 16, 1), q = testutil::gaussian(16 * 16, 2),
                     up = testutil::gaussian(40 * 16, 3), head = testutil::gaussian(64 * 16, 4),
                     norm = std::vector<float>(16, 1.0f);
  std::vector<bf16> down;
  Toy() {
    const auto d = testutil::gaussian(16 * 40, 5);
    down.resize(d.size());
    convert(d.data(), down.data(), d.size());
  }
  void write(const std::string& dir) const {
    safetensors::Writer w;
    w.add("model.embed_tokens.weight", DType::F32, {64, 16}, emb.data(), emb.size() * 4);
    w.add("model.layers.0.self_attn.q_proj.weight", DType::F32, {16, 16}, q.data(), q.size() * 4);
    w.add("model.layers.0.mlp.up_proj.weight", DType::F32, {40, 16}, up.data(), up.size() * 4);
    w.add("model.layers.0.mlp.down_proj.weight", DType::BF16, {16, 40}, down.data(), down.size() * 2);
    w.add("model.layers.0.input_layernorm.weight", DType::F32, {16}, norm.data(), norm.size() * 4);
    w.add("lm_head.weight", DType::F32, {64, 16}, head.data(), head.size() * 4);
    w.write(dir + "/model.safetensors");
    write_text_atomic(dir + "/config.json", R"({"model_type": "llama", "torch_dtype": "bfloat16"})");
    write_text_atomic(dir + "/tokenizer.json", R"({"model": {}})");
  }
};
}  // namespace

TEST_CASE("quantizing a folder: defaults", "[io][quantize]") {
  testutil::TempDir d;
  Toy toy;
  toy.write(d.path);
  const auto rep = quantize_model(d.path, d / "out", {});
  const auto m = hf::ModelFolder::open(d / "out");
  const auto& qc = m.config()["quantization_config"];
  REQUIRE(qc["quant_method"] == "bitsandbytes");
  REQUIRE(qc["load_in_4bit"] == true);
  REQUIRE(qc["bnb_4bit_quant_type"] == "nf4");
  REQUIRE(qc["bnb_4bit_use_double_quant"] == true);
  REQUIRE(qc["bnb_4bit_compute_dtype"] == "bfloat16");
  REQUIRE(qc["llm_int8_skip_modules"].is_null());
  REQUIRE(m.config()["model_type"] == "llama");
  REQUIRE(m.other_files() == std::vector<std::string>{"tokenizer.json"});

  // the three linear weights are 4-bit; embeddings, norm and lm_head pass through byte for byte
  for (const char* w : {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
                        "model.layers.0.mlp.down_proj.weight"})
    REQUIRE(bnb::is_4bit(m, w));
  REQUIRE(m.get("lm_head.weight").copy_as<float>() == toy.head);
  REQUIRE(m.get("model.embed_tokens.weight").copy_as<float>() == toy.emb);
  REQUIRE(m.get("model.layers.0.input_layernorm.weight").dtype == DType::F32);

  // what was written is what quantize_4bit gives, and the bf16 tensor records its dtype
  const auto q = bnb::read_4bit(m, "model.layers.0.self_attn.q_proj.weight");
  const auto direct = quant::quantize_4bit(toy.q.data(), {16, 16}, {});
  REQUIRE(q.packed == direct.packed);
  REQUIRE(q.nested.codes == direct.nested.codes);
  REQUIRE(bnb::read_4bit(m, "model.layers.0.mlp.down_proj.weight").dtype == "bfloat16");

  // the report
  REQUIRE(rep.tensors.size() == 6);
  int nq = 0;
  for (const auto& t : rep.tensors) {
    if (!t.quantized) continue;
    ++nq;
    REQUIRE(t.rmse > 0.0);
    REQUIRE(t.rmse < 0.004);  // NF4 on N(0, 0.02): about 0.1 of the weights' spread
    REQUIRE(t.max_abs_err >= t.rmse);
    std::size_t on_disk = 0;  // the report's size is what the file holds for this weight
    for (const auto& n : m.names())
      if (n.rfind(t.name, 0) == 0) on_disk += m.get(n).nbytes;
    REQUIRE(t.bytes_after == on_disk);
  }
  REQUIRE(nq == 3);
}

TEST_CASE("quantizing: include / exclude, fp4, int8, single files", "[io][quantize]") {
  testutil::TempDir d;
  Toy toy;
  toy.write(d.path);
  QuantizeOptions o;
  o.format = Format::FP4;
  o.blocksize = 32;
  o.double_quant = false;
  o.exclude = "mlp\\.";
  quantize_model(d.path, d / "fp4", o);
  auto m = hf::ModelFolder::open(d / "fp4");
  REQUIRE(bnb::is_4bit(m, "model.layers.0.self_attn.q_proj.weight"));
  REQUIRE(!bnb::is_4bit(m, "model.layers.0.mlp.up_proj.weight"));
  const auto skip = m.config()["quantization_config"]["llm_int8_skip_modules"];
  REQUIRE(skip == nlohmann::json({"model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "lm_head"}));
  REQUIRE(bnb::read_4bit(m, "model.layers.0.self_attn.q_proj.weight").blocksize == 32);

  o = {};
  o.include = "lm_head";  // a user may quantize lm_head on purpose
  quantize_model(d.path, d / "head", o);
  REQUIRE(bnb::is_4bit(hf::ModelFolder::open(d / "head"), "lm_head.weight"));

  o = {};
  o.format = Format::Int8;
  quantize_model(d.path, d / "int8", o);
  m = hf::ModelFolder::open(d / "int8");
  REQUIRE(m.config()["quantization_config"]["load_in_8bit"] == true);
  REQUIRE(bnb::is_int8(m, "model.layers.0.mlp.up_proj.weight"));

  // file to file
  quantize_model(d / "model.safetensors", d / "single.safetensors", {});
  const auto f = safetensors::File::open(d / "single.safetensors");
  REQUIRE(bnb::is_4bit(f, "model.layers.0.mlp.up_proj.weight"));
  REQUIRE(f.metadata().at("format") == "pt");
}

TEST_CASE("quantizing: errors leave no output behind", "[io][quantize]") {
  testutil::TempDir d;
  Toy toy;
  toy.q[5] = NAN;
  toy.write(d.path);
  REQUIRE_THROWS_WITH(quantize_model(d.path, d / "out", {}),
                      Catch::Contains("model.layers.0.self_attn.q_proj.weight: value 5 is nan"));
  REQUIRE(!hf::is_directory(d / "out"));
  REQUIRE(hf::list_files(d.path) ==
          std::vector<std::string>{"config.json", "model.safetensors", "tokenizer.json"});

  toy.q[5] = 0.0f;
  toy.write(d.path);
  QuantizeOptions o;
  o.include = "(";
  REQUIRE_THROWS_WITH(quantize_model(d.path, d / "out", o), Catch::Contains("--include '(' is not a valid"));
  o = {};
  o.blocksize = 100;
  REQUIRE_THROWS_WITH(quantize_model(d.path, d / "out", o), Catch::Contains("got 100"));
  quantize_model(d.path, d / "out", {});
  REQUIRE_THROWS_WITH(quantize_model(d / "out", d / "again", {}), Catch::Contains("already quantized"));
  REQUIRE_THROWS_WITH(quantize_model(d / "missing", d / "x", {}),
                      Catch::Contains("'" + d / "missing" + "' does not exist"));
  // re-quantizing into an existing folder replaces it whole
  o = {};
  o.format = Format::Int8;
  quantize_model(d.path, d / "out", o);
  REQUIRE(hf::ModelFolder::open(d / "out").config()["quantization_config"]["load_in_8bit"] == true);
}
