#pragma once
// LlamaModel<Quant>: transformers' LlamaForCausalLM on the CPU in fp32 activations, with LoRA on
// chosen linear layers, a hand-written backward for the LoRA parameters, and PEFT adapters.
//
//   x = embed_tokens[ids]                                     (M, D)    M = B·T tokens
//   per layer:  h  = x + o_proj(attn(rope(q, k), v))          q, k, v from input_layernorm(x)
//               x' = h + down(silu(gate(n)) ⊙ up(n))           n = post_attention_layernorm(h)
//   logits = lm_head(norm(x))                                 (M, V)    lm_head = embed_tokens if tied
//
// Quant is the base format of the 7 projections of every layer (format::F32 keeps the checkpoint's
// weights, format::NF4 quantizes them on load as bitsandbytes would, and a folder that is already
// bitsandbytes 4-bit / int8 is taken as stored when Quant is its format); the embedding, the norms and
// lm_head stay fp32. Projections that LoRA targets are LoraLinear; the others are frozen products
// (model/linear.hpp says why). Everything but A and B of the LoRA layers is frozen: backward
// produces dA, dB of every LoRA layer and no other parameter gradient.
//
// Full-parameter training (enable_full_training(), F32 models without LoRA; what pretraining the
// embedded demo model uses): every weight is a parameter. The projections' gradients are
// dW = dyᵀ·x (out, in) from the projection inputs the forward keeps, the norms'
// dw = Σ_rows dy ⊙ x·r, lm_head's dW = dlogitsᵀ·norm(x), and the embedding's rows get the gradient
// of the first layer's input, scattered by token id (plus lm_head's when tied).
//
// What a training forward keeps (Activations), per layer and token: the layer input, q, k, v, the
// attention-residual h, gate and up pre-activations, two rstd values, the LoRA contexts (their
// inputs), and the attention probabilities (B, H, T, T) per layer: quadratic in T, fine for the
// sequence lengths this CPU path is for. With gradient checkpointing (set_gradient_checkpointing)
// only the layer inputs are kept and backward recomputes each layer's forward, bit-identically.
#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "qlora/backend/cpu/qmatrix.hpp"
#include "qlora/backend/cpu/thread_pool.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/io/atomic_dir.hpp"
#include "qlora/io/atomic_file.hpp"
#include "qlora/io/bnb_checkpoint.hpp"
#include "qlora/io/hf_model.hpp"
#include "qlora/io/peft_adapter.hpp"
#include "qlora/lora/adapter.hpp"
#include "qlora/model/attention.hpp"
#include "qlora/model/cross_entropy.hpp"
#include "qlora/model/linear.hpp"
#include "qlora/model/llama_config.hpp"
#include "qlora/model/llama_weights.hpp"
#include "qlora/model/rmsnorm.hpp"
#include "qlora/model/rope.hpp"
#include "qlora/optim/param.hpp"

namespace qlora {

// Which projections get a fresh LoRA path, and its hyper-parameters.
struct LlamaLoraOptions {
  // PEFT's target_modules semantics: names matched against the end of the module name ("q_proj",
  // "mlp.down_proj", "model.layers.0.self_attn.v_proj"), or {"all-linear"} for all 7 (lm_head is never
  // a target). Empty: no LoRA, a frozen model.
  std::vector<std::string> target_modules;
  // r, alpha, dropout, rslora, init. seed is the model's: each module draws its init and dropout
  // from seed + its index (layer · 7 + projection), so equal-shaped modules start differently.
  LoraConfig lora;
  // Keep the frozen projections' base weights as loaded beside their CPU matrices (host memory once
  // more for those layers), which LlamaModel::weights() needs to hand them to another backend.
  bool keep_frozen_bases = false;
};

// Where a training step's time goes (LlamaModel::set_profiling): wall seconds summed over forwards
// and backwards. base_matmul: the projections' base products (frozen ones whole, a LoRA layer's
// x·W0ᵀ and dy·W0) and full training's projection dW; lora: the rest of a LoRA layer (rank-r
// products, dropout, its context copy); attention: attention::forward / backward (scores,
// softmax, P·V); lm_head: its product, dx (and dW); rest: norms, RoPE, SwiGLU, residuals, the
// embedding, the loss of forward_backward, and checkpointing's copies. Outside the class template
// because it does not depend on Quant: code that handles models of every base format shares it.
struct LlamaPhaseTimes {
  double base_matmul = 0, lora = 0, attention = 0, lm_head = 0, rest = 0;
  double total() const { return base_matmul + lora + attention + lm_head + rest; }
};

template <class Quant>
class LlamaModel {
 public:
  using Linear = ModelLinear<Quant>;

  struct Layer {
    std::vector<float> input_norm, post_norm;  // (D) RMSNorm weights
    std::vector<Linear> proj;                  // kNumProj, indexed by LlamaProj
    // Full-parameter training: gradients of the above (empty otherwise)
    std::vector<float> d_input_norm, d_post_norm;  // (D)
    std::array<std::vector<float>, kNumProj> dW;   // (out, in) per projection
  };

  // What a forward keeps for backward, and the hidden states for inspection.
  struct LayerActs {
    std::vector<float> x;             // (M, D)     the layer's input (the residual stream)
    std::vector<float> rstd1, rstd2;  // (M)        input_layernorm / post_attention_layernorm r
    std::vector<float> q;             // (M, H·d)   after RoPE
    std::vector<float> k, v;          // (M, KV·d)  k after RoPE
    std::vector<float> P;             // (B, H, T, T) attention probabilities
    std::vector<float> h;             // (M, D)     after the attention residual
    std::vector<float> gate, up;      // (M, I)     MLP pre-activations
    std::array<typename Linear::Context, kNumProj> ctx;  // LoRA layers' contexts
    // Full-parameter training only: the inputs of the frozen products, for their dW.
    std::vector<float> n1;   // (M, D)    input_layernorm(x): q/k/v input
    std::vector<float> att;  // (M, H·d)  attention output: o_proj input
    std::vector<float> n2;   // (M, D)    post_attention_layernorm(h): gate/up input
    std::vector<float> act;  // (M, I)    silu(gate) ⊙ up: down_proj input
    // Gradient checkpointing: the LoRA layers' dropout counters before this layer's forward (the
    // recompute rewinds to them and so draws the same masks); only x and these are kept then.
    std::array<std::uint64_t, kNumProj> dropout_calls{};
    // Bytes held: the capacities of the vectors and the LoRA contexts.
    std::size_t bytes() const {
      std::size_t n = 0;
      for (const std::vector<float>* f :
           {&x, &rstd1, &rstd2, &q, &k, &v, &P, &h, &gate, &up, &n1, &att, &n2, &act})
        n += f->capacity() * sizeof(float);
      for (const auto& c : ctx) n += c.bytes();
      return n + sizeof(dropout_calls);
    }
  };
  struct Activations {
    std::int64_t batch = 0, seq = 0;
    bool checkpointed = false;      // from a forward with gradient checkpointing: layers hold only x
    std::vector<std::int64_t> ids;  // (B, T), kept in full-parameter training (embedding gradient)
    std::vector<LayerActs> layers;
    std::vector<float> final_in;    // (M, D) output of the last layer, input of model.norm
    std::vector<float> final_out;   // (M, D) output of model.norm (transformers' last hidden state)
    std::vector<float> rstd_final;  // (M)
    std::size_t bytes() const {
      std::size_t n = ids.capacity() * sizeof(std::int64_t);
      for (const LayerActs& l : layers) n += l.bytes();
      for (const std::vector<float>* f : {&final_in, &final_out, &rstd_final})
        n += f->capacity() * sizeof(float);
      return n;
    }
  };
  // What a training forward keeps for backward, in bytes (Activations::bytes()).
  friend std::size_t activation_bytes(const Activations& a) { return a.bytes(); }

  using PhaseTimes = LlamaPhaseTimes;

  // A checkpoint folder (config.json + safetensors), with fresh LoRA paths on the targeted modules.
  static LlamaModel load(const std::string& dir, const LlamaLoraOptions& opt = {}) {
    peft::LoraConfig targets;
    if (opt.target_modules.size() == 1 && peft::ModuleSet::pattern(opt.target_modules[0]).is_all_linear())
      targets.target_modules = peft::ModuleSet::pattern(opt.target_modules[0]);
    else
      targets.target_modules = peft::ModuleSet::list(opt.target_modules);
    LlamaModel m = load_impl(
        dir,
        [&](const std::string& module, std::int64_t index) -> std::optional<LoraConfig> {
          if (!peft::targets(targets, module)) return std::nullopt;
          LoraConfig c = opt.lora;
          c.seed = opt.lora.seed + std::uint64_t(index);
          return c;
        },
        opt.keep_frozen_bases);
    // what adapter() writes: PEFT's config for these targets and hyper-parameters
    targets.r = opt.lora.r;
    targets.lora_alpha = opt.lora.alpha;
    targets.lora_dropout = opt.lora.dropout;
    targets.use_rslora = opt.lora.rslora;
    targets.task_type = "CAUSAL_LM";
    m.adapter_config_ = targets;
    return m;
  }

  // A checkpoint folder with a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
  // attached: the modules the adapter targets get its rank, alpha, dropout and weights. seed: the
  // dropout masks' (seed + module index, as load()), so a run resumed from a saved adapter draws
  // the masks of the run that saved it. keep_frozen_bases: as LlamaLoraOptions' (weights() of a
  // model with frozen projections needs it, e.g. a GPU run resumed from its checkpoint).
  static LlamaModel load_with_adapter(const std::string& dir, const std::string& adapter_dir,
                                      std::uint64_t seed = 0, bool keep_frozen_bases = false) {
    const peft::Adapter adapter = peft::load_adapter(adapter_dir);
    const std::string where = "PEFT adapter '" + adapter_dir + "'";
    QLORA_CHECK(adapter.biases.empty(), where, ": bias \"", adapter.config.bias,
                "\" (trained biases) is not supported by LlamaModel, expected \"none\"");
    LlamaModel m = load_impl(
        dir,
        [&](const std::string& module, std::int64_t index) -> std::optional<LoraConfig> {
          if (!peft::targets(adapter.config, module)) return std::nullopt;
          LoraConfig c = config_for(adapter.config, module);
          c.seed = seed + std::uint64_t(index);
          return c;
        },
        keep_frozen_bases);
    std::size_t used = 0;
    for (std::int64_t l = 0; l < m.cfg_.num_hidden_layers; ++l)
      for (int p = 0; p < kNumProj; ++p) {
        Linear& lin = m.layers_[std::size_t(l)].proj[std::size_t(p)];
        if (!lin.has_lora()) continue;
        const std::string name = llama_module(l, p);
        auto it = adapter.modules.find(name);
        QLORA_CHECK(it != adapter.modules.end(), where, ": targets '", name, "' but has no weights for it");
        with_context(where, [&] { load_weights(lin.lora_layer(), it->second); });
        ++used;
      }
    for (const auto& kv : adapter.modules)
      QLORA_CHECK(m.find(kv.first) != nullptr && m.find(kv.first)->has_lora(), where, ": weights for '",
                  kv.first, "', which is not a targeted projection of the model");
    QLORA_CHECK(used == adapter.modules.size(), where, ": ", adapter.modules.size(), " modules, ", used,
                " of them loaded");
    m.adapter_config_ = adapter.config;
    m.adapter_config_.inference_mode = false;
    return m;
  }

  const LlamaConfig& config() const { return cfg_; }
  const RopeTable& rope() const { return rope_; }
  Layer& layer(std::int64_t l) { return layers_.at(std::size_t(l)); }
  // The projection named as transformers names it ("model.layers.1.mlp.up_proj"), or null.
  Linear* find(const std::string& module) {
    for (std::int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
      for (int p = 0; p < kNumProj; ++p)
        if (llama_module(l, p) == module) return &layers_[std::size_t(l)].proj[std::size_t(p)];
    return nullptr;
  }

  // How every projection's base product treats few-token activations (model/linear.hpp).
  void set_act_quant(cpu::ActQuant aq) {
    for (Layer& L : layers_)
      for (Linear& lin : L.proj) lin.set_act_quant(aq);
  }

  // The LoRA paths as a PEFT adapter (peft::save_adapter writes it): the config the model was loaded
  // with (targets, r, alpha, dropout; an attached adapter's own config) and every LoRA layer's A, B.
  peft::Adapter adapter(const std::string& base_model_name_or_path = {}) const {
    peft::Adapter a;
    a.config = adapter_config_;
    if (!base_model_name_or_path.empty()) a.config.base_model_name_or_path = base_model_name_or_path;
    for (std::int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
      for (int p = 0; p < kNumProj; ++p) {
        const Linear& lin = layers_[std::size_t(l)].proj[std::size_t(p)];
        if (lin.has_lora()) a.modules[llama_module(l, p)] = weights_of(lin.lora_layer(), llama_module(l, p));
      }
    QLORA_CHECK(!a.modules.empty(), "LlamaModel::adapter: the model has no LoRA layers");
    return a;
  }

  // The model as plain host arrays for another backend (model/llama_weights.hpp): base weights by
  // pointer (valid while this model lives and is not moved), everything else copied. LoRA A, B and
  // dropout counters are the current ones. A model with frozen projections must have been loaded
  // with LlamaLoraOptions::keep_frozen_bases.
  LlamaWeights<Quant> weights() const {
    QLORA_CHECK(!full_,
                "LlamaModel::weights: full-parameter training is on; only LoRA models can be exported");
    LlamaWeights<Quant> w;
    const LlamaConfig& c = cfg_;
    w.shape = {c.hidden_size,         c.intermediate_size,       c.num_hidden_layers,
               c.num_attention_heads, c.num_key_value_heads,     c.head_dim,
               c.vocab_size,          c.max_position_embeddings, c.rms_norm_eps};
    w.embed = embed_;
    w.final_norm = final_norm_;
    w.lm_head.resize(std::size_t(c.vocab_size * c.hidden_size));
    lm_head_->dequantize(w.lm_head.data());
    w.rope_cos = rope_.cos;
    w.rope_sin = rope_.sin;
    for (const Layer& L : layers_) {
      typename LlamaWeights<Quant>::Layer wl;
      wl.input_norm = L.input_norm;
      wl.post_norm = L.post_norm;
      for (const Linear& lin : L.proj) {
        typename LlamaWeights<Quant>::Proj p;
        if (lin.has_lora()) {
          const auto& lo = lin.lora_layer();
          QLORA_CHECK(!lo.merged(), "LlamaModel::weights: a LoRA layer is merged; unmerge it first");
          p.base = &lo.base();
          p.lora = lo.config();
          p.A = storage_copy(lo.A());
          p.B = storage_copy(lo.B());
          p.dropout_calls = lo.dropout_calls();
        } else {
          p.base = &lin.frozen_base();
        }
        wl.proj.push_back(std::move(p));
      }
      w.layers.push_back(std::move(wl));
    }
    return w;
  }

  // Sets A, B and the dropout counter of LoRA layers from another backend's copy (every module named
  // must be a LoRA layer of this model, with the same shapes).
  void set_lora(const std::vector<LoraTensors>& tensors) {
    for (const LoraTensors& t : tensors) {
      Linear* lin = find(t.module);
      QLORA_CHECK(lin && lin->has_lora(), "LlamaModel::set_lora: '", t.module,
                  "' is not a LoRA layer of the model");
      auto& lo = lin->lora_layer();
      QLORA_CHECK(std::size_t(lo.A().size()) == t.A.size() && std::size_t(lo.B().size()) == t.B.size(),
                  "LlamaModel::set_lora: '", t.module, "' has A, B of ", t.A.size(), ", ", t.B.size(),
                  " values, expected ", lo.A().size(), ", ", lo.B().size());
      std::copy(t.A.begin(), t.A.end(), lo.A().data());
      std::copy(t.B.begin(), t.B.end(), lo.B().data());
      lo.set_dropout_calls(t.dropout_calls);
    }
  }

  // The dropout call counters of the LoRA layers (the masks of the next forward depend on them), in
  // module order: a checkpoint saves them so that a resumed run draws the masks the run would have.
  std::vector<std::uint64_t> dropout_calls() const {
    std::vector<std::uint64_t> out;
    for (const Layer& L : layers_)
      for (const Linear& lin : L.proj)
        if (lin.has_lora()) out.push_back(lin.lora_layer().dropout_calls());
    return out;
  }
  void set_dropout_calls(const std::vector<std::uint64_t>& c) {
    std::size_t k = 0;
    for (Layer& L : layers_)
      for (Linear& lin : L.proj)
        if (lin.has_lora()) {
          QLORA_CHECK(k < c.size(), "LlamaModel::set_dropout_calls: ", c.size(),
                      " counters for more LoRA layers");
          lin.lora_layer().set_dropout_calls(c[k++]);
        }
    QLORA_CHECK(k == c.size(), "LlamaModel::set_dropout_calls: ", c.size(), " counters, the model has ", k,
                " LoRA layers");
  }

  // Makes every weight trainable (the checkpoint's names; see the top of this file). Only for
  // format::F32 models with no LoRA path: a quantized base cannot take gradient updates, and mixing
  // full and LoRA training is not something this model does.
  void enable_full_training() {
    QLORA_CHECK((std::is_same<Quant, format::F32>::value),
                "LlamaModel::enable_full_training: needs an fp32 model (format::F32), not a quantized one");
    for (std::int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
      for (int p = 0; p < kNumProj; ++p)
        QLORA_CHECK(!layers_[std::size_t(l)].proj[std::size_t(p)].has_lora(),
                    "LlamaModel::enable_full_training: '", llama_module(l, p),
                    "' has a LoRA path; load the model without target modules");
    if (full_) return;
    full_ = true;
    const std::int64_t D = cfg_.hidden_size;
    d_embed_.assign(embed_.size(), 0.0f);
    d_final_norm_.assign(std::size_t(D), 0.0f);
    if (!cfg_.tie_word_embeddings) d_lm_head_.assign(std::size_t(cfg_.vocab_size * D), 0.0f);
    for (Layer& L : layers_) {
      L.d_input_norm.assign(std::size_t(D), 0.0f);
      L.d_post_norm.assign(std::size_t(D), 0.0f);
      for (int p = 0; p < kNumProj; ++p) {
        const Linear& lin = L.proj[std::size_t(p)];
        L.dW[std::size_t(p)].assign(std::size_t(lin.out_features() * lin.in_features()), 0.0f);
      }
    }
  }
  bool full_training() const { return full_; }

  // Gradient checkpointing (transformers' gradient_checkpointing_enable, torch.utils.checkpoint per
  // decoder layer): a training forward keeps only each layer's input x and its LoRA layers' dropout
  // counters, and backward recomputes the layer's forward right before the layer's backward, with
  // the counters rewound so dropout draws the same masks. Same operations in the same order: the
  // loss and gradients are bit-identical, for about one more forward of the layers per step.
  void set_gradient_checkpointing(bool on) { checkpointing_ = on; }
  bool gradient_checkpointing() const { return checkpointing_; }

  // Opt-in phase timing (PhaseTimes); off, nothing is timed. Accumulates until reset_phase_times().
  void set_profiling(bool on) {
    profiling_ = on;
    for (Layer& L : layers_)
      for (Linear& lin : L.proj)
        if (lin.has_lora()) lin.lora_layer().set_profiling(on);
  }
  PhaseTimes phase_times() const {
    PhaseTimes t = times_;
    t.rest = total_s_ - (t.base_matmul + t.lora + t.attention + t.lm_head);
    return t;
  }
  void reset_phase_times() {
    times_ = {};
    total_s_ = 0;
  }

  // The trainable parameters for an optimizer: every LoRA A and B (PEFT's names without the
  // "base_model.model." prefix), or in full-parameter training every weight (the checkpoint's names).
  std::vector<optim::Param> params() {
    std::vector<optim::Param> out;
    if (full_) {
      auto add = [&](std::string name, float* v, std::vector<float>& g) {
        out.push_back({std::move(name), v, g.data(), g.size(), optim::ParamGroup::Other});
      };
      add("model.embed_tokens.weight", embed_.data(), d_embed_);
      for (std::int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
        Layer& L = layers_[std::size_t(l)];
        const std::string pre = "model.layers." + std::to_string(l) + ".";
        add(pre + "input_layernorm.weight", L.input_norm.data(), L.d_input_norm);
        add(pre + "post_attention_layernorm.weight", L.post_norm.data(), L.d_post_norm);
        for (int p = 0; p < kNumProj; ++p)
          add(llama_module(l, p) + ".weight", L.proj[std::size_t(p)].frozen_matrix().f32_data(),
              L.dW[std::size_t(p)]);
      }
      add("model.norm.weight", final_norm_.data(), d_final_norm_);
      if (!cfg_.tie_word_embeddings) add("lm_head.weight", lm_head_->f32_data(), d_lm_head_);
      return out;
    }
    for (std::int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
      for (int p = 0; p < kNumProj; ++p) {
        Linear& lin = layers_[std::size_t(l)].proj[std::size_t(p)];
        if (!lin.has_lora()) continue;
        for (auto& prm : lin.lora_layer().params(llama_module(l, p))) out.push_back(prm);
      }
    return out;
  }

  // ids (B, T) -> logits (B·T, V). With acts (training), LoRA dropout is on and everything backward
  // needs is kept there; without, the forward of inference.
  void forward(const std::int64_t* ids, std::int64_t B, std::int64_t T, float* logits, Activations* acts) {
    QLORA_CHECK(B > 0 && T > 0, "LlamaModel::forward: batch ", B, " and sequence ", T, " must be positive");
    QLORA_CHECK(T <= cfg_.max_position_embeddings, "LlamaModel::forward: sequence of ", T,
                " tokens, longer than max_position_embeddings ", cfg_.max_position_embeddings);
    const std::int64_t M = B * T, D = cfg_.hidden_size;
    timing_ = profiling_ && acts;  // training forwards only: evaluations are not a step's time
    const auto t_start = Clock::now();
    Activations scratch;
    Activations& a = acts ? *acts : scratch;
    a.batch = B;
    a.seq = T;
    a.checkpointed = acts && checkpointing_;
    // Full training updates embed_ in place; a tied lm_head reads its own copy, refreshed here.
    if (full_ && cfg_.tie_word_embeddings) std::copy(embed_.begin(), embed_.end(), lm_head_->f32_data());
    if (full_ && acts) a.ids.assign(ids, ids + M);
    a.layers.resize(acts ? std::size_t(cfg_.num_hidden_layers) : 1);
    std::vector<float> x(std::size_t(M * D));  // (M, D) the residual stream
    for (std::int64_t t = 0; t < M; ++t) {
      const std::int64_t id = ids[t];
      QLORA_CHECK(id >= 0 && id < cfg_.vocab_size, "LlamaModel::forward: token id ", id, " at [", t / T, ", ",
                  t % T, "] is outside the vocabulary [0, ", cfg_.vocab_size, ")");
      std::copy_n(embed_.data() + id * D, D, x.data() + t * D);
    }
    LayerActs work;  // checkpointing: the full activations of one layer, dropped after it
    for (std::int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
      Layer& L = layers_[std::size_t(l)];
      if (!a.checkpointed) {
        layer_forward(L, a.layers[acts ? std::size_t(l) : 0], x, B, T, acts != nullptr);
        continue;
      }
      LayerActs& kept = a.layers[std::size_t(l)];
      kept = LayerActs{};
      kept.dropout_calls = dropout_calls_of(L);
      layer_forward(L, work, x, B, T, /*train=*/true);
      kept.x = std::move(work.x);
    }
    a.final_in = x;
    a.final_out.resize(std::size_t(M * D));
    a.rstd_final.resize(std::size_t(M));
    rmsnorm::forward(x.data(), final_norm_.data(), M, D, float(cfg_.rms_norm_eps), a.final_out.data(),
                     a.rstd_final.data());
    timed(&PhaseTimes::lm_head,
          [&] { lm_head_->forward(a.final_out.data(), M, logits, cpu::Accumulate::No); });  // (M, V)
    if (timing_) total_s_ += since(t_start);
    timing_ = false;
  }

  std::vector<float> logits(const std::int64_t* ids, std::int64_t B, std::int64_t T) {
    std::vector<float> out(std::size_t(B * T * cfg_.vocab_size));
    forward(ids, B, T, out.data(), nullptr);
    return out;
  }

  // The mean next-token cross-entropy of labels (B, T) (-100: ignored), as transformers'
  // model(ids, labels=labels).loss.
  float loss(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B, std::int64_t T) {
    const std::vector<float> z = logits(ids, B, T);
    return causal_lm_loss(z.data(), labels, B, T, cfg_.vocab_size, nullptr);
  }

  // dlogits (B·T, V) -> dA, dB of every LoRA layer, written or added by `mode`. acts from the
  // training forward that produced the logits.
  void backward(const Activations& a, const float* dlogits, GradMode mode) {
    const std::int64_t B = a.batch, T = a.seq, M = B * T, D = cfg_.hidden_size;
    QLORA_CHECK(
        a.layers.size() == std::size_t(cfg_.num_hidden_layers) && std::int64_t(a.final_in.size()) == M * D,
        "LlamaModel::backward: activations are not from a training forward of this model");
    timing_ = profiling_;
    const auto t_start = Clock::now();
    std::vector<float> dn(std::size_t(M * D)), dres(std::size_t(M * D));  // (M, D)
    if (full_) {
      QLORA_CHECK(
          std::int64_t(a.ids.size()) == M && !a.layers.empty() && (a.checkpointed || !a.layers[0].n1.empty()),
          "LlamaModel::backward: activations are from a forward before enable_full_training()");
      if (mode == GradMode::Overwrite) zero_grad();
      // lm_head (V, D): dW += dlogitsᵀ · norm(x); tied, it is the embedding's gradient too
      timed(&PhaseTimes::lm_head, [&] {
        add_weight_grad(cfg_.tie_word_embeddings ? d_embed_ : d_lm_head_, dlogits, a.final_out.data(), M,
                        cfg_.vocab_size, D);
      });
    }
    // lm_head and the final norm are frozen unless full_: only their dx
    timed(&PhaseTimes::lm_head, [&] { lm_head_->backward(dlogits, M, dn.data(), cpu::Accumulate::No); });
    if (full_) add_norm_grad(d_final_norm_, dn.data(), a.final_in.data(), a.rstd_final.data(), M, D);
    rmsnorm::backward(dn.data(), a.final_in.data(), final_norm_.data(), a.rstd_final.data(), M, D,
                      dres.data());
    LayerActs work;  // checkpointing: the recomputed activations of the current layer
    for (std::int64_t l = cfg_.num_hidden_layers - 1; l >= 0; --l) {
      Layer& L = layers_[std::size_t(l)];
      const LayerActs* la = &a.layers[std::size_t(l)];
      if (a.checkpointed) {  // the layer's training forward again, with the masks it drew the first time
        const std::array<std::uint64_t, kNumProj> after = dropout_calls_of(L);
        set_dropout_calls_of(L, la->dropout_calls);
        std::vector<float> x = la->x;
        layer_forward(L, work, x, B, T, /*train=*/true);
        set_dropout_calls_of(L, after);
        la = &work;
      }
      // a frozen embedding needs no gradient: then the first layer skips the gradient of its input
      layer_backward(L, *la, dres, B, T, mode, l > 0 || full_);
    }
    if (full_)  // embedding rows: the gradient of the first layer's input, by token
      for (std::int64_t t = 0; t < M; ++t) {
        float* g = d_embed_.data() + a.ids[std::size_t(t)] * D;
        const float* d = dres.data() + t * D;
        for (std::int64_t i = 0; i < D; ++i) g[i] += d[i];
      }
    if (timing_) total_s_ += since(t_start);
    timing_ = false;
  }

  // Writes the model as a Hugging Face folder (config.json + model.safetensors, the source folder's
  // other files such as tokenizer.json copied), atomically. Every projection is stored dense as the
  // model computes with it: a LoRA path is merged in (W0 + s·B·A; a 4-bit base dequantized first),
  // so this is also what `qlora merge` writes. dtype: F32, BF16 or F16.
  void save(const std::string& dir, DType dtype = DType::F32) const {
    QLORA_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16,
                "LlamaModel::save: dtype ", dtype_name(dtype), ", expected F32, BF16 or F16");
    const std::int64_t D = cfg_.hidden_size, V = cfg_.vocab_size;
    safetensors::Writer w;
    w.set_metadata("format", "pt");  // transformers refuses safetensors files without it
    auto put = [&](const std::string& name, const float* v, std::vector<std::int64_t> shape) {
      std::size_t n = 1;
      for (std::int64_t d : shape) n *= std::size_t(d);
      if (dtype == DType::F32) return w.add_copy(name, dtype, shape, v, n * 4);
      std::vector<std::uint16_t> h(n);
      for (std::size_t i = 0; i < n; ++i)
        h[i] = dtype == DType::BF16 ? to_bf16(v[i]).bits : to_fp16(v[i]).bits;
      w.add_copy(name, dtype, shape, h.data(), n * 2);
    };
    put("model.embed_tokens.weight", embed_.data(), {V, D});
    for (std::int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
      const Layer& L = layers_[std::size_t(l)];
      const std::string pre = "model.layers." + std::to_string(l) + ".";
      put(pre + "input_layernorm.weight", L.input_norm.data(), {D});
      put(pre + "post_attention_layernorm.weight", L.post_norm.data(), {D});
      for (int p = 0; p < kNumProj; ++p) {
        const Linear& lin = L.proj[std::size_t(p)];
        const std::vector<float> wt = lin.dense_weight();
        put(llama_module(l, p) + ".weight", wt.data(), {lin.out_features(), lin.in_features()});
      }
    }
    put("model.norm.weight", final_norm_.data(), {D});
    if (!cfg_.tie_word_embeddings) {
      std::vector<float> head(std::size_t(V * D));
      lm_head_->dequantize(head.data());
      put("lm_head.weight", head.data(), {V, D});
    }
    nlohmann::json cfg = source_config_;
    cfg.erase("quantization_config");
    cfg["torch_dtype"] = dtype == DType::F32 ? "float32" : dtype == DType::BF16 ? "bfloat16" : "float16";
    if (cfg.contains("dtype")) cfg["dtype"] = cfg["torch_dtype"];
    AtomicDir out(dir);
    w.write(hf::join(out.path(), hf::kSingleWeights));
    write_text_atomic(hf::join(out.path(), "config.json"), cfg.dump(2) + "\n");
    for (const std::string& f : source_files_)
      copy_file_atomic(hf::join(source_dir_, f), hf::join(out.path(), f));
    out.commit();
  }

  // Clears the full-training gradients (the LoRA layers' own are cleared by the optimizer's
  // zero_grad through params()).
  void zero_grad() {
    auto z = [](std::vector<float>& v) { std::fill(v.begin(), v.end(), 0.0f); };
    z(d_embed_);
    z(d_final_norm_);
    z(d_lm_head_);
    for (Layer& L : layers_) {
      z(L.d_input_norm);
      z(L.d_post_norm);
      for (auto& g : L.dW) z(g);
    }
  }

  // One training step's forward and backward on labels (B, T): returns the loss; dA, dB of every
  // LoRA layer written or added by `mode` (Accumulate for gradient accumulation over micro-batches).
  float forward_backward(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B, std::int64_t T,
                         GradMode mode) {
    Activations a;
    std::vector<float> z(std::size_t(B * T * cfg_.vocab_size)), dz(z.size());  // (M, V)
    forward(ids, B, T, z.data(), &a);
    const auto t0 = Clock::now();
    const float L = causal_lm_loss(z.data(), labels, B, T, cfg_.vocab_size, dz.data());
    if (profiling_) total_s_ += since(t0);
    backward(a, dz.data(), mode);
    return L;
  }

 private:
  LlamaModel() = default;

  // One projection's base weight. A bitsandbytes-quantized tensor (4-bit packed with its quant
  // state, or LLM.int8 with SCB) goes to make_base as read: kept as stored when Quant is its format,
  // dequantized for F32 / BF16, refused for another quantized format. A floating tensor (the
  // original checkpoint, or a module the bitsandbytes folder left unquantized) is read as fp32 and
  // quantized on load when Quant asks for it.
  template <class Tensor>
  static BaseWeight<Quant> load_base(const hf::ModelFolder& f, const std::string& dir,
                                     const std::string& module, std::int64_t out, std::int64_t in,
                                     const Tensor& tensor) {
    const std::string weight = module + ".weight";
    const std::string what = "model folder '" + dir + "': tensor '" + weight + "'";
    const std::vector<std::int64_t> shape = {out, in};
    if (bnb::is_4bit(f, weight)) {
      quant::Quantized4bit q = with_context(what, [&] { return bnb::read_4bit(f, weight); });
      QLORA_CHECK(q.shape == shape, what, ": bitsandbytes quant_state has shape ",
                  safetensors::detail::shape_str(q.shape), ", expected ",
                  safetensors::detail::shape_str(shape));
      return make_base<Quant>(std::move(q), what);
    }
    if (bnb::is_int8(f, weight)) {
      quant::RowwiseInt8 q = with_context(what, [&] { return bnb::read_int8(f, weight); });
      QLORA_CHECK(q.rows == out && q.cols == in, what, ": int8 weight has shape [", q.rows, ", ", q.cols,
                  "], expected ", safetensors::detail::shape_str(shape));
      return make_base<Quant>(std::move(q), what);
    }
    return make_base<Quant>(tensor(weight, shape), out, in);
  }

  template <class LoraFor>
  static LlamaModel load_impl(const std::string& dir, LoraFor&& lora_for, bool keep_frozen_bases = false) {
    const hf::ModelFolder f = hf::ModelFolder::open(dir);
    LlamaModel m;
    m.cfg_ = LlamaConfig::from_folder(f);
    m.source_dir_ = dir;
    m.source_config_ = f.config();
    m.source_files_ = f.other_files();
    const LlamaConfig& c = m.cfg_;
    const std::int64_t D = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
    auto tensor = [&](const std::string& name, std::vector<std::int64_t> shape) {
      const safetensors::TensorView v = f.get(name);
      QLORA_CHECK(v.shape == shape, "model folder '", dir, "': tensor '", name, "' has shape ",
                  safetensors::detail::shape_str(v.shape), ", expected ",
                  safetensors::detail::shape_str(shape));
      return with_context("model folder '" + dir + "': tensor '" + name + "'", [&] { return v.to_f32(); });
    };
    m.embed_ = tensor("model.embed_tokens.weight", {V, D});
    m.final_norm_ = tensor("model.norm.weight", {D});
    if (c.tie_word_embeddings) {
      m.lm_head_.emplace(cpu::QMatrix::dense(m.embed_.data(), V, D));
    } else {
      const std::vector<float> w = tensor("lm_head.weight", {V, D});
      m.lm_head_.emplace(cpu::QMatrix::dense(w.data(), V, D));
    }
    const std::array<std::array<std::int64_t, 2>, kNumProj> shapes = {
        {{c.q_size(), D}, {c.kv_size(), D}, {c.kv_size(), D}, {D, c.q_size()}, {I, D}, {I, D}, {D, I}}};
    for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
      Layer L;
      const std::string pre = "model.layers." + std::to_string(l) + ".";
      L.input_norm = tensor(pre + "input_layernorm.weight", {D});
      L.post_norm = tensor(pre + "post_attention_layernorm.weight", {D});
      for (int p = 0; p < kNumProj; ++p) {
        const std::string name = llama_module(l, p);
        const std::int64_t out = shapes[std::size_t(p)][0], in = shapes[std::size_t(p)][1];
        BaseWeight<Quant> base = with_context(name, [&] { return load_base(f, dir, name, out, in, tensor); });
        const std::optional<LoraConfig> lc = lora_for(name, l * kNumProj + p);
        L.proj.push_back(lc ? Linear::lora(std::move(base), *lc)
                            : Linear::frozen(std::move(base), keep_frozen_bases));
      }
      m.layers_.push_back(std::move(L));
    }
    m.rope_ = RopeTable::make(c.rope_theta, c.head_dim, c.max_position_embeddings);
    return m;
  }

  using Clock = std::chrono::steady_clock;
  // A matrix's values in storage order (an empty matrix's data() may be null: no copy from it).
  template <class Mat>
  static std::vector<float> storage_copy(const Mat& m) {
    std::vector<float> v(std::size_t(m.size()));
    if (!v.empty()) std::memcpy(v.data(), m.data(), v.size() * sizeof(float));
    return v;
  }

  static double since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
  }
  // f(), its wall time added to `phase` while timing_.
  template <class F>
  void timed(double PhaseTimes::*phase, F&& f) {
    if (!timing_) return f();
    const auto t0 = Clock::now();
    f();
    times_.*phase += since(t0);
  }
  // A projection's forward or backward f(), its time split into base_matmul (a frozen product, or
  // the LoRA layer's own base-product timer) and lora (the rest of the LoRA layer).
  template <class F>
  void timed_proj(Linear& lin, F&& f) {
    if (!timing_) return f();
    const double base0 = lin.has_lora() ? lin.lora_layer().base_seconds() : 0.0;
    const auto t0 = Clock::now();
    f();
    const double dt = since(t0);
    const double base = lin.has_lora() ? lin.lora_layer().base_seconds() - base0 : dt;
    times_.base_matmul += base;
    times_.lora += dt - base;
  }
  void proj_forward(Layer& L, int p, const float* x, std::int64_t M, float* y,
                    typename Linear::Context* ctx) {
    Linear& lin = L.proj[std::size_t(p)];
    timed_proj(lin, [&] { lin.forward(x, M, y, ctx); });
  }
  // The LoRA layers' dropout counters of a decoder layer (0 for frozen projections).
  static std::array<std::uint64_t, kNumProj> dropout_calls_of(const Layer& L) {
    std::array<std::uint64_t, kNumProj> c{};
    for (int p = 0; p < kNumProj; ++p)
      if (L.proj[std::size_t(p)].has_lora())
        c[std::size_t(p)] = L.proj[std::size_t(p)].lora_layer().dropout_calls();
    return c;
  }
  static void set_dropout_calls_of(Layer& L, const std::array<std::uint64_t, kNumProj>& c) {
    for (int p = 0; p < kNumProj; ++p)
      if (L.proj[std::size_t(p)].has_lora())
        L.proj[std::size_t(p)].lora_layer().set_dropout_calls(c[std::size_t(p)]);
  }

  attention::Shape attn_shape(std::int64_t B, std::int64_t T) const {
    return {B, T, cfg_.num_attention_heads, cfg_.num_key_value_heads, cfg_.head_dim};
  }

  // x (M, D) -> the layer's output, in place.
  void layer_forward(Layer& L, LayerActs& a, std::vector<float>& x, std::int64_t B, std::int64_t T,
                     bool train) {
    const std::int64_t M = B * T, D = cfg_.hidden_size, I = cfg_.intermediate_size;
    const std::int64_t H = cfg_.num_attention_heads, KV = cfg_.num_key_value_heads;
    const float eps = float(cfg_.rms_norm_eps);
    auto ctx = [&](int p) { return train ? &a.ctx[std::size_t(p)] : nullptr; };
    auto sized = [](std::vector<float>& v, std::int64_t n) -> float* {
      v.resize(std::size_t(n));
      return v.data();
    };
    a.x = x;
    std::vector<float> n(std::size_t(M * D));  // (M, D) normed input, then reused
    rmsnorm::forward(x.data(), L.input_norm.data(), M, D, eps, n.data(), sized(a.rstd1, M));
    const bool keep_inputs = train && full_;  // the frozen products' inputs, for dW
    if (keep_inputs) a.n1 = n;
    proj_forward(L, kQ, n.data(), M, sized(a.q, M * cfg_.q_size()), ctx(kQ));   // (M, H·d)
    proj_forward(L, kK, n.data(), M, sized(a.k, M * cfg_.kv_size()), ctx(kK));  // (M, KV·d)
    proj_forward(L, kV, n.data(), M, sized(a.v, M * cfg_.kv_size()), ctx(kV));  // (M, KV·d)
    rope_.apply(a.q.data(), B, T, H);
    rope_.apply(a.k.data(), B, T, KV);
    std::vector<float> att(std::size_t(M * cfg_.q_size()));  // (M, H·d)
    float* P = sized(a.P, B * H * T * T);
    timed(&PhaseTimes::attention,
          [&] { attention::forward(attn_shape(B, T), a.q.data(), a.k.data(), a.v.data(), att.data(), P); });
    if (keep_inputs) a.att = att;
    proj_forward(L, kO, att.data(), M, n.data(), ctx(kO));  // (M, D)
    a.h.resize(std::size_t(M * D));
    for (std::int64_t i = 0; i < M * D; ++i) a.h[std::size_t(i)] = x[std::size_t(i)] + n[std::size_t(i)];
    rmsnorm::forward(a.h.data(), L.post_norm.data(), M, D, eps, n.data(), sized(a.rstd2, M));
    if (keep_inputs) a.n2 = n;
    proj_forward(L, kGate, n.data(), M, sized(a.gate, M * I), ctx(kGate));  // (M, I)
    proj_forward(L, kUp, n.data(), M, sized(a.up, M * I), ctx(kUp));        // (M, I)
    std::vector<float> act(std::size_t(M * I));                             // (M, I)
    for (std::int64_t i = 0; i < M * I; ++i) {
      const float g = a.gate[std::size_t(i)];
      act[std::size_t(i)] = g / (1.0f + std::exp(-g)) * a.up[std::size_t(i)];  // silu(g) · u
    }
    if (keep_inputs) a.act = act;
    proj_forward(L, kDown, act.data(), M, n.data(), ctx(kDown));  // (M, D)
    for (std::int64_t i = 0; i < M * D; ++i) x[std::size_t(i)] = a.h[std::size_t(i)] + n[std::size_t(i)];
  }

  // dres (M, D): d loss / d (layer output) in, d loss / d (layer input) out (when need_dx).
  void layer_backward(Layer& L, const LayerActs& a, std::vector<float>& dres, std::int64_t B, std::int64_t T,
                      GradMode mode, bool need_dx) {
    const std::int64_t M = B * T, D = cfg_.hidden_size, I = cfg_.intermediate_size;
    const std::int64_t H = cfg_.num_attention_heads, KV = cfg_.num_key_value_heads;
    const std::int64_t qw = cfg_.q_size(), kw = cfg_.kv_size();
    const std::array<const float*, kNumProj> inputs = {a.n1.data(), a.n1.data(), a.n1.data(), a.att.data(),
                                                       a.n2.data(), a.n2.data(), a.act.data()};
    auto bwd = [&](int p, const float* dy, float* dx) {
      Linear& lin = L.proj[std::size_t(p)];
      if (full_)
        timed(&PhaseTimes::base_matmul, [&] {
          add_weight_grad(L.dW[std::size_t(p)], dy, inputs[std::size_t(p)], M, lin.out_features(),
                          lin.in_features());
        });
      if (!dx && !lin.has_lora()) return;  // nothing to compute for a frozen layer
      timed_proj(lin, [&] { lin.backward(a.ctx[std::size_t(p)], dy, M, dx, mode); });
    };
    // MLP: x' = h + down(silu(g) ⊙ u)
    std::vector<float> dact(std::size_t(M * I)), dg(std::size_t(M * I)), du(std::size_t(M * I));  // (M, I)
    bwd(kDown, dres.data(), dact.data());
    for (std::int64_t i = 0; i < M * I; ++i) {
      const float g = a.gate[std::size_t(i)], sg = 1.0f / (1.0f + std::exp(-g));
      du[std::size_t(i)] = dact[std::size_t(i)] * (g * sg);
      // silu'(g) = σ(g) · (1 + g · (1 − σ(g)))
      dg[std::size_t(i)] = dact[std::size_t(i)] * a.up[std::size_t(i)] * (sg * (1.0f + g * (1.0f - sg)));
    }
    std::vector<float> dn(std::size_t(M * D)), tmp(std::size_t(M * D));  // (M, D)
    bwd(kGate, dg.data(), dn.data());
    bwd(kUp, du.data(), tmp.data());
    for (std::int64_t i = 0; i < M * D; ++i) dn[std::size_t(i)] += tmp[std::size_t(i)];
    if (full_) add_norm_grad(L.d_post_norm, dn.data(), a.h.data(), a.rstd2.data(), M, D);
    rmsnorm::backward(dn.data(), a.h.data(), L.post_norm.data(), a.rstd2.data(), M, D, tmp.data());
    for (std::int64_t i = 0; i < M * D; ++i) dres[std::size_t(i)] += tmp[std::size_t(i)];  // now d loss / d h
    // attention: h = x + o_proj(attn)
    std::vector<float> datt(std::size_t(M * qw)), dq(std::size_t(M * qw));  // (M, H·d)
    std::vector<float> dk(std::size_t(M * kw)), dv(std::size_t(M * kw));    // (M, KV·d)
    bwd(kO, dres.data(), datt.data());
    timed(&PhaseTimes::attention, [&] {
      attention::backward(attn_shape(B, T), a.q.data(), a.k.data(), a.v.data(), a.P.data(), datt.data(),
                          dq.data(), dk.data(), dv.data());
    });
    rope_.apply(dq.data(), B, T, H, /*inverse=*/true);
    rope_.apply(dk.data(), B, T, KV, /*inverse=*/true);
    if (!need_dx) {
      bwd(kQ, dq.data(), nullptr);
      bwd(kK, dk.data(), nullptr);
      bwd(kV, dv.data(), nullptr);
      return;
    }
    bwd(kQ, dq.data(), dn.data());
    bwd(kK, dk.data(), tmp.data());
    for (std::int64_t i = 0; i < M * D; ++i) dn[std::size_t(i)] += tmp[std::size_t(i)];
    bwd(kV, dv.data(), tmp.data());
    for (std::int64_t i = 0; i < M * D; ++i) dn[std::size_t(i)] += tmp[std::size_t(i)];
    if (full_) add_norm_grad(L.d_input_norm, dn.data(), a.x.data(), a.rstd1.data(), M, D);
    rmsnorm::backward(dn.data(), a.x.data(), L.input_norm.data(), a.rstd1.data(), M, D, tmp.data());
    for (std::int64_t i = 0; i < M * D; ++i) dres[std::size_t(i)] += tmp[std::size_t(i)];  // d loss / d x
  }

  // g (N, K) += dyᵀ · x with dy (M, N), x (M, K): a weight gradient, rows split over the pool.
  static void add_weight_grad(std::vector<float>& g, const float* dy, const float* x, std::int64_t M,
                              std::int64_t N, std::int64_t K) {
    using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    Eigen::Map<const RowMat> DY(dy, M, N), X(x, M, K);
    Eigen::Map<RowMat> G(g.data(), N, K);
    cpu::pool_for(
        std::size_t(N), 8, std::size_t(std::max<std::int64_t>(8, 32768 / std::max<std::int64_t>(K, 1))),
        [&](std::size_t b, std::size_t e) {
          const auto n = std::int64_t(e - b);
          G.middleRows(std::int64_t(b), n).noalias() += DY.middleCols(std::int64_t(b), n).transpose() * X;
        });
  }
  // g (D) += Σ_rows dy ⊙ x · r: the gradient of an RMSNorm weight (y = w ⊙ x · r).
  static void add_norm_grad(std::vector<float>& g, const float* dy, const float* x, const float* rstd,
                            std::int64_t M, std::int64_t D) {
    std::vector<double> acc(std::size_t(D), 0.0);
    for (std::int64_t t = 0; t < M; ++t)
      for (std::int64_t i = 0; i < D; ++i)
        acc[std::size_t(i)] += double(dy[t * D + i]) * x[t * D + i] * rstd[t];
    for (std::int64_t i = 0; i < D; ++i) g[std::size_t(i)] += float(acc[std::size_t(i)]);
  }

  LlamaConfig cfg_;
  std::string source_dir_;                 // the folder loaded, for save()
  nlohmann::json source_config_;           // its config.json
  peft::LoraConfig adapter_config_;        // what adapter() writes
  std::vector<std::string> source_files_;  // its files other than weights and config (tokenizer...)
  bool full_ = false;                      // enable_full_training()
  bool checkpointing_ = false;             // set_gradient_checkpointing()
  bool profiling_ = false;                 // set_profiling()
  bool timing_ = false;                    // profiling_, inside a training forward or a backward
  PhaseTimes times_;                       // rest unused: total_s_ less the others
  double total_s_ = 0;                     // training forwards, backwards and forward_backward's loss
  std::vector<float> d_embed_, d_final_norm_, d_lm_head_;  // their gradients in full training
  std::vector<float> embed_;                               // (V, D)
  std::vector<float> final_norm_;                          // (D)
  std::optional<cpu::QMatrix> lm_head_;                    // (V, D), fp32; a copy of embed_ when tied
  std::vector<Layer> layers_;
  RopeTable rope_;
};

}  // namespace qlora
