#pragma once
// BpeTokenizer: byte-level BPE read from a Hugging Face tokenizer.json (GPT-2, Llama-3, SmolLM
// style; the Qwen2 split pattern too), producing the same ids as the `tokenizers` library for the
// files it accepts.
//
// The pipeline, in the library's order:
//   1. added tokens (special or not) are cut out of the text first, leftmost then longest, and map
//      straight to their ids;
//   2. each remaining segment goes through the pre-tokenizer: Split(regex) and Digits steps, then
//      one ByteLevel step (optional prefix space, optional GPT-2 split), giving pre-tokens;
//   3. each pre-token is merged as bytes: start from one token per byte, repeatedly merge the
//      adjacent pair with the lowest merge rank (leftmost on ties) until no pair has a merge.
//      With ignore_merges (Llama-3) a pre-token that is itself in the vocabulary is one token.
//   4. with add_special, the post-processor's TemplateProcessing "single" template puts its special
//      tokens (e.g. BOS) around the ids.
// Internally the vocabulary is kept as raw bytes: the GPT-2 byte-to-unicode mapping of the JSON is
// undone once at load, so encoding never builds mapped strings.
//
// Anything this does not implement is an Error at load naming the component, so a file is either
// tokenized exactly as the library would or refused: normalizers, non-byte-level pre-tokenizers,
// split regexes other than the GPT-2 / Llama-3 / Qwen2 ones, BPE dropout, byte_fallback, subword
// prefixes/suffixes, decoders other than ByteLevel, post-processors other than ByteLevel /
// TemplateProcessing. Not modelled: the lstrip / rstrip / single_word options of added tokens.
//
// encode is safe to call from several threads: the per-pre-token cache is behind a mutex.
#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <queue>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/io/hf_model.hpp"
#include "qlora/text/split_pattern.hpp"
#include "qlora/text/unicode.hpp"

namespace qlora {
namespace text {

class BpeTokenizer {
 public:
  // Reads tokenizer.json; a tokenizer_config.json beside it, if any, supplies bos_token / eos_token.
  static BpeTokenizer from_file(const std::string& path) {
    BpeTokenizer t = with_context("tokenizer '" + path + "'", [&] { return from_json(hf::read_json(path)); });
    const std::size_t slash = path.find_last_of('/');
    const std::string config =
        hf::join(slash == std::string::npos ? "" : path.substr(0, slash + 1), "tokenizer_config.json");
    if (hf::file_exists(config)) {
      with_context("'" + config + "'", [&] { t.read_config(hf::read_json(config)); });
    }
    return t;
  }

  static BpeTokenizer from_json(const nlohmann::json& j) {
    QLORA_CHECK(j.is_object(), "tokenizer.json: expected a JSON object, got ", j.type_name());
    BpeTokenizer t;
    t.read_model(field(j, "model"));
    t.read_added_tokens(j.value("added_tokens", nlohmann::json::array()));
    check_normalizer(j.value("normalizer", nlohmann::json()));
    t.read_pre_tokenizer(j.value("pre_tokenizer", nlohmann::json()));
    check_decoder(j.value("decoder", nlohmann::json()));
    t.read_post_processor(j.value("post_processor", nlohmann::json()));
    return t;
  }

  // Token ids of text. add_special: apply the post-processor template (e.g. prepend BOS), as the
  // library's encode(text, add_special_tokens=True).
  std::vector<std::int32_t> encode(const std::string& text, bool add_special = false) const {
    std::vector<std::int32_t> ids;
    if (add_special) ids = template_prefix_;
    // next[k]: where added token k next occurs at or after pos (npos: nowhere). Kept across the loop
    // so a text is searched once per added token, not once per token per occurrence (Llama-3 has
    // hundreds of reserved special tokens).
    std::vector<std::size_t> next(added_.size(), 0);
    for (std::size_t k = 0; k < added_.size(); ++k) next[k] = text.find(added_[k].content);
    std::size_t pos = 0;
    while (pos < text.size()) {
      // The leftmost added token at or after pos, the longest if several start there.
      std::size_t at = text.size(), len = 0;
      std::int32_t added_id = -1;
      for (std::size_t k = 0; k < added_.size(); ++k) {
        if (next[k] != std::string::npos && next[k] < pos) next[k] = text.find(added_[k].content, pos);
        if (next[k] == std::string::npos) continue;
        if (next[k] < at || (next[k] == at && added_[k].content.size() > len))
          at = next[k], len = added_[k].content.size(), added_id = added_[k].id;
      }
      if (at > pos) encode_segment(text.substr(pos, at - pos), ids);
      if (len == 0) break;
      ids.push_back(added_id);
      pos = at + len;
    }
    if (add_special) ids.insert(ids.end(), template_suffix_.begin(), template_suffix_.end());
    return ids;
  }

  // The bytes of ids: regular tokens as their bytes, added tokens as their content. Unlike the
  // library (which replaces invalid UTF-8 by U+FFFD) the bytes are returned as they are, so
  // decode(encode(s)) == s for every byte string s.
  std::string decode(const std::vector<std::int32_t>& ids) const {
    std::string out;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::int32_t id = ids[i];
      QLORA_CHECK(id >= 0 && id < vocab_size() && has_id_[static_cast<std::size_t>(id)],
                  "BpeTokenizer::decode: id ", id, " at position ", i, " is not a token (vocabulary size ",
                  vocab_size(), ")");
      out += id_to_bytes_[static_cast<std::size_t>(id)];
    }
    return out;
  }

  // One past the largest id, added tokens included (the embedding rows a model needs).
  std::int32_t vocab_size() const { return static_cast<std::int32_t>(id_to_bytes_.size()); }

  // The id of a token as tokenizer.json spells it (byte-level form, e.g. "Ġthe", or an added
  // token's content).
  std::optional<std::int32_t> token_id(const std::string& token) const {
    for (const Added& a : added_)
      if (a.content == token) return a.id;
    const auto it = vocab_.find(token);
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }

  // BOS: tokenizer_config.json's bos_token, else the first special token the template puts before
  // the text. EOS: eos_token, else the last one the template puts after it.
  std::optional<std::int32_t> bos_id() const { return bos_; }
  std::optional<std::int32_t> eos_id() const { return eos_; }

 private:
  struct Added {
    std::string content;
    std::int32_t id;
  };
  struct Merge {
    std::int32_t rank, id;
  };
  struct PreStep {
    enum Kind { kSplit, kDigits, kByteLevel } kind;
    SplitPattern pattern;            // the Split's regex, or Gpt2 for ByteLevel with use_regex
    bool use_regex = true;           // ByteLevel only
    bool add_prefix_space = false;   // ByteLevel only
    bool individual_digits = false;  // Digits only
  };
  struct Cache {
    std::mutex mu;
    std::unordered_map<std::string, std::vector<std::int32_t>> map;
  };
  // Bounds the cache; a text of many distinct words starts it over rather than growing without end.
  static constexpr std::size_t kCacheEntries = 1 << 16;

  static const nlohmann::json& field(const nlohmann::json& j, const char* key) {
    QLORA_CHECK(j.contains(key), "tokenizer.json: missing \"", key, "\"");
    return j.at(key);
  }
  static std::string type_of(const nlohmann::json& j, const char* component) {
    QLORA_CHECK(j.is_object() && j.contains("type") && j["type"].is_string(), "tokenizer.json: ", component,
                " has no \"type\" string");
    return j["type"].get<std::string>();
  }
  static std::uint64_t pair_key(std::int32_t a, std::int32_t b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
  }

  // The raw bytes a vocabulary string stands for; nullopt when a character is outside the
  // byte-to-unicode map (such tokens, e.g. special tokens, decode to their UTF-8 as the library does).
  static std::optional<std::string> unmap_bytes(const std::string& token) {
    std::string out;
    for (const CodePoint& c : decode_utf8(token)) {
      const int b = c.cp < kInvalidByte ? unicode_to_byte(c.cp) : -1;
      if (b < 0) return std::nullopt;
      out += static_cast<char>(b);
    }
    return out;
  }

  void set_token(std::int32_t id, const std::string& bytes) {
    QLORA_CHECK(id >= 0, "tokenizer.json: token id ", id, " is negative");
    const auto n = static_cast<std::size_t>(id) + 1;
    if (id_to_bytes_.size() < n) id_to_bytes_.resize(n), has_id_.resize(n, false);
    id_to_bytes_[static_cast<std::size_t>(id)] = bytes;
    has_id_[static_cast<std::size_t>(id)] = true;
  }

  void read_model(const nlohmann::json& m) {
    QLORA_CHECK(m.is_object(), "tokenizer.json: \"model\" is ", m.type_name(), ", expected an object");
    const std::string type = m.value("type", std::string("BPE"));
    QLORA_CHECK(type == "BPE", "tokenizer.json: model type '", type,
                "' is not supported (byte-level BPE only)");
    QLORA_CHECK(!m.contains("dropout") || m["dropout"].is_null() || m["dropout"] == 0.0,
                "tokenizer.json: BPE dropout ", m.value("dropout", nlohmann::json()).dump(),
                " is not supported (expected null: dropout is for training)");
    QLORA_CHECK(!m.value("byte_fallback", false),
                "tokenizer.json: BPE byte_fallback is not supported (byte-level BPE has every byte in its "
                "vocabulary)");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      const bool unset =
          !m.contains(key) || m[key].is_null() || (m[key].is_string() && m[key].get<std::string>().empty());
      QLORA_CHECK(unset, "tokenizer.json: BPE ", key, " ", m[key].dump(),
                  " is not supported (expected null)");
    }
    ignore_merges_ = m.value("ignore_merges", false);

    const nlohmann::json& vocab = field(m, "vocab");
    QLORA_CHECK(vocab.is_object(), "tokenizer.json: model.vocab is ", vocab.type_name(),
                ", expected an object");
    byte_id_.assign(256, -1);
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      QLORA_CHECK(it.value().is_number_integer(), "tokenizer.json: vocab[\"", it.key(), "\"] is ",
                  it.value().type_name(), ", expected an integer id");
      const auto id = it.value().get<std::int32_t>();
      vocab_[it.key()] = id;
      const std::optional<std::string> bytes = unmap_bytes(it.key());
      set_token(id, bytes ? *bytes : it.key());
      if (bytes) {
        bytes_to_id_[*bytes] = id;
        if (bytes->size() == 1) byte_id_[static_cast<std::uint8_t>((*bytes)[0])] = id;
      }
    }
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      const auto it = vocab_.find(m["unk_token"].get<std::string>());
      QLORA_CHECK(it != vocab_.end(), "tokenizer.json: unk_token '", m["unk_token"].get<std::string>(),
                  "' is not in the vocabulary");
      unk_ = it->second;
    }

    const nlohmann::json& merges = field(m, "merges");
    QLORA_CHECK(merges.is_array(), "tokenizer.json: model.merges is ", merges.type_name(),
                ", expected an array");
    for (std::size_t r = 0; r < merges.size(); ++r) {
      const nlohmann::json& e = merges[r];
      std::string a, b;
      // Two spellings: "a b" (older files) and ["a", "b"] (tokenizers >= 0.20, which allows spaces).
      if (e.is_string()) {
        const std::string s = e.get<std::string>();
        const std::size_t sp = s.find(' ');
        QLORA_CHECK(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos,
                    "tokenizer.json: merge ", r, " '", s, "' is not two tokens separated by one space");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {
        QLORA_CHECK(e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string(),
                    "tokenizer.json: merge ", r, " is ", e.dump(), ", expected \"a b\" or [\"a\", \"b\"]");
        a = e[0].get<std::string>(), b = e[1].get<std::string>();
      }
      std::string merged = a + b;
      for (std::string* tok : {&a, &b, &merged}) {
        QLORA_CHECK(vocab_.count(*tok), "tokenizer.json: merge ", r, " ('", a, "', '", b, "') ",
                    tok == &merged ? "produces" : "references", " token '", *tok,
                    "', which is not in the vocabulary");
      }
      // A repeated pair keeps its last rank, as collecting into the library's hash map does.
      merges_.insert_or_assign(pair_key(vocab_[a], vocab_[b]),
                               Merge{static_cast<std::int32_t>(r), vocab_[a + b]});
    }
  }

  void read_added_tokens(const nlohmann::json& added) {
    QLORA_CHECK(added.is_array(), "tokenizer.json: added_tokens is ", added.type_name(),
                ", expected an array");
    for (const nlohmann::json& a : added) {
      QLORA_CHECK(a.is_object() && a.contains("id") && a["id"].is_number_integer() && a.contains("content") &&
                      a["content"].is_string(),
                  "tokenizer.json: added token ", a.dump(),
                  " needs an integer \"id\" and a string \"content\"");
      const Added t{a["content"].get<std::string>(), a["id"].get<std::int32_t>()};
      QLORA_CHECK(!t.content.empty(), "tokenizer.json: added token ", t.id, " has empty content");
      set_token(t.id, t.content);
      added_.push_back(t);
    }
  }

  static void check_normalizer(const nlohmann::json& n) {
    if (n.is_null()) return;
    throw_error("tokenizer.json: normalizer type '", type_of(n, "normalizer"),
                "' is not supported (byte-level BPE with no normalizer only)");
  }

  static void check_decoder(const nlohmann::json& d) {
    if (d.is_null()) return;
    const std::string type = type_of(d, "decoder");
    QLORA_CHECK(type == "ByteLevel", "tokenizer.json: decoder type '", type,
                "' is not supported (byte-level BPE: ByteLevel only)");
  }

  void read_pre_step(const nlohmann::json& p) {
    const std::string type = type_of(p, "pre_tokenizer");
    if (type == "ByteLevel") {
      PreStep s{PreStep::kByteLevel, SplitPattern::Gpt2};
      s.use_regex = p.value("use_regex", true);
      s.add_prefix_space = p.value("add_prefix_space", true);
      pre_.push_back(s);
    } else if (type == "Split") {
      const nlohmann::json pattern = p.value("pattern", nlohmann::json());
      QLORA_CHECK(pattern.is_object() && pattern.contains("Regex") && pattern["Regex"].is_string(),
                  "tokenizer.json: pre_tokenizer Split pattern ", pattern.dump(),
                  " is not supported (expected {\"Regex\": ...})");
      const std::string regex = pattern["Regex"].get<std::string>();
      const std::optional<SplitPattern> known = pattern_from_regex(regex);
      QLORA_CHECK(known.has_value(), "tokenizer.json: pre_tokenizer Split regex '", regex,
                  "' is not supported (the GPT-2, Llama-3 and Qwen2 patterns only)");
      const std::string behavior = p.value("behavior", std::string("Isolated"));
      QLORA_CHECK(behavior == "Isolated", "tokenizer.json: pre_tokenizer Split behavior '", behavior,
                  "' is not supported (expected 'Isolated')");
      QLORA_CHECK(!p.value("invert", false),
                  "tokenizer.json: pre_tokenizer Split with invert=true is not supported");
      pre_.push_back(PreStep{PreStep::kSplit, *known});
    } else if (type == "Digits") {
      // SmolLM / StarCoder: numbers cut out of the text, one digit per piece with individual_digits.
      PreStep s{PreStep::kDigits, SplitPattern::Gpt2};
      s.individual_digits = p.value("individual_digits", false);
      pre_.push_back(s);
    } else {
      throw_error("tokenizer.json: pre_tokenizer type '", type, "' is not supported (byte-level BPE only)");
    }
  }

  void read_pre_tokenizer(const nlohmann::json& p) {
    QLORA_CHECK(!p.is_null(),
                "tokenizer.json: no pre_tokenizer (byte-level BPE needs a ByteLevel pre-tokenizer)");
    if (type_of(p, "pre_tokenizer") == "Sequence") {
      const nlohmann::json steps = p.value("pretokenizers", nlohmann::json());
      QLORA_CHECK(steps.is_array(), "tokenizer.json: pre_tokenizer Sequence has no \"pretokenizers\" array");
      for (const nlohmann::json& s : steps) read_pre_step(s);
    } else {
      read_pre_step(p);
    }
    // Byte-level BPE means the vocabulary is over mapped bytes: exactly one ByteLevel step, last
    // (a Split after it would see mapped characters, which the patterns here are not written for).
    std::size_t byte_levels = 0;
    for (const PreStep& s : pre_) byte_levels += s.kind == PreStep::kByteLevel;
    QLORA_CHECK(byte_levels == 1 && pre_.back().kind == PreStep::kByteLevel,
                "tokenizer.json: pre_tokenizer has ", byte_levels,
                " ByteLevel steps, expected exactly one, as the last step");
  }

  void read_post_step(const nlohmann::json& p) {
    const std::string type = type_of(p, "post_processor");
    if (type == "ByteLevel") return;  // offsets only; no ids
    QLORA_CHECK(type == "TemplateProcessing", "tokenizer.json: post_processor type '", type,
                "' is not supported (ByteLevel and TemplateProcessing only)");
    const nlohmann::json single = p.value("single", nlohmann::json());
    const nlohmann::json specials = p.value("special_tokens", nlohmann::json::object());
    QLORA_CHECK(single.is_array(),
                "tokenizer.json: post_processor TemplateProcessing has no \"single\" array");
    bool after = false;
    for (const nlohmann::json& piece : single) {
      if (piece.contains("Sequence")) {
        after = true;
        continue;
      }
      QLORA_CHECK(piece.contains("SpecialToken") && piece["SpecialToken"].contains("id"),
                  "tokenizer.json: post_processor template piece ", piece.dump(),
                  " is neither a Sequence nor a SpecialToken");
      const std::string name = piece["SpecialToken"]["id"].get<std::string>();
      QLORA_CHECK(
          specials.contains(name) && specials[name].contains("ids") && specials[name]["ids"].is_array(),
          "tokenizer.json: post_processor template uses special token '", name,
          "', which its special_tokens do not define");
      for (const nlohmann::json& id : specials[name]["ids"])
        (after ? template_suffix_ : template_prefix_).push_back(id.get<std::int32_t>());
    }
    if (!template_prefix_.empty()) bos_ = template_prefix_.front();
    if (!template_suffix_.empty()) eos_ = template_suffix_.back();
  }

  void read_post_processor(const nlohmann::json& p) {
    if (p.is_null()) return;
    if (type_of(p, "post_processor") == "Sequence") {
      const nlohmann::json steps = p.value("processors", nlohmann::json());
      QLORA_CHECK(steps.is_array(), "tokenizer.json: post_processor Sequence has no \"processors\" array");
      for (const nlohmann::json& s : steps) read_post_step(s);
    } else {
      read_post_step(p);
    }
  }

  void read_config(const nlohmann::json& c) {
    const auto token_of = [&](const char* key) -> std::optional<std::int32_t> {
      if (!c.is_object() || !c.contains(key) || c[key].is_null()) return std::nullopt;
      const nlohmann::json& v = c[key];
      // A plain string, or an AddedToken object {"content": ...}.
      const std::string content = v.is_object() ? v.value("content", std::string()) : v.get<std::string>();
      const std::optional<std::int32_t> id = token_id(content);
      QLORA_CHECK(id.has_value(), key, " '", content, "' is not a token of the tokenizer");
      return id;
    };
    if (auto id = token_of("bos_token")) bos_ = id;
    if (auto id = token_of("eos_token")) eos_ = id;
  }

  // The library's Digits pre-tokenizer: runs of numeric characters (Rust's char::is_numeric, i.e.
  // \p{N}) become their own pieces, or each digit its own piece with individual_digits.
  static void split_digits(const std::string& text, bool individual, std::vector<std::string>& out) {
    const std::vector<CodePoint> cps = decode_utf8(text);
    std::size_t begin = 0;  // byte offset of the piece being built
    for (std::size_t i = 0; i < cps.size(); ++i) {
      const bool digit = is_number(cps[i].cp);
      const bool boundary = i > 0 && (digit != is_number(cps[i - 1].cp) || (digit && individual));
      if (boundary) {
        out.push_back(text.substr(begin, cps[i].offset - begin));
        begin = cps[i].offset;
      }
    }
    if (begin < text.size()) out.push_back(text.substr(begin));
  }

  void encode_segment(const std::string& segment, std::vector<std::int32_t>& ids) const {
    std::vector<std::string> pieces{segment};
    for (const PreStep& s : pre_) {
      std::vector<std::string> next;
      for (std::string& p : pieces) {
        switch (s.kind) {
          case PreStep::kSplit:
            for (std::string& q : split(p, s.pattern)) next.push_back(std::move(q));
            break;
          case PreStep::kDigits: split_digits(p, s.individual_digits, next); break;
          case PreStep::kByteLevel:
            // The prefix space goes on every piece that earlier steps made, as in the library.
            if (s.add_prefix_space && p[0] != ' ') p.insert(p.begin(), ' ');
            if (s.use_regex) {
              for (std::string& q : split(p, s.pattern)) next.push_back(std::move(q));
            } else {
              next.push_back(std::move(p));
            }
            break;
        }
      }
      pieces = std::move(next);
    }
    for (const std::string& p : pieces) bpe(p, ids);
  }

  // Rank-based merging of one pre-token, as the library's Word::merge_all: a min-heap of candidate
  // pairs by (rank, position); an entry whose pair has since changed is stale and skipped.
  void bpe(const std::string& piece, std::vector<std::int32_t>& ids) const {
    if (ignore_merges_) {
      const auto it = bytes_to_id_.find(piece);
      if (it != bytes_to_id_.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    {
      std::lock_guard<std::mutex> lock(cache_->mu);
      const auto it = cache_->map.find(piece);
      if (it != cache_->map.end()) {
        ids.insert(ids.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    struct Sym {
      std::int32_t id;
      int prev, next;
      bool alive;
    };
    std::vector<Sym> sym;
    sym.reserve(piece.size());
    for (std::size_t i = 0; i < piece.size(); ++i) {
      const auto byte = static_cast<std::uint8_t>(piece[i]);
      std::int32_t id = byte_id_[byte];
      if (id < 0) {
        QLORA_CHECK(unk_.has_value(), "BpeTokenizer::encode: byte 0x", std::hex, int(byte), std::dec,
                    " has no token in the vocabulary and there is no unk_token");
        id = *unk_;
      }
      sym.push_back({id, static_cast<int>(i) - 1, i + 1 < piece.size() ? static_cast<int>(i) + 1 : -1, true});
    }
    using Cand = std::pair<std::int32_t, int>;  // (rank, position of the left symbol)
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    const auto push = [&](int left) {
      if (left < 0 || sym[left].next < 0) return;
      const auto it = merges_.find(pair_key(sym[left].id, sym[sym[left].next].id));
      if (it != merges_.end()) heap.push({it->second.rank, left});
    };
    for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) push(i);
    while (!heap.empty()) {
      const auto [rank, left] = heap.top();
      heap.pop();
      if (!sym[left].alive || sym[left].next < 0) continue;
      const int right = sym[left].next;
      const auto it = merges_.find(pair_key(sym[left].id, sym[right].id));
      if (it == merges_.end() || it->second.rank != rank) continue;  // stale
      sym[left].id = it->second.id;
      sym[right].alive = false;
      sym[left].next = sym[right].next;
      if (sym[right].next >= 0) sym[sym[right].next].prev = left;
      push(sym[left].prev);
      push(left);
    }
    std::vector<std::int32_t> out;
    for (const Sym& s : sym)
      if (s.alive) out.push_back(s.id);
    ids.insert(ids.end(), out.begin(), out.end());
    std::lock_guard<std::mutex> lock(cache_->mu);
    if (cache_->map.size() >= kCacheEntries) cache_->map.clear();
    cache_->map.emplace(piece, std::move(out));
  }

  std::unordered_map<std::string, std::int32_t> vocab_;        // as spelled in the JSON
  std::unordered_map<std::string, std::int32_t> bytes_to_id_;  // raw bytes -> id
  std::vector<std::string> id_to_bytes_;                       // id -> bytes decode emits
  std::vector<bool> has_id_;                                   // ids may have gaps
  std::vector<std::int32_t> byte_id_;                          // byte -> id, -1 if none
  std::unordered_map<std::uint64_t, Merge> merges_;            // (left id, right id) -> merge
  std::vector<Added> added_;
  std::vector<PreStep> pre_;
  std::vector<std::int32_t> template_prefix_, template_suffix_;
  std::optional<std::int32_t> bos_, eos_, unk_;
  bool ignore_merges_ = false;
  // Shared by copies (the mutex makes that safe); a cache is only ever a function of the fields above.
  std::shared_ptr<Cache> cache_ = std::make_shared<Cache>();
};

}  // namespace text
}  // namespace qlora
