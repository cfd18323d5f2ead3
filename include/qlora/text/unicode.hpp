#pragma once
// The Unicode pieces a byte-level tokenizer needs: UTF-8 decoding that never fails, the character
// classes of the pre-tokenizer regexes (\p{L}, \p{N}, \s), and GPT-2's byte-to-unicode map.
//
// Invalid UTF-8 is not an error here: each byte that does not start a well-formed sequence becomes
// one code point of its own (kInvalidByte + byte), classed as "other" (not letter, number or space).
// Python's tokenizers cannot be given such input at all (a str is always valid Unicode), so this
// is our convention; the byte-level vocabulary still covers every byte, so encode/decode round-trip.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/text/unicode_tables.hpp"

namespace qlora {
namespace text {

// Above the Unicode range, so no valid code point collides with an invalid byte.
constexpr std::uint32_t kInvalidByte = 0x110000;

struct CodePoint {
  std::uint32_t cp;    // code point, or kInvalidByte + byte
  std::size_t offset;  // first byte in the source string
  std::size_t length;  // bytes it occupies (1 for an invalid byte)
};

// Decodes UTF-8 strictly (no overlongs, no surrogates, nothing above U+10FFFF).
inline std::vector<CodePoint> decode_utf8(const std::string& s) {
  std::vector<CodePoint> out;
  out.reserve(s.size());
  const auto byte = [&](std::size_t i) { return static_cast<std::uint8_t>(s[i]); };
  std::size_t i = 0;
  while (i < s.size()) {
    const std::uint8_t b = byte(i);
    std::size_t len = 0;
    std::uint32_t cp = 0, min = 0;
    if (b < 0x80) {
      len = 1, cp = b;
    } else if (b >= 0xC2 && b <= 0xDF) {
      len = 2, cp = b & 0x1Fu, min = 0x80;
    } else if (b >= 0xE0 && b <= 0xEF) {
      len = 3, cp = b & 0x0Fu, min = 0x800;
    } else if (b >= 0xF0 && b <= 0xF4) {
      len = 4, cp = b & 0x07u, min = 0x10000;
    }
    bool ok = len > 0 && i + len <= s.size();
    for (std::size_t k = 1; ok && k < len; ++k) {
      const std::uint8_t c = byte(i + k);
      ok = (c & 0xC0u) == 0x80u;
      cp = (cp << 6) | (c & 0x3Fu);
    }
    ok = ok && cp >= min && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
    if (ok) {
      out.push_back({cp, i, len});
      i += len;
    } else {
      out.push_back({kInvalidByte + b, i, 1});
      i += 1;
    }
  }
  return out;
}

inline void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

namespace detail {
template <std::size_t N>
bool in_ranges(const CodeRange (&ranges)[N], std::uint32_t cp) {
  // First range whose end is >= cp; cp is inside iff that range also starts at or before it.
  const CodeRange* it = std::lower_bound(ranges, ranges + N, cp,
                                         [](const CodeRange& r, std::uint32_t c) { return r.last < c; });
  return it != ranges + N && it->first <= cp;
}
}  // namespace detail

inline bool is_letter(std::uint32_t cp) {
  return cp < 0x80 ? ((cp | 0x20u) - 'a' < 26u) : detail::in_ranges(kLetterRanges, cp);
}
inline bool is_number(std::uint32_t cp) {
  return cp < 0x80 ? (cp - '0' < 10u) : detail::in_ranges(kNumberRanges, cp);
}

// \s as Oniguruma reads it for Unicode: the White_Space characters.
inline bool is_space(std::uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the other 68 bytes to
// U+0100.. in byte order, so every byte is a visible character and a vocabulary is plain JSON
// text (the space byte is 'Ġ' U+0120).
inline const std::array<std::uint32_t, 256>& byte_to_unicode() {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> t{};
    std::uint32_t next = 256;
    for (std::uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = printable ? b : next++;
    }
    return t;
  }();
  return table;
}

// The inverse map; -1 for a character that no byte maps to.
inline int unicode_to_byte(std::uint32_t cp) {
  if (cp > 0x143) return -1;  // the map's largest value: 256 + 68 - 1
  static const std::array<int, 0x144> table = [] {
    std::array<int, 0x144> t{};
    t.fill(-1);
    for (int b = 0; b < 256; ++b) t[byte_to_unicode()[b]] = b;
    return t;
  }();
  return table[cp];
}

}  // namespace text
}  // namespace qlora
