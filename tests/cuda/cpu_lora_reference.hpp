#pragma once
// The Cpu backend's LoraLinear behind a plain interface, for the [cuda] tests: it is compiled by the
// host compiler in its own translation unit (cpu_lora_reference.cpp), as users of the CPU library
// compile it, so neither Eigen nor the CPU kernels go through nvcc.
#include <cstdint>
#include <memory>
#include <vector>

#include "qlora/core/half.hpp"
#include "qlora/lora/config.hpp"
#include "qlora/lora/lora_linear.hpp"  // MergeReport
#include "qlora/quant/blockwise4bit.hpp"
#include "qlora/quant/rowwise_int8.hpp"

namespace cpuref {

class LoraLayer {
 public:
  // Every factory takes the Cpu backend's bias arguments: (out) values or empty, and the mode.
  // LoraLinear<NF4 / FP4, Dynamic, Cpu> with exact fp32 activations in its 4-bit product
  // (ActQuant::None); the tensor's type picks NF4 or FP4.
  static LoraLayer nf4(const qlora::quant::Quantized4bit& w, const qlora::LoraConfig& cfg,
                       const std::vector<float>& bias = {}, qlora::BiasMode mode = qlora::BiasMode::Frozen);
  // LoraLinear<F32, Dynamic, Cpu>.
  static LoraLayer f32(const std::vector<float>& w, std::int64_t out, std::int64_t in,
                       const qlora::LoraConfig& cfg, const std::vector<float>& bias = {},
                       qlora::BiasMode mode = qlora::BiasMode::Frozen);
  // LoraLinear<BF16, Dynamic, Cpu>.
  static LoraLayer bf16(const std::vector<qlora::bf16>& w, std::int64_t out, std::int64_t in,
                        const qlora::LoraConfig& cfg, const std::vector<float>& bias = {},
                        qlora::BiasMode mode = qlora::BiasMode::Frozen);
  // LoraLinear<Int8, Dynamic, Cpu> (its product on fp32 activations: ActQuant::None, the default).
  static LoraLayer int8(const qlora::quant::RowwiseInt8& w, const qlora::LoraConfig& cfg,
                        const std::vector<float>& bias = {}, qlora::BiasMode mode = qlora::BiasMode::Frozen);
  ~LoraLayer();
  LoraLayer(LoraLayer&&) noexcept;

  std::vector<float> A() const;      // (r, in)
  std::vector<float> B() const;      // (out, r)
  std::vector<float> dA() const;     // (r, in)
  std::vector<float> dB() const;     // (out, r)
  std::vector<float> bias() const;   // (out) or empty
  std::vector<float> dbias() const;  // (out) or empty
  // Training forward (keeps its context), x (M, in) -> y (M, out).
  void forward(const float* x, std::int64_t M, float* y);
  // Inference forward (no dropout, nothing kept; the only forward a merged layer takes).
  void infer(const float* x, std::int64_t M, float* y) const;
  // Backward of the last forward: dy (M, out) -> dx (M, in).
  void backward(const float* dy, float* dx, qlora::GradMode mode);
  std::vector<std::uint64_t> keep() const;  // the last forward's dropout mask words
  std::uint64_t dropout_calls() const;

  // merged_weight() / merge() / unmerge() of the Cpu backend, and the base weight as it is now:
  // dequantized to fp32 (any format), or its stored form (base_4bit: NF4 / FP4, base_int8, base_bf16;
  // each throws for another format).
  std::vector<float> merged_weight() const;
  qlora::MergeReport merge();
  qlora::MergeReport unmerge();
  std::vector<float> base_dequantized() const;
  qlora::quant::Quantized4bit base_4bit() const;
  qlora::quant::RowwiseInt8 base_int8() const;
  std::vector<qlora::bf16> base_bf16() const;

  struct Impl;

 private:
  explicit LoraLayer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cpuref
