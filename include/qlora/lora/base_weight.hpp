#pragma once
// The frozen base weight W0 (out, in) of a LoRA layer, in one of the formats the layer's Quant policy
// names. Storage only: the backends turn it into what their products need (cpu::QMatrix, device
// buffers) and read it back for merging and export.
//
//   format::F32   dense fp32            format::NF4 / FP4   bitsandbytes 4-bit (+ double quant)
//   format::BF16  dense bf16            format::Int8        row-wise int8 (LLM.int8 weights)
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/quant/blockwise4bit.hpp"
#include "qlora/quant/rowwise_int8.hpp"

namespace qlora {
namespace format {
struct F32 {
  static constexpr const char* name = "f32";
};
struct BF16 {
  static constexpr const char* name = "bf16";
};
struct NF4 {
  static constexpr const char* name = "nf4";
};
struct FP4 {
  static constexpr const char* name = "fp4";
};
struct Int8 {
  static constexpr const char* name = "int8";
};
}  // namespace format

// Primary template: no storage for an unknown format.
template <class Quant>
struct BaseWeight {
  static_assert(sizeof(Quant) == 0, "BaseWeight: no specialization for this Quant format");
};

namespace detail {
template <class T>
struct DenseBase {
  std::int64_t out = 0, in = 0;
  std::vector<T> w;  // (out, in) row-major

  DenseBase() = default;
  DenseBase(std::vector<T> weights, std::int64_t out_features, std::int64_t in_features)
      : out(out_features), in(in_features), w(std::move(weights)) {
    QLORA_CHECK(out > 0 && in > 0, "base weight: shape (", out, ", ", in, ") must be positive");
    QLORA_CHECK(w.size() == std::size_t(out * in), "base weight: ", w.size(), " values for shape (", out,
                ", ", in, "), expected ", out * in);
  }
  void dequantize(float* o) const {
    for (std::size_t i = 0; i < w.size(); ++i) o[i] = to_float_any(w[i]);
  }
  // Replaces the weight with merged values (out, in); returns the RMS of the rounding (0 for fp32).
  double requantize(const float* merged) {
    double se = 0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      store(merged[i], &w[i]);
      const double d = double(to_float_any(w[i])) - double(merged[i]);
      se += d * d;
    }
    return w.empty() ? 0.0 : std::sqrt(se / double(w.size()));
  }

 private:
  static float to_float_any(float v) { return v; }
  static float to_float_any(bf16 v) { return to_float(v); }
};
}  // namespace detail

template <>
struct BaseWeight<format::F32> : detail::DenseBase<float> {
  using DenseBase::DenseBase;
};
template <>
struct BaseWeight<format::BF16> : detail::DenseBase<bf16> {
  using DenseBase::DenseBase;
};

namespace detail {
template <quant::Quant4Type T>
struct FourBitBase {
  std::int64_t out = 0, in = 0;
  quant::Quantized4bit q;

  FourBitBase() = default;
  explicit FourBitBase(quant::Quantized4bit weights) : q(std::move(weights)) {
    QLORA_CHECK(q.type == T, "base weight: a ", quant::quant4_name(q.type), " tensor given where ",
                quant::quant4_name(T), " was expected");
    QLORA_CHECK(q.shape.size() == 2, "base weight: 4-bit tensor has ", q.shape.size(),
                " dimensions, expected 2 (out, in)");
    quant::validate(q, "base weight");
    out = q.shape[0];
    in = q.shape[1];
  }
  // Quantizes a dense fp32 weight (out, in) with the given blocksize and double quantization.
  static FourBitBase quantize(const float* w, std::int64_t out_features, std::int64_t in_features,
                              int blocksize = 64, bool double_quant = true) {
    return FourBitBase(quant::quantize_4bit(w, {out_features, in_features}, {T, blocksize, double_quant}));
  }
  void dequantize(float* o) const { quant::dequantize(q, o); }
  // Replaces the weight with the requantized merged values; returns the RMS error requantization adds.
  double requantize(const float* merged) {
    quant::Quantized4bit nq =
        quant::quantize_4bit(merged, q.shape, {T, q.blocksize, q.double_quant}, "merged weight");
    nq.dtype = q.dtype;
    std::vector<float> back(std::size_t(out * in));
    quant::dequantize(nq, back.data());
    double se = 0;
    for (std::size_t i = 0; i < back.size(); ++i)
      se += double(back[i] - merged[i]) * double(back[i] - merged[i]);
    q = std::move(nq);
    return std::sqrt(se / double(back.size()));
  }
};
}  // namespace detail

template <>
struct BaseWeight<format::NF4> : detail::FourBitBase<quant::Quant4Type::NF4> {
  using FourBitBase::FourBitBase;
  BaseWeight(FourBitBase b) : FourBitBase(std::move(b)) {}  // NOLINT: from quantize()
};
template <>
struct BaseWeight<format::FP4> : detail::FourBitBase<quant::Quant4Type::FP4> {
  using FourBitBase::FourBitBase;
  BaseWeight(FourBitBase b) : FourBitBase(std::move(b)) {}  // NOLINT: from quantize()
};

template <>
struct BaseWeight<format::Int8> {
  std::int64_t out = 0, in = 0;
  quant::RowwiseInt8 q;

  BaseWeight() = default;
  explicit BaseWeight(quant::RowwiseInt8 weights)
      : out(weights.rows), in(weights.cols), q(std::move(weights)) {
    QLORA_CHECK(out > 0 && in > 0, "base weight: int8 shape (", out, ", ", in, ") must be positive");
  }
  static BaseWeight quantize(const float* w, std::int64_t out_features, std::int64_t in_features) {
    return BaseWeight(quant::quantize_rowwise_int8(w, out_features, in_features));
  }
  void dequantize(float* o) const { quant::dequantize(q, o); }
  double requantize(const float* merged) {
    q = quant::quantize_rowwise_int8(merged, out, in, "merged weight");
    std::vector<float> back(std::size_t(out * in));
    quant::dequantize(q, back.data());
    double se = 0;
    for (std::size_t i = 0; i < back.size(); ++i)
      se += double(back[i] - merged[i]) * double(back[i] - merged[i]);
    return std::sqrt(se / double(back.size()));
  }
};

}  // namespace qlora
