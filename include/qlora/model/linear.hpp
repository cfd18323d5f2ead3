#pragma once
// ModelLinear<Quant>: one linear layer of a model (q_proj, gate_proj, ...), either a LoRA target or
// a frozen plain product.
//
// Why not a LoraLinear everywhere (with B = 0 on the others): a LoRA path that is never trained
// still costs its rank-r products, its Context copy of the input and dA/dB buffers, and it would
// show up in params(). A frozen layer holds only its cpu::QMatrix (same base format, same kernels
// as the LoRA base), keeps nothing for backward, and its backward is dx = dy·W0.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "qlora/backend/cpu/lora_linear.hpp"
#include "qlora/core/error.hpp"

namespace qlora {

// A dense fp32 weight (out, in) in the base format Quant: F32 kept as is, NF4 / FP4 quantized with
// bitsandbytes' defaults (blocksize 64, double quantization), BF16 rounded.
template <class Quant>
BaseWeight<Quant> make_base(std::vector<float> w, std::int64_t out, std::int64_t in) {
  if constexpr (std::is_same<Quant, format::F32>::value) {
    return BaseWeight<format::F32>(std::move(w), out, in);
  } else if constexpr (std::is_same<Quant, format::BF16>::value) {
    std::vector<bf16> b(w.size());
    for (std::size_t i = 0; i < w.size(); ++i) b[i] = to_bf16(w[i]);
    return BaseWeight<format::BF16>(std::move(b), out, in);
  } else if constexpr (std::is_same<Quant, format::Int8>::value) {
    return BaseWeight<format::Int8>::quantize(w.data(), out, in);
  } else {
    return BaseWeight<Quant>(BaseWeight<Quant>::quantize(w.data(), out, in));
  }
}

namespace detail {
template <class Quant>
constexpr bool is_dense_format() {
  return std::is_same<Quant, format::F32>::value || std::is_same<Quant, format::BF16>::value;
}
[[noreturn]] inline void refuse_requantize(const std::string& what, const char* stored, const char* asked) {
  throw_error(what, ": stored as bitsandbytes ", stored, ", requested as ", asked, "; load it as ", stored,
              " (as stored) or as f32 / bf16 (dequantized): requantizing quantized weights is not "
              "supported, quantize the original checkpoint instead");
}
}  // namespace detail

// A bitsandbytes 4-bit weight read from a checkpoint (bnb::read_4bit) in the base format Quant: taken
// as stored when Quant is its own format (packed codes, absmax, code tables unchanged: no
// dequantize / requantize round trip), dequantized to fp32 for F32 (BF16: then rounded), refused
// for another quantized format. `what` names the weight for the error.
template <class Quant>
BaseWeight<Quant> make_base(quant::Quantized4bit q, const std::string& what) {
  QLORA_CHECK(q.shape.size() == 2, what, ": 4-bit weight has ", q.shape.size(),
              " dimensions, expected 2 (out, in)");
  if constexpr (detail::is_dense_format<Quant>()) {
    std::vector<float> w(std::size_t(q.numel()));
    quant::dequantize(q, w.data());
    return make_base<Quant>(std::move(w), q.shape[0], q.shape[1]);
  } else if constexpr (std::is_same<Quant, format::NF4>::value || std::is_same<Quant, format::FP4>::value) {
    const char* stored = quant::quant4_name(q.type);
    if (std::string(stored) != Quant::name) detail::refuse_requantize(what, stored, Quant::name);
    return BaseWeight<Quant>(std::move(q));
  } else {
    detail::refuse_requantize(what, quant::quant4_name(q.type), Quant::name);
  }
}

// A bitsandbytes LLM.int8 weight (bnb::read_int8: int8 rows and their SCB) in the base format Quant:
// as stored for Int8, dequantized for F32 / BF16, refused for the 4-bit formats.
template <class Quant>
BaseWeight<Quant> make_base(quant::RowwiseInt8 q, const std::string& what) {
  if constexpr (detail::is_dense_format<Quant>()) {
    std::vector<float> w(q.q.size());
    quant::dequantize(q, w.data());
    return make_base<Quant>(std::move(w), q.rows, q.cols);
  } else if constexpr (std::is_same<Quant, format::Int8>::value) {
    return BaseWeight<format::Int8>(std::move(q));
  } else {
    detail::refuse_requantize(what, "int8", Quant::name);
  }
}

template <class Quant>
class ModelLinear {
 public:
  using Lora = LoraLinear<Quant, Dynamic, Cpu>;
  using Context = typename Lora::Context;  // empty (never filled) for a frozen layer

  // keep_base: also keep the base weight as loaded (frozen_base(); host memory once more), for
  // backends that upload it.
  static ModelLinear frozen(BaseWeight<Quant> base, bool keep_base = false) {
    ModelLinear l;
    l.out_ = base.out;
    l.in_ = base.in;
    l.frozen_.emplace(detail::make_qmatrix(base));
    if (keep_base) l.frozen_base_ = std::make_shared<const BaseWeight<Quant>>(std::move(base));
    return l;
  }
  static ModelLinear lora(BaseWeight<Quant> base, const LoraConfig& cfg) {
    ModelLinear l;
    l.out_ = base.out;
    l.in_ = base.in;
    l.lora_ = std::make_unique<Lora>(std::move(base), cfg);
    return l;
  }

  bool has_lora() const { return bool(lora_); }
  Lora& lora_layer() {
    QLORA_CHECK(lora_, "ModelLinear: this layer has no LoRA path");
    return *lora_;
  }
  const Lora& lora_layer() const {
    QLORA_CHECK(lora_, "ModelLinear: this layer has no LoRA path");
    return *lora_;
  }
  // How the base product treats few-token activations (backend/cpu/act_quant.hpp); 4-bit bases
  // default to Int16 (~5e-5 relative error per product), None is the exact fp32 path.
  void set_act_quant(cpu::ActQuant aq) {
    if (lora_)
      lora_->set_act_quant(aq);
    else
      frozen_->set_act_quant(aq);
  }
  // The frozen product (no LoRA path): its weight, for full-parameter training of an F32 model.
  cpu::QMatrix& frozen_matrix() {
    QLORA_CHECK(frozen_, "ModelLinear::frozen_matrix: this layer has a LoRA path");
    return *frozen_;
  }
  // The base weight of a frozen layer as loaded, for backends that upload it (LlamaModel::weights);
  // only when frozen(..., keep_base = true) kept it beside the QMatrix.
  const BaseWeight<Quant>& frozen_base() const {
    QLORA_CHECK(
        frozen_base_, "ModelLinear::frozen_base: ",
        lora_ ? "this layer has a LoRA path" : "the base was not kept (LlamaLoraOptions::keep_frozen_bases)");
    return *frozen_base_;
  }
  // The weight as the layer computes with it, (out, in) fp32: W0 (dequantized) plus the scaled
  // B·A of an unmerged LoRA path. What a merged checkpoint stores.
  std::vector<float> dense_weight() const {
    if (lora_) return lora_->merged_weight();
    std::vector<float> w(std::size_t(out_ * in_));
    frozen_->dequantize(w.data());
    return w;
  }
  std::int64_t in_features() const { return in_; }
  std::int64_t out_features() const { return out_; }

  // x (M, in) -> y (M, out). With ctx (training), a LoRA layer keeps what its backward needs.
  void forward(const float* x, std::int64_t M, float* y, Context* ctx) {
    if (!lora_)
      frozen_->forward(x, M, y, cpu::Accumulate::No);
    else if (ctx)
      lora_->forward(x, M, y, *ctx);
    else
      static_cast<const Lora&>(*lora_).forward(x, M, y);
  }

  // dy (M, out) -> dx (M, in), overwritten; LoRA layers also write or add dA, dB by `mode`.
  void backward(const Context& ctx, const float* dy, std::int64_t M, float* dx, GradMode mode) {
    if (lora_)
      lora_->backward(ctx, dy, dx, mode);
    else
      frozen_->backward(dy, M, dx, cpu::Accumulate::No);
  }

 private:
  ModelLinear() = default;
  std::int64_t out_ = 0, in_ = 0;
  std::unique_ptr<Lora> lora_;
  std::optional<cpu::QMatrix> frozen_;
  std::shared_ptr<const BaseWeight<Quant>> frozen_base_;  // shared: a ModelLinear stays cheap to move
};

}  // namespace qlora
