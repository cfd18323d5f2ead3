#pragma once
// The CPU LlamaModel<Quant> behind a plain interface, for the [cuda] model test: compiled by the host
// compiler in its own translation unit (cpu_llama_reference.cpp), so Eigen and the CPU kernels stay
// out of nvcc. The test sees only plain types (model/llama_weights.hpp, lora/config.hpp).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qlora/lora/config.hpp"
#include "qlora/model/llama_weights.hpp"
#include "qlora/optim/adamw.hpp"

namespace cpuref {

template <class Quant>
class LlamaReference {
 public:
  // LlamaModel<Quant>::load(dir, {targets, lora}), base products in exact fp32 (ActQuant::None).
  LlamaReference(const std::string& dir, const std::vector<std::string>& targets,
                 const qlora::LoraConfig& lora);
  ~LlamaReference();
  LlamaReference(LlamaReference&&) noexcept;

  // LlamaModel::weights(): the base pointers stay valid while this object lives.
  qlora::LlamaWeights<Quant> weights() const;
  // forward_backward with GradMode::Overwrite; loss without backward.
  float forward_backward(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B, std::int64_t T);
  float loss(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B, std::int64_t T);
  std::vector<qlora::LoraTensors> lora() const;   // A, B, dropout counters per LoRA layer
  std::vector<qlora::LoraTensors> grads() const;  // dA, dB (in A, B)
  // optim::AdamW over params(), created on the first call; returns the gradient norm.
  double adamw_step(const qlora::optim::AdamWConfig& cfg);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

extern template class LlamaReference<qlora::format::NF4>;
extern template class LlamaReference<qlora::format::BF16>;

}  // namespace cpuref
