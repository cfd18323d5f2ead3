#pragma once
// LoRA hyper-parameters and the small enums the layer's API uses.
//
// The layer computes y = W0·x + bias + s·B·A·dropout(x), with s = alpha / r, or alpha / sqrt(r) with
// rsLoRA (Kalajdzievski 2023), as PEFT does. A is (r, in), B is (out, r), as PEFT stores them.
#include <cmath>
#include <cstdint>

#include "qlora/core/error.hpp"

namespace qlora {

// A compile-time rank, or Dynamic for a rank chosen at run time (the Eigen convention).
constexpr int Dynamic = -1;

// What a backward pass does with a gradient buffer: replace its contents, or add to them (for
// gradient accumulation over micro-batches). Never a bool, so call sites say which.
enum class GradMode : std::uint8_t { Overwrite, Accumulate };

// How A and B start (PEFT's init_lora_weights):
//   Default   A ~ kaiming_uniform(a = sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0
//   Gaussian  A ~ N(0, (1/r)^2)  (PEFT: normal_(std=1/r)); B = 0
//   NonZero   A as Default and B ~ U(-1/sqrt(r), 1/sqrt(r)): not for training, but for tests, where
//             B = 0 would hide every mistake on the B path
enum class LoraInit : std::uint8_t { Default, Gaussian, NonZero };

// The base layer's bias: absent, frozen (PEFT bias="none"), or trained with the adapter
// (PEFT bias="all" / "lora_only").
enum class BiasMode : std::uint8_t { None, Frozen, Trainable };

struct LoraConfig {
  int r = 8;
  float alpha = 16.0f;
  float dropout = 0.0f;  // probability of zeroing an input of the LoRA path, in [0, 1)
  bool rslora = false;
  LoraInit init = LoraInit::Default;
  std::uint64_t seed = 0;  // for the init and the dropout masks

  // In double, then rounded: PEFT computes it in Python floats.
  float scaling() const {
    return float(rslora ? double(alpha) / std::sqrt(double(r)) : double(alpha) / double(r));
  }
  void validate() const {
    QLORA_CHECK(r > 0, "LoRA rank r must be positive, got ", r);
    QLORA_CHECK(dropout >= 0.0f && dropout < 1.0f, "LoRA dropout must be in [0, 1), got ", dropout);
    QLORA_CHECK(std::isfinite(alpha), "LoRA alpha must be finite, got ", alpha);
  }
};

}  // namespace qlora
