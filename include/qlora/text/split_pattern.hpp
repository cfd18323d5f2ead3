#pragma once
// The pre-tokenizer split regexes of the byte-level BPE families, as hand-written matchers.
//
// std::regex has no \p{L} / \p{N}, and a general regex engine is far more than three fixed patterns
// need, so each pattern is matched by code that follows its alternatives in order, with the same
// leftmost-first choice and backtracking the regex engine makes (noted beside each alternative).
// A pattern is recognised by its exact source text in tokenizer.json; any other text is an error
// (see pattern_from_regex), never a silent approximation.
//
//   Gpt2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   Llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//           \s*[\r\n]+|\s+(?!\S)|\s+
//   Qwen2:  as Llama3 with \p{N} (one digit per piece) in place of \p{N}{1,3}
//
// (?i:...) folds ASCII case plus the one non-ASCII character that folds onto these letters:
// U+017F 'ſ' (long s) matches 's', as in Oniguruma.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qlora/text/unicode.hpp"

namespace qlora {
namespace text {

enum class SplitPattern { Gpt2, Llama3, Qwen2 };

inline const char* pattern_source(SplitPattern p) {
  switch (p) {
    case SplitPattern::Gpt2:
      return R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
    case SplitPattern::Llama3:
      return R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
    case SplitPattern::Qwen2:
      return R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  }
  return "";
}

inline std::optional<SplitPattern> pattern_from_regex(const std::string& regex) {
  for (SplitPattern p : {SplitPattern::Gpt2, SplitPattern::Llama3, SplitPattern::Qwen2})
    if (regex == pattern_source(p)) return p;
  return std::nullopt;
}

namespace detail {

// Length (in code points) of the match starting at i, or 0 when no alternative matches there.
class SplitMatcher {
 public:
  SplitMatcher(const std::vector<CodePoint>& cps, SplitPattern p) : c_(cps), p_(p) {}

  std::size_t match(std::size_t i) const {
    const bool llama = p_ != SplitPattern::Gpt2;
    if (std::size_t n = contraction(i, /*ignore_case=*/llama)) return n;
    if (llama) {
      // [^\r\n\p{L}\p{N}]?\p{L}+ : the optional prefix is any one non-newline, non-alphanumeric
      // character (space, tab, punctuation); the engine tries it first, then without it.
      if (i + 1 < c_.size() && !newline(i) && !letter(i) && !number(i) && letter(i + 1))
        return 1 + run(i + 1, &SplitMatcher::letter);
      if (letter(i)) return run(i, &SplitMatcher::letter);
      // \p{N}{1,3} or \p{N}
      if (number(i)) {
        const std::size_t most = p_ == SplitPattern::Llama3 ? 3 : 1;
        std::size_t n = 0;
        while (n < most && number(i + n)) ++n;
        return n;
      }
      // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
      if (std::size_t n = optional_space_then(i, &SplitMatcher::other))
        return n + run(i + n, &SplitMatcher::newline);
      // \s*[\r\n]+ : greedy \s* gives back until [\r\n]+ can match, so the match ends just after the
      // last newline of the whitespace run.
      if (space(i)) {
        const std::size_t end = i + run(i, &SplitMatcher::space);
        for (std::size_t k = end; k > i; --k)
          if (newline(k - 1)) return k - i;
      }
    } else {
      if (std::size_t n = optional_space_then(i, &SplitMatcher::letter)) return n;
      if (std::size_t n = optional_space_then(i, &SplitMatcher::number)) return n;
      if (std::size_t n = optional_space_then(i, &SplitMatcher::other)) return n;
    }
    if (space(i)) {
      // \s+(?!\S) : at the end of the text the whole run; before a non-space the run minus its last
      // character (which is left to lead the next piece, e.g. " word"); a single space there fails
      // and falls to \s+.
      const std::size_t n = run(i, &SplitMatcher::space);
      if (i + n == c_.size() || n == 1) return n;
      return n - 1;
    }
    return 0;
  }

 private:
  bool valid(std::size_t i) const { return i < c_.size(); }
  bool letter(std::size_t i) const { return valid(i) && is_letter(c_[i].cp); }
  bool number(std::size_t i) const { return valid(i) && is_number(c_[i].cp); }
  bool space(std::size_t i) const { return valid(i) && is_space(c_[i].cp); }
  bool newline(std::size_t i) const { return valid(i) && (c_[i].cp == '\r' || c_[i].cp == '\n'); }
  bool other(std::size_t i) const {
    return valid(i) && !is_space(c_[i].cp) && !is_letter(c_[i].cp) && !is_number(c_[i].cp);
  }
  bool is(std::size_t i, char ch, bool ignore_case) const {
    if (!valid(i)) return false;
    const std::uint32_t cp = c_[i].cp;
    if (ignore_case && ch >= 'a' && ch <= 'z')
      return cp == static_cast<std::uint32_t>(ch) || cp == static_cast<std::uint32_t>(ch - 32) ||
             (ch == 's' && cp == 0x17F);
    return cp == static_cast<std::uint32_t>(ch);
  }

  std::size_t run(std::size_t i, bool (SplitMatcher::*pred)(std::size_t) const) const {
    std::size_t n = 0;
    while ((this->*pred)(i + n)) ++n;
    return n;
  }

  // ` ?X+` : the space is taken only when X+ can follow it.
  std::size_t optional_space_then(std::size_t i, bool (SplitMatcher::*pred)(std::size_t) const) const {
    if (is(i, ' ', false) && (this->*pred)(i + 1)) return 1 + run(i + 1, pred);
    return run(i, pred);
  }

  // 's|'t|'re|'ve|'m|'ll|'d : at most one can match, so their order does not matter.
  std::size_t contraction(std::size_t i, bool ignore_case) const {
    if (!is(i, '\'', false)) return 0;
    for (char ch : {'s', 't', 'm', 'd'})
      if (is(i + 1, ch, ignore_case)) return 2;
    for (const char* two : {"re", "ve", "ll"})
      if (is(i + 1, two[0], ignore_case) && is(i + 2, two[1], ignore_case)) return 3;
    return 0;
  }

  const std::vector<CodePoint>& c_;
  SplitPattern p_;
};

}  // namespace detail

// Splits text into the pattern's pieces, as the Hugging Face Split pre-tokenizer with behavior
// "Isolated": matches and the (here impossible) unmatched gaps between them are all kept, so the
// pieces concatenate back to the text.
inline std::vector<std::string> split(const std::string& text, SplitPattern pattern) {
  const std::vector<CodePoint> cps = decode_utf8(text);
  const detail::SplitMatcher m(cps, pattern);
  std::vector<std::string> pieces;
  std::size_t gap = 0, i = 0;  // gap: first code point not yet in a piece
  const auto emit = [&](std::size_t from, std::size_t to) {
    const std::size_t begin = cps[from].offset, end = cps[to - 1].offset + cps[to - 1].length;
    pieces.push_back(text.substr(begin, end - begin));
  };
  while (i < cps.size()) {
    const std::size_t n = m.match(i);
    if (n == 0) {
      ++i;
      continue;
    }
    if (gap < i) emit(gap, i);
    emit(i, i + n);
    i += n;
    gap = i;
  }
  if (gap < cps.size()) emit(gap, cps.size());
  return pieces;
}

}  // namespace text
}  // namespace qlora
