// The host-compiled half of the [cuda] model test: see cpu_llama_reference.hpp.
#include "cpu_llama_reference.hpp"

#include <optional>
#include <utility>

#include "qlora/model/llama.hpp"

namespace cpuref {

template <class Quant>
struct LlamaReference<Quant>::Impl {
  qlora::LlamaModel<Quant> model;
  std::optional<qlora::optim::AdamW> opt;
};

template <class Quant>
LlamaReference<Quant>::LlamaReference(const std::string& dir, const std::vector<std::string>& targets,
                                      const qlora::LoraConfig& lora) {
  qlora::LlamaLoraOptions opt;
  opt.target_modules = targets;
  opt.lora = lora;
  opt.keep_frozen_bases = true;  // the GPU model uploads the frozen projections too
  impl_ = std::make_unique<Impl>(Impl{qlora::LlamaModel<Quant>::load(dir, opt), std::nullopt});
  impl_->model.set_act_quant(qlora::cpu::ActQuant::None);
}
template <class Quant>
LlamaReference<Quant>::~LlamaReference() = default;
template <class Quant>
LlamaReference<Quant>::LlamaReference(LlamaReference&&) noexcept = default;

template <class Quant>
qlora::LlamaWeights<Quant> LlamaReference<Quant>::weights() const {
  return impl_->model.weights();
}
template <class Quant>
float LlamaReference<Quant>::forward_backward(const std::int64_t* ids, const std::int64_t* labels,
                                              std::int64_t B, std::int64_t T) {
  return impl_->model.forward_backward(ids, labels, B, T, qlora::GradMode::Overwrite);
}
template <class Quant>
float LlamaReference<Quant>::loss(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B,
                                  std::int64_t T) {
  return impl_->model.loss(ids, labels, B, T);
}

template <class Quant>
std::vector<qlora::LoraTensors> LlamaReference<Quant>::lora() const {
  std::vector<qlora::LoraTensors> out;
  const std::vector<std::uint64_t> calls = impl_->model.dropout_calls();  // in module order
  std::size_t k = 0;
  for (std::int64_t l = 0; l < impl_->model.config().num_hidden_layers; ++l)
    for (int p = 0; p < qlora::kNumProj; ++p) {
      auto* lin = impl_->model.find(qlora::llama_module(l, p));
      if (!lin->has_lora()) continue;
      const auto& lo = lin->lora_layer();
      out.push_back({qlora::llama_module(l, p),
                     std::vector<float>(lo.A().data(), lo.A().data() + lo.A().size()),
                     std::vector<float>(lo.B().data(), lo.B().data() + lo.B().size()), calls[k++]});
    }
  return out;
}

template <class Quant>
std::vector<qlora::LoraTensors> LlamaReference<Quant>::grads() const {
  std::vector<qlora::LoraTensors> out;
  for (std::int64_t l = 0; l < impl_->model.config().num_hidden_layers; ++l)
    for (int p = 0; p < qlora::kNumProj; ++p) {
      auto* lin = impl_->model.find(qlora::llama_module(l, p));
      if (!lin->has_lora()) continue;
      const auto& lo = lin->lora_layer();
      out.push_back(
          {qlora::llama_module(l, p), std::vector<float>(lo.dA().data(), lo.dA().data() + lo.dA().size()),
           std::vector<float>(lo.dB().data(), lo.dB().data() + lo.dB().size()), lo.dropout_calls()});
    }
  return out;
}

template <class Quant>
double LlamaReference<Quant>::adamw_step(const qlora::optim::AdamWConfig& cfg) {
  if (!impl_->opt) impl_->opt.emplace(impl_->model.params(), cfg);
  return impl_->opt->step();
}

template class LlamaReference<qlora::format::NF4>;
template class LlamaReference<qlora::format::BF16>;

}  // namespace cpuref
