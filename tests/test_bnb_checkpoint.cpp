// bitsandbytes checkpoint layout: write + read back, a file laid out as bitsandbytes saves it
// (from the golden data), the quant state JSON, and clear errors for broken entries.
#include <catch2/catch.hpp>

#include "qlora/io/bnb_checkpoint.hpp"
#include "test_util.hpp"

using namespace qlora;
using namespace qlora::quant;

namespace {
safetensors::File roundtrip(const safetensors::Writer& w) {
  return safetensors::File::from_memory(w.to_bytes());
}
}  // namespace

TEST_CASE("4-bit weights round-trip through the bitsandbytes layout", "[io][bnb]") {
  const auto x = testutil::gaussian(96 * 40 + 0, 1);
  for (bool dq : {false, true})
    for (Quant4Type type : {Quant4Type::NF4, Quant4Type::FP4}) {
      Quantized4bit q = quantize_4bit(x.data(), {96, 40}, {type, 128, dq});
      q.dtype = "bfloat16";
      safetensors::Writer w;
      bnb::add_4bit(w, "model.layers.0.mlp.up_proj.weight", q);
      const auto f = roundtrip(w);
      const std::string W = "model.layers.0.mlp.up_proj.weight";
      REQUIRE(bnb::is_4bit(f, W));
      REQUIRE(f.get(W).shape == std::vector<std::int64_t>{96 * 40 / 2, 1});
      REQUIRE(f.get(W + ".absmax").dtype == (dq ? DType::U8 : DType::F32));
      REQUIRE(f.contains(W + ".nested_absmax") == dq);
      const Quantized4bit r = bnb::read_4bit(f, W);
      REQUIRE(r.type == type);
      REQUIRE(r.blocksize == 128);
      REQUIRE(r.dtype == "bfloat16");
      REQUIRE(r.shape == q.shape);
      REQUIRE(r.packed == q.packed);
      REQUIRE(r.double_quant == dq);
      REQUIRE(float_bits(r.offset) == float_bits(q.offset));
      std::vector<float> a(x.size()), b(x.size());
      dequantize(q, a.data());
      dequantize(r, b.data());
      REQUIRE(a == b);
    }
}

TEST_CASE("quant state JSON is what bitsandbytes writes", "[io][bnb]") {
  std::vector<float> x(64 * 64, 0.25f);
  x[0] = 1.0f;
  Quantized4bit q = quantize_4bit(x.data(), {64, 64}, {Quant4Type::NF4, 64, false});
  q.dtype = "float16";
  REQUIRE(bnb::quant_state_json(q) ==
          "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float16\", \"shape\": [64, 64]}");
  q = quantize_4bit(x.data(), {64, 64}, {Quant4Type::FP4, 64, true});
  const std::string js = bnb::quant_state_json(q);
  REQUIRE(
      js.rfind("{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [64, 64], "
               "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": ",
               0) == 0);
  // the offset printed is the float32 value widened to double, so it parses back exactly
  const float back = nlohmann::json::parse(js)["nested_offset"].get<float>();
  REQUIRE(float_bits(back) == float_bits(q.offset));
}

TEST_CASE("a checkpoint laid out by bitsandbytes reads with the file's own tables", "[io][bnb][golden]") {
  const auto g = safetensors::File::open(std::string(QLORA_GOLDEN_DIR) + "/bnb_quant_small.safetensors");
  for (const char* type : {"nf4", "fp4"}) {
    const std::string k = std::string("c2_") + type + "_bs64_dq1_";
    const std::string W = "model.layers.3.self_attn.v_proj.weight";
    const std::string js = std::string("{\"quant_type\": \"") + type +
                           "\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [37, 53], "
                           "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": " +
                           nlohmann::json(double(g.get(k + "offset").copy_as<float>()[0])).dump() + "}";
    const auto packed = g.get(k + "packed").copy_as<std::uint8_t>();
    safetensors::Writer w;
    w.add(W, DType::U8, {std::int64_t(packed.size()), 1}, packed.data(), packed.size());
    const auto qabs = g.get(k + "qabsmax");
    w.add(W + ".absmax", DType::U8, qabs.shape, qabs.data, qabs.nbytes);
    const auto code = g.get(std::string(type) + "_code");
    w.add(W + ".quant_map", DType::F32, code.shape, code.data, code.nbytes);
    const auto a2 = g.get(k + "absmax2");
    w.add(W + ".nested_absmax", DType::F32, a2.shape, a2.data, a2.nbytes);
    const auto dyn = g.get("dynamic_map_signed");
    w.add(W + ".nested_quant_map", DType::F32, dyn.shape, dyn.data, dyn.nbytes);
    w.add(W + ".quant_state.bitsandbytes__" + type, DType::U8, {std::int64_t(js.size())}, js.data(),
          js.size());
    const auto f = roundtrip(w);
    const Quantized4bit q = bnb::read_4bit(f, W);
    std::vector<float> out(37 * 53);
    dequantize(q, out.data());
    const auto want = g.get(k + "dequant").copy_as<float>();
    for (std::size_t i = 0; i < out.size(); ++i) REQUIRE(float_bits(out[i]) == float_bits(want[i]));
  }
}

TEST_CASE("int8 weights round-trip with SCB and weight_format", "[io][bnb]") {
  const auto x = testutil::gaussian(24 * 33, 2);
  const RowwiseInt8 q = quantize_rowwise_int8(x.data(), 24, 33);
  safetensors::Writer w;
  bnb::add_int8(w, "model.layers.0.self_attn.o_proj.weight", q);
  const auto f = roundtrip(w);
  REQUIRE(f.contains("model.layers.0.self_attn.o_proj.SCB"));
  REQUIRE(f.get("model.layers.0.self_attn.o_proj.weight_format").shape.empty());
  REQUIRE(bnb::is_int8(f, "model.layers.0.self_attn.o_proj.weight"));
  const RowwiseInt8 r = bnb::read_int8(f, "model.layers.0.self_attn.o_proj.weight");
  REQUIRE(r.q == q.q);
  REQUIRE(r.scb == q.scb);
}

TEST_CASE("broken bitsandbytes entries give clear errors", "[io][bnb]") {
  const auto x = testutil::gaussian(64 * 8, 3);
  const Quantized4bit q = quantize_4bit(x.data(), {64, 8}, {Quant4Type::NF4, 64, true});
  const std::string W = "m.weight";
  auto build = [&](const std::string& skip, const std::string& state) {
    safetensors::Writer full;
    bnb::add_4bit(full, W, q);
    const auto f = roundtrip(full);
    safetensors::Writer w;
    for (const auto& n : f.names()) {
      if (n == skip) continue;
      const auto v = f.get(n);
      if (n == W + ".quant_state.bitsandbytes__nf4" && !state.empty())
        w.add_copy(n, DType::U8, {std::int64_t(state.size())}, state.data(), state.size());
      else
        w.add_copy(n, v.dtype, v.shape, v.data, v.nbytes);
    }
    return roundtrip(w);
  };
  REQUIRE_THROWS_WITH(bnb::read_4bit(build(W + ".nested_absmax", ""), W),
                      Catch::Contains("missing tensor 'm.weight.nested_absmax'"));
  REQUIRE_THROWS_WITH(bnb::read_4bit(build("", "{not json"), W),
                      Catch::Contains("quant_state is not valid JSON"));
  REQUIRE_THROWS_WITH(
      bnb::read_4bit(build("",
                           "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": "
                           "[64, 9], \"nested_blocksize\": 256, \"nested_offset\": 0.1}"),
                     W),
      Catch::Contains("packed weight has 256 bytes, expected 288"));
  REQUIRE_THROWS_WITH(bnb::read_4bit(build("", "{\"quant_type\": \"fp4\", \"blocksize\": 64}"), W),
                      Catch::Contains("quant_state says quant_type \"fp4\", its key says nf4"));
  REQUIRE_THROWS_WITH(bnb::read_4bit(build("",
                                           "{\"quant_type\": \"nf4\", \"blocksize\": 48, \"dtype\": "
                                           "\"float32\", \"shape\": [64, 8]}"),
                                     W),
                      Catch::Contains("got 48"));
}
