#pragma once
// A trainable parameter as the optimizer sees it: a name, the fp32 master values, their gradient and
// the group that decides its learning rate and weight decay.
//
// Ownership: the layers own `value` and `grad` (fp32 master weights and their gradient buffers); the
// optimizer only holds the pointers, so both buffers must outlive it and must not move. Gradients
// follow the layers' convention: the backward pass ADDS into `grad` (that is what makes gradient
// accumulation over micro-batches work), and `zero_grad()` clears them.
#include <cstddef>
#include <string>

namespace qlora {
namespace optim {

// Which rule sets the parameter's learning rate and weight decay (see AdamWConfig):
//   LoraA  lr,                     weight decay
//   LoraB  lr * loraplus_lr_ratio, weight decay   (LoRA+: B learns faster)
//   Bias   lr,                     no weight decay (as the transformers Trainer, which never decays
//                                                   biases)
//   Other  lr,                     weight decay
// An enum rather than an lr multiplier + flag so that a saved state can be checked against the
// grouping it was trained with, and so that the LoRA+ ratio lives in one place (the config).
enum class ParamGroup { LoraA, LoraB, Bias, Other };

inline const char* group_name(ParamGroup g) {
  switch (g) {
    case ParamGroup::LoraA: return "lora_A";
    case ParamGroup::LoraB: return "lora_B";
    case ParamGroup::Bias: return "bias";
    case ParamGroup::Other: return "other";
  }
  return "?";
}

struct Param {
  std::string name;  // unique; also the key of its state in a saved optimizer file
  float* value;      // (size) fp32 master weights, owned by the layer
  float* grad;       // (size) accumulated gradient, owned by the layer
  std::size_t size;  // number of elements
  ParamGroup group = ParamGroup::Other;
};

}  // namespace optim
}  // namespace qlora
