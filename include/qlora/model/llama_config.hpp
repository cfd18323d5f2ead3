#pragma once
// LlamaConfig: the hyper-parameters of a Llama checkpoint, read from its config.json as transformers
// 5.17 reads them (tests/data/llama/README.md).
//
// Only what this implementation computes is accepted: rope_type "default" (absent counts as default),
// hidden_act "silu", no attention / MLP bias. Anything else is an Error naming the key and the file,
// rather than a model that silently computes something else.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "qlora/core/error.hpp"
#include "qlora/io/hf_model.hpp"

namespace qlora {

struct LlamaConfig {
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_hidden_layers = 0;
  std::int64_t num_attention_heads = 0;
  std::int64_t num_key_value_heads = 0;  // default: num_attention_heads (no grouped-query attention)
  std::int64_t head_dim = 0;             // default: hidden_size / num_attention_heads
  std::int64_t vocab_size = 0;
  std::int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;

  std::int64_t q_size() const { return num_attention_heads * head_dim; }   // q_proj / o_proj width
  std::int64_t kv_size() const { return num_key_value_heads * head_dim; }  // k_proj / v_proj width

  // `where` names the file in messages (e.g. "'model/config.json'").
  static LlamaConfig from_json(const nlohmann::json& j, const std::string& where) {
    QLORA_CHECK(j.is_object(), where, ": expected a JSON object, got ", j.type_name());
    auto has = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
    auto integer = [&](const char* key) -> std::int64_t {
      QLORA_CHECK(has(key), where, ": missing \"", key, "\"");
      const auto& v = j[key];
      QLORA_CHECK(v.is_number_integer(), where, ": \"", key, "\" is ", v.dump(), ", expected an integer");
      const std::int64_t n = v.get<std::int64_t>();
      QLORA_CHECK(n > 0, where, ": \"", key, "\" is ", n, ", expected a positive integer");
      return n;
    };
    auto number = [&](const nlohmann::json& v, const std::string& key) -> double {
      QLORA_CHECK(v.is_number(), where, ": \"", key, "\" is ", v.dump(), ", expected a number");
      const double d = v.get<double>();
      QLORA_CHECK(d > 0, where, ": \"", key, "\" is ", d, ", expected a positive number");
      return d;
    };
    auto flag = [&](const char* key, bool dflt) -> bool {
      if (!has(key)) return dflt;
      QLORA_CHECK(j[key].is_boolean(), where, ": \"", key, "\" is ", j[key].dump(),
                  ", expected true or false");
      return j[key].get<bool>();
    };

    LlamaConfig c;
    c.hidden_size = integer("hidden_size");
    c.intermediate_size = integer("intermediate_size");
    c.num_hidden_layers = integer("num_hidden_layers");
    c.num_attention_heads = integer("num_attention_heads");
    c.num_key_value_heads =
        has("num_key_value_heads") ? integer("num_key_value_heads") : c.num_attention_heads;
    c.vocab_size = integer("vocab_size");
    c.max_position_embeddings = integer("max_position_embeddings");
    if (has("head_dim")) {
      c.head_dim = integer("head_dim");
    } else {
      QLORA_CHECK(c.hidden_size % c.num_attention_heads == 0, where, ": \"hidden_size\" ", c.hidden_size,
                  " is not a multiple of \"num_attention_heads\" ", c.num_attention_heads,
                  " and there is no \"head_dim\"");
      c.head_dim = c.hidden_size / c.num_attention_heads;
    }
    QLORA_CHECK(c.head_dim % 2 == 0, where, ": \"head_dim\" is ", c.head_dim,
                ", expected an even number (RoPE)");
    QLORA_CHECK(c.num_attention_heads % c.num_key_value_heads == 0, where, ": \"num_attention_heads\" ",
                c.num_attention_heads, " is not a multiple of \"num_key_value_heads\" ",
                c.num_key_value_heads);
    c.rms_norm_eps = has("rms_norm_eps") ? number(j["rms_norm_eps"], "rms_norm_eps") : 1e-6;

    // RoPE: transformers 5 writes rope_parameters {rope_theta, rope_type}; older checkpoints have a
    // top-level rope_theta and rope_scaling (null for plain RoPE). Both are read; a scaled RoPE
    // (llama3, linear, dynamic, yarn, ...) is refused.
    auto check_type = [&](const nlohmann::json& obj, const std::string& key) {
      for (const char* k : {"rope_type", "type"}) {
        if (!obj.contains(k) || obj[k].is_null()) continue;
        const auto& t = obj[k];
        QLORA_CHECK(t.is_string() && t.get<std::string>() == "default", where, ": \"", key, ".", k, "\" is ",
                    t.dump(), ", expected \"default\" (scaled RoPE is not supported)");
      }
    };
    bool have_theta = false;
    if (has("rope_parameters")) {
      const auto& rp = j["rope_parameters"];
      QLORA_CHECK(rp.is_object(), where, ": \"rope_parameters\" is ", rp.dump(), ", expected an object");
      check_type(rp, "rope_parameters");
      if (rp.contains("rope_theta")) {
        c.rope_theta = number(rp["rope_theta"], "rope_parameters.rope_theta");
        have_theta = true;
      }
    }
    if (has("rope_scaling")) {
      QLORA_CHECK(j["rope_scaling"].is_object(), where, ": \"rope_scaling\" is ", j["rope_scaling"].dump(),
                  ", expected null or an object");
      check_type(j["rope_scaling"], "rope_scaling");
    }
    if (has("rope_theta")) {
      const double t = number(j["rope_theta"], "rope_theta");
      QLORA_CHECK(!have_theta || t == c.rope_theta, where, ": \"rope_theta\" is ", t,
                  " but \"rope_parameters.rope_theta\" is ", c.rope_theta);
      c.rope_theta = t;
      have_theta = true;
    }
    QLORA_CHECK(have_theta, where, ": missing \"rope_theta\" (top level or in \"rope_parameters\")");

    if (has("hidden_act")) {
      const auto& a = j["hidden_act"];
      QLORA_CHECK(a.is_string() && a.get<std::string>() == "silu", where, ": \"hidden_act\" is ", a.dump(),
                  ", expected \"silu\"");
    }
    QLORA_CHECK(!flag("attention_bias", false), where,
                ": \"attention_bias\" is true, expected false (biases are not supported)");
    QLORA_CHECK(!flag("mlp_bias", false), where,
                ": \"mlp_bias\" is true, expected false (biases are not supported)");
    // transformers' LlamaConfig default is false
    c.tie_word_embeddings = flag("tie_word_embeddings", false);
    return c;
  }

  static LlamaConfig from_folder(const hf::ModelFolder& folder) {
    return from_json(folder.config(), "'" + hf::join(folder.dir(), "config.json") + "'");
  }
};

}  // namespace qlora
