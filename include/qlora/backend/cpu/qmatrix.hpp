#pragma once
// QMatrix: a frozen base weight W (N, K) = (out, in), prepared once for the two products a LoRA
// layer needs on the CPU:
//
//   forward:  y (M, N) = x (M, K) . W^T      (Accumulate::Yes: y += ...)
//   backward: dx (M, K) = dy (M, N) . W      (Accumulate::Yes: dx += ...)
//
// Activations are fp32, row-major. W is dense fp32, dense bf16, NF4 / FP4 (any blocksize, with or
// without double quantization) or row-wise int8. Construction copies and repacks W into the layout
// its kernels read (packed_4bit.hpp); the source tensor is not referenced afterwards.
//
// Paths (all tested against ref::forward / ref::backward on the dequantized weight):
// - f32: Eigen, split over threads (gemm_dequant.hpp: forward_f32 / backward_f32).
// - forward, M <= small_m_max() (AVX2 builds): a fused kernel that reads the stored weight once
//   (gemv_4bit.hpp, gemv_int8.hpp, gemv_bf16.hpp). act_quant() picks how it treats activations
//   (act_quant.hpp): None (the default) computes with fp32 activations and the exactly dequantized
//   weight, equal to the reference up to fp32 summation order (~3e-7 relative); Int16 (4-bit
//   weights, K % 32 == 0) quantizes activations to int16 per 32 values and runs integer dot
//   products, ~1.8x faster at relative error ~5e-5; Int8 (4-bit with K % 32 == 0, and int8
//   weights) is the llama.cpp scheme, ~2x faster, relative error 5e-3..1.3e-2.
// - everything else (large M, every backward, 4-bit weights with K % 32 != 0, builds without
//   AVX2): tiles of W decoded to fp32 and multiplied with Eigen (forward_tiled / backward_tiled);
//   equal to the reference within fp32 rounding whatever act_quant() says.
// Threads: qlora::num_threads(), on the persistent pool of thread_pool.hpp.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/backend/cpu/accumulate.hpp"
#include "qlora/backend/cpu/act_quant.hpp"
#include "qlora/backend/cpu/gemm_dequant.hpp"
#include "qlora/backend/cpu/gemv_4bit.hpp"
#include "qlora/backend/cpu/gemv_bf16.hpp"
#include "qlora/backend/cpu/gemv_int8.hpp"
#include "qlora/backend/cpu/packed_4bit.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/quant/blockwise4bit.hpp"
#include "qlora/quant/rowwise_int8.hpp"

namespace qlora {
namespace cpu {

class QMatrix {
  // deq(r0, r1, c0, c1, out, ld) for forward_tiled / backward_tiled
  struct TileDecoder {
    const QMatrix* m;
    void operator()(std::int64_t r0, std::int64_t r1, std::int64_t c0, std::int64_t c1, float* out,
                    std::int64_t ld) const {
      m->decode_tile(r0, r1, c0, c1, out, ld);
    }
  };
  TileDecoder tile_decoder() const { return TileDecoder{this}; }

 public:
  QMatrix(QMatrix&&) = default;
  QMatrix& operator=(QMatrix&&) = default;
  QMatrix(const QMatrix&) = delete;
  QMatrix& operator=(const QMatrix&) = delete;

  // W: (N, K), copied.
  static QMatrix dense(const float* W, std::int64_t N, std::int64_t K) {
    check_shape(N, K, "QMatrix::dense");
    QMatrix m(Kind::F32, N, K);
    m.f32_.assign(W, W + N * K);
    return m;
  }
  static QMatrix dense_bf16(const bf16* W, std::int64_t N, std::int64_t K) {
    check_shape(N, K, "QMatrix::dense_bf16");
    QMatrix m(Kind::BF16, N, K);
    m.bf16_.assign(W, W + N * K);
    return m;
  }
  // Shape (N, K) = q.shape, which must be 2-D.
  static QMatrix from(const quant::Quantized4bit& q) {
    Packed4bit p = pack_4bit(q);
    QMatrix m(Kind::Q4, p.N, p.K);
    m.q4_ = std::move(p);
    return m;
  }
  static QMatrix from(const quant::RowwiseInt8& q) {
    check_shape(q.rows, q.cols, "QMatrix::from(RowwiseInt8)");
    QLORA_CHECK(q.q.size() == std::size_t(q.rows * q.cols) && q.scb.size() == std::size_t(q.rows),
                "QMatrix::from(RowwiseInt8): ", q.q.size(), " codes and ", q.scb.size(),
                " scales for shape (", q.rows, ", ", q.cols, ")");
    QMatrix m(Kind::Int8, q.rows, q.cols);
    m.i8_ = q.q;
    m.scb_ = q.scb;
    return m;
  }

  std::int64_t rows() const { return N_; }
  std::int64_t cols() const { return K_; }
  const char* format() const {
    switch (kind_) {
      case Kind::F32: return "f32";
      case Kind::BF16: return "bf16";
      case Kind::Q4: return q4_.type == quant::Quant4Type::NF4 ? "nf4" : "fp4";
      case Kind::Int8: return "int8";
    }
    return "?";
  }
  // Bytes of the stored (repacked) weight: what a product streams from memory.
  std::size_t weight_bytes() const {
    switch (kind_) {
      case Kind::F32: return f32_.size() * sizeof(float);
      case Kind::BF16: return bf16_.size() * sizeof(bf16);
      case Kind::Q4: return q4_.bytes();
      case Kind::Int8: return i8_.size() + scb_.size() * sizeof(float);
    }
    return 0;
  }

  // The small-M fused products: activation handling (act_quant.hpp) and up to which M they run
  // (above it, tiles of W are dequantized and multiplied with Eigen).
  QMatrix& set_act_quant(ActQuant aq) {
    act_quant_ = aq;
    return *this;
  }
  ActQuant act_quant() const { return act_quant_; }
  // A negative value restores the default, measured per format (docs/performance.md): the M where
  // the tiled Eigen path overtakes the fused kernel on one Zen 4 core.
  QMatrix& set_small_m_max(std::int64_t m) {
    small_m_max_ = m;
    return *this;
  }
  std::int64_t small_m_max() const {
    if (small_m_max_ >= 0) return small_m_max_;
    switch (kind_) {
      case Kind::Q4: return act_quant_ == ActQuant::None ? 12 : 48;
      case Kind::Int8: return act_quant_ == ActQuant::Int8 ? 48 : 16;
      case Kind::BF16: return 12;
      case Kind::F32: return 0;
    }
    return 0;
  }

  // x (M, K) -> y (M, N)
  void forward(const float* x, std::int64_t M, float* y, Accumulate acc) const {
    QLORA_CHECK(M >= 0, "QMatrix::forward: M must be >= 0, got ", M);
    if (kind_ == Kind::F32) return forward_f32(f32_.data(), N_, K_, x, M, y, acc);
#ifdef __AVX2__
    if (M <= small_m_max()) {
      if (kind_ == Kind::Q4 && q4_.grouped) return gemv_4bit(q4_, x, M, y, acc, act_quant_);
      if (kind_ == Kind::Int8)
        return gemv_int8(Int8View{i8_.data(), scb_.data(), N_, K_}, x, M, y, acc, act_quant_);
      if (kind_ == Kind::BF16) return gemv_bf16(bf16_.data(), N_, K_, x, M, y, acc);
    }
#endif
    forward_tiled(tile_decoder(), N_, K_, x, M, y, acc, M <= 16 ? tile::kSmallTileRows : tile::kTileRows);
  }

  // dy (M, N) -> dx (M, K)
  void backward(const float* dy, std::int64_t M, float* dx, Accumulate acc) const {
    QLORA_CHECK(M >= 0, "QMatrix::backward: M must be >= 0, got ", M);
    if (kind_ == Kind::F32) return backward_f32(f32_.data(), N_, K_, dy, M, dx, acc);
    backward_tiled(tile_decoder(), N_, K_, dy, M, dx, acc, M <= 16 ? tile::kSmallTileRows : tile::kTileRows);
  }

  // The fp32 weight (N, K) itself, for full-parameter training, where the optimizer updates it in
  // place (the products read it directly, so an update takes effect at the next call).
  float* f32_data() {
    QLORA_CHECK(kind_ == Kind::F32, "QMatrix::f32_data: the matrix is ", format(), ", expected f32");
    return f32_.data();
  }

  // out: (N, K), the weight as the products see it (equal to quant::dequantize of the source).
  void dequantize(float* out) const {
    const auto deq = tile_decoder();
    const std::int64_t K = K_;
    parallel_for(std::size_t(N_), 1,
                 std::size_t(std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(K, 1))),
                 [&](std::size_t b, std::size_t e) {
                   deq(std::int64_t(b), std::int64_t(e), 0, K, out + std::int64_t(b) * K, K);
                 });
  }

 private:
  enum class Kind { F32, BF16, Q4, Int8 };
  QMatrix(Kind k, std::int64_t N, std::int64_t K) : kind_(k), N_(N), K_(K) {}

  static void check_shape(std::int64_t N, std::int64_t K, const char* what) {
    QLORA_CHECK(N >= 0 && K >= 0, what, ": shape must be non-negative, got (", N, ", ", K, ")");
  }

  // deq(r0, r1, c0, c1, out, ld): W[r0:r1, c0:c1] as fp32 into out (row stride ld).
  void decode_tile(std::int64_t r0, std::int64_t r1, std::int64_t c0, std::int64_t c1, float* out,
                   std::int64_t ld) const {
    switch (kind_) {
      case Kind::F32:
        for (std::int64_t r = r0; r < r1; ++r)
          std::copy(f32_.data() + r * K_ + c0, f32_.data() + r * K_ + c1, out + (r - r0) * ld);
        break;
      case Kind::BF16:
        for (std::int64_t r = r0; r < r1; ++r)
          convert(bf16_.data() + r * K_ + c0, out + (r - r0) * ld, std::size_t(c1 - c0));
        break;
      case Kind::Q4: dequantize_tile(q4_, r0, r1, c0, c1, out, ld); break;
      case Kind::Int8:
        for (std::int64_t r = r0; r < r1; ++r) {
          const std::int8_t* q = i8_.data() + r * K_;
          const float s = scb_[std::size_t(r)];
          float* o = out + (r - r0) * ld - c0;
          for (std::int64_t c = c0; c < c1; ++c) {
            const float prod = float(q[c]) * s;  // (q * SCB) * (1/127): two roundings, as bitsandbytes
            o[c] = prod * quant::kInv127;
          }
        }
        break;
    }
  }

  Kind kind_;
  std::int64_t N_ = 0, K_ = 0;
  ActQuant act_quant_ = ActQuant::None;
  std::int64_t small_m_max_ = -1;  // < 0: the format's default
  std::vector<float> f32_;         // (N, K)
  std::vector<bf16> bf16_;         // (N, K)
  Packed4bit q4_;                  // see packed_4bit.hpp
  std::vector<std::int8_t> i8_;    // (N, K)
  std::vector<float> scb_;         // (N)
};

}  // namespace cpu
}  // namespace qlora
