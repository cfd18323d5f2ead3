#pragma once
// LoraLinear<Quant, Rank, Cuda>: the LoRA layer of lora/lora_linear.hpp on the GPU, the same math and
// the same layer API as the Cpu backend (backend/cpu/lora_linear.hpp) on device pointers, each call
// on an explicit cuda::Context (its stream and cuBLAS handle). Bases: NF4, FP4, Int8 (row-wise),
// BF16, F32.
//
//   forward   y (M, out) = x·W0ᵀ + bias + s·dropout(x)·Aᵀ·Bᵀ
//   backward  dx (M, in) = dy·W0 + s·((dy·B)·A) ⊙ mask/(1-p)
//             dA (r, in) = s·(dy·B)ᵀ·dropout(x),  dB (out, r) = s·dyᵀ·h,   h = dropout(x)·Aᵀ
//             dbias (out) = Σ_t dy[t, :]   (a trainable bias only)
//
// Conventions. Activations x, y, dy, dx are bf16 (M, in) / (M, out) row-major; every product
// accumulates in fp32. A (r, in), B (out, r), dA, dB, and the bias and dbias (out), are fp32 device
// buffers owned by the layer (the optimizer's master weights); bf16 copies of A and B are made for
// the two products that need them as cuBLAS operands (x·Aᵀ, dy·B), every call, from the current
// masters. Gradients are written or added by GradMode; activations are always written (dx:
// overwritten).
//
// Where each product runs, and what is formed:
//   y  = x·W0ᵀ                 4-bit: cuda::matmul_4bit (GEMV for M ≤ 32, twice up to 64 on large
//                              weights, else dequantize + cuBLAS);
//                              int8: dequantize_rowwise_int8 into the reused bf16 scratch + cuBLAS
//                              (no int8 GEMV on the GPU yet); dense: cuBLAS on the bf16 copy
//   h  = (1/(1-p))·xm·Aᵀ       cuBLAS, bf16 in, fp32 out (M, r); xm = x ⊙ keep, exact in bf16
//   y += bias + s·h·Bᵀ         lowrank_add: fp32 bias, h and B, added into the bf16 y in one pass
//   dbias = Σ_t dy[t, :]       bias.cuh's column_sums: fp32, a fixed order, no atomics
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
// Merge (the Cpu backend's merged_weight / merge / unmerge, on the device): W0 is dequantized to
// fp32 (the CPU's values, bit for bit), s·B·A added by an fp32 cuBLAS product of the fp32 masters
// (no TF32: the handle keeps cuBLAS's default math mode), and the result requantized in the base's
// own format by the GPU quantizers (quantize_4bit, quantize_rowwise_int8: the CPU's bytes for the
// same fp32 input) or rounded to bf16; MergeReport's RMS error is computed on the device as the CPU
// computes it (rms_error.cuh). The one difference from the CPU is the order of the r-term sums of
// B·A (cuBLAS's, not Eigen's): the merged fp32 weight differs by fp32 rounding, which can move a
// value that sits on a quantization boundary to the neighbouring code. A merge holds two fp32
// copies of the weight (out·in·8 bytes) while it runs. An F32 base keeps its fp32 values on the
// device next to the bf16 compute copy (4 more bytes per weight), so it merges exactly, as on the CPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/cuda/bias.cuh"
#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/cast.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/dequantize4bit.cuh"
#include "qlora/cuda/dequantize8bit.cuh"
#include "qlora/cuda/dropout.cuh"
#include "qlora/cuda/gemm_bf16.cuh"
#include "qlora/cuda/gemm_rowmajor.cuh"
#include "qlora/cuda/layout4bit.cuh"
#include "qlora/cuda/lowrank_add.cuh"
#include "qlora/cuda/matmul4bit.cuh"
#include "qlora/cuda/quantize4bit.cuh"
#include "qlora/cuda/quantize8bit.cuh"
#include "qlora/cuda/quantized4bit.cuh"
#include "qlora/cuda/quantized8bit.cuh"
#include "qlora/cuda/rms_error.cuh"
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

// The base weight on the device: its two products (y = x·W0ᵀ, dx = dy·W0, with a bf16 scratch the
// quantized bases dequantize into) and what a merge needs of it:
//   dequantize(ctx, out)            W0 as fp32 (out, in) into a device buffer
//   requantize(ctx, merged, tmp)    replaces W0 by the merged fp32 values in its own format and
//                                   returns the RMS error that adds (BaseWeight::requantize's);
//                                   blocking; tmp: a scratch grown to out·in floats where needed
//   to_host(ctx)                    the BaseWeight on the host (blocking)
// The constructors' keep_master is for F32 only (the layer asks for it; the model's frozen
// projections, which never merge, do not).
template <class Quant>
struct DeviceBase {
  static_assert(sizeof(Quant) == 0,
                "LoraLinear<..., Cuda>: no device base for this Quant format (NF4, FP4, Int8, BF16, F32)");
};

template <class Fmt, quant::Quant4Type T>
struct DeviceBase4bit {
  DeviceQuantized4bit w;  // in the GEMV's tiles layout where the shape allows (layout4bit.cuh)
  DeviceBase4bit(const Context& ctx, const BaseWeight<Fmt>& base, bool /*keep_master*/ = false)
      : w(to_device(base.q, ctx)) {
    use_gemv_layout(ctx, w);
  }
  std::int64_t out() const { return w.shape[0]; }
  std::int64_t in() const { return w.shape[1]; }
  void forward(const Context& ctx, const __nv_bfloat16* x, int M, __nv_bfloat16* y,
               DeviceBuffer<__nv_bfloat16>& scratch) const {
    matmul_4bit(ctx, w, x, M, y, scratch, false);
  }
  void backward(const Context& ctx, const __nv_bfloat16* dy, int M, __nv_bfloat16* dx,
                DeviceBuffer<__nv_bfloat16>& scratch) const {
    ensure_size(scratch, std::size_t(out()) * std::size_t(in()));
    dequantize_4bit(ctx, w, scratch.data());
    base_backward_bf16(ctx, scratch.data(), int(out()), int(in()), dy, M, dx);
  }
  void dequantize(const Context& ctx, float* o) const { dequantize_4bit(ctx, w, o); }
  // As FourBitBase::requantize: same type, blocksize and double quantization; the dtype kept.
  double requantize(const Context& ctx, const float* merged, DeviceBuffer<float>& tmp) {
    DeviceQuantized4bit nq =
        quantize_4bit(ctx, merged, w.shape, {T, w.blocksize, w.double_quant}, "merged weight");
    nq.dtype = w.dtype;
    const std::size_t n = std::size_t(nq.numel());
    ensure_size(tmp, n);
    dequantize_4bit(ctx, nq, tmp.data());
    const double e = rms_error(ctx, tmp.data(), merged, n, DiffIn::Float);
    w = std::move(nq);
    use_gemv_layout(ctx, w);
    return e;
  }
  BaseWeight<Fmt> to_host(const Context& ctx) const { return BaseWeight<Fmt>(cuda::to_host(w, ctx)); }
};
template <>
struct DeviceBase<format::NF4> : DeviceBase4bit<format::NF4, quant::Quant4Type::NF4> {
  using DeviceBase4bit::DeviceBase4bit;
};
template <>
struct DeviceBase<format::FP4> : DeviceBase4bit<format::FP4, quant::Quant4Type::FP4> {
  using DeviceBase4bit::DeviceBase4bit;
};

// Row-wise int8 (LLM.int8 weights): both products dequantize into the bf16 scratch (the CPU's
// values, rounded once to bf16) and run on cuBLAS, at every M.
template <>
struct DeviceBase<format::Int8> {
  DeviceRowwiseInt8 w;
  DeviceBase(const Context& ctx, const BaseWeight<format::Int8>& base, bool /*keep_master*/ = false)
      : w(to_device(base.q, ctx)) {}
  std::int64_t out() const { return w.rows; }
  std::int64_t in() const { return w.cols; }
  void forward(const Context& ctx, const __nv_bfloat16* x, int M, __nv_bfloat16* y,
               DeviceBuffer<__nv_bfloat16>& scratch) const {
    ensure_size(scratch, std::size_t(w.numel()));
    dequantize_rowwise_int8(ctx, w, scratch.data());
    gemm_bf16(ctx, x, M, int(in()), scratch.data(), int(out()), y, 0.0f);
  }
  void backward(const Context& ctx, const __nv_bfloat16* dy, int M, __nv_bfloat16* dx,
                DeviceBuffer<__nv_bfloat16>& scratch) const {
    ensure_size(scratch, std::size_t(w.numel()));
    dequantize_rowwise_int8(ctx, w, scratch.data());
    base_backward_bf16(ctx, scratch.data(), int(out()), int(in()), dy, M, dx);
  }
  void dequantize(const Context& ctx, float* o) const { dequantize_rowwise_int8(ctx, w, o); }
  // As BaseWeight<Int8>::requantize.
  double requantize(const Context& ctx, const float* merged, DeviceBuffer<float>& tmp) {
    DeviceRowwiseInt8 nq = quantize_rowwise_int8(ctx, merged, w.rows, w.cols, "merged weight");
    const std::size_t n = std::size_t(nq.numel());
    ensure_size(tmp, n);
    dequantize_rowwise_int8(ctx, nq, tmp.data());
    const double e = rms_error(ctx, tmp.data(), merged, n, DiffIn::Float);
    w = std::move(nq);
    return e;
  }
  BaseWeight<format::Int8> to_host(const Context& ctx) const {
    return BaseWeight<format::Int8>(cuda::to_host(w, ctx));
  }
};

// Dense bases run their products in bf16: an F32 base is rounded to bf16 once on upload (the
// tensor-core rate; the error is the bf16 rounding of W0, ~2⁻⁹ relative).
struct DeviceDenseProducts {
  DeviceBuffer<__nv_bfloat16> w;  // (out, in)
  int rows = 0, cols = 0;
  template <class T>
  DeviceDenseProducts(const Context& ctx, const std::vector<T>& host, std::int64_t out, std::int64_t in)
      : w(host.size()), rows(int(out)), cols(int(in)) {
    std::vector<bf16> hb(host.size());
    for (std::size_t i = 0; i < hb.size(); ++i) hb[i] = to_bf16_any(host[i]);
    static_assert(sizeof(bf16) == sizeof(__nv_bfloat16), "bf16 layout");
    QLORA_CUDA_CHECK(
        cudaMemcpyAsync(w.data(), hb.data(), hb.size() * sizeof(bf16), cudaMemcpyHostToDevice, ctx.stream()));
    ctx.synchronize();
  }
  std::int64_t out() const { return rows; }
  std::int64_t in() const { return cols; }
  void forward(const Context& ctx, const __nv_bfloat16* x, int M, __nv_bfloat16* y,
               DeviceBuffer<__nv_bfloat16>&) const {
    gemm_bf16(ctx, x, M, cols, w.data(), rows, y, 0.0f);
  }
  void backward(const Context& ctx, const __nv_bfloat16* dy, int M, __nv_bfloat16* dx,
                DeviceBuffer<__nv_bfloat16>&) const {
    base_backward_bf16(ctx, w.data(), rows, cols, dy, M, dx);
  }
  std::size_t numel() const { return w.size(); }

 private:
  static bf16 to_bf16_any(float v) { return to_bf16(v); }
  static bf16 to_bf16_any(bf16 v) { return v; }
};

template <>
struct DeviceBase<format::BF16> : DeviceDenseProducts {
  DeviceBase(const Context& ctx, const BaseWeight<format::BF16>& base, bool /*keep_master*/ = false)
      : DeviceDenseProducts(ctx, base.w, base.out, base.in) {}
  void dequantize(const Context& ctx, float* o) const { cast_to_float(ctx, w.data(), numel(), o); }
  // As DenseBase<bf16>::requantize: round to nearest even, the error taken in double.
  double requantize(const Context& ctx, const float* merged, DeviceBuffer<float>&) {
    cast_to_bf16(ctx, merged, numel(), w.data());
    return rms_error(ctx, w.data(), merged, numel(), DiffIn::Double);
  }
  BaseWeight<format::BF16> to_host(const Context& ctx) const {
    std::vector<bf16> h(numel());
    QLORA_CUDA_CHECK(cudaMemcpyAsync(h.data(), w.data(), w.bytes(), cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
    return BaseWeight<format::BF16>(std::move(h), out(), in());
  }
};

template <>
struct DeviceBase<format::F32> : DeviceDenseProducts {
  DeviceBuffer<float> master;  // (out, in) the exact fp32 W0, with keep_master; else empty
  DeviceBase(const Context& ctx, const BaseWeight<format::F32>& base, bool keep_master = false)
      : DeviceDenseProducts(ctx, base.w, base.out, base.in) {
    if (keep_master) master = DeviceBuffer<float>::from_host(base.w, ctx.stream());
  }
  void dequantize(const Context& ctx, float* o) const {
    require_master();
    QLORA_CUDA_CHECK(
        cudaMemcpyAsync(o, master.data(), master.bytes(), cudaMemcpyDeviceToDevice, ctx.stream()));
  }
  // As DenseBase<float>::requantize: the merged values are stored as they are (error 0); the bf16
  // compute copy follows them.
  double requantize(const Context& ctx, const float* merged, DeviceBuffer<float>&) {
    require_master();
    QLORA_CUDA_CHECK(
        cudaMemcpyAsync(master.data(), merged, master.bytes(), cudaMemcpyDeviceToDevice, ctx.stream()));
    cast_to_bf16(ctx, master.data(), numel(), w.data());
    ctx.synchronize();
    return 0.0;
  }
  BaseWeight<format::F32> to_host(const Context& ctx) const {
    require_master();
    return BaseWeight<format::F32>(master.to_host(ctx.stream()), out(), in());
  }

 private:
  void require_master() const {
    QLORA_CHECK(master.size() == numel(),
                "cuda::DeviceBase<f32>: the fp32 weight was not kept on the device ",
                "(constructed with keep_master = false: a frozen product only)");
  }
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

  // Uploads the base weight (and the bias) and initializes A and B on the host exactly as the Cpu
  // backend does (same counter-based draws), so both backends start from the same bits.
  // bias: (out) values or empty; bias_mode says whether it is trained (the Cpu backend's arguments).
  LoraLinear(const cuda::Context& dev, const Base& base, const LoraConfig& cfg,
             const std::vector<float>& bias = {}, BiasMode bias_mode = BiasMode::Frozen)
      : cfg_(cfg), base_(dev, base, /*keep_master=*/true), out_(base.out), in_(base.in) {
    cfg_.validate();
    QLORA_CHECK(Rank == Dynamic || Rank == cfg_.r, "LoraLinear<", Quant::name, ", ", Rank,
                ", Cuda>: config rank r = ", cfg_.r, ", expected ", Rank);
    QLORA_CHECK(out_ <= INT_MAX && in_ <= INT_MAX, "LoraLinear<..., Cuda>: shape (", out_, ", ", in_,
                ") exceeds cuBLAS's int sizes");
    QLORA_CHECK(bias.empty() || std::int64_t(bias.size()) == out_, "LoraLinear<..., Cuda>: bias has ",
                bias.size(), " values, expected ", out_, " (out features)");
    QLORA_CHECK(!(bias_mode == BiasMode::Trainable && bias.empty()),
                "LoraLinear<..., Cuda>: a trainable bias was asked for, but no bias values were given");
    bias_mode_ = bias.empty() ? BiasMode::None : bias_mode;
    if (!bias.empty()) {
      bias_ = cuda::DeviceBuffer<float>::from_host(bias, dev.stream());
      dbias_ = cuda::DeviceBuffer<float>(bias.size());
    }
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
  bool merged() const { return merged_; }
  // The base weight as it is now (merged or not), copied to the host. Blocking.
  Base base(const cuda::Context& dev) const { return base_.to_host(dev); }

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

  // The bias (out) and its gradient, fp32 device buffers (empty without a bias).
  cuda::DeviceBuffer<float>& bias() { return bias_; }
  const cuda::DeviceBuffer<float>& bias() const { return bias_; }
  cuda::DeviceBuffer<float>& dbias() { return dbias_; }
  const cuda::DeviceBuffer<float>& dbias() const { return dbias_; }
  BiasMode bias_mode() const { return bias_mode_; }
  // Blocking host copy into the bias; the layer must have one (given to the constructor).
  void set_bias(const cuda::Context& dev, const std::vector<float>& b) {
    QLORA_CHECK(bias_mode_ != BiasMode::None, "LoraLinear<..., Cuda>: set_bias on a layer without a bias ",
                "(give the constructor bias values)");
    set(dev, bias_, b, "bias");
  }

  // Layers of one model can share one dequantization scratch (the largest weight's size, bf16),
  // as matmul_4bit allows; by default each layer has its own. `s` must outlive the layer's use.
  void share_scratch(cuda::DeviceBuffer<__nv_bfloat16>& s) { shared_scratch_ = &s; }

  std::uint64_t dropout_calls() const { return calls_; }
  void set_dropout_calls(std::uint64_t c) { calls_ = c; }

  // Inference: y (M, out) = x (M, in)·W0ᵀ + bias + s·x·Aᵀ·Bᵀ, no dropout, nothing kept.
  void forward(const cuda::Context& dev, const __nv_bfloat16* x, std::int64_t M, __nv_bfloat16* y) {
    forward_impl(dev, x, M, y, nullptr);
  }
  // Training: as above with dropout on the LoRA input; ctx keeps what backward needs.
  void forward(const cuda::Context& dev, const __nv_bfloat16* x, std::int64_t M, __nv_bfloat16* y,
               Context& ctx) {
    forward_impl(dev, x, M, y, &ctx);
    ++calls_;
  }

  // dy (M, out) -> dx (M, in) (skipped when dx is null), and dA, dB (and dbias when trained) written
  // or added by `mode`. Asynchronous on dev's stream, like forward.
  void backward(const cuda::Context& dev, const Context& ctx, const __nv_bfloat16* dy, __nv_bfloat16* dx,
                GradMode mode) {
    QLORA_CHECK(!merged_, "LoraLinear<..., Cuda>::backward on a merged layer: unmerge first");
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
    // dbias (out) = Σ_t dy[t, :]
    if (bias_mode_ == BiasMode::Trainable)
      cuda::column_sums(dev, dy, M, out, dbias_part_, dbias_.data(), mode == GradMode::Accumulate);
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

  // The trainable parameters for cuda::AdamW, named as PEFT names them under `module`:
  // <module>.lora_A.weight, <module>.lora_B.weight, and <module>.bias when the bias is trained (as the
  // Cpu backend's params()); value and grad are device pointers owned by the layer.
  std::vector<optim::Param> params(const std::string& module) {
    std::vector<optim::Param> p = {
        {module + ".lora_A.weight", A_.data(), dA_.data(), A_.size(), optim::ParamGroup::LoraA},
        {module + ".lora_B.weight", B_.data(), dB_.data(), B_.size(), optim::ParamGroup::LoraB}};
    if (bias_mode_ == BiasMode::Trainable)
      p.push_back({module + ".bias", bias_.data(), dbias_.data(), bias_.size(), optim::ParamGroup::Bias});
    return p;
  }

  void zero_grad(const cuda::Context& dev) {
    QLORA_CUDA_CHECK(cudaMemsetAsync(dA_.data(), 0, dA_.bytes(), dev.stream()));
    QLORA_CUDA_CHECK(cudaMemsetAsync(dB_.data(), 0, dB_.bytes(), dev.stream()));
    if (!dbias_.empty()) QLORA_CUDA_CHECK(cudaMemsetAsync(dbias_.data(), 0, dbias_.bytes(), dev.stream()));
  }

  // W0 + s·B·A as fp32 (out, in) on the host: the weight a merged dense checkpoint holds (W0 alone
  // once merged, as on the CPU). Blocking.
  std::vector<float> merged_weight(const cuda::Context& dev) const {
    cuda::DeviceBuffer<float> w(std::size_t(out_) * std::size_t(in_));
    base_.dequantize(dev, w.data());
    if (!merged_) add_lowrank(dev, w.data(), cfg_.scaling());
    return w.to_host(dev.stream());
  }

  // Folds s·B·A into the base weight, so forward costs one product (the Cpu backend's merge(), on
  // the device: see the top of this file). Dense fp32 bases merge exactly (up to fp32 rounding);
  // bf16 and quantized bases are requantized in their own format, and the report says what that
  // cost. Until unmerge() the LoRA path is off: training forwards and backward refuse. Blocking.
  MergeReport merge(const cuda::Context& dev) {
    QLORA_CHECK(!merged_, "LoraLinear<..., Cuda>::merge: already merged");
    MergeReport rep;
    rep.requantization_rmse = fold(dev, cfg_.scaling());
    merged_ = true;
    return rep;
  }

  // Subtracts s·B·A again (for a requantized base this does not restore the original bytes).
  MergeReport unmerge(const cuda::Context& dev) {
    QLORA_CHECK(merged_, "LoraLinear<..., Cuda>::unmerge: not merged");
    MergeReport rep;
    rep.requantization_rmse = fold(dev, -cfg_.scaling());
    merged_ = false;
    return rep;
  }

 private:
  cuda::DeviceBuffer<__nv_bfloat16>& scratch() { return shared_scratch_ ? *shared_scratch_ : own_scratch_; }

  // w (out, in) fp32 += alpha · B (out, r) · A (r, in), on the fp32 masters (the CPU's W += s·(B·A)).
  void add_lowrank(const cuda::Context& dev, float* w, float alpha) const {
    cuda::gemm_rowmajor(dev, int(out_), int(in_), cfg_.r, alpha, {B_.data(), CUDA_R_32F, cfg_.r},
                        {A_.data(), CUDA_R_32F, int(in_)}, 1.0f, w, CUDA_R_32F, int(in_));
  }

  // W0 <- requantize(W0 + alpha·B·A); returns the requantization's RMS error.
  double fold(const cuda::Context& dev, float alpha) {
    cuda::DeviceBuffer<float> w(std::size_t(out_) * std::size_t(in_)), tmp;
    base_.dequantize(dev, w.data());
    add_lowrank(dev, w.data(), alpha);
    const double e = base_.requantize(dev, w.data(), tmp);
    dev.synchronize();  // w and tmp are freed on return
    return e;
  }

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
    QLORA_CHECK(!(merged_ && ctx),
                "LoraLinear<..., Cuda>::forward: training forward on a merged layer: unmerge first");
    const int M = int(M64), r = cfg_.r, in = int(in_), out = int(out_);
    const std::size_t n = std::size_t(M) * std::size_t(in);
    const float* bias = bias_.empty() ? nullptr : bias_.data();
    base_.forward(dev, x, M, y, scratch());
    if (merged_) {  // y = x·(W0 + s·B·A)ᵀ + bias
      if (bias) cuda::add_bias(dev, y, M, out, bias);
      return;
    }
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
    // h (M, r) = (1/(1-p)) · xm (M, in) · Aᵀ (in, r); y (M, out) += bias + s · h · Bᵀ
    cuda::cast_to_bf16(dev, A_.data(), A_.size(), Ab_.data());
    cuda::gemm_rowmajor(dev, M, r, in, ks, {xin, CUDA_R_16BF, in}, {Ab_.data(), CUDA_R_16BF, in, cuda::Op::T},
                        0.0f, h, CUDA_R_32F, r);
    cuda::lowrank_add(dev, y, M, out, r, cfg_.scaling(), h, B_.data(), 1, r, nullptr, bias);
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
  cuda::DeviceBuffer<float> bias_, dbias_;                       // (out) fp32, empty without a bias
  cuda::DeviceBuffer<float> dbias_part_;                         // column_sums' partial sums (M > 256)
  BiasMode bias_mode_ = BiasMode::None;
  std::uint64_t calls_ = 0;
  bool merged_ = false;
};

}  // namespace qlora
