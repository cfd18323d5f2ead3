#pragma once
// Moving LoRA weights between a layer and a PEFT adapter (io/peft_adapter.hpp), for any backend's
// LoraLinear: load a module's A and B into a layer (checking they fit), and read them back out for
// saving. A layer's rank and scaling are fixed at construction, so make the layer with
// config_for(adapter, module) and then load_weights().
#include <cmath>
#include <string>

#include "qlora/core/error.hpp"
#include "qlora/io/peft_adapter.hpp"
#include "qlora/lora/config.hpp"

namespace qlora {

// The LoraConfig of one module of a PEFT adapter: its rank and alpha after rank_pattern /
// alpha_pattern, use_rslora, and the adapter's dropout.
inline LoraConfig config_for(const peft::LoraConfig& c, const std::string& module) {
  LoraConfig cfg;
  cfg.r = peft::rank_for(c, module);
  cfg.alpha = peft::alpha_for(c, module);
  cfg.rslora = c.use_rslora;
  cfg.dropout = float(c.lora_dropout);
  return cfg;
}

// Copies w.A (r, in) and w.B (out, r) into the layer; every mismatch is an Error naming the module.
template <class Layer>
void load_weights(Layer& layer, const peft::LoraWeights& w) {
  const std::string what = "adapter " + w.module;
  QLORA_CHECK(w.r == layer.rank(), what, ": rank ", w.r, ", the layer has rank ", layer.rank());
  QLORA_CHECK(w.in == layer.in_features(), what, ": lora_A has ", w.in, " columns, base weight has ",
              layer.in_features());
  QLORA_CHECK(w.out == layer.out_features(), what, ": lora_B has ", w.out, " rows, base weight has ",
              layer.out_features());
  QLORA_CHECK(std::fabs(w.scaling - layer.scaling()) <= 1e-6f * std::fabs(layer.scaling()), what,
              ": scaling ", w.scaling, ", the layer was made with scaling ", layer.scaling());
  for (std::int64_t k = 0; k < w.r; ++k)
    for (std::int64_t i = 0; i < w.in; ++i) layer.A()(k, i) = w.A[std::size_t(k * w.in + i)];
  for (std::int64_t o = 0; o < w.out; ++o)
    for (std::int64_t k = 0; k < w.r; ++k) layer.B()(o, k) = w.B[std::size_t(o * w.r + k)];
}

// The layer's A and B as a PEFT module entry.
template <class Layer>
peft::LoraWeights weights_of(const Layer& layer, const std::string& module) {
  peft::LoraWeights w;
  w.module = module;
  w.r = layer.rank();
  w.alpha = layer.config().alpha;
  w.scaling = layer.scaling();
  w.in = layer.in_features();
  w.out = layer.out_features();
  w.A.resize(std::size_t(w.r * w.in));
  w.B.resize(std::size_t(w.out * w.r));
  for (std::int64_t k = 0; k < w.r; ++k)
    for (std::int64_t i = 0; i < w.in; ++i) w.A[std::size_t(k * w.in + i)] = layer.A()(k, i);
  for (std::int64_t o = 0; o < w.out; ++o)
    for (std::int64_t k = 0; k < w.r; ++k) w.B[std::size_t(o * w.r + k)] = layer.B()(o, k);
  return w;
}

}  // namespace qlora
