#pragma once
// bitsandbytes' checkpoint layout (what transformers saves for a bnb-quantized model and loads back).
//
// 4-bit weight W = "<module>.weight" (Params4bit with its packed QuantState):
//   W                                       U8  ((n + 1) / 2, 1)  packed codes
//   W.absmax                                F32 (blocks)          without double quant
//                                           U8  (blocks)          with double quant: nested codes
//   W.quant_map                             F32 (16)              the 4-bit code table
//   W.nested_absmax                         F32 (ceil(blocks / 256))   double quant only
//   W.nested_quant_map                      F32 (256)                  double quant only
//   W.quant_state.bitsandbytes__<nf4|fp4>   U8  (len)   UTF-8 JSON: quant_type, blocksize, dtype,
//                                           shape [, nested_blocksize, nested_dtype, nested_offset]
// int8 weight (Int8Params, LLM.int8):
//   W                 I8  (out, in)
//   <module>.SCB      F32 (out)     row absmax
//   <module>.weight_format  U8 ()   0 = "row" (written; optional on read, only "row" accepted)
//
// Reading takes the code tables, the offset and the original dtype from the file rather than
// recomputing them (torch's dynamic map differs by an ulp between versions).
#include <cstdint>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qlora/core/dtype.hpp"
#include "qlora/core/error.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/quant/blockwise4bit.hpp"
#include "qlora/quant/rowwise_int8.hpp"

namespace qlora {
namespace bnb {

using quant::Quant4Type;
using quant::Quantized4bit;
using quant::RowwiseInt8;

inline std::string quant_state_suffix(Quant4Type t) {
  return std::string(".quant_state.bitsandbytes__") + quant::quant4_name(t);
}

// The torch dtype name bitsandbytes records for the original tensor ("bfloat16", ...).
inline std::string torch_dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    default:
      throw_error("bitsandbytes: cannot quantize a ", dtype_name(t), " tensor, expected F32, BF16 or F16");
  }
}

// The quant state JSON exactly as bitsandbytes writes it: Python's json.dumps of the non-tensor
// entries of QuantState.as_dict(), in that order, with ", " and ": " separators.
inline std::string quant_state_json(const Quantized4bit& q) {
  auto num = [](const auto& v) { return nlohmann::json(v).dump(); };
  std::string s = "{\"quant_type\": \"" + std::string(quant::quant4_name(q.type)) +
                  "\", \"blocksize\": " + num(q.blocksize) + ", \"dtype\": \"" + q.dtype + "\", \"shape\": [";
  for (std::size_t i = 0; i < q.shape.size(); ++i) s += (i ? ", " : "") + num(q.shape[i]);
  s += "]";
  if (q.double_quant)
    s += ", \"nested_blocksize\": " + num(q.nested.blocksize) + ", \"nested_dtype\": \"float32\"" +
         ", \"nested_offset\": " + num(double(q.offset));
  return s + "}";
}

// Adds the tensors of one 4-bit weight. The writer references q's memory: keep q alive until
// writer.write().
inline void add_4bit(safetensors::Writer& w, const std::string& weight, const Quantized4bit& q) {
  const std::int64_t blocks = std::int64_t(q.blocks());
  w.add(weight, DType::U8, {std::int64_t(q.packed.size()), 1}, q.packed.data(), q.packed.size());
  if (q.double_quant) {
    w.add(weight + ".absmax", DType::U8, {blocks}, q.nested.codes.data(), q.nested.codes.size());
  } else {
    w.add(weight + ".absmax", DType::F32, {blocks}, q.absmax.data(), q.absmax.size() * 4);
  }
  w.add(weight + ".quant_map", DType::F32, {16}, q.code.data(), 16 * 4);
  if (q.double_quant) {
    w.add(weight + ".nested_absmax", DType::F32, {std::int64_t(q.nested.absmax.size())},
          q.nested.absmax.data(), q.nested.absmax.size() * 4);
    w.add(weight + ".nested_quant_map", DType::F32, {256}, q.nested.code.data(), 256 * 4);
  }
  const std::string js = quant_state_json(q);
  w.add_copy(weight + quant_state_suffix(q.type), DType::U8, {std::int64_t(js.size())}, js.data(), js.size());
}

inline std::string module_of(const std::string& weight) {
  const std::string suffix = ".weight";
  QLORA_CHECK(weight.size() > suffix.size() &&
                  weight.compare(weight.size() - suffix.size(), suffix.size(), suffix) == 0,
              "bitsandbytes: '", weight, "' is not a weight name (expected '<module>.weight')");
  return weight.substr(0, weight.size() - suffix.size());
}

inline void add_int8(safetensors::Writer& w, const std::string& weight, const RowwiseInt8& q) {
  static const std::uint8_t row_format = 0;
  const std::string module = module_of(weight);
  w.add(weight, DType::I8, {q.rows, q.cols}, q.q.data(), q.q.size());
  w.add(module + ".SCB", DType::F32, {q.rows}, q.scb.data(), q.scb.size() * 4);
  w.add(module + ".weight_format", DType::U8, {}, &row_format, 1);
}

// --- reading ---------------------------------------------------------------------------------------
// Source: anything with contains(name) and get(name) -> safetensors::TensorView (a safetensors::File
// or an hf::ModelFolder).

template <class Source>
bool is_4bit(const Source& src, const std::string& weight) {
  return src.contains(weight + quant_state_suffix(Quant4Type::NF4)) ||
         src.contains(weight + quant_state_suffix(Quant4Type::FP4));
}

template <class Source>
bool is_int8(const Source& src, const std::string& weight) {
  return src.contains(weight) && src.get(weight).dtype == DType::I8 &&
         src.contains(module_of(weight) + ".SCB");
}

// True for the auxiliary tensors of a quantized weight (absmax, quant_map, SCB, ...), which are not
// weights of their own.
inline bool is_quant_aux(const std::string& name) {
  for (const char* s :
       {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format"}) {
    const std::string suf = s;
    if (name.size() > suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0) return true;
  }
  return name.find(".quant_state.bitsandbytes__") != std::string::npos;
}

namespace detail {
template <class Source>
safetensors::TensorView expect(const Source& src, const std::string& name, DType dtype,
                               const std::string& what) {
  QLORA_CHECK(src.contains(name), what, ": missing tensor '", name, "'");
  safetensors::TensorView v = src.get(name);
  QLORA_CHECK(v.dtype == dtype, what, ": tensor '", name, "' is ", dtype_name(v.dtype), ", expected ",
              dtype_name(dtype));
  return v;
}
// Fills type, blocksize, dtype, shape and the double-quant scalars of q from the quant state JSON.
inline void parse_quant_state(const std::string& text, Quant4Type type, const std::string& what,
                              Quantized4bit& q) {
  nlohmann::json st;
  try {
    st = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw_error(what, ": quant_state is not valid JSON: ", e.what());
  }
  QLORA_CHECK(st.is_object(), what, ": quant_state is ", st.type_name(), ", expected a JSON object");
  auto field = [&](const char* key) -> const nlohmann::json& {
    QLORA_CHECK(st.contains(key), what, ": quant_state has no \"", key, "\"");
    return st[key];
  };
  try {
    const std::string qt = field("quant_type").get<std::string>();
    QLORA_CHECK(qt == quant::quant4_name(type), what, ": quant_state says quant_type \"", qt,
                "\", its key says ", quant::quant4_name(type));
    q.type = type;
    q.blocksize = field("blocksize").get<int>();
    q.dtype = field("dtype").get<std::string>();
    q.shape = field("shape").get<std::vector<std::int64_t>>();
    q.double_quant = st.contains("nested_offset");
    if (q.double_quant) {
      q.offset = field("nested_offset").get<float>();
      q.nested.blocksize = field("nested_blocksize").get<int>();
      QLORA_CHECK(q.nested.blocksize > 0, what, ": nested_blocksize is ", q.nested.blocksize);
    }
  } catch (const nlohmann::json::exception& e) {
    throw_error(what, ": quant_state field of the wrong type: ", e.what());
  }
}
}  // namespace detail

template <class Source>
Quantized4bit read_4bit(const Source& src, const std::string& weight) {
  const std::string what = "bitsandbytes 4-bit weight '" + weight + "'";
  Quantized4bit q;
  const bool nf4 = src.contains(weight + quant_state_suffix(Quant4Type::NF4));
  const Quant4Type type = nf4 ? Quant4Type::NF4 : Quant4Type::FP4;
  const auto state_view = detail::expect(src, weight + quant_state_suffix(type), DType::U8, what);
  const std::string text(reinterpret_cast<const char*>(state_view.data), state_view.nbytes);
  detail::parse_quant_state(text, type, what, q);
  quant::check_blocksize4(q.blocksize);

  const auto packed = detail::expect(src, weight, DType::U8, what);
  q.packed = packed.template copy_as<std::uint8_t>();
  const auto qmap = detail::expect(src, weight + ".quant_map", DType::F32, what);
  QLORA_CHECK(qmap.numel() == 16, what, ": quant_map has ", qmap.numel(), " values, expected 16");
  std::memcpy(q.code.data(), qmap.data, 64);
  if (q.double_quant) {
    q.nested.codes =
        detail::expect(src, weight + ".absmax", DType::U8, what).template copy_as<std::uint8_t>();
    q.nested.absmax =
        detail::expect(src, weight + ".nested_absmax", DType::F32, what).template copy_as<float>();
    const auto nmap = detail::expect(src, weight + ".nested_quant_map", DType::F32, what);
    QLORA_CHECK(nmap.numel() == 256, what, ": nested_quant_map has ", nmap.numel(), " values, expected 256");
    std::memcpy(q.nested.code.data(), nmap.data, 256 * 4);
  } else {
    q.absmax = detail::expect(src, weight + ".absmax", DType::F32, what).template copy_as<float>();
  }
  quant::validate(q, what);
  return q;
}

template <class Source>
RowwiseInt8 read_int8(const Source& src, const std::string& weight) {
  const std::string what = "bitsandbytes int8 weight '" + weight + "'";
  const std::string module = module_of(weight);
  const auto w = detail::expect(src, weight, DType::I8, what);
  QLORA_CHECK(w.shape.size() == 2, what, ": has ", w.shape.size(), " dimensions, expected 2");
  const auto scb = detail::expect(src, module + ".SCB", DType::F32, what);
  QLORA_CHECK(scb.numel() == w.shape[0], what, ": SCB has ", scb.numel(), " values, expected ", w.shape[0],
              " (one per row)");
  if (src.contains(module + ".weight_format")) {
    const auto fmt = src.get(module + ".weight_format");
    QLORA_CHECK(fmt.nbytes >= 1 && fmt.data[0] == 0, what, ": weight_format is ",
                int(fmt.nbytes ? fmt.data[0] : -1),
                ", expected 0 (\"row\"); other layouts are not supported");
  }
  RowwiseInt8 q;
  q.rows = w.shape[0];
  q.cols = w.shape[1];
  q.q = w.template copy_as<std::int8_t>();
  q.scb = scb.template copy_as<float>();
  return q;
}

// The "quantization_config" that transformers writes into config.json for a bitsandbytes model.
// skip_modules: modules left unquantized (null when empty: transformers then skips lm_head itself).
inline nlohmann::json quantization_config(bool four_bit, Quant4Type type, bool double_quant,
                                          const std::string& compute_dtype,
                                          const std::vector<std::string>& skip_modules) {
  nlohmann::json c;
  c["_load_in_4bit"] = four_bit;
  c["_load_in_8bit"] = !four_bit;
  c["bnb_4bit_compute_dtype"] = compute_dtype;
  c["bnb_4bit_quant_storage"] = "uint8";
  c["bnb_4bit_quant_type"] = four_bit ? quant::quant4_name(type) : "fp4";
  c["bnb_4bit_use_double_quant"] = four_bit && double_quant;
  c["llm_int8_enable_fp32_cpu_offload"] = false;
  c["llm_int8_has_fp16_weight"] = false;
  c["llm_int8_skip_modules"] = skip_modules.empty() ? nlohmann::json(nullptr) : nlohmann::json(skip_modules);
  c["llm_int8_threshold"] = 6.0;
  c["load_in_4bit"] = four_bit;
  c["load_in_8bit"] = !four_bit;
  c["quant_method"] = "bitsandbytes";
  return c;
}

}  // namespace bnb
}  // namespace qlora
