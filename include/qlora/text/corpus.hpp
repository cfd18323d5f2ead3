#pragma once
// Corpus: a tokenized training text, cut into documents and split into a training and a held-out
// stream, with the batches a language-model trainer draws from it.
//
// Documents: a fortune file (Debian's fortunes packages: entries separated by a line holding only
// "%") is cut at those lines; any other text at blank lines. Each document goes to the held-out
// stream when a hash of its index falls under val_fraction, so the split is the same on every run
// and does not depend on how the file is ordered. Each stream is its documents' tokens, in file
// order, each followed by the separator's tokens ("\n%\n" or "\n\n"), so what a model learns
// includes where a document ends.
//
// Batches: a training batch of B windows of T tokens starts each window at a position drawn from
// (seed, step, micro-batch, row) by a counter-based hash, not by a stateful generator: a resumed run
// draws exactly the windows the uninterrupted run would have, with no generator state to save.
// Held-out loss uses consecutive non-overlapping windows from the start of the held-out stream.
#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"

namespace qlora {
namespace text {

// splitmix64: the counter-based hash behind the window positions and the document split.
inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

inline std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  QLORA_CHECK(f.good(), "text file '", path, "' cannot be opened");
  std::ostringstream ss;
  ss << f.rdbuf();
  QLORA_CHECK(!f.bad(), "text file '", path, "' cannot be read");
  return ss.str();
}

// Splits text into documents and the separator that joined them (see the top of the file).
inline std::vector<std::string> split_documents(const std::string& text, std::string* separator) {
  std::vector<std::string> docs;
  std::vector<std::string> lines;
  {
    std::size_t b = 0;
    while (b <= text.size()) {
      std::size_t e = text.find('\n', b);
      if (e == std::string::npos) e = text.size();
      lines.push_back(text.substr(b, e - b));
      b = e + 1;
    }
  }
  const bool fortune = std::count(lines.begin(), lines.end(), std::string("%")) > 0;
  if (separator) *separator = fortune ? "\n%\n" : "\n\n";
  std::string cur;
  auto flush = [&] {
    while (!cur.empty() && cur.back() == '\n') cur.pop_back();
    if (!cur.empty()) docs.push_back(cur);
    cur.clear();
  };
  for (const std::string& l : lines) {
    if (fortune ? l == "%" : l.find_first_not_of(" \t\r") == std::string::npos) {
      flush();
    } else {
      cur += l;
      cur += '\n';
    }
  }
  flush();
  return docs;
}

class Corpus {
 public:
  struct Split {
    std::vector<std::int64_t> train, val;  // token streams
    std::size_t train_docs = 0, val_docs = 0;
  };

  // text -> documents -> the two token streams. encode: std::string -> a vector of integer ids.
  // val_fraction in [0, 1); with 0 (or too few documents) the held-out stream is empty.
  template <class Encode>
  static Split split(const std::string& text, Encode&& encode, double val_fraction, std::uint64_t seed = 0) {
    QLORA_CHECK(val_fraction >= 0.0 && val_fraction < 1.0, "Corpus: val_fraction is ", val_fraction,
                ", expected a number in [0, 1)");
    std::string sep;
    const std::vector<std::string> docs = split_documents(text, &sep);
    Split s;
    const auto sep_ids = encode(sep);
    const std::uint64_t cut = std::uint64_t(val_fraction * 18446744073709551615.0);
    for (std::size_t i = 0; i < docs.size(); ++i) {
      const bool val = val_fraction > 0 && mix64(seed ^ mix64(i)) < cut;
      std::vector<std::int64_t>& out = val ? s.val : s.train;
      for (auto id : encode(docs[i])) out.push_back(std::int64_t(id));
      for (auto id : sep_ids) out.push_back(std::int64_t(id));
      ++(val ? s.val_docs : s.train_docs);
    }
    return s;
  }

  // Token ids of a training batch: B windows of T tokens, (B, T) row-major, for optimizer step
  // `step` and micro-batch `micro` (see the top of the file).
  static std::vector<std::int64_t> batch(const std::vector<std::int64_t>& stream, std::int64_t B,
                                         std::int64_t T, std::uint64_t seed, std::int64_t step,
                                         std::int64_t micro) {
    QLORA_CHECK(std::int64_t(stream.size()) > T, "Corpus: the training text has ", stream.size(),
                " tokens, fewer than one window of --seq ", T, " + 1");
    std::vector<std::int64_t> ids(std::size_t(B * T));
    const std::uint64_t span = std::uint64_t(std::int64_t(stream.size()) - T + 1);
    for (std::int64_t b = 0; b < B; ++b) {
      const std::uint64_t h =
          mix64(seed ^ mix64(std::uint64_t(step) ^
                             mix64(std::uint64_t(micro) * 0x100000001b3ull + std::uint64_t(b))));
      const std::size_t start = std::size_t(h % span);
      std::copy_n(stream.begin() + std::ptrdiff_t(start), T, ids.begin() + b * T);
    }
    return ids;
  }

  // Consecutive windows of T tokens from the start of the stream, at most max_windows of them (the
  // last partial window is dropped); (n, T) row-major, n = windows.size() / T.
  static std::vector<std::int64_t> eval_windows(const std::vector<std::int64_t>& stream, std::int64_t T,
                                                std::int64_t max_windows) {
    const std::int64_t n = std::min<std::int64_t>(std::int64_t(stream.size()) / T, max_windows);
    return std::vector<std::int64_t>(stream.begin(), stream.begin() + n * T);
  }
};

}  // namespace text
}  // namespace qlora
