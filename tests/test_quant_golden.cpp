// Byte-for-byte agreement with bitsandbytes 0.50.2 (../shared/golden/bnb_quant_small.safetensors,
// made with its CUDA kernels on an H100). Both the reference and the fast paths are checked.
#include <catch2/catch.hpp>
#include <cstring>
#include <string>
#include <vector>

#include "qlora/io/safetensors.hpp"
#include "qlora/quant/blockwise4bit.hpp"
#include "qlora/quant/blockwise8bit.hpp"

using namespace qlora;
using namespace qlora::quant;

namespace {
const safetensors::File& golden() {
  static const safetensors::File f =
      safetensors::File::open(std::string(QLORA_GOLDEN_DIR) + "/bnb_quant_small.safetensors");
  return f;
}
std::vector<float> f32(const std::string& k) { return golden().get(k).copy_as<float>(); }
std::vector<std::uint8_t> u8(const std::string& k) { return golden().get(k).copy_as<std::uint8_t>(); }

// Bitwise float comparison (so -0.0 vs 0.0 or a 1-ulp difference fails).
void require_same_bits(const std::vector<float>& got, const std::vector<float>& want,
                       const std::string& what) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO(what << " element " << i << ": got " << got[i] << " want " << want[i]);
    REQUIRE(float_bits(got[i]) == float_bits(want[i]));
  }
}
}  // namespace

TEST_CASE("code tables equal bitsandbytes'", "[quant][golden]") {
  const auto nf4 = f32("nf4_code"), fp4 = f32("fp4_code"), dyn = f32("dynamic_map_signed");
  require_same_bits(std::vector<float>(code4(Quant4Type::NF4).begin(), code4(Quant4Type::NF4).end()), nf4,
                    "nf4");
  require_same_bits(std::vector<float>(code4(Quant4Type::FP4).begin(), code4(Quant4Type::FP4).end()), fp4,
                    "fp4");
  require_same_bits(std::vector<float>(dynamic_map_signed().begin(), dynamic_map_signed().end()), dyn,
                    "dynamic");
}

TEST_CASE("NF4/FP4 quantize and dequantize equal bitsandbytes", "[quant][golden]") {
  for (int c : {0, 2})
    for (const char* type : {"nf4", "fp4"})
      for (int bs : {64, 128})
        for (int dq : {0, 1}) {
          const std::string key = "c" + std::to_string(c) + "_" + type + "_bs" + std::to_string(bs) + "_dq" +
                                  std::to_string(dq) + "_";
          DYNAMIC_SECTION(key) {
            const auto in = golden().get("c" + std::to_string(c) + "_input");
            const auto x = in.copy_as<float>();
            const Quant4Config cfg{parse_quant4(type), bs, dq == 1};
            const Quantized4bit q = quantize_4bit(x.data(), in.shape, cfg);
            REQUIRE(q.packed == u8(key + "packed"));
            if (dq) {
              REQUIRE(q.nested.codes == u8(key + "qabsmax"));
              require_same_bits(q.nested.absmax, f32(key + "absmax2"), "absmax2");
              require_same_bits({q.offset}, f32(key + "offset"), "offset");
            } else {
              require_same_bits(q.absmax, f32(key + "absmax"), "absmax");
            }
            std::vector<float> deq(x.size());
            dequantize(q, deq.data());
            require_same_bits(deq, f32(key + "dequant"), "dequant");

            // The reference implementation agrees on the same bytes.
            std::vector<std::uint8_t> packed((x.size() + 1) / 2);
            std::vector<float> absmax(q.blocks());
            ref::quantize_4bit(x.data(), x.size(), cfg.type, bs, packed.data(), absmax.data());
            REQUIRE(packed == q.packed);
            if (!dq) {
              std::vector<float> deq_ref(x.size());
              ref::dequantize_4bit(packed.data(), absmax.data(), x.size(), decode_table(q), bs,
                                   deq_ref.data());
              require_same_bits(deq_ref, f32(key + "dequant"), "ref dequant");
            }
          }
        }
}

TEST_CASE("8-bit blockwise (dynamic map, blocksize 256) equals bitsandbytes", "[quant][golden]") {
  for (int c : {0, 2}) {
    const std::string p = "c" + std::to_string(c) + "_";
    const auto x = f32(p + "input");
    const Blockwise8 q = quantize_blockwise8(x.data(), x.size(), 256);
    REQUIRE(q.codes == u8(p + "i8bw256_q"));
    require_same_bits(q.absmax, f32(p + "i8bw256_absmax"), "absmax");
    std::vector<std::uint8_t> codes(x.size());
    std::vector<float> absmax(q.absmax.size());
    ref::quantize_blockwise8(x.data(), x.size(), 256, dynamic_map_signed(), codes.data(), absmax.data());
    REQUIRE(codes == q.codes);
  }
}
