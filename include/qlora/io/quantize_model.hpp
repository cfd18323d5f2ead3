#pragma once
// Quantizing a checkpoint on disk: a .safetensors file or a Hugging Face model folder in, the same
// in bitsandbytes' layout out (what `qlora quantize` runs).
//
// Selection: by default the 2-D floating tensors whose name ends in ".weight", except embeddings,
// lm_head and norms, i.e. exactly the nn.Linear weights transformers turns into Linear4bit /
// Linear8bitLt when it loads the result. --include replaces the name rule; --exclude removes
// matches; a selected tensor must still be 2-D and floating. A folder's config.json gains the
// quantization_config transformers writes, listing in llm_int8_skip_modules any linear-looking weight
// left out, so transformers does not try to quantize it on load.
//
// Unselected tensors are written unchanged, straight from the memory-mapped input. The output is
// written atomically: a file through AtomicFile, a folder built beside the target and renamed in.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/io/atomic_dir.hpp"
#include "qlora/io/atomic_file.hpp"
#include "qlora/io/bnb_checkpoint.hpp"
#include "qlora/io/hf_model.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/quant/blockwise4bit.hpp"
#include "qlora/quant/rowwise_int8.hpp"

namespace qlora {
namespace checkpoint {

enum class Format { NF4, FP4, Int8 };

inline Format parse_format(const std::string& s) {
  if (s == "nf4") return Format::NF4;
  if (s == "fp4") return Format::FP4;
  if (s == "int8") return Format::Int8;
  throw_error("--type must be nf4, fp4 or int8, got '", s, "'");
}
inline const char* format_name(Format f) {
  return f == Format::NF4 ? "nf4" : f == Format::FP4 ? "fp4" : "int8";
}

struct QuantizeOptions {
  Format format = Format::NF4;
  int blocksize = 64;
  bool double_quant = true;
  std::string include;  // regex (std::regex_search on the tensor name); empty: the default rule
  std::string exclude;  // regex; empty: nothing excluded beyond the default rule
};

struct TensorReport {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  bool quantized = false;
  std::size_t bytes_before = 0, bytes_after = 0;
  double rmse = 0, max_abs_err = 0;  // of the dequantized weight against the input, quantized only
};

struct QuantizeReport {
  std::vector<TensorReport> tensors;
  std::size_t bytes_before = 0, bytes_after = 0;
  std::vector<std::string> skipped_linear;  // linear-looking weights left unquantized
};

// progress(done, total, name): called before each tensor is processed.
using Progress = std::function<void(std::size_t, std::size_t, const std::string&)>;

inline bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// The default name rule (without the shape/dtype condition).
inline bool default_name_rule(const std::string& name) {
  if (!ends_with(name, ".weight")) return false;
  for (const char* no : {"embed", "lm_head", "norm", "wte", "wpe"})
    if (name.find(no) != std::string::npos) return false;
  return true;
}

namespace detail {

inline std::regex compile(const std::string& re, const char* flag) {
  try {
    return std::regex(re, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw_error(flag, " '", re, "' is not a valid regular expression: ", e.what());
  }
}

// Everything a tensor source (File or ModelFolder) needs to offer here.
template <class Source>
QuantizeReport quantize_tensors(const Source& src, const std::vector<std::string>& names,
                                const QuantizeOptions& opt, safetensors::Writer& w,
                                std::vector<std::shared_ptr<void>>& keep, const Progress& progress) {
  const bool has_inc = !opt.include.empty(), has_exc = !opt.exclude.empty();
  const std::regex inc = has_inc ? compile(opt.include, "--include") : std::regex();
  const std::regex exc = has_exc ? compile(opt.exclude, "--exclude") : std::regex();
  QuantizeReport rep;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const std::string& name = names[i];
    if (progress) progress(i, names.size(), name);
    QLORA_CHECK(!bnb::is_4bit(src, name) && !bnb::is_int8(src, name) && !bnb::is_quant_aux(name), "tensor '",
                name, "' is already bitsandbytes-quantized; quantize the original checkpoint");
    const safetensors::TensorView v = src.get(name);
    TensorReport t;
    t.name = name;
    t.dtype = v.dtype;
    t.shape = v.shape;
    t.bytes_before = v.nbytes;
    const bool floating = v.dtype == DType::F32 || v.dtype == DType::BF16 || v.dtype == DType::F16;
    const bool named = has_inc ? std::regex_search(name, inc) : default_name_rule(name);
    const bool excluded = has_exc && std::regex_search(name, exc);
    t.quantized = floating && v.shape.size() == 2 && named && !excluded;
    if (!t.quantized && floating && v.shape.size() == 2 && default_name_rule(name))
      rep.skipped_linear.push_back(name);
    if (!t.quantized) {
      w.add(name, v.dtype, v.shape, v.data, v.nbytes);  // straight from the input mapping
      t.bytes_after = v.nbytes;
    } else {
      const std::vector<float> x = v.to_f32();
      std::vector<float> back(x.size());
      if (opt.format == Format::Int8) {
        auto q = std::make_shared<quant::RowwiseInt8>(
            quant::quantize_rowwise_int8(x.data(), v.shape[0], v.shape[1], name));
        quant::dequantize(*q, back.data());
        bnb::add_int8(w, name, *q);
        t.bytes_after = q->q.size() + q->scb.size() * 4 + 1;
        keep.push_back(q);
      } else {
        const quant::Quant4Config cfg{
            opt.format == Format::NF4 ? quant::Quant4Type::NF4 : quant::Quant4Type::FP4, opt.blocksize,
            opt.double_quant};
        auto q = std::make_shared<quant::Quantized4bit>(quant::quantize_4bit(x.data(), v.shape, cfg, name));
        q->dtype = bnb::torch_dtype_name(v.dtype);
        quant::dequantize(*q, back.data());
        bnb::add_4bit(w, name, *q);
        t.bytes_after = q->packed.size() + 64 + bnb::quant_state_json(*q).size() +
                        (q->double_quant ? q->nested.codes.size() + q->nested.absmax.size() * 4 + 1024
                                         : q->absmax.size() * 4);
        keep.push_back(q);
      }
      double se = 0, mx = 0;
      for (std::size_t k = 0; k < x.size(); ++k) {
        const double d = double(back[k]) - double(x[k]);
        se += d * d;
        mx = std::max(mx, std::fabs(d));
      }
      t.rmse = x.empty() ? 0.0 : std::sqrt(se / double(x.size()));
      t.max_abs_err = mx;
    }
    rep.bytes_before += t.bytes_before;
    rep.bytes_after += t.bytes_after;
    rep.tensors.push_back(std::move(t));
  }
  if (progress) progress(names.size(), names.size(), "");
  return rep;
}

inline std::string config_dtype(const nlohmann::json& cfg) {
  for (const char* k : {"torch_dtype", "dtype"})
    if (cfg.contains(k) && cfg[k].is_string()) return cfg[k].get<std::string>();
  return "float32";
}

// The modules to keep unquantized in transformers: those we skipped, plus lm_head (which
// transformers skips by default but no longer does once the list is given).
inline std::vector<std::string> skip_modules(const QuantizeReport& rep) {
  std::vector<std::string> out;
  for (const std::string& n : rep.skipped_linear) out.push_back(bnb::module_of(n));
  if (!out.empty()) out.push_back("lm_head");
  return out;
}

}  // namespace detail

// in: a .safetensors file or a model folder; out: the same kind. Returns what was done per tensor.
inline QuantizeReport quantize_model(const std::string& in, const std::string& out,
                                     const QuantizeOptions& opt, const Progress& progress = {}) {
  if (opt.format != Format::Int8) quant::check_blocksize4(opt.blocksize);
  std::vector<std::shared_ptr<void>> keep;  // quantized tensors referenced by the writer
  safetensors::Writer w;
  w.set_metadata("format", "pt");  // transformers refuses safetensors files without it
  if (!hf::is_directory(in)) {
    QLORA_CHECK(hf::file_exists(in), "input '", in, "' does not exist");
    QLORA_CHECK(!hf::is_directory(out), "input '", in, "' is a file, so the output must be a file, but '",
                out, "' is a folder");
    const safetensors::File f = safetensors::File::open(in);
    for (const auto& kv : f.metadata())
      if (kv.first != "format") w.set_metadata(kv.first, kv.second);
    QuantizeReport rep = detail::quantize_tensors(f, f.names(), opt, w, keep, progress);
    w.write(out);
    return rep;
  }

  const hf::ModelFolder m = hf::ModelFolder::open(in);
  QLORA_CHECK(!m.config().contains("quantization_config"), "model folder '", in,
              "' is already quantized (config.json has a quantization_config)");
  QuantizeReport rep = detail::quantize_tensors(m, m.names(), opt, w, keep, progress);
  nlohmann::json cfg = m.config();
  const bool four = opt.format != Format::Int8;
  cfg["quantization_config"] = bnb::quantization_config(
      four, opt.format == Format::FP4 ? quant::Quant4Type::FP4 : quant::Quant4Type::NF4, opt.double_quant,
      detail::config_dtype(cfg), detail::skip_modules(rep));
  AtomicDir dir(out);
  w.write(hf::join(dir.path(), hf::kSingleWeights));
  write_text_atomic(hf::join(dir.path(), "config.json"), cfg.dump(2) + "\n");
  for (const std::string& f : m.other_files()) copy_file_atomic(hf::join(in, f), hf::join(dir.path(), f));
  dir.commit();
  return rep;
}

}  // namespace checkpoint
}  // namespace qlora
