#pragma once
// cuda::LlamaModel<Quant>: the CPU's LlamaModel<Quant> (model/llama.hpp) on the GPU for LoRA
// training, built from its weights (LlamaModel::weights(), model/llama_weights.hpp):
//
//   x = embed_tokens[ids]                                     (M, D) fp32   M = B·T tokens
//   per layer:  h  = x + o_proj(attn(rope(q, k), v))          q, k, v from input_layernorm(x)
//               x' = h + down(silu(gate(n)) ⊙ up(n))           n = post_attention_layernorm(h)
//   logits = lm_head(norm(x))                                 (M, V) fp32
//   loss = mean next-token cross-entropy (transformers' ForCausalLMLoss)
//
// Precision. The residual stream x, h, the norms' statistics and the logits are fp32, as on the CPU;
// the inputs and outputs of the products (norm outputs, q, k, v, attention output, MLP activations,
// and the gradients flowing into products) are bf16, as LoraLinear<..., Cuda> takes them, with fp32
// accumulation everywhere. The embedding, norms and lm_head are frozen (lm_head runs in bf16 on a
// bf16 copy of its weight: checkpoints store it in bf16 anyway).
//
// Projections that LoRA targets are LoraLinear<Quant, Dynamic, Cuda> (the CPU model's Rank), with
// the CPU layers' config (seed included), A, B and dropout counters, so the dropout masks repeat;
// the others are frozen device bases (lora_linear.cuh's DeviceBase), whose backward is dx = dy·W0.
// All layers share one dequantization scratch (the largest weight, bf16).
//
// What a training forward keeps per layer (LayerActs): the layer input x and h (fp32 (M, D)), two
// rstd (M), rotated q, k, v (bf16), attention's row max and inverse sum (B, H, T) (attention.cuh:
// backward recomputes the probabilities), gate and up (bf16 (M, I)), and the LoRA contexts (each
// LoRA layer's copy of its input and its (M, r) h). Everything else is in buffers shared by all
// layers and reused: forward's norm output, attention output, sublayer output and MLP activation,
// and backward's gradients. All buffers grow on first use and are kept: steps of one shape
// allocate nothing.
//
// Not here (the CPU model has them): full-parameter training and gradient checkpointing (both are
// refused), phase timing.
#include <cuda_bf16.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/cast.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/gemm_rowmajor.cuh"
#include "qlora/cuda/lora_linear.cuh"
#include "qlora/cuda/model/attention.cuh"
#include "qlora/cuda/model/cross_entropy.cuh"
#include "qlora/cuda/model/embedding.cuh"
#include "qlora/cuda/model/residual.cuh"
#include "qlora/cuda/model/rmsnorm.cuh"
#include "qlora/cuda/model/rope.cuh"
#include "qlora/cuda/model/swiglu.cuh"
#include "qlora/model/llama_weights.hpp"
#include "qlora/optim/param.hpp"

namespace qlora {
namespace cuda {

template <class Quant>
class LlamaModel {
 public:
  using Lora = qlora::LoraLinear<Quant, Dynamic, Cuda>;

  // Uploads w (blocking). ctx must outlive the model; every call runs on its stream.
  LlamaModel(const Context& ctx, const LlamaWeights<Quant>& w) : ctx_(&ctx), s_(w.shape) {
    const std::int64_t D = s_.hidden, V = s_.vocab, d = s_.head_dim;
    QLORA_CHECK(s_.layers > 0 && D > 0 && V > 0 && s_.heads > 0 && s_.kv_heads > 0 && d > 0,
                "cuda::LlamaModel: shape with ", s_.layers, " layers, hidden ", D, ", vocab ", V,
                ", expected positive sizes");
    QLORA_CHECK(s_.heads % s_.kv_heads == 0, "cuda::LlamaModel: ", s_.heads, " heads over ", s_.kv_heads,
                " KV heads, expected a multiple");
    auto check = [](const std::vector<float>& v, std::int64_t n, const char* what) {
      QLORA_CHECK(std::int64_t(v.size()) == n, "cuda::LlamaModel: ", what, " has ", v.size(),
                  " values, expected ", n);
    };
    check(w.embed, V * D, "embed_tokens");
    check(w.final_norm, D, "model.norm");
    check(w.lm_head, V * D, "lm_head");
    check(w.rope_cos, s_.max_positions * d, "the RoPE cos table");
    check(w.rope_sin, s_.max_positions * d, "the RoPE sin table");
    QLORA_CHECK(std::int64_t(w.layers.size()) == s_.layers, "cuda::LlamaModel: ", w.layers.size(),
                " layers given, expected ", s_.layers);
    const cudaStream_t st = ctx.stream();
    embed_ = DeviceBuffer<float>::from_host(w.embed, st);
    final_norm_ = DeviceBuffer<float>::from_host(w.final_norm, st);
    rope_cos_ = DeviceBuffer<float>::from_host(w.rope_cos, st);
    rope_sin_ = DeviceBuffer<float>::from_host(w.rope_sin, st);
    {
      std::vector<bf16> hb(w.lm_head.size());
      for (std::size_t i = 0; i < hb.size(); ++i) hb[i] = to_bf16(w.lm_head[i]);
      lm_head_ = DeviceBuffer<__nv_bfloat16>(hb.size());
      static_assert(sizeof(bf16) == sizeof(__nv_bfloat16), "bf16 layout");
      QLORA_CUDA_CHECK(
          cudaMemcpyAsync(lm_head_.data(), hb.data(), hb.size() * sizeof(bf16), cudaMemcpyHostToDevice, st));
      ctx.synchronize();
    }
    const std::int64_t I = s_.intermediate, qw = s_.q_size(), kw = s_.kv_size();
    const std::array<std::array<std::int64_t, 2>, kNumProj> shapes = {
        {{qw, D}, {kw, D}, {kw, D}, {D, qw}, {I, D}, {I, D}, {D, I}}};
    for (std::int64_t l = 0; l < s_.layers; ++l) {
      const auto& wl = w.layers[std::size_t(l)];
      check(wl.input_norm, D, "input_layernorm");
      check(wl.post_norm, D, "post_attention_layernorm");
      QLORA_CHECK(wl.proj.size() == std::size_t(kNumProj), "cuda::LlamaModel: layer ", l, " has ",
                  wl.proj.size(), " projections, expected ", int(kNumProj));
      Layer L;
      L.input_norm = DeviceBuffer<float>::from_host(wl.input_norm, st);
      L.post_norm = DeviceBuffer<float>::from_host(wl.post_norm, st);
      for (int p = 0; p < kNumProj; ++p) {
        const auto& wp = wl.proj[std::size_t(p)];
        const std::string name = llama_module(l, p);
        QLORA_CHECK(wp.base, "cuda::LlamaModel: '", name, "' has no base weight");
        QLORA_CHECK(wp.base->out == shapes[std::size_t(p)][0] && wp.base->in == shapes[std::size_t(p)][1],
                    "cuda::LlamaModel: '", name, "' has shape (", wp.base->out, ", ", wp.base->in,
                    "), expected (", shapes[std::size_t(p)][0], ", ", shapes[std::size_t(p)][1], ")");
        Proj& P = L.proj[std::size_t(p)];
        P.out = wp.base->out;
        P.in = wp.base->in;
        if (wp.lora) {
          P.lora = std::make_unique<Lora>(ctx, *wp.base, *wp.lora);
          with_context(name, [&] {
            P.lora->set_A(ctx, wp.A);
            P.lora->set_B(ctx, wp.B);
          });
          P.lora->set_dropout_calls(wp.dropout_calls);
          P.lora->share_scratch(scratch_);
        } else {
          P.frozen = std::make_unique<detail::DeviceBase<Quant>>(ctx, *wp.base);
        }
      }
      layers_.push_back(std::move(L));
    }
    acts_.resize(std::size_t(s_.layers));
    xs_.resize(std::size_t(s_.layers) + 1);
    ctx.synchronize();
  }

  LlamaModel(const LlamaModel&) = delete;
  LlamaModel& operator=(const LlamaModel&) = delete;

  const LlamaShape& shape() const { return s_; }

  // Refused here: the CPU model has both (set_gradient_checkpointing, enable_full_training).
  void set_gradient_checkpointing(bool on) {
    QLORA_CHECK(
        !on, "cuda::LlamaModel: gradient checkpointing is not implemented on the GPU yet; train without it");
  }
  void enable_full_training() {
    throw_error("cuda::LlamaModel: full-parameter training is not implemented on the GPU; use LoRA targets");
  }

  // One training step's forward and backward on ids, labels (B, T) host arrays (-100: ignored):
  // returns the mean next-token loss; dA, dB of every LoRA layer written or added by `mode`.
  // Synchronizes once, at the end (the loss is read back).
  float forward_backward(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B, std::int64_t T,
                         GradMode mode = GradMode::Overwrite) {
    const std::int64_t count = upload(ids, labels, B, T);
    forward_impl(B, T, count, /*train=*/true);
    backward_impl(B, T, mode);
    return read_loss(B * T, count);
  }

  // The mean next-token loss without dropout and without keeping anything (held-out evaluation).
  float loss(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B, std::int64_t T) {
    const std::int64_t count = upload(ids, labels, B, T);
    forward_impl(B, T, count, /*train=*/false);
    return read_loss(B * T, count);
  }

  // The trainable parameters for cuda::AdamW (device pointers), PEFT's names as the CPU model's.
  std::vector<optim::Param> params() {
    std::vector<optim::Param> out;
    for_each_lora([&](std::int64_t l, int p, Lora& lo) {
      for (auto& prm : lo.params(llama_module(l, p))) out.push_back(prm);
    });
    return out;
  }
  void zero_grad() {
    for_each_lora([&](std::int64_t, int, Lora& lo) { lo.zero_grad(*ctx_); });
  }

  // The LoRA layers' dropout counters in module order, as LlamaModel::dropout_calls().
  std::vector<std::uint64_t> dropout_calls() const {
    std::vector<std::uint64_t> c;
    for (const Layer& L : layers_)
      for (const Proj& P : L.proj)
        if (P.lora) c.push_back(P.lora->dropout_calls());
    return c;
  }
  void set_dropout_calls(const std::vector<std::uint64_t>& c) {
    std::size_t k = 0;
    for_each_lora([&](std::int64_t, int, Lora& lo) {
      QLORA_CHECK(k < c.size(), "cuda::LlamaModel::set_dropout_calls: ", c.size(),
                  " counters for more LoRA layers");
      lo.set_dropout_calls(c[k++]);
    });
    QLORA_CHECK(k == c.size(), "cuda::LlamaModel::set_dropout_calls: ", c.size(), " counters, the model has ",
                k, " LoRA layers");
  }

  // A, B and dropout counters of every LoRA layer (blocking), for LlamaModel::set_lora on the CPU
  // model, whose adapter() then saves them.
  std::vector<LoraTensors> download_lora() { return download(false); }
  // dA, dB of every LoRA layer (in A, B), blocking: for tests.
  std::vector<LoraTensors> download_lora_grads() { return download(true); }

  // Sets A, B and the dropout counter of LoRA layers from download_lora()'s or the CPU model's copy
  // (LlamaModel::set_lora's contract: every module named is a LoRA layer of this model, with its
  // shapes), e.g. to restore a checkpoint. Every entry is checked before any layer changes. Blocking.
  void set_lora(const std::vector<LoraTensors>& tensors) {
    std::vector<Lora*> dst;
    for (const LoraTensors& t : tensors) {
      Lora* found = nullptr;
      for_each_lora([&](std::int64_t l, int p, Lora& lo) {
        if (llama_module(l, p) == t.module) found = &lo;
      });
      QLORA_CHECK(found, "cuda::LlamaModel::set_lora: '", t.module, "' is not a LoRA layer of the model");
      QLORA_CHECK(found->A().size() == t.A.size() && found->B().size() == t.B.size(),
                  "cuda::LlamaModel::set_lora: '", t.module, "' has A, B of ", t.A.size(), ", ", t.B.size(),
                  " values, expected ", found->A().size(), ", ", found->B().size());
      dst.push_back(found);
    }
    for (std::size_t k = 0; k < tensors.size(); ++k) {
      dst[k]->set_A(*ctx_, tensors[k].A);
      dst[k]->set_B(*ctx_, tensors[k].B);
      dst[k]->set_dropout_calls(tensors[k].dropout_calls);
    }
  }

 private:
  std::vector<LoraTensors> download(bool grads) {
    std::vector<LoraTensors> out;
    for_each_lora([&](std::int64_t l, int p, Lora& lo) {
      const cudaStream_t st = ctx_->stream();
      out.push_back({llama_module(l, p), (grads ? lo.dA() : lo.A()).to_host(st),
                     (grads ? lo.dB() : lo.B()).to_host(st), lo.dropout_calls()});
    });
    return out;
  }

  struct Proj {
    std::unique_ptr<Lora> lora;                         // a LoRA target, or
    std::unique_ptr<detail::DeviceBase<Quant>> frozen;  // a frozen product
    std::int64_t out = 0, in = 0;
  };
  struct Layer {
    DeviceBuffer<float> input_norm, post_norm;  // (D)
    std::array<Proj, kNumProj> proj;
  };
  // What a training forward keeps for one layer's backward (see the top of this file); the layer
  // input is xs_[l].
  struct LayerActs {
    DeviceBuffer<float> rstd1, rstd2;                  // (M)
    DeviceBuffer<__nv_bfloat16> q;                     // (M, H·d) after RoPE
    DeviceBuffer<__nv_bfloat16> k, v;                  // (M, KV·d) k after RoPE
    DeviceBuffer<float> row_max, row_inv;              // (B, H, T) attention's softmax statistics
    DeviceBuffer<float> h;                             // (M, D) after the attention residual
    DeviceBuffer<__nv_bfloat16> gate, up;              // (M, I) MLP pre-activations
    std::array<typename Lora::Context, kNumProj> ctx;  // LoRA layers' contexts
  };

  template <class T>
  static T* sized(DeviceBuffer<T>& b, std::int64_t n) {
    detail::ensure_size(b, std::size_t(n));
    return b.data();
  }

  template <class F>
  void for_each_lora(F&& f) {
    for (std::int64_t l = 0; l < s_.layers; ++l)
      for (int p = 0; p < kNumProj; ++p)
        if (Lora* lo = layers_[std::size_t(l)].proj[std::size_t(p)].lora.get()) f(l, p, *lo);
  }

  AttentionShape attn_shape(std::int64_t B, std::int64_t T) const {
    return {int(B), int(T), int(s_.heads), int(s_.kv_heads), int(s_.head_dim)};
  }

  // Checks ids and labels as the CPU model does, uploads them; returns the number of targets.
  std::int64_t upload(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B, std::int64_t T) {
    QLORA_CHECK(B > 0 && T > 0, "cuda::LlamaModel: batch ", B, " and sequence ", T, " must be positive");
    QLORA_CHECK(T <= s_.max_positions, "cuda::LlamaModel: sequence of ", T,
                " tokens, longer than max_position_embeddings ", s_.max_positions);
    QLORA_CHECK(B * T <= 65535 * detail::kLowrankRows, "cuda::LlamaModel: ", B * T,
                " tokens per call, expected at most ", 65535 * detail::kLowrankRows);
    const std::int64_t M = B * T, V = s_.vocab;
    std::int64_t count = 0;
    for (std::int64_t t = 0; t < M; ++t) {
      QLORA_CHECK(ids[t] >= 0 && ids[t] < V, "cuda::LlamaModel: token id ", ids[t], " at [", t / T, ", ",
                  t % T, "] is outside the vocabulary [0, ", V, ")");
      const std::int64_t y = labels[t];
      QLORA_CHECK(y == -100 || (y >= 0 && y < V), "cuda::LlamaModel: label [", t / T, ", ", t % T, "] is ", y,
                  ", expected -100 or a token id in [0, ", V, ")");
      if (t % T > 0 && y != -100) ++count;  // position 0 is nobody's target
    }
    QLORA_CHECK(count > 0, "cuda::LlamaModel: every label is -100, no target to compute a loss on");
    host_ids_.assign(ids, ids + M);
    host_labels_.assign(labels, labels + M);
    sized(ids_, M);
    sized(labels_, M);
    ids_.upload(host_ids_.data(), std::size_t(M), ctx_->stream());
    labels_.upload(host_labels_.data(), std::size_t(M), ctx_->stream());
    return count;
  }

  void proj_forward(Layer& L, int p, const __nv_bfloat16* x, std::int64_t M, __nv_bfloat16* y,
                    typename Lora::Context* c) {
    Proj& P = L.proj[std::size_t(p)];
    if (P.frozen)
      P.frozen->forward(*ctx_, x, int(M), y, scratch_);
    else if (c)
      P.lora->forward(*ctx_, x, M, y, *c);
    else
      P.lora->forward(*ctx_, x, M, y);
  }
  // dy (M, out) -> dx (M, in) overwritten (skipped when null); LoRA layers write or add dA, dB.
  void proj_backward(Layer& L, LayerActs& a, int p, const __nv_bfloat16* dy, std::int64_t M,
                     __nv_bfloat16* dx, GradMode mode) {
    Proj& P = L.proj[std::size_t(p)];
    if (P.lora)
      P.lora->backward(*ctx_, a.ctx[std::size_t(p)], dy, dx, mode);
    else if (dx)
      P.frozen->backward(*ctx_, dy, int(M), dx, scratch_);
  }

  // The layer on x_in (M, D) -> x_out (M, D) (may alias x_in when not training).
  void layer_forward(Layer& L, LayerActs& a, const float* x_in, float* x_out, std::int64_t B, std::int64_t T,
                     bool train) {
    const std::int64_t M = B * T, D = s_.hidden, I = s_.intermediate, H = s_.heads, KV = s_.kv_heads;
    const std::int64_t qw = s_.q_size(), kw = s_.kv_size(), d = s_.head_dim;
    const float eps = float(s_.rms_norm_eps);
    auto ctx = [&](int p) { return train ? &a.ctx[std::size_t(p)] : nullptr; };
    const Context& c = *ctx_;
    __nv_bfloat16* n = sized(n_, M * D);  // (M, D) normed input, bf16
    rmsnorm_forward(c, x_in, L.input_norm.data(), M, D, eps, n, sized(a.rstd1, M));
    __nv_bfloat16* q = sized(a.q, M * qw);  // (M, H·d)
    __nv_bfloat16* k = sized(a.k, M * kw);  // (M, KV·d)
    __nv_bfloat16* v = sized(a.v, M * kw);  // (M, KV·d)
    proj_forward(L, kQ, n, M, q, ctx(kQ));
    proj_forward(L, kK, n, M, k, ctx(kK));
    proj_forward(L, kV, n, M, v, ctx(kV));
    rope_apply(c, q, q, B, T, H, d, rope_cos_.data(), rope_sin_.data(), false);
    rope_apply(c, k, k, B, T, KV, d, rope_cos_.data(), rope_sin_.data(), false);
    __nv_bfloat16* att = sized(att_, M * qw);  // (M, H·d)
    attention_forward(c, attn_shape(B, T), q, k, v, att, sized(a.row_max, B * H * T),
                      sized(a.row_inv, B * H * T));
    __nv_bfloat16* y = sized(y_, M * D);  // (M, D) sublayer output
    proj_forward(L, kO, att, M, y, ctx(kO));
    float* h = sized(a.h, M * D);  // (M, D)
    residual_add(c, x_in, y, std::size_t(M * D), h);
    rmsnorm_forward(c, h, L.post_norm.data(), M, D, eps, n, sized(a.rstd2, M));
    __nv_bfloat16* g = sized(a.gate, M * I);  // (M, I)
    __nv_bfloat16* u = sized(a.up, M * I);    // (M, I)
    proj_forward(L, kGate, n, M, g, ctx(kGate));
    proj_forward(L, kUp, n, M, u, ctx(kUp));
    __nv_bfloat16* act = sized(act_, M * I);  // (M, I)
    swiglu_forward(c, g, u, std::size_t(M * I), act);
    proj_forward(L, kDown, act, M, y, ctx(kDown));
    residual_add(c, h, y, std::size_t(M * D), x_out);
  }

  // dres (M, D): d loss / d (layer output) in, d loss / d (layer input) out when need_dx.
  void layer_backward(Layer& L, LayerActs& a, const float* x_in, std::int64_t B, std::int64_t T,
                      GradMode mode, bool need_dx) {
    const std::int64_t M = B * T, D = s_.hidden, I = s_.intermediate, H = s_.heads, KV = s_.kv_heads;
    const std::int64_t qw = s_.q_size(), kw = s_.kv_size(), d = s_.head_dim;
    const Context& c = *ctx_;
    float* dres = dres_.data();
    __nv_bfloat16* dres_b = sized(dres_b_, M * D);  // (M, D) bf16 copy: the dy of the products
    __nv_bfloat16* dn0 = sized(dn_[0], M * D);      // (M, D) dx of the products that read a norm
    __nv_bfloat16* dn1 = sized(dn_[1], M * D);
    __nv_bfloat16* dn2 = sized(dn_[2], M * D);
    // MLP: x' = h + down(silu(g) ⊙ u)
    cast_to_bf16(c, dres, std::size_t(M * D), dres_b);
    __nv_bfloat16* dact = sized(dact_, M * I);  // (M, I); then dg in place
    __nv_bfloat16* du = sized(du_, M * I);      // (M, I)
    proj_backward(L, a, kDown, dres_b, M, dact, mode);
    swiglu_backward(c, dact, a.gate.data(), a.up.data(), std::size_t(M * I), dact, du);
    proj_backward(L, a, kGate, dact, M, dn0, mode);
    proj_backward(L, a, kUp, du, M, dn1, mode);
    NormGrad post;
    post.bf16[0] = dn0;
    post.bf16[1] = dn1;
    post.n_bf16 = 2;
    rmsnorm_backward(c, post, a.h.data(), L.post_norm.data(), a.rstd2.data(), M, D, /*accumulate=*/true,
                     dres);
    // now d loss / d h. Attention: h = x + o_proj(attn)
    cast_to_bf16(c, dres, std::size_t(M * D), dres_b);
    __nv_bfloat16* datt = sized(datt_, M * qw);  // (M, H·d)
    proj_backward(L, a, kO, dres_b, M, datt, mode);
    float* dq = sized(dq_, M * qw);          // (M, H·d)
    float* dk = sized(dk_, M * kw);          // (M, KV·d)
    __nv_bfloat16* dv = sized(dv_, M * kw);  // (M, KV·d)
    attention_backward(c, attn_shape(B, T), a.q.data(), a.k.data(), a.v.data(), a.row_max.data(),
                       a.row_inv.data(), datt, dq, dk, dv, sized(delta_, B * H * T));
    __nv_bfloat16* dqb = sized(dqb_, M * qw);  // (M, H·d) before RoPE
    __nv_bfloat16* dkb = sized(dkb_, M * kw);  // (M, KV·d) before RoPE
    rope_apply(c, dq, dqb, B, T, H, d, rope_cos_.data(), rope_sin_.data(), true);
    rope_apply(c, dk, dkb, B, T, KV, d, rope_cos_.data(), rope_sin_.data(), true);
    // a frozen embedding needs no gradient: the first layer skips the gradient of its input
    proj_backward(L, a, kQ, dqb, M, need_dx ? dn0 : nullptr, mode);
    proj_backward(L, a, kK, dkb, M, need_dx ? dn1 : nullptr, mode);
    proj_backward(L, a, kV, dv, M, need_dx ? dn2 : nullptr, mode);
    if (!need_dx) return;
    NormGrad in;
    in.bf16[0] = dn0;
    in.bf16[1] = dn1;
    in.bf16[2] = dn2;
    in.n_bf16 = 3;
    rmsnorm_backward(c, in, x_in, L.input_norm.data(), a.rstd1.data(), M, D, /*accumulate=*/true, dres);
  }

  // Embedding, layers, final norm, lm_head and the loss: per-row losses into loss_rows_, and with
  // train dlogits (M, V) = (softmax − onehot) / count in bf16.
  void forward_impl(std::int64_t B, std::int64_t T, std::int64_t count, bool train) {
    const std::int64_t M = B * T, D = s_.hidden, V = s_.vocab;
    const Context& c = *ctx_;
    float* x0 = sized(xs_[0], M * D);
    embedding_forward(c, embed_.data(), ids_.data(), M, D, x0);
    for (std::int64_t l = 0; l < s_.layers; ++l) {
      // evaluation: one layer's buffers serve every layer, and the stream is updated in place
      LayerActs& a = acts_[train ? std::size_t(l) : 0];
      const float* x_in = train ? xs_[std::size_t(l)].data() : x0;
      float* x_out = train ? sized(xs_[std::size_t(l) + 1], M * D) : x0;
      layer_forward(layers_[std::size_t(l)], a, x_in, x_out, B, T, train);
    }
    const float* xf = train ? xs_[std::size_t(s_.layers)].data() : x0;  // (M, D) final norm input
    __nv_bfloat16* fn = sized(final_out_, M * D);                       // (M, D) bf16
    rmsnorm_forward(c, xf, final_norm_.data(), M, D, float(s_.rms_norm_eps), fn, sized(rstd_final_, M));
    // logits (M, V) = fn (M, D) · lm_headᵀ (D, V)
    float* z = sized(logits_, M * V);
    gemm_rowmajor(c, int(M), int(V), int(D), 1.0f, {fn, CUDA_R_16BF, int(D)},
                  {lm_head_.data(), CUDA_R_16BF, int(D), Op::T}, 0.0f, z, CUDA_R_32F, int(V));
    cross_entropy(c, z, labels_.data(), B, T, V, count, sized(loss_rows_, M),
                  train ? sized(dlogits_, M * V) : nullptr);
  }

  // From the logits of forward_impl(train) to dA, dB of every LoRA layer.
  void backward_impl(std::int64_t B, std::int64_t T, GradMode mode) {
    const std::int64_t M = B * T, D = s_.hidden, V = s_.vocab;
    const Context& c = *ctx_;
    const __nv_bfloat16* dz = dlogits_.data();  // (M, V) from forward_impl
    // lm_head (frozen): dfn (M, D) = dlogits (M, V) · lm_head (V, D), fp32 out for the norm's backward
    float* dfn = sized(dfinal_, M * D);
    gemm_rowmajor(c, int(M), int(D), int(V), 1.0f, {dz, CUDA_R_16BF, int(V)},
                  {lm_head_.data(), CUDA_R_16BF, int(D)}, 0.0f, dfn, CUDA_R_32F, int(D));
    NormGrad g;
    g.f32 = dfn;
    float* dres = sized(dres_, M * D);  // (M, D) d loss / d residual stream
    rmsnorm_backward(c, g, xs_[std::size_t(s_.layers)].data(), final_norm_.data(), rstd_final_.data(), M, D,
                     /*accumulate=*/false, dres);
    for (std::int64_t l = s_.layers - 1; l >= 0; --l)
      layer_backward(layers_[std::size_t(l)], acts_[std::size_t(l)], xs_[std::size_t(l)].data(), B, T, mode,
                     l > 0);
  }

  // The mean of the per-row losses: added in row order in double, as the CPU's causal_lm_loss.
  float read_loss(std::int64_t M, std::int64_t count) {
    host_loss_rows_.resize(std::size_t(M));
    loss_rows_.download(host_loss_rows_.data(), std::size_t(M), ctx_->stream());
    ctx_->synchronize();
    double total = 0;
    for (double r : host_loss_rows_) total += r;
    return float(total / double(count));
  }

  const Context* ctx_;
  LlamaShape s_;
  DeviceBuffer<float> embed_;                // (V, D)
  DeviceBuffer<float> final_norm_;           // (D)
  DeviceBuffer<__nv_bfloat16> lm_head_;      // (V, D)
  DeviceBuffer<float> rope_cos_, rope_sin_;  // (max_positions, d)
  std::vector<Layer> layers_;
  DeviceBuffer<__nv_bfloat16> scratch_;  // dequantized base weight, shared by all projections
  // kept for backward
  std::vector<DeviceBuffer<float>> xs_;  // layers + 1 of (M, D): layer inputs, then model.norm's
  std::vector<LayerActs> acts_;
  DeviceBuffer<float> rstd_final_;         // (M)
  DeviceBuffer<__nv_bfloat16> final_out_;  // (M, D) norm(x), lm_head's input
  DeviceBuffer<float> logits_;             // (M, V)
  // shared by all layers, reused
  DeviceBuffer<__nv_bfloat16> n_, att_, y_, act_;      // forward: (M, D), (M, H·d), (M, D), (M, I)
  DeviceBuffer<float> dres_, dfinal_;                  // (M, D)
  DeviceBuffer<__nv_bfloat16> dres_b_, dn_[3];         // (M, D)
  DeviceBuffer<__nv_bfloat16> dact_, du_;              // (M, I)
  DeviceBuffer<__nv_bfloat16> datt_, dqb_, dkb_, dv_;  // (M, H·d), (M, H·d), (M, KV·d), (M, KV·d)
  DeviceBuffer<float> dq_, dk_, delta_;                // (M, H·d), (M, KV·d), (B, H, T)
  DeviceBuffer<__nv_bfloat16> dlogits_;                // (M, V)
  DeviceBuffer<double> loss_rows_;                     // (M)
  DeviceBuffer<std::int64_t> ids_, labels_;            // (M)
  std::vector<std::int64_t> host_ids_, host_labels_;
  std::vector<double> host_loss_rows_;
};

}  // namespace cuda
}  // namespace qlora
