#pragma once
// The Cpu backend's LoraLinear behind a plain interface, for the [cuda] tests: it is compiled by the
// host compiler in its own translation unit (cpu_lora_reference.cpp), as users of the CPU library
// compile it, so neither Eigen nor the CPU kernels go through nvcc.
#include <cstdint>
#include <memory>
#include <vector>

#include "qlora/lora/config.hpp"
#include "qlora/quant/blockwise4bit.hpp"

namespace cpuref {

class LoraLayer {
 public:
  // LoraLinear<NF4, Dynamic, Cpu> with exact fp32 activations in its 4-bit product (ActQuant::None).
  static LoraLayer nf4(const qlora::quant::Quantized4bit& w, const qlora::LoraConfig& cfg);
  // LoraLinear<F32, Dynamic, Cpu>.
  static LoraLayer f32(const std::vector<float>& w, std::int64_t out, std::int64_t in,
                       const qlora::LoraConfig& cfg);
  ~LoraLayer();
  LoraLayer(LoraLayer&&) noexcept;

  std::vector<float> A() const;   // (r, in)
  std::vector<float> B() const;   // (out, r)
  std::vector<float> dA() const;  // (r, in)
  std::vector<float> dB() const;  // (out, r)
  // Training forward (keeps its context), x (M, in) -> y (M, out).
  void forward(const float* x, std::int64_t M, float* y);
  // Backward of the last forward: dy (M, out) -> dx (M, in).
  void backward(const float* dy, float* dx, qlora::GradMode mode);
  std::vector<std::uint64_t> keep() const;  // the last forward's dropout mask words
  std::uint64_t dropout_calls() const;

  struct Impl;

 private:
  explicit LoraLayer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cpuref
