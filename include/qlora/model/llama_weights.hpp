#pragma once
// LlamaWeights<Quant>: what another backend needs to run a LlamaModel<Quant>, as plain host arrays:
// the shapes, the fp32 embedding / norms / lm_head, the RoPE table, and per projection the base
// weight (a pointer into the model it came from) with its LoRA path's config, A, B and dropout
// counter. LlamaModel::weights() makes one; LlamaModel::set_lora() takes back trained A, B.
//
// Why a separate header: the CUDA model (cuda/qlora/cuda/model/llama.cuh) is compiled by nvcc, which
// should not see Eigen or the CPU kernels that llama.hpp brings in. This header needs neither: a
// host translation unit converts the CPU model, the nvcc one uploads the result.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qlora/lora/base_weight.hpp"
#include "qlora/lora/config.hpp"

namespace qlora {

// The 7 projections of a decoder layer, in the order LlamaModel holds them.
enum LlamaProj : int { kQ, kK, kV, kO, kGate, kUp, kDown, kNumProj };
inline const char* llama_proj_name(int p) {
  static const char* const names[kNumProj] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                              "mlp.down_proj"};
  return names[p];
}
// "model.layers.{layer}.self_attn.q_proj": the module name transformers and PEFT use.
inline std::string llama_module(std::int64_t layer, int p) {
  return "model.layers." + std::to_string(layer) + "." + llama_proj_name(p);
}

// The sizes of LlamaConfig that the computation needs (LlamaConfig itself reads JSON).
struct LlamaShape {
  std::int64_t hidden = 0, intermediate = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  std::int64_t max_positions = 0;
  double rms_norm_eps = 1e-6;
  std::int64_t q_size() const { return heads * head_dim; }      // q_proj / o_proj width
  std::int64_t kv_size() const { return kv_heads * head_dim; }  // k_proj / v_proj width
};

// One LoRA path's trainable tensors, named by module ("model.layers.0.self_attn.q_proj").
struct LoraTensors {
  std::string module;
  std::vector<float> A;  // (r, in)
  std::vector<float> B;  // (out, r)
  std::uint64_t dropout_calls = 0;
};

template <class Quant>
struct LlamaWeights {
  struct Proj {
    const BaseWeight<Quant>* base = nullptr;  // (out, in), owned by the model weights() was called on
    std::optional<LoraConfig> lora;           // set: a LoRA target (its config, seed included)
    std::vector<float> A, B;                  // (r, in), (out, r): the current values when lora is set
    std::uint64_t dropout_calls = 0;
  };
  struct Layer {
    std::vector<float> input_norm, post_norm;  // (D)
    std::vector<Proj> proj;                    // kNumProj, indexed by LlamaProj
  };
  LlamaShape shape;
  std::vector<float> embed;               // (V, D)
  std::vector<float> final_norm;          // (D)
  std::vector<float> lm_head;             // (V, D) (a copy of embed when the embeddings are tied)
  std::vector<float> rope_cos, rope_sin;  // (max_positions, head_dim), RopeTable's
  std::vector<Layer> layers;
};

}  // namespace qlora
