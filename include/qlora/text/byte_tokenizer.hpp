#pragma once
// ByteTokenizer: one token per byte, id = byte value (0..255), for byte-level models that need no
// vocabulary file. Every byte string round-trips, valid UTF-8 or not.
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"

namespace qlora {
namespace text {

class ByteTokenizer {
 public:
  static constexpr std::int32_t kVocabSize = 256;

  std::vector<std::int32_t> encode(const std::string& text) const {
    std::vector<std::int32_t> ids(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<std::uint8_t>(text[i]);
    return ids;
  }

  std::string decode(const std::vector<std::int32_t>& ids) const {
    std::string out(ids.size(), '\0');
    for (std::size_t i = 0; i < ids.size(); ++i) {
      QLORA_CHECK(ids[i] >= 0 && ids[i] < kVocabSize, "ByteTokenizer::decode: id ", ids[i], " at position ",
                  i, " is outside [0, ", kVocabSize, ")");
      out[i] = static_cast<char>(static_cast<std::uint8_t>(ids[i]));
    }
    return out;
  }

  std::int32_t vocab_size() const { return kVocabSize; }
};

}  // namespace text
}  // namespace qlora
