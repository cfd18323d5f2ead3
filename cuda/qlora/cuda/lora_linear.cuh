#pragma once
// LoraLinear<Quant, Rank, Cuda>: the LoRA layer of lora/lora_linear.hpp on the GPU, the same math as
// the Cpu backend (backend/cpu/lora_linear.hpp) on device pointers, each call on an explicit
// cuda::Context (its stream and cuBLAS handle):
//
//   forward   y (M, out) = x·W0ᵀ + s·dropout(x)·Aᵀ·Bᵀ
//   backward  dx (M, in) = dy·W0 + s·((dy·B)·A) ⊙ mask/(1-p)
//             dA (r, in) = s·(dy·B)ᵀ·dropout(x),  dB (out, r) = s·dyᵀ·h,   h = dropout(x)·Aᵀ
//
// Conventions. Activations x, y, dy, dx are bf16 (M, in) / (M, out) row-major; every product
// accumulates in fp32. A (r, in), B (out, r), dA, dB are fp32 device buffers owned by the layer (the
// optimizer's master weights); bf16 copies of A and B are made for the two products that need them
// as cuBLAS operands (x·Aᵀ, dy·B), every call, from the current masters. Gradients are written or
// added by GradMode; activations are always written (dx: overwritten).
//
// Where each product runs, and what is formed:
//   y  = x·W0ᵀ                 cuda::matmul_4bit (GEMV for M ≤ 64, dequantize + cuBLAS above)
//   h  = (1/(1-p))·xm·Aᵀ       cuBLAS, bf16 in, fp32 out (M, r); xm = x ⊙ keep, exact in bf16
//   y += s·h·Bᵀ                lowrank_add: fp32 h and B, added into the bf16 y in one pass
//   dB = s·dyᵀ·h               cuBLAS (out, r), h rounded to bf16
//   dh = s·dy·B                cuBLAS (M, r), fp32
//   dA = (1/(1-p))·dhᵀ·xm      cuBLAS (r, in), dh rounded to bf16
//   dx = dy·W0                 W0 dequantized into the reused bf16 scratch, cuBLAS
//   dx += (1/(1-p))·keep ⊙ (dh·A)   lowrank_add with the mask: the (M, in) LoRA term is never stored
// so besides the activations only (M, r) intermediates exist, and the dropout scale never rounds
// the input (it rides in the products' alpha).
//
// Dropout: the mask of training call dropout_calls() is dropout.cuh's, bit for bit the CPU's.
//
// What forward keeps for backward (Context): the masked input xm (M·in bf16: the input itself
// without dropout, copied since the caller may reuse its buffer), h (M·r fp32) and the keep mask
// (M·in bits). For in = 4096, r = 16: 8.3 KiB per token (8.8 KiB with dropout), half the CPU's.
// Its buffers are grown on first use and reused by later forwards.
//
// Not here yet (the Cpu backend has them): a bias, merge / unmerge, int8 bases.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/cast.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/dequantize4bit.cuh"
#include "qlora/cuda/dropout.cuh"
#include "qlora/cuda/gemm_bf16.cuh"
#include "qlora/cuda/gemm_rowmajor.cuh"
#include "qlora/cuda/lowrank_add.cuh"
#include "qlora/cuda/matmul4bit.cuh"
#include "qlora/cuda/quantized4bit.cuh"
#include "qlora/lora/lora_linear.hpp"
#include "qlora/lora/random.hpp"
#include "qlora/optim/param.hpp"

namespace qlora {
namespace cuda {
namespace detail {

template <class T>
void ensure_size(DeviceBuffer<T>& b, std::size_t n) {
  if (b.size() < n) b = DeviceBuffer<T>(n);
}

// dx (M, in) = dy (M, out) · W (out, in), W bf16 row-major.
inline void base_backward_bf16(const Context& ctx, const __nv_bfloat16* w, int out, int in,
                               const __nv_bfloat16* dy, int M, __nv_bfloat16* dx) {
  gemm_rowmajor(ctx, M, in, out, 1.0f, {dy, CUDA_R_16BF, out}, {w, CUDA_R_16BF, in}, 0.0f, dx, CUDA_R_16BF,
                in);
}

// The base weight on the device and its two products (y = x·W0ᵀ, dx = dy·W0).
template <class Quant>
struct DeviceBase {
  static_assert(sizeof(Quant) == 0,
                "LoraLinear<..., Cuda>: no device base for this Quant format (NF4, FP4, BF16, F32)");
};

template <quant::Quant4Type T>
struct DeviceBase4bit {
  DeviceQuantized4bit w;
  template <class B>
  DeviceBase4bit(const Context& ctx, const B& base) : w(to_device(base.q, ctx)) {}
  void forward(const Context& ctx, const __nv_bfloat16* x, int M, __nv_bfloat16* y,
               DeviceBuffer<__nv_bfloat16>& scratch) const {
    matmul_4bit(ctx, w, x, M, y, scratch, false);
  }
  void backward(const Context& ctx, const __nv_bfloat16* dy, int M, __nv_bfloat16* dx,
                DeviceBuffer<__nv_bfloat16>& scratch) const {
    const int out = int(w.shape[0]), in = int(w.shape[1]);
    ensure_size(scratch, std::size_t(out) * std::size_t(in));
    dequantize_4bit(ctx, w, scratch.data());
    base_backward_bf16(ctx, scratch.data(), out, in, dy, M, dx);
  }
};
template <>
struct DeviceBase<format::NF4> : DeviceBase4bit<quant::Quant4Type::NF4> {
  using DeviceBase4bit::DeviceBase4bit;
};
template <>
struct DeviceBase<format::FP4> : DeviceBase4bit<quant::Quant4Type::FP4> {
  using DeviceBase4bit::DeviceBase4bit;
};

// Dense bases run their products in bf16: an F32 base is rounded to bf16 once on upload (the
// tensor-core rate; the error is the bf16 rounding of W0, ~2⁻⁹ relative).
struct DeviceBaseDense {
  DeviceBuffer<__nv_bfloat16> w;  // (out, in)
  int out = 0, in = 0;
  template <class B>
  DeviceBaseDense(const Context& ctx, const B& base)
      : w(base.w.size()), out(int(base.out)), in(int(base.in)) {
    std::vector<bf16> hb(base.w.size());
    for (std::size_t i = 0; i < hb.size(); ++i) hb[i] = to_bf16_any(base.w[i]);
    static_assert(sizeof(bf16) == sizeof(__nv_bfloat16), "bf16 layout");
    QLORA_CUDA_CHECK(
        cudaMemcpyAsync(w.data(), hb.data(), hb.size() * sizeof(bf16), cudaMemcpyHostToDevice, ctx.stream()));
    ctx.synchronize();
  }
  void forward(const Context& ctx, const __nv_bfloat16* x, int M, __nv_bfloat16* y,
               DeviceBuffer<__nv_bfloat16>&) const {
    gemm_bf16(ctx, x, M, in, w.data(), out, y, 0.0f);
  }
  void backward(const Context& ctx, const __nv_bfloat16* dy, int M, __nv_bfloat16* dx,
                DeviceBuffer<__nv_bfloat16>&) const {
    base_backward_bf16(ctx, w.data(), out, in, dy, M, dx);
  }

 private:
  static bf16 to_bf16_any(float v) { return to_bf16(v); }
  static bf16 to_bf16_any(bf16 v) { return v; }
};
template <>
struct DeviceBase<format::BF16> : DeviceBaseDense {
  using DeviceBaseDense::DeviceBaseDense;
};
template <>
struct DeviceBase<format::F32> : DeviceBaseDense {
  using DeviceBaseDense::DeviceBaseDense;
};

}  // namespace detail
}  // namespace cuda

template <class Quant, int Rank>
class LoraLinear<Quant, Rank, Cuda> {
 public:
  using Base = BaseWeight<Quant>;

  // What forward keeps for backward (see the top of this file). Reusable across steps.
  struct Context {
    std::int64_t tokens = 0;
    float keep_scale = 1.0f;                 // 1 / (1 - p) with dropout, else 1
    bool dropout = false;                    // whether keep holds a mask
    cuda::DeviceBuffer<__nv_bfloat16> xm;    // (M, in) x ⊙ keep (x without dropout)
    cuda::DeviceBuffer<float> h;             // (M, r)  dropout(x)·Aᵀ
    cuda::DeviceBuffer<std::uint64_t> keep;  // ((M·in + 63) / 64) words, bit idx % 64 of word idx / 64
    std::size_t bytes() const { return xm.bytes() + h.bytes() + keep.bytes(); }
  };

  // Uploads the base weight and initializes A and B on the host exactly as the Cpu backend does
  // (same counter-based draws), so both backends start from the same bits.
  LoraLinear(const cuda::Context& dev, const Base& base, const LoraConfig& cfg)
      : cfg_(cfg), base_(dev, base), out_(base.out), in_(base.in) {
    cfg_.validate();
    QLORA_CHECK(Rank == Dynamic || Rank == cfg_.r, "LoraLinear<", Quant::name, ", ", Rank,
                ", Cuda>: config rank r = ", cfg_.r, ", expected ", Rank);
    QLORA_CHECK(out_ <= INT_MAX && in_ <= INT_MAX, "LoraLinear<..., Cuda>: shape (", out_, ", ", in_,
                ") exceeds cuBLAS's int sizes");
    const std::size_t na = std::size_t(cfg_.r) * std::size_t(in_),
                      nb = std::size_t(out_) * std::size_t(cfg_.r);
    A_ = cuda::DeviceBuffer<float>(na);
    B_ = cuda::DeviceBuffer<float>(nb);
    dA_ = cuda::DeviceBuffer<float>(na);
    dB_ = cuda::DeviceBuffer<float>(nb);
    Ab_ = cuda::DeviceBuffer<__nv_bfloat16>(na);
    Bb_ = cuda::DeviceBuffer<__nv_bfloat16>(nb);
    zero_grad(dev);
    init(dev, cfg_.init);
  }

  // (Re)initializes A and B as the Cpu backend does (config.hpp: LoraInit), from cfg.seed. Blocking.
  void init(const cuda::Context& dev, LoraInit how) {
    std::vector<float> a(A_.size()), b(B_.size());
    const float a_bound = 1.0f / std::sqrt(float(in_));
    for (std::size_t i = 0; i < a.size(); ++i)
      a[i] = how == LoraInit::Gaussian ? rng::normal(cfg_.seed, rng::kInitA, i) / float(cfg_.r)
                                       : (2.0f * rng::uniform(cfg_.seed, rng::kInitA, i) - 1.0f) * a_bound;
    const float b_bound = 1.0f / std::sqrt(float(cfg_.r));
    for (std::size_t i = 0; i < b.size(); ++i)
      b[i] =
          how == LoraInit::NonZero ? (2.0f * rng::uniform(cfg_.seed, rng::kInitB, i) - 1.0f) * b_bound : 0.0f;
    set_A(dev, a);
    set_B(dev, b);
  }

  std::int64_t in_features() const { return in_; }
  std::int64_t out_features() const { return out_; }
  int rank() const { return cfg_.r; }
  float scaling() const { return cfg_.scaling(); }
  const LoraConfig& config() const { return cfg_; }

  // Device buffers: A (r, in), B (out, r) and their gradients, fp32 row-major.
  cuda::DeviceBuffer<float>& A() { return A_; }
  cuda::DeviceBuffer<float>& B() { return B_; }
  const cuda::DeviceBuffer<float>& A() const { return A_; }
  const cuda::DeviceBuffer<float>& B() const { return B_; }
  cuda::DeviceBuffer<float>& dA() { return dA_; }
  cuda::DeviceBuffer<float>& dB() { return dB_; }
  const cuda::DeviceBuffer<float>& dA() const { return dA_; }
  const cuda::DeviceBuffer<float>& dB() const { return dB_; }
  // Blocking host copies (setup, checkpoints, tests).
  void set_A(const cuda::Context& dev, const std::vector<float>& a) { set(dev, A_, a, "A"); }
  void set_B(const cuda::Context& dev, const std::vector<float>& b) { set(dev, B_, b, "B"); }

  // Layers of one model can share one dequantization scratch (the largest weight's size, bf16),
  // as matmul_4bit allows; by default each layer has its own. `s` must outlive the layer's use.
  void share_scratch(cuda::DeviceBuffer<__nv_bfloat16>& s) { shared_scratch_ = &s; }

  std::uint64_t dropout_calls() const { return calls_; }
  void set_dropout_calls(std::uint64_t c) { calls_ = c; }

  // Inference: y (M, out) = x (M, in)·W0ᵀ + s·x·Aᵀ·Bᵀ, no dropout, nothing kept.
  void forward(const cuda::Context& dev, const __nv_bfloat16* x, std::int64_t M, __nv_bfloat16* y) {
    forward_impl(dev, x, M, y, nullptr);
  }
  // Training: as above with dropout on the LoRA input; ctx keeps what backward needs.
  void forward(const cuda::Context& dev, const __nv_bfloat16* x, std::int64_t M, __nv_bfloat16* y,
               Context& ctx) {
    forward_impl(dev, x, M, y, &ctx);
    ++calls_;
  }

  // dy (M, out) -> dx (M, in) (skipped when dx is null), and dA, dB written or added by `mode`.
  // Asynchronous on dev's stream, like forward.
  void backward(const cuda::Context& dev, const Context& ctx, const __nv_bfloat16* dy, __nv_bfloat16* dx,
                GradMode mode) {
    const int M = int(ctx.tokens), r = cfg_.r, in = int(in_), out = int(out_);
    QLORA_CHECK(
        ctx.xm.size() >= std::size_t(M) * std::size_t(in) && ctx.h.size() >= std::size_t(M) * std::size_t(r),
        "LoraLinear<..., Cuda>::backward: context holds ", ctx.xm.size(), " inputs, expected ",
        std::int64_t(M) * in, " (was forward called with this context?)");
    const float s = cfg_.scaling(), ks = ctx.keep_scale;
    const float beta = mode == GradMode::Overwrite ? 0.0f : 1.0f;
    if (M == 0) {
      if (mode == GradMode::Overwrite) zero_grad(dev);
      return;
    }
    const std::size_t mr = std::size_t(M) * std::size_t(r);
    cuda::detail::ensure_size(hb_, mr);
    cuda::detail::ensure_size(dh_, mr);
    cuda::detail::ensure_size(dhb_, mr);
    // dB (out, r) = s · dyᵀ (out, M) · h (M, r)
    cuda::cast_to_bf16(dev, ctx.h.data(), mr, hb_.data());
    cuda::gemm_rowmajor(dev, out, r, M, s, {dy, CUDA_R_16BF, out, cuda::Op::T}, {hb_.data(), CUDA_R_16BF, r},
                        beta, dB_.data(), CUDA_R_32F, r);
    // dh (M, r) = s · dy (M, out) · B (out, r)
    cuda::cast_to_bf16(dev, B_.data(), B_.size(), Bb_.data());
    cuda::gemm_rowmajor(dev, M, r, out, s, {dy, CUDA_R_16BF, out}, {Bb_.data(), CUDA_R_16BF, r}, 0.0f,
                        dh_.data(), CUDA_R_32F, r);
    // dA (r, in) = (1/(1-p)) · dhᵀ (r, M) · xm (M, in)
    cuda::cast_to_bf16(dev, dh_.data(), mr, dhb_.data());
    cuda::gemm_rowmajor(dev, r, in, M, ks, {dhb_.data(), CUDA_R_16BF, r, cuda::Op::T},
                        {ctx.xm.data(), CUDA_R_16BF, in}, beta, dA_.data(), CUDA_R_32F, in);
    if (!dx) return;
    // dx (M, in) = dy · W0, then += (1/(1-p)) · keep ⊙ (dh (M, r) · A (r, in))
    base_.backward(dev, dy, M, dx, scratch());
    cuda::lowrank_add(dev, dx, M, in, r, ks, dh_.data(), A_.data(), in, 1,
                      ctx.dropout ? ctx.keep.data() : nullptr);
  }

  // The trainable parameters for cuda::AdamW, named as PEFT names them under `module`; value and
  // grad are device pointers owned by the layer.
  std::vector<optim::Param> params(const std::string& module) {
    return {{module + ".lora_A.weight", A_.data(), dA_.data(), A_.size(), optim::ParamGroup::LoraA},
            {module + ".lora_B.weight", B_.data(), dB_.data(), B_.size(), optim::ParamGroup::LoraB}};
  }

  void zero_grad(const cuda::Context& dev) {
    QLORA_CUDA_CHECK(cudaMemsetAsync(dA_.data(), 0, dA_.bytes(), dev.stream()));
    QLORA_CUDA_CHECK(cudaMemsetAsync(dB_.data(), 0, dB_.bytes(), dev.stream()));
  }

 private:
  cuda::DeviceBuffer<__nv_bfloat16>& scratch() { return shared_scratch_ ? *shared_scratch_ : own_scratch_; }

  void set(const cuda::Context& dev, cuda::DeviceBuffer<float>& d, const std::vector<float>& h,
           const char* what) {
    QLORA_CHECK(h.size() == d.size(), "LoraLinear<..., Cuda>: ", what, " has ", h.size(),
                " values, expected ", d.size());
    d.upload(h.data(), h.size(), dev.stream());
    dev.synchronize();
  }

  void forward_impl(const cuda::Context& dev, const __nv_bfloat16* x, std::int64_t M64, __nv_bfloat16* y,
                    Context* ctx) {
    // lowrank_add's grid has M / 16 rows of blocks (at most 65535)
    QLORA_CHECK(M64 >= 0 && M64 <= std::int64_t(65535) * cuda::detail::kLowrankRows,
                "LoraLinear<..., Cuda>::forward: token count ", M64, ", expected 0 to ",
                65535 * cuda::detail::kLowrankRows, " per call");
    const int M = int(M64), r = cfg_.r, in = int(in_), out = int(out_);
    const std::size_t n = std::size_t(M) * std::size_t(in);
    base_.forward(dev, x, M, y, scratch());
    const bool drop = ctx && cfg_.dropout > 0.0f;
    // The CPU's scale, as float: 1.0f / (1.0f - p).
    const float ks = drop ? 1.0f / (1.0f - cfg_.dropout) : 1.0f;
    const __nv_bfloat16* xin = x;  // (M, in) the LoRA path's input
    if (ctx) {
      ctx->tokens = M;
      ctx->keep_scale = ks;
      ctx->dropout = drop;
      cuda::detail::ensure_size(ctx->xm, n);
      cuda::detail::ensure_size(ctx->h, std::size_t(M) * std::size_t(r));
      if (drop) {
        cuda::detail::ensure_size(ctx->keep, (n + 63) / 64);
        cuda::dropout_mask(dev, x, n, cfg_.seed, calls_, cfg_.dropout, ctx->xm.data(), ctx->keep.data());
      } else if (n) {
        QLORA_CUDA_CHECK(cudaMemcpyAsync(ctx->xm.data(), x, n * sizeof(__nv_bfloat16),
                                         cudaMemcpyDeviceToDevice, dev.stream()));
      }
      xin = ctx->xm.data();
    }
    if (M == 0) return;
    float* h = nullptr;  // (M, r)
    if (ctx) {
      h = ctx->h.data();
    } else {
      cuda::detail::ensure_size(h_infer_, std::size_t(M) * std::size_t(r));
      h = h_infer_.data();
    }
    // h (M, r) = (1/(1-p)) · xm (M, in) · Aᵀ (in, r); y (M, out) += s · h · Bᵀ
    cuda::cast_to_bf16(dev, A_.data(), A_.size(), Ab_.data());
    cuda::gemm_rowmajor(dev, M, r, in, ks, {xin, CUDA_R_16BF, in}, {Ab_.data(), CUDA_R_16BF, in, cuda::Op::T},
                        0.0f, h, CUDA_R_32F, r);
    cuda::lowrank_add(dev, y, M, out, r, cfg_.scaling(), h, B_.data(), 1, r);
  }

  LoraConfig cfg_;
  cuda::detail::DeviceBase<Quant> base_;
  std::int64_t out_ = 0, in_ = 0;
  cuda::DeviceBuffer<float> A_, B_, dA_, dB_;      // (r, in), (out, r) fp32 masters and gradients
  cuda::DeviceBuffer<__nv_bfloat16> Ab_, Bb_;      // bf16 compute copies of A and B
  cuda::DeviceBuffer<float> dh_, h_infer_;         // (M, r) backward's dh, inference's h
  cuda::DeviceBuffer<__nv_bfloat16> hb_, dhb_;     // (M, r) bf16 operands of dB and dA
  cuda::DeviceBuffer<__nv_bfloat16> own_scratch_;  // dequantized W0 (out, in), grown on first use
  cuda::DeviceBuffer<__nv_bfloat16>* shared_scratch_ = nullptr;  // share_scratch(), else own_scratch_
  std::uint64_t calls_ = 0;
};

}  // namespace qlora
