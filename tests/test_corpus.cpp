// text::Corpus: documents of fortune files and plain text, the seeded held-out split, and the
// counter-based training windows that make a resumed run draw the batches of an uninterrupted one.
#include <catch2/catch.hpp>
#include <set>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/text/byte_tokenizer.hpp"
#include "qlora/text/corpus.hpp"

using namespace qlora;
using text::Corpus;

namespace {
std::vector<std::int64_t> bytes(const std::string& s) {
  std::vector<std::int64_t> v;
  for (auto id : text::ByteTokenizer().encode(s)) v.push_back(id);
  return v;
}
}  // namespace

TEST_CASE("split_documents cuts fortune files at % lines and other text at blank lines", "[corpus]") {
  std::string sep;
  auto d = text::split_documents("First one.\n\t-- Someone\n%\nSecond\nline two\n%\n\n%\nThird\n", &sep);
  REQUIRE(d.size() == 3);
  CHECK(sep == "\n%\n");
  CHECK(d[0] == "First one.\n\t-- Someone");
  CHECK(d[1] == "Second\nline two");
  CHECK(d[2] == "Third");
  d = text::split_documents("para one\nstill one\n\n  \npara two\n\n\n", &sep);
  REQUIRE(d.size() == 2);
  CHECK(sep == "\n\n");
  CHECK(d[1] == "para two");
  CHECK(text::split_documents("", &sep).empty());
}

TEST_CASE("Corpus::split: every document once, in one stream, the same way every time", "[corpus]") {
  std::string t;
  for (int i = 0; i < 1000; ++i) t += "doc " + std::to_string(i) + "\n%\n";
  const auto s = Corpus::split(t, bytes, 0.1, 5);
  CHECK(s.train_docs + s.val_docs == 1000);
  CHECK(s.val_docs > 60);  // ~100 expected
  CHECK(s.val_docs < 140);
  CHECK(s.train.size() + s.val.size() == t.size());  // the separators are kept, nothing is lost
  const auto again = Corpus::split(t, bytes, 0.1, 5);
  CHECK(again.train == s.train);
  CHECK(Corpus::split(t, bytes, 0.1, 6).val != s.val);  // the seed changes which documents
  CHECK(Corpus::split(t, bytes, 0.0, 5).val.empty());
  CHECK_THROWS_WITH(Corpus::split(t, bytes, 1.0, 5), Catch::Contains("val_fraction is 1"));
}

TEST_CASE("Corpus::batch: windows of the stream, a pure function of (seed, step, micro)", "[corpus]") {
  std::vector<std::int64_t> stream(1000);
  for (std::size_t i = 0; i < stream.size(); ++i) stream[i] = std::int64_t(i);
  const auto a = Corpus::batch(stream, 4, 16, 1, 7, 0);
  REQUIRE(a.size() == 64);
  std::set<std::int64_t> starts;
  for (int b = 0; b < 4; ++b) {
    const std::int64_t s0 = a[std::size_t(b * 16)];
    starts.insert(s0);
    CHECK(s0 + 15 < 1000);
    for (int t = 1; t < 16; ++t) CHECK(a[std::size_t(b * 16 + t)] == s0 + t);  // consecutive tokens
  }
  CHECK(starts.size() == 4);
  CHECK(Corpus::batch(stream, 4, 16, 1, 7, 0) == a);
  CHECK(Corpus::batch(stream, 4, 16, 1, 8, 0) != a);
  CHECK(Corpus::batch(stream, 4, 16, 1, 7, 1) != a);
  CHECK(Corpus::batch(stream, 4, 16, 2, 7, 0) != a);
  // every start position is reachable, the last one included
  std::set<std::int64_t> seen;
  for (int step = 0; step < 400; ++step) seen.insert(Corpus::batch(stream, 1, 990, 3, step, 0)[0]);
  CHECK(seen.size() == 11);
  CHECK_THROWS_WITH(Corpus::batch(stream, 1, 1000, 0, 0, 0), Catch::Contains("fewer than one window"));
  const auto w = Corpus::eval_windows(stream, 300, 10);
  CHECK(w.size() == 900);
  CHECK(w.back() == 899);
  CHECK(Corpus::eval_windows(stream, 300, 2).size() == 600);
}
