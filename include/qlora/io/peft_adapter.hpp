#pragma once
// PEFT LoRA adapters on disk: a folder with adapter_config.json and adapter_model.safetensors, as
// PeftModel.save_pretrained writes it and PeftModel.from_pretrained reads it (PEFT 0.21).
//
// Conventions (each checked against PEFT's own output in tests/test_peft_adapter.cpp)
// - Module names are those of the base model's named_modules() ("model.layers.0.self_attn.q_proj").
//   Tensors are "base_model.model.<module>.lora_A.weight" (r, in) and ".lora_B.weight" (out, r);
//   PEFT strips the adapter name "default" when saving, and ".lora_A.default.weight" (an unstripped
//   state dict) is read too.
// - A module's output is x W0ᵀ + b + scaling · (x Aᵀ) Bᵀ, scaling = alpha / r, or alpha / sqrt(r)
//   with use_rslora. r and alpha come from rank_pattern / alpha_pattern when a key matches.
// - Pattern keys are regular expressions tried in the order of the JSON object, first match wins
//   (PEFT's get_pattern_key: re.match(rf"(.*\.)?({key})$", name)). PEFT writes the config with
//   sort_keys=True, so after a reload the order is the sorted one even when the live model used
//   another; save_adapter therefore writes sorted keys and checks every module against that order.
// - Regular expressions run as std::regex ECMAScript. Python-only syntax ((?P<name>...), \Z,
//   look-behind) is a qlora::Error when the config is read, never a silent mismatch.
// - Everything this library cannot apply faithfully is an error, never ignored: DoRA, fan_in_fan_out,
//   layers_to_transform, initializations that rewrite the base weights, unknown keys, extra tensors.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "qlora/core/dtype.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/io/atomic_dir.hpp"
#include "qlora/io/atomic_file.hpp"
#include "qlora/io/hf_model.hpp"
#include "qlora/io/safetensors.hpp"

namespace qlora {
namespace peft {

// The PEFT release whose adapter_config.json key set and defaults this file follows; written as
// "peft_version" by save_adapter.
inline constexpr const char* kPeftVersion = "0.21.0";
inline constexpr const char* kConfigFile = "adapter_config.json";
inline constexpr const char* kWeightsFile = "adapter_model.safetensors";
// What PeftModel puts in front of a base-model module name in the saved state dict.
inline constexpr const char* kPrefix = "base_model.model.";

// target_modules / exclude_modules: null, a list of names, or one regular expression (a JSON string).
struct ModuleSet {
  enum class Kind { None, List, Regex };
  Kind kind = Kind::None;
  std::vector<std::string> names;  // Kind::List, in file order
  std::string regex;               // Kind::Regex; "all-linear" (any case) is PEFT's shorthand

  static ModuleSet list(std::vector<std::string> n) { return {Kind::List, std::move(n), {}}; }
  static ModuleSet pattern(std::string r) { return {Kind::Regex, {}, std::move(r)}; }
  bool is_all_linear() const {
    std::string lower = regex;
    for (char& c : lower) c = char(std::tolower(static_cast<unsigned char>(c)));
    return kind == Kind::Regex && lower == "all-linear";
  }
  bool operator==(const ModuleSet& o) const { return kind == o.kind && names == o.names && regex == o.regex; }
};

// adapter_config.json of a LoRA adapter. Defaults are PEFT's.
struct LoraConfig {
  std::string peft_type = "LORA";
  std::optional<std::string> task_type;  // null, or one of PEFT's TaskType values
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> revision;
  std::string peft_version = kPeftVersion;
  bool inference_mode = false;
  int r = 8;
  double lora_alpha = 8;
  double lora_dropout = 0.0;  // training only: a saved adapter applies no dropout
  ModuleSet target_modules;
  ModuleSet exclude_modules;
  std::string bias = "none";  // "none" | "all" | "lora_only"
  bool use_rslora = false;
  // Key (regular expression) -> value, in file order: the order decides when several keys match.
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  nlohmann::json init_lora_weights = true;   // true, false, "gaussian", "eva" or "orthogonal"
  bool fan_in_fan_out = false;               // only false is supported
  std::vector<std::string> modules_to_save;  // only null / empty is supported
  // The keys PEFT writes that change nothing in a trained adapter (auto_mapping, megatron_core,
  // qalora_group_size, eva_config, ...), as read, so that a save writes them back.
  nlohmann::ordered_json inert = nlohmann::ordered_json::object();
};

namespace detail {

enum class KeyKind {
  Field,        // a LoraConfig member
  Inert,        // accepted with any value, kept in LoraConfig::inert
  DefaultOnly,  // a feature qlora does not implement: accepted only at its default value
};

struct KeyRule {
  const char* key;
  KeyKind kind;
  const char* default_json;  // PEFT's default, as json.dumps writes it
  const char* why;           // DefaultOnly: what the feature is; Inert: why it may be ignored
};

// Every key of PEFT 0.21's LoraConfig.to_dict(), sorted as save_pretrained writes them.
inline const std::vector<KeyRule>& key_rules() {
  static const std::vector<KeyRule> rules = {
      {"alora_invocation_tokens", KeyKind::DefaultOnly, "null", "activated LoRA (aLoRA)"},
      {"alpha_pattern", KeyKind::Field, "{}", ""},
      {"arrow_config", KeyKind::DefaultOnly, "null", "Arrow routing between adapters"},
      {"auto_mapping", KeyKind::Inert, "null", "names the base model class"},
      {"base_model_name_or_path", KeyKind::Field, "null", ""},
      {"bias", KeyKind::Field, "\"none\"", ""},
      {"corda_config", KeyKind::Inert, "null", "used only by init_lora_weights \"corda\", refused there"},
      {"ensure_weight_tying", KeyKind::Inert, "false", "ties adapters of tied embeddings, none here"},
      {"eva_config", KeyKind::Inert, "null", "EVA only initializes A"},
      {"exclude_modules", KeyKind::Field, "null", ""},
      {"fan_in_fan_out", KeyKind::DefaultOnly, "false", "fan_in_fan_out (Conv1D weights stored (in, out))"},
      {"inference_mode", KeyKind::Field, "false", ""},
      {"init_lora_weights", KeyKind::Field, "true", ""},
      {"kasa_config", KeyKind::DefaultOnly, "null", "KaSA (a singular-value diagonal between A and B)"},
      {"layer_replication", KeyKind::DefaultOnly, "null", "layer_replication (duplicated decoder layers)"},
      {"layers_pattern", KeyKind::Inert, "null", "used only with layers_to_transform, refused there"},
      {"layers_to_transform", KeyKind::DefaultOnly, "null", "layers_to_transform (LoRA on some layers only)"},
      {"loftq_config", KeyKind::Inert, "{}", "used only by init_lora_weights \"loftq\", refused there"},
      {"lora_alpha", KeyKind::Field, "8", ""},
      {"lora_bias", KeyKind::DefaultOnly, "false", "lora_bias (a bias on lora_B)"},
      {"lora_dropout", KeyKind::Field, "0.0", ""},
      {"lora_ga_config", KeyKind::Inert, "null", "used only by init_lora_weights \"lora_ga\", refused there"},
      {"megatron_config", KeyKind::DefaultOnly, "null", "Megatron tensor-parallel layers"},
      {"megatron_core", KeyKind::Inert, "\"megatron.core\"", "used only with megatron_config"},
      {"modules_to_save", KeyKind::DefaultOnly, "null", "modules_to_save (full copies of modules)"},
      {"monteclora_config", KeyKind::DefaultOnly, "null", "MonteCLoRA (sampled adapters)"},
      {"peft_type", KeyKind::Field, "\"LORA\"", ""},
      {"peft_version", KeyKind::Field, "null", ""},
      {"qalora_group_size", KeyKind::Inert, "16", "used only with use_qalora"},
      {"r", KeyKind::Field, "8", ""},
      {"rank_pattern", KeyKind::Field, "{}", ""},
      {"revision", KeyKind::Field, "null", ""},
      {"target_modules", KeyKind::Field, "null", ""},
      {"target_parameters", KeyKind::DefaultOnly, "null", "target_parameters (LoRA on bare parameters)"},
      {"task_type", KeyKind::Field, "null", ""},
      {"trainable_token_indices", KeyKind::DefaultOnly, "null",
       "trainable_token_indices (trained embedding rows)"},
      {"use_bdlora", KeyKind::DefaultOnly, "null", "BD-LoRA (block-diagonal A or B)"},
      {"use_dora", KeyKind::DefaultOnly, "false", "DoRA (a magnitude vector per module)"},
      {"use_qalora", KeyKind::DefaultOnly, "false", "QA-LoRA (pooled inputs to A)"},
      {"use_rslora", KeyKind::Field, "false", ""},
      {"velora_config", KeyKind::DefaultOnly, "null", "VeLoRA (a compressed backward pass)"},
  };
  return rules;
}

inline const KeyRule* find_rule(const std::string& key) {
  for (const KeyRule& k : key_rules())
    if (key == k.key) return &k;
  return nullptr;
}

// A default-valued feature may also be written as an empty container (PEFT treats [] and {} as unset).
inline bool is_default(const nlohmann::ordered_json& v, const KeyRule& rule) {
  if (v == nlohmann::ordered_json::parse(rule.default_json)) return true;
  if (std::string(rule.default_json) == "null") return (v.is_array() || v.is_object()) && v.empty();
  return false;
}

inline std::regex compile(const std::string& pattern, const std::string& what) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw_error(what, " '", pattern,
                "' is not a regular expression std::regex (ECMAScript) accepts: ", e.what());
  }
}

// PEFT's get_pattern_key: re.match(rf"(.*\.)?({key})$", name), i.e. the key matches the whole name or
// a suffix of it that starts after a '.'.
inline bool pattern_matches(const std::string& key, const std::string& module) {
  return std::regex_match(module, compile("(.*\\.)?(" + key + ")", "pattern key"));
}

inline std::string type_of(const nlohmann::ordered_json& v) { return v.type_name(); }

// Integral doubles as JSON integers, as PEFT's int defaults are written (lora_alpha 16, not 16.0).
inline nlohmann::json number(double v) {
  if (std::floor(v) == v && std::fabs(v) < 9.0e15) return nlohmann::json(std::int64_t(v));
  return nlohmann::json(v);
}

}  // namespace detail

// ---- resolution per module, as PEFT's LoraModel._create_and_replace does it ----------------------

inline int rank_for(const LoraConfig& c, const std::string& module) {
  for (const auto& [key, r] : c.rank_pattern)
    if (detail::pattern_matches(key, module)) return r;
  return c.r;
}

inline float alpha_for(const LoraConfig& c, const std::string& module) {
  for (const auto& [key, a] : c.alpha_pattern)
    if (detail::pattern_matches(key, module)) return float(a);
  return float(c.lora_alpha);
}

// alpha / r, or alpha / sqrt(r) with use_rslora; computed in double as Python does, then rounded.
inline float scaling(const LoraConfig& c, const std::string& module) {
  const double alpha = double(alpha_for(c, module)), r = rank_for(c, module);
  return float(c.use_rslora ? alpha / std::sqrt(r) : alpha / r);
}

// PEFT's check_target_module_exists for a module name of the base model:
// - exclude_modules first: a regex that fully matches, or a list entry equal to the name or to a
//   suffix of it after a '.';
// - target_modules as a list: an entry equals the name or a '.'-suffix of it ("q_proj" targets
//   "model.layers.0.self_attn.q_proj", "self_attn.q_proj" too, "proj" does not);
// - target_modules as a string: re.fullmatch of the whole name ("q_proj" alone matches nothing);
// - "all-linear": PEFT expands it, at injection, to every nn.Linear of the model except the output
//   embedding (lm_head for causal LMs; for a model that is not a transformers PreTrainedModel nothing
//   is excluded). Here the caller asks only about linear modules, and output_layer names the one to
//   leave out (empty: none).
inline bool targets(const LoraConfig& c, const std::string& module,
                    const std::string& output_layer = "lm_head") {
  auto in_list = [&](const std::vector<std::string>& names) {
    for (const std::string& n : names) {
      if (module == n) return true;
      if (module.size() > n.size() && module.compare(module.size() - n.size(), n.size(), n) == 0 &&
          module[module.size() - n.size() - 1] == '.')
        return true;
    }
    return false;
  };
  const ModuleSet& ex = c.exclude_modules;
  if (ex.kind == ModuleSet::Kind::Regex &&
      std::regex_match(module, detail::compile(ex.regex, "exclude_modules")))
    return false;
  if (ex.kind == ModuleSet::Kind::List && in_list(ex.names)) return false;
  const ModuleSet& t = c.target_modules;
  switch (t.kind) {
    case ModuleSet::Kind::None: return false;
    case ModuleSet::Kind::List: return in_list(t.names);
    case ModuleSet::Kind::Regex:
      if (t.is_all_linear()) return module != output_layer;
      return std::regex_match(module, detail::compile(t.regex, "target_modules"));
  }
  return false;
}

// ---- adapter_config.json ---------------------------------------------------------------------------

namespace detail {

inline ModuleSet parse_module_set(const nlohmann::ordered_json& v, const std::string& key,
                                  const std::string& where) {
  if (v.is_null()) return {};
  if (v.is_string()) {
    ModuleSet s = ModuleSet::pattern(v.get<std::string>());
    if (!s.is_all_linear()) compile(s.regex, where + ": " + key);
    return s;
  }
  QLORA_CHECK(v.is_array(), where, ": ", key, " is ", type_of(v),
              ", expected null, a list of names or a string");
  ModuleSet s;
  s.kind = ModuleSet::Kind::List;
  for (const auto& e : v) {
    QLORA_CHECK(e.is_string(), where, ": ", key, " holds ", e.dump(), " (", type_of(e),
                "), expected module names");
    s.names.push_back(e.get<std::string>());
  }
  return s;
}

inline std::optional<std::string> opt_string(const nlohmann::ordered_json& v, const std::string& key,
                                             const std::string& where) {
  if (v.is_null()) return std::nullopt;
  QLORA_CHECK(v.is_string(), where, ": ", key, " is ", v.dump(), " (", type_of(v),
              "), expected a string or null");
  return v.get<std::string>();
}

inline bool get_bool(const nlohmann::ordered_json& v, const std::string& key, const std::string& where) {
  QLORA_CHECK(v.is_boolean(), where, ": ", key, " is ", v.dump(), " (", type_of(v),
              "), expected true or false");
  return v.get<bool>();
}

inline double get_number(const nlohmann::ordered_json& v, const std::string& key, const std::string& where) {
  QLORA_CHECK(v.is_number(), where, ": ", key, " is ", v.dump(), " (", type_of(v), "), expected a number");
  return v.get<double>();
}

inline int get_rank(const nlohmann::ordered_json& v, const std::string& key, const std::string& where) {
  QLORA_CHECK(v.is_number_integer() && v.get<std::int64_t>() > 0 && v.get<std::int64_t>() <= (1 << 30), where,
              ": ", key, " is ", v.dump(), ", expected a positive integer");
  return int(v.get<std::int64_t>());
}

// init_lora_weights only decides how A and B start, except for the methods that also rewrite the
// base weights (the adapter then belongs to a modified base model) or that are LoRA variants.
inline void check_init(const nlohmann::ordered_json& v, const std::string& where) {
  if (v.is_boolean()) return;
  QLORA_CHECK(v.is_string(), where, ": init_lora_weights is ", v.dump(),
              ", expected true, false or a string");
  const std::string s = v.get<std::string>();
  if (s == "gaussian" || s == "eva" || s == "orthogonal") return;
  std::string lower = s;
  for (char& ch : lower) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  for (const char* p : {"pissa", "corda", "olora", "loftq", "lora_ga"})
    if (lower.rfind(p, 0) == 0)
      throw_error(where, ": init_lora_weights \"", s,
                  "\" is not supported: it rewrites the base weights, so the adapter does not apply to the "
                  "original model (convert it to a plain LoRA adapter with PEFT first)");
  if (lower == "mica") throw_error(where, ": init_lora_weights \"mica\" (a LoRA variant) is not supported");
  throw_error(where, ": unknown init_lora_weights \"", s,
              "\", expected true, false, \"gaussian\", \"eva\" or ", "\"orthogonal\"");
}

}  // namespace detail

// Reads and validates one config object (the contents of adapter_config.json); `where` names it in errors.
inline LoraConfig parse_config(const nlohmann::ordered_json& j, const std::string& where) {
  using detail::KeyKind;
  QLORA_CHECK(j.is_object(), where, ": expected a JSON object, got ", j.type_name());
  // peft_type first: an IA3 or LoHa config is "not LoRA", not "has unknown keys".
  QLORA_CHECK(j.contains("peft_type"), where, ": no peft_type, expected \"LORA\"");
  QLORA_CHECK(j["peft_type"] == "LORA", where, ": peft_type is ", j["peft_type"].dump(),
              ", expected \"LORA\" (only LoRA adapters are supported)");
  LoraConfig c;
  c.peft_version = "";  // a file without the key came from PEFT < 0.18
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const auto& v = it.value();
    const detail::KeyRule* rule = detail::find_rule(key);
    QLORA_CHECK(rule, where, ": unknown key '", key, "' (not written by PEFT ", kPeftVersion,
                "; a newer PEFT feature this library does not know)");
    if (rule->kind == KeyKind::Inert) {
      c.inert[key] = v;
      continue;
    }
    if (rule->kind == KeyKind::DefaultOnly) {
      QLORA_CHECK(detail::is_default(v, *rule), where, ": ", key, " = ", v.dump(),
                  " is not supported: ", rule->why, " is not implemented (only ", rule->default_json, ")");
      continue;
    }
    if (key == "peft_type") {
      c.peft_type = "LORA";
    } else if (key == "task_type") {
      c.task_type = detail::opt_string(v, key, where);
      static const char* const kTasks[] = {"SEQ_CLS",   "SEQ_2_SEQ_LM", "CAUSAL_LM",
                                           "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"};
      QLORA_CHECK(!c.task_type || std::count(std::begin(kTasks), std::end(kTasks), *c.task_type), where,
                  ": task_type \"", *c.task_type, "\" is not one of PEFT's task types");
    } else if (key == "base_model_name_or_path") {
      c.base_model_name_or_path = detail::opt_string(v, key, where);
    } else if (key == "revision") {
      c.revision = detail::opt_string(v, key, where);
    } else if (key == "peft_version") {
      c.peft_version = detail::opt_string(v, key, where).value_or("");
    } else if (key == "inference_mode") {
      c.inference_mode = detail::get_bool(v, key, where);
    } else if (key == "r") {
      c.r = detail::get_rank(v, key, where);
    } else if (key == "lora_alpha") {
      c.lora_alpha = detail::get_number(v, key, where);
    } else if (key == "lora_dropout") {
      c.lora_dropout = detail::get_number(v, key, where);
      QLORA_CHECK(c.lora_dropout >= 0 && c.lora_dropout < 1, where, ": lora_dropout is ", c.lora_dropout,
                  ", expected a probability in [0, 1)");
    } else if (key == "target_modules") {
      c.target_modules = detail::parse_module_set(v, key, where);
    } else if (key == "exclude_modules") {
      c.exclude_modules = detail::parse_module_set(v, key, where);
    } else if (key == "bias") {
      QLORA_CHECK(v == "none" || v == "all" || v == "lora_only", where, ": bias is ", v.dump(),
                  ", expected \"none\", \"all\" or \"lora_only\"");
      c.bias = v.get<std::string>();
    } else if (key == "use_rslora") {
      c.use_rslora = detail::get_bool(v, key, where);
    } else if (key == "rank_pattern" || key == "alpha_pattern") {
      QLORA_CHECK(v.is_object(), where, ": ", key, " is ", detail::type_of(v), ", expected an object");
      for (auto p = v.begin(); p != v.end(); ++p) {
        try {
          std::regex("(.*\\.)?(" + p.key() + ")", std::regex::ECMAScript);
        } catch (const std::regex_error& e) {
          throw_error(where, ": ", key, " key '", p.key(),
                      "' is not a regular expression std::regex (ECMAScript) ", "accepts: ", e.what());
        }
        if (key == "rank_pattern")
          c.rank_pattern.emplace_back(p.key(),
                                      detail::get_rank(p.value(), key + "[\"" + p.key() + "\"]", where));
        else
          c.alpha_pattern.emplace_back(p.key(),
                                       detail::get_number(p.value(), key + "[\"" + p.key() + "\"]", where));
      }
    } else if (key == "init_lora_weights") {
      detail::check_init(v, where);
      c.init_lora_weights = v;
    }
  }
  // PEFT fills a null target_modules from its table of model types when the model is loaded; which
  // modules that picks depends on the model, not on the file.
  QLORA_CHECK(c.target_modules.kind != ModuleSet::Kind::None, where,
              ": target_modules is null (PEFT then picks modules by model type): not supported, name them");
  return c;
}

inline LoraConfig read_config(const std::string& dir) {
  const std::string path = hf::join(dir, kConfigFile);
  QLORA_CHECK(hf::file_exists(path), "PEFT adapter '", dir, "': no ", kConfigFile);
  std::ifstream in(path);
  QLORA_CHECK(in, "cannot open '", path, "'");
  std::stringstream text;
  text << in.rdbuf();
  // ordered_json keeps the file's key order, which decides between matching pattern keys.
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(text.str());
  } catch (const nlohmann::json::exception& e) {
    throw_error("'", path, "' is not valid JSON: ", e.what());
  }
  return parse_config(j, "'" + path + "'");
}

// The config as PEFT 0.21's save_pretrained writes it: every key of LoraConfig.to_dict(), sorted,
// indented by 2, no trailing newline. Pattern keys come out sorted, as PEFT writes them too.
inline std::string config_json(const LoraConfig& c) {
  using detail::KeyKind;
  nlohmann::json j = nlohmann::json::object();  // std::map: sorted keys, at every level
  for (const detail::KeyRule& rule : detail::key_rules()) {
    const std::string key = rule.key;
    if (rule.kind == KeyKind::DefaultOnly) {
      j[key] = nlohmann::json::parse(rule.default_json);
    } else if (rule.kind == KeyKind::Inert) {
      j[key] = c.inert.contains(key) ? nlohmann::json::parse(c.inert[key].dump())
                                     : nlohmann::json::parse(rule.default_json);
    }
  }
  auto opt = [](const std::optional<std::string>& s) { return s ? nlohmann::json(*s) : nlohmann::json(); };
  auto set = [](const ModuleSet& s) {
    if (s.kind == ModuleSet::Kind::List) return nlohmann::json(s.names);
    if (s.kind == ModuleSet::Kind::Regex) return nlohmann::json(s.regex);
    return nlohmann::json();
  };
  j["peft_type"] = c.peft_type;
  j["task_type"] = opt(c.task_type);
  j["base_model_name_or_path"] = opt(c.base_model_name_or_path);
  j["revision"] = opt(c.revision);
  j["peft_version"] = kPeftVersion;  // the format written is that of this PEFT release
  j["inference_mode"] = c.inference_mode;
  j["r"] = c.r;
  j["lora_alpha"] = detail::number(c.lora_alpha);
  j["lora_dropout"] = c.lora_dropout;
  j["target_modules"] = set(c.target_modules);
  j["exclude_modules"] = set(c.exclude_modules);
  j["bias"] = c.bias;
  j["use_rslora"] = c.use_rslora;
  j["rank_pattern"] = nlohmann::json::object();
  for (const auto& [k, v] : c.rank_pattern) j["rank_pattern"][k] = v;
  j["alpha_pattern"] = nlohmann::json::object();
  for (const auto& [k, v] : c.alpha_pattern) j["alpha_pattern"][k] = detail::number(v);
  j["init_lora_weights"] = nlohmann::json::parse(c.init_lora_weights.dump());
  return j.dump(2);
}

// ---- weights ---------------------------------------------------------------------------------------

struct LoraWeights {
  std::string module;
  int r = 0;
  float alpha = 0;
  float scaling = 0;
  std::vector<float> A;  // (r, in) row-major
  std::vector<float> B;  // (out, r) row-major
  std::int64_t in = 0, out = 0;
};

struct Adapter {
  LoraConfig config;
  std::map<std::string, LoraWeights> modules;  // by module name
  // bias "all" / "lora_only": the trained biases, by module name, replacing the base model's (out).
  std::map<std::string, std::vector<float>> biases;
};

namespace detail {

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// What a tensor name that is no plain LoRA weight belongs to, for the error message.
inline std::string feature_of(const std::string& name) {
  if (name.find("lora_magnitude_vector") != std::string::npos)
    return " (DoRA's magnitude vector: not supported)";
  if (name.find("lora_embedding_") != std::string::npos) return " (LoRA on an embedding: not supported)";
  if (name.find("lora_diag") != std::string::npos) return " (KaSA: not supported)";
  if (name.find("lora_B") != std::string::npos && ends_with(name, ".bias"))
    return " (lora_bias: not supported)";
  if (name.find("modules_to_save") != std::string::npos) return " (modules_to_save: not supported)";
  if (name.find("trainable_tokens") != std::string::npos) return " (trainable tokens: not supported)";
  return "";
}

inline std::vector<float> floats(const safetensors::TensorView& v, const std::string& name,
                                 const std::string& where) {
  QLORA_CHECK(v.dtype == DType::F32 || v.dtype == DType::F16 || v.dtype == DType::BF16, where, ": tensor '",
              name, "' is ", dtype_name(v.dtype), ", expected F32, F16 or BF16");
  return v.to_f32();
}

}  // namespace detail

// Reads adapter_config.json and adapter_model.safetensors. Every tensor must be a LoRA A or B of a
// module the config targets (or a bias when bias is not "none"); A is (r, in) and B (out, r) with r as
// the config resolves it for that module.
inline Adapter load_adapter(const std::string& dir) {
  Adapter a;
  a.config = read_config(dir);
  const LoraConfig& c = a.config;
  const std::string path = hf::join(dir, kWeightsFile);
  QLORA_CHECK(
      hf::file_exists(path), "PEFT adapter '", dir, "': no ", kWeightsFile,
      (hf::file_exists(hf::join(dir, "adapter_model.bin")) ? " (adapter_model.bin, a pickle, is not read)"
                                                           : ""));
  const std::string where = "PEFT adapter '" + path + "'";
  const safetensors::File f = safetensors::File::open(path);

  std::map<std::string, std::string> a_name, b_name;  // module -> tensor name
  std::map<std::string, std::string> bias_name;
  const std::string prefix = kPrefix;
  for (const std::string& name : f.names()) {
    QLORA_CHECK(name.rfind(prefix, 0) == 0, where, ": tensor '", name, "' does not start with '", prefix,
                "' (expected PEFT's saved names, base_model.model.<module>.lora_A.weight)");
    const std::string rest = name.substr(prefix.size());
    bool matched = false;
    // The stripped form PEFT saves, and the state-dict form with the adapter name "default" still in.
    for (const char* ab : {"A", "B"})
      for (const char* mid : {"", ".default"}) {
        const std::string suffix = std::string(".lora_") + ab + mid + ".weight";
        if (!matched && detail::ends_with(rest, suffix)) {
          const std::string module = rest.substr(0, rest.size() - suffix.size());
          auto& slot = (*ab == 'A' ? a_name : b_name)[module];
          QLORA_CHECK(slot.empty(), where, ": module ", module, " has both '", slot, "' and '", name, "'");
          slot = name;
          matched = true;
        }
      }
    if (!matched && detail::ends_with(rest, ".bias") && rest.find("lora_") == std::string::npos) {
      QLORA_CHECK(c.bias != "none", where, ": unexpected bias tensor '", name,
                  "': the config's bias is \"none\" (\"all\" or \"lora_only\" save biases)");
      std::string module = rest.substr(0, rest.size() - 5);
      if (detail::ends_with(module, ".base_layer"))
        module.resize(module.size() - 11);  // a LoRA-wrapped module
      QLORA_CHECK(!bias_name.count(module), where, ": module ", module, " has two biases, '",
                  bias_name[module], "' and '", name, "'");
      bias_name[module] = name;
      matched = true;
    }
    QLORA_CHECK(matched, where, ": unexpected tensor '", name, "'", detail::feature_of(name));
  }

  for (const auto& [module, an] : a_name)
    QLORA_CHECK(b_name.count(module), where, ": module ", module, " has lora_A ('", an, "') but no lora_B");
  for (const auto& [module, bn] : b_name)
    QLORA_CHECK(a_name.count(module), where, ": module ", module, " has lora_B ('", bn, "') but no lora_A");

  for (const auto& [module, an] : a_name) {
    const std::string& bn = b_name[module];
    const std::string what = where + ": adapter " + module;
    QLORA_CHECK(targets(c, module), what, " is not selected by the config's target_modules",
                " (PEFT would create no LoRA layer there and drop these weights)");
    const safetensors::TensorView A = f.get(an), B = f.get(bn);
    QLORA_CHECK(A.shape.size() == 2, what, ": lora_A is ", safetensors::detail::shape_str(A.shape),
                ", expected 2 dimensions (r, in)");
    QLORA_CHECK(B.shape.size() == 2, what, ": lora_B is ", safetensors::detail::shape_str(B.shape),
                ", expected 2 dimensions (out, r)");
    LoraWeights w;
    w.module = module;
    w.r = rank_for(c, module);
    QLORA_CHECK(A.shape[0] == w.r, what, ": lora_A has ", A.shape[0], " rows, the config gives r = ", w.r);
    QLORA_CHECK(B.shape[1] == A.shape[0], what, ": lora_B has ", B.shape[1],
                " columns, lora_A has r = ", A.shape[0], " rows");
    QLORA_CHECK(A.shape[1] > 0 && B.shape[0] > 0, what, ": empty lora_A ",
                safetensors::detail::shape_str(A.shape), " or lora_B ",
                safetensors::detail::shape_str(B.shape));
    w.in = A.shape[1];
    w.out = B.shape[0];
    w.alpha = alpha_for(c, module);
    w.scaling = scaling(c, module);
    w.A = detail::floats(A, an, where);
    w.B = detail::floats(B, bn, where);
    a.modules.emplace(module, std::move(w));
  }

  for (const auto& [module, bn] : bias_name) {
    const safetensors::TensorView v = f.get(bn);
    QLORA_CHECK(v.shape.size() == 1, where, ": bias '", bn, "' is ", safetensors::detail::shape_str(v.shape),
                ", expected 1 dimension");
    auto m = a.modules.find(module);
    // "lora_only" trains the biases of LoRA modules only; "all" every bias of the model.
    QLORA_CHECK(c.bias == "all" || m != a.modules.end(), where, ": bias '", bn,
                "' of a module without LoRA weights, but bias is \"lora_only\"");
    QLORA_CHECK(m == a.modules.end() || v.shape[0] == m->second.out, where, ": bias '", bn, "' has ",
                v.shape[0], " elements, lora_B has ", m == a.modules.end() ? 0 : m->second.out, " rows");
    a.biases[module] = detail::floats(v, bn, where);
  }
  return a;
}

// Checks that every adapter module exists in the base model with matching sizes. base_shape(module,
// out, in) returns false when the base model has no such linear module, else sets its weight's shape.
inline void check_fits(
    const Adapter& a,
    const std::function<bool(const std::string& module, std::int64_t& out, std::int64_t& in)>& base_shape) {
  for (const auto& [module, w] : a.modules) {
    std::int64_t out = 0, in = 0;
    QLORA_CHECK(base_shape(module, out, in), "adapter module '", module, "' not found in the base model");
    QLORA_CHECK(w.in == in, "adapter ", module, ": lora_A has ", w.in, " columns, base weight has ", in);
    QLORA_CHECK(w.out == out, "adapter ", module, ": lora_B has ", w.out, " rows, base weight has ", out);
  }
  for (const auto& [module, b] : a.biases) {
    std::int64_t out = 0, in = 0;
    QLORA_CHECK(base_shape(module, out, in), "adapter bias of '", module,
                "': module not found in the base model");
    QLORA_CHECK(std::int64_t(b.size()) == out, "adapter ", module, ": bias has ", b.size(),
                " elements, base weight has ", out, " rows");
  }
}

// Writes dir/adapter_config.json and dir/adapter_model.safetensors (dtype F32, BF16 or F16, metadata
// {"format": "pt"} as PEFT writes it). The folder is built beside dir and renamed into place: dir is
// replaced as a whole, or left as it was if anything fails.
//
// Before writing, every module is checked against the config as PEFT will read it back (pattern keys
// in sorted order): targeted, r and alpha as resolved, A and B of r·in and out·r values. A module
// PEFT would not target, or would give another r, is an error here rather than a silently dropped or
// refused adapter there.
inline void save_adapter(const std::string& dir, const Adapter& a, DType dtype = DType::F32) {
  QLORA_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16, "save_adapter '", dir,
              "': dtype ", dtype_name(dtype), ", expected F32, BF16 or F16");
  const LoraConfig& c = a.config;
  QLORA_CHECK(c.peft_type == "LORA", "save_adapter '", dir, "': peft_type \"", c.peft_type,
              "\", expected \"LORA\"");
  QLORA_CHECK(c.r > 0, "save_adapter '", dir, "': r is ", c.r, ", expected a positive integer");
  QLORA_CHECK(c.target_modules.kind != ModuleSet::Kind::None, "save_adapter '", dir,
              "': target_modules is null");
  QLORA_CHECK(c.bias == "none" || c.bias == "all" || c.bias == "lora_only", "save_adapter '", dir,
              "': bias \"", c.bias, "\", expected \"none\", \"all\" or \"lora_only\"");
  QLORA_CHECK(!a.modules.empty(), "save_adapter '", dir, "': the adapter has no modules");
  QLORA_CHECK(!c.fan_in_fan_out, "save_adapter '", dir, "': fan_in_fan_out = true is not supported");
  QLORA_CHECK(c.modules_to_save.empty(), "save_adapter '", dir, "': modules_to_save is not supported");
  // What PEFT will see: the written text, parsed back (sorted pattern keys, validated like any file).
  const std::string text = config_json(c);
  const LoraConfig seen = parse_config(nlohmann::ordered_json::parse(text), "save_adapter '" + dir + "'");
  for (const auto& [module, w] : a.modules) {
    const std::string what = "save_adapter '" + dir + "': adapter " + module;
    QLORA_CHECK(w.module == module, what, ": LoraWeights::module is '", w.module, "'");
    QLORA_CHECK(targets(seen, module), what, " is not selected by target_modules (PEFT would drop it)");
    QLORA_CHECK(w.r == rank_for(seen, module), what, ": r is ", w.r, ", the config as PEFT reads it back ",
                "(pattern keys sorted) gives ", rank_for(seen, module));
    QLORA_CHECK(w.alpha == alpha_for(seen, module), what, ": alpha is ", w.alpha,
                ", the config as PEFT reads ", "it back (pattern keys sorted) gives ",
                alpha_for(seen, module));
    QLORA_CHECK(w.in > 0 && w.out > 0, what, ": in = ", w.in, ", out = ", w.out, ", expected positive sizes");
    QLORA_CHECK(std::int64_t(w.A.size()) == w.r * w.in, what, ": A has ", w.A.size(),
                " values, expected r·in = ", w.r * w.in);
    QLORA_CHECK(std::int64_t(w.B.size()) == w.out * w.r, what, ": B has ", w.B.size(),
                " values, expected out·r = ", w.out * w.r);
  }
  QLORA_CHECK(a.biases.empty() || c.bias != "none", "save_adapter '", dir, "': ", a.biases.size(),
              " biases, but the config's bias is \"none\"");
  for (const auto& [module, b] : a.biases) {
    auto m = a.modules.find(module);
    QLORA_CHECK(c.bias == "all" || m != a.modules.end(), "save_adapter '", dir, "': bias of ", module,
                ", which has no LoRA weights, but bias is \"lora_only\"");
    QLORA_CHECK(m == a.modules.end() || std::int64_t(b.size()) == m->second.out, "save_adapter '", dir,
                "': bias of ", module, " has ", b.size(), " elements, lora_B has ", m->second.out, " rows");
  }

  safetensors::Writer wr;
  wr.set_metadata("format", "pt");
  auto add = [&](const std::string& name, const std::vector<float>& v, std::vector<std::int64_t> shape) {
    if (dtype == DType::F32) {
      wr.add(name, dtype, std::move(shape), v.data(), v.size() * 4);  // a's memory outlives write()
    } else if (dtype == DType::BF16) {
      std::vector<bf16> h(v.size());
      convert(v.data(), h.data(), v.size());
      wr.add_copy(name, dtype, std::move(shape), h.data(), h.size() * 2);
    } else {
      std::vector<fp16> h(v.size());
      convert(v.data(), h.data(), v.size());
      wr.add_copy(name, dtype, std::move(shape), h.data(), h.size() * 2);
    }
  };
  for (const auto& [module, w] : a.modules) {
    add(kPrefix + module + ".lora_A.weight", w.A, {w.r, w.in});
    add(kPrefix + module + ".lora_B.weight", w.B, {w.out, w.r});
  }
  // PEFT names the bias of a LoRA-wrapped module after its base layer.
  for (const auto& [module, b] : a.biases)
    add(kPrefix + module + (a.modules.count(module) ? ".base_layer.bias" : ".bias"), b,
        {std::int64_t(b.size())});

  AtomicDir out(dir);
  wr.write(hf::join(out.path(), kWeightsFile));
  write_text_atomic(hf::join(out.path(), kConfigFile), text);
  out.commit();
}

}  // namespace peft
}  // namespace qlora
