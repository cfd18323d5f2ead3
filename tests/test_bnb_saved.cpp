// Checkpoints written by transformers + bitsandbytes (save_pretrained of a load_in_4bit /
// load_in_8bit model; tests/data/bnb_saved/make.py) load here, and our dequantization equals
// bitsandbytes' own, bit for bit.
#include <catch2/catch.hpp>

#include "qlora/io/bnb_checkpoint.hpp"
#include "qlora/io/hf_model.hpp"

using namespace qlora;

namespace {
std::string dir(const char* name) { return std::string(QLORA_TEST_DATA_DIR) + "/bnb_saved/" + name; }
}  // namespace

TEST_CASE("a transformers-saved NF4 checkpoint dequantizes exactly as bitsandbytes does", "[io][bnb]") {
  const auto m = hf::ModelFolder::open(dir("nf4"));
  REQUIRE(m.config()["quantization_config"]["bnb_4bit_quant_type"] == "nf4");
  const auto expected = safetensors::File::open(dir("nf4") + "/expected.safetensors");
  REQUIRE(expected.names().size() == 14);
  for (const auto& w : expected.names()) {
    INFO(w);
    REQUIRE(bnb::is_4bit(m, w));
    const auto q = bnb::read_4bit(m, w);
    REQUIRE(q.double_quant);
    REQUIRE(q.dtype == "bfloat16");
    std::vector<bf16> out(std::size_t(q.numel()));
    quant::dequantize(q, out.data());  // bitsandbytes dequantizes to the original dtype
    const auto want = expected.get(w).copy_as<float>();
    REQUIRE(std::vector<std::int64_t>(q.shape) == expected.get(w).shape);
    for (std::size_t i = 0; i < out.size(); ++i) REQUIRE(to_float(out[i]) == want[i]);
  }
}

TEST_CASE("a transformers-saved int8 checkpoint reads with its SCB", "[io][bnb]") {
  const auto m = hf::ModelFolder::open(dir("int8"));
  const auto expected = safetensors::File::open(dir("int8") + "/expected.safetensors");
  int n = 0;
  for (const auto& w : expected.names()) {
    if (w.size() < 7 || w.compare(w.size() - 7, 7, ".weight") != 0) continue;
    INFO(w);
    ++n;
    REQUIRE(bnb::is_int8(m, w));
    const auto q = bnb::read_int8(m, w);
    std::vector<float> out(q.q.size());
    quant::dequantize(q, out.data());
    const auto want = expected.get(w).copy_as<float>();
    for (std::size_t i = 0; i < out.size(); ++i) REQUIRE(float_bits(out[i]) == float_bits(want[i]));
  }
  REQUIRE(n == 14);
}
