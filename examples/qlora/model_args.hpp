#pragma once
// What the qlora commands that run a model (eval, generate, finetune, merge, ...) share:
//
//   AnyTokenizer::open(dir, V) a model folder's tokenizer: tokenizer.json (byte-level BPE, BOS / EOS
//                              from tokenizer_config.json) if present, else raw bytes when the
//                              model's vocabulary V has room for them.
//   read_token_ids(path, V)    a safetensors file with tensor `ids` (I64 or I32, [batch, seq]).
//   default_quant(dir, fallback)      --quant's default: a bitsandbytes folder's own format.
//   load_model(quant, dir, adapter)   a cli::Model for inference, with a PEFT adapter if given.
//   get_float / get_u64(args, name, default)   typed option values.
// (open_model, which turns a --quant string into a model, is model.hpp's.)
//
// Every bad input is a qlora::Error naming the option, file or tensor, so a command only catches
// in main().
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cli.hpp"
#include "model.hpp"
#include "qlora/core/error.hpp"
#include "qlora/io/hf_model.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/optim/param.hpp"
#include "qlora/text/tokenizer.hpp"

namespace cli {

// The --quant a model folder loads in by default: a bitsandbytes folder's own format ("nf4", "fp4"
// or "int8", from config.json's quantization_config), so its weights are used as stored; otherwise
// (a floating checkpoint, or no readable config.json: loading reports that) `fallback`.
inline std::string default_quant(const std::string& model_dir, const std::string& fallback) {
  const std::string path = qlora::hf::join(model_dir, "config.json");
  if (model_dir.empty() || !qlora::hf::file_exists(path)) return fallback;
  const nlohmann::json cfg = qlora::hf::read_json(path);
  if (!cfg.is_object() || !cfg.contains("quantization_config")) return fallback;
  const nlohmann::json& q = cfg["quantization_config"];
  auto flag = [&](const char* k) {
    return q.is_object() && q.contains(k) && q[k].is_boolean() && q[k].get<bool>();
  };
  if (!q.is_object() || q.value("quant_method", std::string("bitsandbytes")) != "bitsandbytes")
    return fallback;
  if (flag("load_in_4bit") || flag("_load_in_4bit")) {
    const std::string t = q.contains("bnb_4bit_quant_type") && q["bnb_4bit_quant_type"].is_string()
                              ? q["bnb_4bit_quant_type"].get<std::string>()
                              : "fp4";  // bitsandbytes' default
    return t == "nf4" ? "nf4" : t == "fp4" ? "fp4" : fallback;
  }
  if (flag("load_in_8bit") || flag("_load_in_8bit")) return "int8";
  return fallback;
}

// A checkpoint folder's model, its projections in quant, with the PEFT adapter in adapter_dir
// attached unless adapter_dir is empty.
inline std::unique_ptr<Model> load_model(const std::string& quant, const std::string& dir,
                                         const std::string& adapter_dir) {
  ModelSpec spec;
  spec.dir = dir;
  if (!adapter_dir.empty()) spec.adapter = adapter_dir;
  return open_model(quant, spec);
}

// How many values the parameters hold (what "N trainable parameters" counts).
inline std::size_t param_count(const std::vector<qlora::optim::Param>& params) {
  std::size_t n = 0;
  for (const auto& p : params) n += p.size;
  return n;
}

// --name VALUE as a finite number (def when absent).
inline double get_float(const Args& a, const std::string& name, double def) {
  if (!a.has(name)) return def;
  const std::string v = a.get(name, "");
  char* end = nullptr;
  const double r = v.empty() ? 0.0 : std::strtod(v.c_str(), &end);
  QLORA_CHECK(!v.empty() && end == v.c_str() + v.size() && std::isfinite(r), "--", name,
              " expects a number, got '", v, "'");
  return r;
}

// --name VALUE as an unsigned 64-bit integer (def when absent).
inline std::uint64_t get_u64(const Args& a, const std::string& name, std::uint64_t def) {
  if (!a.has(name)) return def;
  const std::string v = a.get(name, "");
  char* end = nullptr;
  const bool digits = !v.empty() && v.find_first_not_of("0123456789") == std::string::npos;
  errno = 0;
  const unsigned long long r = digits ? std::strtoull(v.c_str(), &end, 10) : 0;
  QLORA_CHECK(digits && errno == 0, "--", name, " expects an unsigned integer, got '", v, "'");
  return std::uint64_t(r);
}

// The tokenizer of a model folder, whichever kind it has.
class AnyTokenizer {
 public:
  // model_vocab: the model's config vocab_size; every id encode() returns is below it.
  static AnyTokenizer open(const std::string& dir, std::int64_t model_vocab) {
    AnyTokenizer t;
    const std::string path = qlora::hf::join(dir, "tokenizer.json");
    if (qlora::hf::file_exists(path)) {
      t.bpe_ = qlora::text::BpeTokenizer::from_file(path);
      QLORA_CHECK(t.bpe_->vocab_size() <= model_vocab, "tokenizer '", path, "' has ", t.bpe_->vocab_size(),
                  " token ids, more than the model's vocab_size ", model_vocab);
      return t;
    }
    QLORA_CHECK(model_vocab >= qlora::text::ByteTokenizer::kVocabSize, "model folder '", dir,
                "' has no tokenizer.json, and its vocab_size ", model_vocab,
                " is too small for raw bytes (256 needed)");
    return t;
  }

  std::vector<std::int64_t> encode(const std::string& text) const {
    const std::vector<std::int32_t> ids = bpe_ ? bpe_->encode(text) : bytes_.encode(text);
    return std::vector<std::int64_t>(ids.begin(), ids.end());
  }

  std::string decode(const std::vector<std::int64_t>& ids) const {
    std::vector<std::int32_t> narrow(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      QLORA_CHECK(ids[i] >= 0 && ids[i] <= INT32_MAX, "decode: token id ", ids[i], " at position ", i,
                  " is not a token id");
      narrow[i] = std::int32_t(ids[i]);
    }
    return bpe_ ? bpe_->decode(narrow) : bytes_.decode(narrow);
  }

  const char* name() const { return bpe_ ? "bpe (tokenizer.json)" : "bytes"; }
  // Raw bytes have no special tokens: every id is a byte of the text.
  std::optional<std::int64_t> bos_id() const { return bpe_ ? widen(bpe_->bos_id()) : std::nullopt; }
  std::optional<std::int64_t> eos_id() const { return bpe_ ? widen(bpe_->eos_id()) : std::nullopt; }

 private:
  static std::optional<std::int64_t> widen(std::optional<std::int32_t> v) {
    return v ? std::optional<std::int64_t>(*v) : std::nullopt;
  }
  std::optional<qlora::text::BpeTokenizer> bpe_;
  qlora::text::ByteTokenizer bytes_;
};

// Token ids (batch, seq) row-major.
struct TokenIds {
  std::int64_t batch = 0, seq = 0;
  std::vector<std::int64_t> ids;
};

// Tensor `ids` of a safetensors file: I64 or I32, shape [batch, seq], every id in [0, vocab).
inline TokenIds read_token_ids(const std::string& path, std::int64_t vocab) {
  using qlora::DType;
  const auto f = qlora::safetensors::File::open(path);
  const std::string where = "ids file '" + path + "'";
  QLORA_CHECK(f.contains("ids"), where, ": no tensor 'ids' (it has ", f.names().size(), " tensors",
              f.names().empty() ? std::string() : ", e.g. '" + f.names()[0] + "'", ")");
  const auto t = f.get("ids");
  QLORA_CHECK(t.dtype == DType::I64 || t.dtype == DType::I32, where, ": tensor 'ids' is ",
              qlora::dtype_name(t.dtype), ", expected I64 or I32");
  QLORA_CHECK(t.shape.size() == 2, where, ": tensor 'ids' has ", t.shape.size(),
              " dimensions, expected 2 [batch, seq]");
  QLORA_CHECK(t.shape[0] > 0 && t.shape[1] > 0, where, ": tensor 'ids' has shape [", t.shape[0], ", ",
              t.shape[1], "], expected at least one token per row and one row");
  TokenIds r{t.shape[0], t.shape[1], {}};
  if (t.dtype == DType::I64) {
    r.ids = t.copy_as<std::int64_t>();
  } else {
    const auto narrow = t.copy_as<std::int32_t>();
    r.ids.assign(narrow.begin(), narrow.end());
  }
  for (std::size_t i = 0; i < r.ids.size(); ++i)
    QLORA_CHECK(r.ids[i] >= 0 && r.ids[i] < vocab, where, ": ids[", std::int64_t(i) / r.seq, ", ",
                std::int64_t(i) % r.seq, "] = ", r.ids[i], " is outside the vocabulary [0, ", vocab, ")");
  return r;
}

}  // namespace cli
