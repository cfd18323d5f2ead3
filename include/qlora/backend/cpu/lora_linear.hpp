#pragma once
// LoraLinear on the CPU: the base product through cpu::QMatrix (fused 4-bit / int8 kernels, Eigen for
// dense), the rank-r path through Eigen, both split over threads.
//
// Memory kept for backward (Context), per token: the layer input x (in floats, copied: the caller
// may reuse its buffer), h = dropout(x)·Aᵀ (r floats), and with dropout a 1-bit keep mask per input
// (in / 8 bytes). For in = 4096, r = 16: 16.4 KiB per token, 16.9 KiB with dropout.
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "qlora/backend/cpu/qmatrix.hpp"
#include "qlora/backend/cpu/thread_pool.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/finite.hpp"
#include "qlora/core/parallel.hpp"
#include "qlora/lora/lora_linear.hpp"
#include "qlora/lora/random.hpp"
#include "qlora/optim/param.hpp"

namespace qlora {

namespace detail {
inline cpu::QMatrix make_qmatrix(const BaseWeight<format::F32>& b) {
  return cpu::QMatrix::dense(b.w.data(), b.out, b.in);
}
inline cpu::QMatrix make_qmatrix(const BaseWeight<format::BF16>& b) {
  return cpu::QMatrix::dense_bf16(b.w.data(), b.out, b.in);
}
// 4-bit bases multiply few-token activations in int16 (cpu::ActQuant::Int16): ~5e-5 relative error,
// three orders of magnitude under the weights' own NF4 error, for ~1.3x the speed of the exact fp32
// path at M = 1 (docs/performance.md). set_act_quant() on the layer changes it.
inline cpu::QMatrix make_qmatrix(const BaseWeight<format::NF4>& b) {
  cpu::QMatrix m = cpu::QMatrix::from(b.q);
  m.set_act_quant(cpu::ActQuant::Int16);
  return m;
}
inline cpu::QMatrix make_qmatrix(const BaseWeight<format::FP4>& b) {
  cpu::QMatrix m = cpu::QMatrix::from(b.q);
  m.set_act_quant(cpu::ActQuant::Int16);
  return m;
}
inline cpu::QMatrix make_qmatrix(const BaseWeight<format::Int8>& b) { return cpu::QMatrix::from(b.q); }

// Splits [0, n) over the persistent pool's threads in chunks of at least `grain` rows of work.
template <class F>
void split_rows(std::int64_t n, std::int64_t grain, F&& f) {
  cpu::pool_for(std::size_t(n), 1, std::size_t(std::max<std::int64_t>(grain, 1)),
                [&](std::size_t b, std::size_t e) { f(std::int64_t(b), std::int64_t(e)); });
}
}  // namespace detail

template <class Quant, int Rank>
class LoraLinear<Quant, Rank, Cpu> {
 public:
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using MatA = Eigen::Matrix<float, Rank, Eigen::Dynamic, Eigen::RowMajor>;  // (r, in)
  // (out, r); Eigen has no row-major single-column matrix, and with one column the layouts agree
  using MatB = Eigen::Matrix<float, Eigen::Dynamic, Rank, Rank == 1 ? Eigen::ColMajor : Eigen::RowMajor>;
  using Base = BaseWeight<Quant>;

  // What forward keeps for backward (see the top of this file for its size).
  struct Context {
    std::int64_t tokens = 0;
    RowMat x;                         // (M, in) the layer input
    RowMat h;                         // (M, r)  dropout(x)·Aᵀ
    std::vector<std::uint64_t> keep;  // (M * in bits) dropout keep mask, empty without dropout
    std::size_t bytes() const {
      return std::size_t(x.size() + h.size()) * sizeof(float) + keep.size() * sizeof(std::uint64_t);
    }
  };

  // bias: (out) values or empty; bias_mode says whether it is trained.
  LoraLinear(Base base, const LoraConfig& cfg, std::vector<float> bias = {},
             BiasMode bias_mode = BiasMode::Frozen)
      : base_(std::move(base)), cfg_(cfg), bias_(std::move(bias)), qm_(detail::make_qmatrix(base_)) {
    cfg_.validate();
    QLORA_CHECK(Rank == Dynamic || Rank == cfg_.r, "LoraLinear<", Quant::name, ", ", Rank,
                ">: config rank r = ", cfg_.r, ", expected ", Rank);
    out_ = base_.out;
    in_ = base_.in;
    QLORA_CHECK(bias_.empty() || std::int64_t(bias_.size()) == out_, "LoraLinear: bias has ", bias_.size(),
                " values, expected ", out_, " (out features)");
    bias_mode_ = bias_.empty() ? BiasMode::None : bias_mode;
    QLORA_CHECK(!(bias_mode == BiasMode::Trainable && bias_.empty()),
                "LoraLinear: a trainable bias was asked for, but no bias values were given");
    A_.setZero(cfg_.r, in_);
    B_.setZero(out_, cfg_.r);
    dA_.setZero(cfg_.r, in_);
    dB_.setZero(out_, cfg_.r);
    dbias_.assign(bias_.size(), 0.0f);
    init(cfg_.init);
  }

  // (Re)initializes A and B as PEFT does (config.hpp: LoraInit), from cfg.seed.
  void init(LoraInit how) {
    const float a_bound = 1.0f / std::sqrt(float(in_));  // kaiming_uniform(a=sqrt(5)) on (r, in)
    for (std::int64_t i = 0; i < A_.size(); ++i) {
      A_.data()[i] = how == LoraInit::Gaussian
                         ? rng::normal(cfg_.seed, rng::kInitA, std::uint64_t(i)) / float(cfg_.r)
                         : (2.0f * rng::uniform(cfg_.seed, rng::kInitA, std::uint64_t(i)) - 1.0f) * a_bound;
    }
    const float b_bound = 1.0f / std::sqrt(float(cfg_.r));
    for (std::int64_t i = 0; i < B_.size(); ++i)
      B_.data()[i] = how == LoraInit::NonZero
                         ? (2.0f * rng::uniform(cfg_.seed, rng::kInitB, std::uint64_t(i)) - 1.0f) * b_bound
                         : 0.0f;
  }

  std::int64_t in_features() const { return in_; }
  std::int64_t out_features() const { return out_; }
  int rank() const { return cfg_.r; }
  float scaling() const { return cfg_.scaling(); }
  const LoraConfig& config() const { return cfg_; }
  const Base& base() const { return base_; }
  const cpu::QMatrix& base_matrix() const { return qm_; }
  // How the base product treats few-token activations (exact fp32, int16 or int8); kept across merges.
  void set_act_quant(cpu::ActQuant aq) {
    act_quant_ = aq;
    qm_.set_act_quant(aq);
  }
  bool merged() const { return merged_; }

  MatA& A() { return A_; }  // (r, in)
  MatB& B() { return B_; }  // (out, r)
  const MatA& A() const { return A_; }
  const MatB& B() const { return B_; }
  const MatA& dA() const { return dA_; }
  const MatB& dB() const { return dB_; }
  MatA& dA() { return dA_; }
  MatB& dB() { return dB_; }
  std::vector<float>& bias() { return bias_; }
  const std::vector<float>& bias() const { return bias_; }
  std::vector<float>& dbias() { return dbias_; }
  BiasMode bias_mode() const { return bias_mode_; }

  // How many training forwards ran: the dropout stream of the next one. Save and restore it with
  // the optimizer state for a bit-identical resume.
  std::uint64_t dropout_calls() const { return calls_; }
  void set_dropout_calls(std::uint64_t c) { calls_ = c; }

  // Opt-in timing of the base product (x·W0ᵀ in forward, dy·W0 in backward), so a profiler can
  // split a layer's time into base and LoRA: wall seconds summed since profiling was turned on.
  // Off (the default), nothing is timed.
  void set_profiling(bool on) {
    profiling_ = on;
    base_seconds_ = 0;
  }
  double base_seconds() const { return base_seconds_; }

  // Inference: y (M, out) = x (M, in) · W0ᵀ + bias + s·x·Aᵀ·Bᵀ, no dropout, nothing kept.
  void forward(const float* x, std::int64_t M, float* y) const { forward_impl(x, M, y, nullptr); }

  // Training: as above with dropout on the LoRA input; ctx keeps what backward needs.
  void forward(const float* x, std::int64_t M, float* y, Context& ctx) {
    forward_impl(x, M, y, &ctx);
    ++calls_;
  }

  // dy (M, out) -> dx (M, in) (skipped when dx is null), and the parameter gradients dA, dB (and
  // dbias when trained), written or added by `mode`.
  void backward(const Context& ctx, const float* dy, float* dx, GradMode mode) {
    QLORA_CHECK(!merged_, "LoraLinear::backward on a merged layer: unmerge first");
    const std::int64_t M = ctx.tokens, r = cfg_.r;
    QLORA_CHECK(ctx.x.rows() == M && ctx.h.rows() == M, "LoraLinear::backward: context holds ", ctx.x.rows(),
                " tokens, expected ", M, " (was forward called with this context?)");
    const float s = cfg_.scaling();
    Eigen::Map<const RowMat> DY(dy, M, out_);  // (M, out)

    if (bias_mode_ == BiasMode::Trainable) {
      if (mode == GradMode::Overwrite) std::fill(dbias_.begin(), dbias_.end(), 0.0f);
      for (std::int64_t t = 0; t < M; ++t)
        for (std::int64_t o = 0; o < out_; ++o) dbias_[std::size_t(o)] += dy[t * out_ + o];
    }
    // dB (out, r) = s · dyᵀ · h: split over out rows, so each thread owns its rows of dB
    detail::split_rows(out_, 64, [&](std::int64_t o0, std::int64_t o1) {
      auto blk = dB_.middleRows(o0, o1 - o0);
      if (mode == GradMode::Overwrite)
        blk.noalias() = s * DY.middleCols(o0, o1 - o0).transpose() * ctx.h;
      else
        blk.noalias() += s * DY.middleCols(o0, o1 - o0).transpose() * ctx.h;
    });
    // dh (M, r) = s · dy · B
    RowMat dh(M, r);
    detail::split_rows(M, 16, [&](std::int64_t t0, std::int64_t t1) {
      dh.middleRows(t0, t1 - t0).noalias() = s * DY.middleRows(t0, t1 - t0) * B_;
    });
    // xd = x ⊙ mask, materialized only with dropout
    const bool drop = !ctx.keep.empty();
    RowMat xd;
    if (drop) xd = apply_mask(ctx.x, ctx.keep);
    const RowMat& X = drop ? xd : ctx.x;
    // dA (r, in) = dhᵀ · xd: split over input columns
    detail::split_rows(in_, 256, [&](std::int64_t i0, std::int64_t i1) {
      auto blk = dA_.middleCols(i0, i1 - i0);
      if (mode == GradMode::Overwrite)
        blk.noalias() = dh.transpose() * X.middleCols(i0, i1 - i0);
      else
        blk.noalias() += dh.transpose() * X.middleCols(i0, i1 - i0);
    });
    if (!dx) return;
    // dx (M, in) = dy · W0 + (dh · A) ⊙ mask
    timed_base([&] { qm_.backward(dy, M, dx, cpu::Accumulate::No); });
    Eigen::Map<RowMat> DX(dx, M, in_);
    detail::split_rows(M, 16, [&](std::int64_t t0, std::int64_t t1) {
      RowMat lora = dh.middleRows(t0, t1 - t0) * A_;  // (rows, in)
      if (drop) lora = apply_mask_rows(lora, ctx.keep, t0);
      DX.middleRows(t0, t1 - t0) += lora;
    });
  }

  // The trainable parameters for an optimizer, named as PEFT names them under `module` (e.g.
  // "model.layers.0.self_attn.q_proj"): <module>.lora_A.weight, <module>.lora_B.weight, and
  // <module>.bias when the bias is trained. The layer owns the memory; do not resize it afterwards.
  std::vector<optim::Param> params(const std::string& module) {
    std::vector<optim::Param> p;
    p.push_back(
        {module + ".lora_A.weight", A_.data(), dA_.data(), std::size_t(A_.size()), optim::ParamGroup::LoraA});
    p.push_back(
        {module + ".lora_B.weight", B_.data(), dB_.data(), std::size_t(B_.size()), optim::ParamGroup::LoraB});
    if (bias_mode_ == BiasMode::Trainable)
      p.push_back({module + ".bias", bias_.data(), dbias_.data(), bias_.size(), optim::ParamGroup::Bias});
    return p;
  }

  void zero_grad() {
    dA_.setZero();
    dB_.setZero();
    std::fill(dbias_.begin(), dbias_.end(), 0.0f);
  }

  // W0 + s·B·A as fp32 (out, in): the weight a merged dense checkpoint holds.
  std::vector<float> merged_weight() const {
    std::vector<float> w(std::size_t(out_ * in_));
    base_.dequantize(w.data());
    if (!merged_) {
      Eigen::Map<RowMat> W(w.data(), out_, in_);
      W.noalias() += cfg_.scaling() * (B_ * A_);
    }
    return w;
  }

  // Folds s·B·A into the base weight, so forward costs one product. Dense fp32 bases merge exactly
  // (up to fp32 rounding) and unmerge() restores them; bf16 and quantized bases are dequantized,
  // merged and requantized in their own format, which adds error: the report says how much. After a
  // merge the LoRA path is off until unmerge(), which subtracts s·B·A again (and for a requantized
  // base does not restore the original bytes).
  MergeReport merge() {
    QLORA_CHECK(!merged_, "LoraLinear::merge: already merged");
    MergeReport rep;
    std::vector<float> w = merged_weight();
    rep.requantization_rmse = base_.requantize(w.data());
    qm_ = detail::make_qmatrix(base_);
    if (act_quant_) qm_.set_act_quant(*act_quant_);
    merged_ = true;
    return rep;
  }

  MergeReport unmerge() {
    QLORA_CHECK(merged_, "LoraLinear::unmerge: not merged");
    std::vector<float> w(std::size_t(out_ * in_));
    base_.dequantize(w.data());
    Eigen::Map<RowMat> W(w.data(), out_, in_);
    W.noalias() -= cfg_.scaling() * (B_ * A_);
    MergeReport rep;
    rep.requantization_rmse = base_.requantize(w.data());
    qm_ = detail::make_qmatrix(base_);
    if (act_quant_) qm_.set_act_quant(*act_quant_);
    merged_ = false;
    return rep;
  }

 private:
  bool keep_bit(const std::vector<std::uint64_t>& keep, std::int64_t idx) const {
    return (keep[std::size_t(idx) / 64] >> (idx % 64)) & 1u;
  }

  template <class F>
  void timed_base(F&& f) const {
    if (!profiling_) return f();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    base_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  RowMat apply_mask(const RowMat& x, const std::vector<std::uint64_t>& keep) const {
    return apply_mask_rows(x, keep, 0);
  }
  // rows of a (rows, in) block that starts at token t0, times mask / (1 - p)
  RowMat apply_mask_rows(const RowMat& x, const std::vector<std::uint64_t>& keep, std::int64_t t0) const {
    RowMat out = x;
    const float scale = 1.0f / (1.0f - cfg_.dropout);
    for (std::int64_t t = 0; t < x.rows(); ++t)
      for (std::int64_t i = 0; i < in_; ++i)
        out(t, i) = keep_bit(keep, (t0 + t) * in_ + i) ? x(t, i) * scale : 0.0f;
    return out;
  }

  void forward_impl(const float* x, std::int64_t M, float* y, Context* ctx) const {
    QLORA_CHECK(M >= 0, "LoraLinear::forward: negative token count ", M);
    Eigen::Map<const RowMat> X(x, M, in_);  // (M, in)
    Eigen::Map<RowMat> Y(y, M, out_);       // (M, out)
    // y = x · W0ᵀ (+ bias)
    timed_base([&] { qm_.forward(x, M, y, cpu::Accumulate::No); });
    if (!bias_.empty())
      for (std::int64_t t = 0; t < M; ++t)
        for (std::int64_t o = 0; o < out_; ++o) y[t * out_ + o] += bias_[std::size_t(o)];
    if (merged_) {
      QLORA_CHECK(!ctx, "LoraLinear::forward: training forward on a merged layer: unmerge first");
      return;
    }
    const bool drop = ctx && cfg_.dropout > 0.0f;
    RowMat xd;
    std::vector<std::uint64_t> keep;
    if (drop) {
      // the keep mask of training call `calls_`: a pure function of (seed, call, element), so the
      // CUDA backend draws the same one
      // CUDA backend draws the same one. Split by 64-bit words so each word has one writer (no
      // atomics), and the input scaled while its word is in a register.
      const std::int64_t n = M * in_, words = (n + 63) / 64;
      keep.assign(std::size_t(words), 0);
      xd.resize(M, in_);
      const float scale = 1.0f / (1.0f - cfg_.dropout);
      const std::uint64_t seed = cfg_.seed, call = calls_;
      const float p = cfg_.dropout;
      detail::split_rows(words, 64, [&](std::int64_t w0, std::int64_t w1) {
        float* xo = xd.data();
        for (std::int64_t w = w0; w < w1; ++w) {
          std::uint64_t word = 0;
          const std::int64_t i0 = w * 64, i1 = std::min(n, i0 + 64);
          for (std::int64_t idx = i0; idx < i1; ++idx) {
            const bool k = rng::dropout_keep(seed, call, std::uint64_t(idx), p);
            word |= std::uint64_t(k) << (idx - i0);
            xo[idx] = k ? x[idx] * scale : 0.0f;
          }
          keep[std::size_t(w)] = word;
        }
      });
    }
    // h (M, r) = xd · Aᵀ; y += s · h · Bᵀ
    RowMat h(M, cfg_.r);
    const float s = cfg_.scaling();
    detail::split_rows(M, 16, [&](std::int64_t t0, std::int64_t t1) {
      auto hb = h.middleRows(t0, t1 - t0);
      if (drop)
        hb.noalias() = xd.middleRows(t0, t1 - t0) * A_.transpose();
      else
        hb.noalias() = X.middleRows(t0, t1 - t0) * A_.transpose();
      Y.middleRows(t0, t1 - t0).noalias() += s * hb * B_.transpose();
    });
    if (ctx) {
      ctx->tokens = M;
      ctx->x = X;
      ctx->h = std::move(h);
      ctx->keep = std::move(keep);
    }
  }

  Base base_;
  LoraConfig cfg_;
  std::vector<float> bias_, dbias_;
  BiasMode bias_mode_ = BiasMode::None;
  std::int64_t out_ = 0, in_ = 0;
  cpu::QMatrix qm_;
  MatA A_, dA_;
  MatB B_, dB_;
  std::uint64_t calls_ = 0;
  bool merged_ = false;
  bool profiling_ = false;           // set_profiling()
  mutable double base_seconds_ = 0;  // the base products' time while profiling
  // set_act_quant()'s choice, re-applied to the QMatrix rebuilt by a merge; unset: the format's default
  std::optional<cpu::ActQuant> act_quant_;
};

}  // namespace qlora
