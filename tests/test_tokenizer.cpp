// Tokenizers against the Hugging Face `tokenizers` library: tests/data/tokenizer/cases.json holds
// the ids it produced (see make_tokenizers.py) for small trained byte-level BPE tokenizers (GPT-2,
// Llama-3, Qwen2 and SmolLM style pre-tokenizers); every case must encode to exactly those ids and
// decode back.
#include <stdlib.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "qlora/text/tokenizer.hpp"

using qlora::text::BpeTokenizer;
using qlora::text::ByteTokenizer;

namespace {

const std::string kDir = std::string(QLORA_TEST_DATA_DIR) + "/tokenizer/";

nlohmann::json load(const std::string& name) { return qlora::hf::read_json(kDir + name); }

// The Llama-3 style file with one part replaced, for the error tests.
nlohmann::json llama3_with(const nlohmann::json::json_pointer& where, const nlohmann::json& value) {
  nlohmann::json j = load("llama3_style.json");
  j[where] = value;
  return j;
}

std::string error_of(const nlohmann::json& j) {
  try {
    BpeTokenizer::from_json(j);
  } catch (const qlora::Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("ByteTokenizer: one token per byte, any bytes round-trip") {
  const ByteTokenizer tok;
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  const std::vector<std::int32_t> ids = tok.encode(all);
  REQUIRE(ids.size() == 256);
  for (int b = 0; b < 256; ++b) CHECK(ids[static_cast<std::size_t>(b)] == b);
  CHECK(tok.decode(ids) == all);
  CHECK(tok.decode(tok.encode("héllo 😀")) == "héllo 😀");
  CHECK(tok.encode("").empty());
  CHECK(tok.vocab_size() == 256);
  CHECK_THROWS_WITH(tok.decode({65, 256}), Catch::Contains("id 256 at position 1"));
  CHECK_THROWS_AS(tok.decode({-1}), qlora::Error);
}

TEST_CASE("split patterns: pieces match the Hugging Face Split pre-tokenizer") {
  using qlora::text::SplitPattern;
  const nlohmann::json ref = load("cases.json");
  const std::pair<const char*, SplitPattern> patterns[] = {{"split_gpt2", SplitPattern::Gpt2},
                                                           {"split_llama3", SplitPattern::Llama3},
                                                           {"split_qwen2", SplitPattern::Qwen2}};
  for (const auto& [key, pattern] : patterns) {
    for (const char* set : {"cases", "split_cases"}) {
      REQUIRE(ref[set].size() >= 100);
      for (const nlohmann::json& c : ref[set]) {
        const std::string text = c["text"].get<std::string>();
        INFO(key << " case '" << text << "'");
        CHECK(qlora::text::split(text, pattern) == c[key].get<std::vector<std::string>>());
      }
    }
    CHECK(qlora::text::pattern_from_regex(qlora::text::pattern_source(pattern)) == pattern);
  }
  CHECK_FALSE(qlora::text::pattern_from_regex("\\w+").has_value());
}

TEST_CASE("BpeTokenizer: ids match the Hugging Face library on every case") {
  const nlohmann::json ref = load("cases.json");
  REQUIRE(ref["cases"].size() >= 40);
  for (auto t = ref["tokenizers"].begin(); t != ref["tokenizers"].end(); ++t) {
    const std::string name = t.key();
    nlohmann::json j = load(t.value()["file"].get<std::string>());
    if (t.value().value("add_prefix_space", false)) j["pre_tokenizer"]["add_prefix_space"] = true;
    const BpeTokenizer tok = BpeTokenizer::from_json(j);
    CHECK(tok.vocab_size() == t.value()["vocab_size"].get<std::int32_t>());
    std::size_t matched = 0;
    for (const nlohmann::json& c : ref["cases"]) {
      const std::string text = c["text"].get<std::string>();
      INFO(name << " case '" << text << "'");
      const auto expected = c[name].get<std::vector<std::int32_t>>();
      const std::vector<std::int32_t> ids = tok.encode(text);
      CHECK(ids == expected);
      matched += ids == expected;
      // "<name>_special" is stored only where the post-processor adds tokens.
      const std::string special = name + "_special";
      CHECK(tok.encode(text, /*add_special=*/true) ==
            (c.contains(special) ? c[special] : c[name]).get<std::vector<std::int32_t>>());
      if (!t.value().value("add_prefix_space", false)) CHECK(tok.decode(ids) == text);
      CHECK(tok.encode(text) == ids);  // second time from the cache
    }
    CHECK(matched == ref["cases"].size());
  }
}

TEST_CASE("BpeTokenizer: special tokens, lookups, BOS/EOS") {
  const BpeTokenizer gpt2 = BpeTokenizer::from_file(kDir + "gpt2_style.json");
  const BpeTokenizer llama = BpeTokenizer::from_file(kDir + "llama3_style.json");
  CHECK(gpt2.token_id("<|endoftext|>").has_value());
  CHECK(gpt2.token_id("Ġthe").has_value());  // the byte-level spelling, as in the JSON
  CHECK_FALSE(gpt2.token_id("no such token").has_value());
  CHECK_FALSE(gpt2.bos_id().has_value());  // a ByteLevel post-processor adds nothing
  REQUIRE(llama.bos_id().has_value());
  CHECK(*llama.bos_id() == *llama.token_id("<|begin_of_text|>"));
  CHECK(llama.encode("hi", true).front() == *llama.bos_id());
  CHECK(llama.decode({*llama.bos_id()}) == "<|begin_of_text|>");
  CHECK_THROWS_WITH(llama.decode({llama.vocab_size()}), Catch::Contains("is not a token"));
}

TEST_CASE("BpeTokenizer: invalid UTF-8 and long inputs round-trip") {
  for (const char* name : {"gpt2_style", "llama3_style", "qwen2_style", "smollm_style"}) {
    const BpeTokenizer tok = BpeTokenizer::from_file(kDir + name + ".json");
    std::string all;
    for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
    for (const std::string& s :
         {all, std::string("\xff\xfe bad \xc3 x\xe2\x82 \xed\xa0\x80 end"), std::string("caf\xc3\xa9\x80"),
          std::string(20000, 'a'), std::string(5000, ' ')}) {
      const std::vector<std::int32_t> ids = tok.encode(s);
      CHECK(tok.decode(ids) == s);
      CHECK(ids.size() <= s.size());
    }
  }
}

TEST_CASE("BpeTokenizer: merges as \"a b\" strings read the same as pairs") {
  nlohmann::json j = load("gpt2_style.json");
  for (nlohmann::json& m : j["model"]["merges"])
    if (m.is_array()) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
  const BpeTokenizer strings = BpeTokenizer::from_json(j);
  const BpeTokenizer pairs = BpeTokenizer::from_file(kDir + "gpt2_style.json");
  const std::string text = "The quick brown fox, naïve café 中文 😀 it's 2024!";
  CHECK(strings.encode(text) == pairs.encode(text));
}

TEST_CASE("BpeTokenizer: unsupported components are errors that name them") {
  using P = nlohmann::json::json_pointer;
  CHECK_THAT(error_of(llama3_with(P("/model/type"), "WordPiece")),
             Catch::Contains("model type 'WordPiece' is not supported"));
  CHECK_THAT(error_of(llama3_with(P("/pre_tokenizer"), {{"type", "Metaspace"}})),
             Catch::Contains("pre_tokenizer type 'Metaspace' is not supported (byte-level BPE only)"));
  CHECK_THAT(error_of(llama3_with(P("/pre_tokenizer/pretokenizers/0/pattern/Regex"), "\\w+")),
             Catch::Contains("Split regex '\\w+' is not supported"));
  CHECK_THAT(error_of(llama3_with(P("/pre_tokenizer/pretokenizers/0/behavior"), "Removed")),
             Catch::Contains("behavior 'Removed'"));
  CHECK_THAT(error_of(llama3_with(P("/pre_tokenizer"), nullptr)), Catch::Contains("no pre_tokenizer"));
  CHECK_THAT(error_of(llama3_with(P("/normalizer"), {{"type", "NFC"}})),
             Catch::Contains("normalizer type 'NFC'"));
  CHECK_THAT(error_of(llama3_with(P("/decoder"), {{"type", "Metaspace"}})),
             Catch::Contains("decoder type 'Metaspace'"));
  CHECK_THAT(error_of(llama3_with(P("/post_processor"), {{"type", "BertProcessing"}})),
             Catch::Contains("post_processor type 'BertProcessing'"));
  CHECK_THAT(error_of(llama3_with(P("/model/byte_fallback"), true)), Catch::Contains("byte_fallback"));
  CHECK_THAT(error_of(llama3_with(P("/model/dropout"), 0.1)), Catch::Contains("dropout"));
  CHECK_THROWS_WITH(BpeTokenizer::from_file(kDir + "missing.json"), Catch::Contains("cannot open"));
}

TEST_CASE("BpeTokenizer: vocabulary and merges must agree") {
  using P = nlohmann::json::json_pointer;
  nlohmann::json j = load("llama3_style.json");
  j["model"]["merges"].push_back({"Ġthe", "zzz_unknown"});
  CHECK_THAT(error_of(j), Catch::Contains("references token 'zzz_unknown', which is not in the vocabulary"));

  j = load("llama3_style.json");
  j["model"]["vocab"].erase(j["model"]["merges"][0][0].get<std::string>() +
                            j["model"]["merges"][0][1].get<std::string>());
  CHECK_THAT(error_of(j), Catch::Contains("merge 0") && Catch::Contains("produces token"));

  CHECK_THAT(error_of(llama3_with(P("/model/merges/3"), "abc")),
             Catch::Contains("merge 3 'abc' is not two tokens"));
  CHECK_THAT(error_of(llama3_with(P("/model/merges/3"), 7)), Catch::Contains("merge 3 is 7"));
  CHECK_THAT(error_of(llama3_with(P("/model/vocab/a"), "x")), Catch::Contains("vocab[\"a\"] is string"));
}

TEST_CASE("BpeTokenizer: tokenizer_config.json beside the file names BOS and EOS") {
  char dir_template[] = "/tmp/qlora_tokenizer_XXXXXX";
  const char* dir = ::mkdtemp(dir_template);
  REQUIRE(dir != nullptr);
  const std::string d = dir;
  {
    std::ofstream(d + "/tokenizer.json") << load("llama3_style.json").dump();
    // bos_token as a plain string, eos_token as an AddedToken object: both spellings occur.
    std::ofstream(d + "/tokenizer_config.json")
        << R"({"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>"}})";
  }
  const BpeTokenizer tok = BpeTokenizer::from_file(d + "/tokenizer.json");
  CHECK(tok.bos_id() == tok.token_id("<|begin_of_text|>"));
  CHECK(tok.eos_id() == tok.token_id("<|end_of_text|>"));
  REQUIRE(tok.eos_id().has_value());
  CHECK(tok.encode("a<|end_of_text|>").back() == *tok.eos_id());

  std::ofstream(d + "/tokenizer_config.json") << R"({"eos_token": "<|no_such|>"})";
  CHECK_THROWS_WITH(BpeTokenizer::from_file(d + "/tokenizer.json"),
                    Catch::Contains("tokenizer_config.json") && Catch::Contains("eos_token '<|no_such|>'"));
  std::remove((d + "/tokenizer.json").c_str());
  std::remove((d + "/tokenizer_config.json").c_str());
  ::rmdir(dir);
}

TEST_CASE("BpeTokenizer: encode from several threads at once agrees with one thread") {
  const BpeTokenizer tok = BpeTokenizer::from_file(kDir + "llama3_style.json");
  const nlohmann::json ref = load("cases.json");
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (std::size_t t = 0; t < ok.size(); ++t) {
    threads.emplace_back([&, t] {
      bool all = true;
      for (int round = 0; round < 20; ++round)
        for (const nlohmann::json& c : ref["cases"])
          all = all && tok.encode(c["text"].get<std::string>()) ==
                           c["llama3_style"].get<std::vector<std::int32_t>>();
      ok[t] = all;
    });
  }
  for (std::thread& th : threads) th.join();
  CHECK(ok == std::vector<int>(4, 1));
}

TEST_CASE("BpeTokenizer: added tokens match leftmost, then longest") {
  nlohmann::json j = load("gpt2_style.json");
  j["added_tokens"].push_back({{"id", 900}, {"content", "<x>"}, {"special", true}});
  j["added_tokens"].push_back({{"id", 901}, {"content", "<x>>"}, {"special", true}});
  const BpeTokenizer tok = BpeTokenizer::from_json(j);
  CHECK(tok.vocab_size() == 902);
  const std::vector<std::int32_t> ids = tok.encode("a<x>><x>b<x>");
  const std::vector<std::int32_t> a = tok.encode("a"), b = tok.encode("b");
  std::vector<std::int32_t> expected = a;
  expected.push_back(901);
  expected.push_back(900);
  expected.insert(expected.end(), b.begin(), b.end());
  expected.push_back(900);
  CHECK(ids == expected);
  CHECK(tok.decode(ids) == "a<x>><x>b<x>");
  CHECK_THROWS_WITH(tok.decode({899}), Catch::Contains("id 899 at position 0 is not a token"));  // a gap
}
