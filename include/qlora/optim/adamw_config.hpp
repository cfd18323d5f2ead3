#pragma once
// AdamW's settings (AdamWConfig) and the policy for a state file saved under other settings
// (ConfigMismatch), shared by optim::AdamW (adamw.hpp), its state file (adamw_state.hpp) and
// cuda::AdamW (cuda/qlora/cuda/adamw.cuh). adamw.hpp says what each setting does.
#include <cmath>
#include <cstdint>

#include "qlora/core/error.hpp"
#include "qlora/optim/schedule.hpp"

namespace qlora {
namespace optim {

struct AdamWConfig {
  double lr = 2e-4;  // base learning rate (lora_A, bias, other); the schedule multiplies it
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;       // decoupled; PEFT / the Trainer default for LoRA is 0
  double loraplus_lr_ratio = 1.0;  // LoRA+: lora_B's lr = lr * ratio (1 = plain LoRA)
  double max_grad_norm = 1.0;      // the Trainer's default; <= 0 turns clipping off
  std::int64_t grad_accum_steps = 1;
  Schedule schedule;  // default: constant, no warmup

  void validate() const {
    QLORA_CHECK(std::isfinite(lr) && lr >= 0.0, "AdamW: lr is ", lr, ", expected a finite number >= 0");
    QLORA_CHECK(beta1 >= 0.0 && beta1 < 1.0, "AdamW: beta1 is ", beta1, ", expected a number in [0, 1)");
    QLORA_CHECK(beta2 >= 0.0 && beta2 < 1.0, "AdamW: beta2 is ", beta2, ", expected a number in [0, 1)");
    QLORA_CHECK(std::isfinite(eps) && eps >= 0.0, "AdamW: eps is ", eps, ", expected a finite number >= 0");
    QLORA_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0, "AdamW: weight_decay is ", weight_decay,
                ", expected a finite number >= 0");
    QLORA_CHECK(std::isfinite(loraplus_lr_ratio) && loraplus_lr_ratio > 0.0, "AdamW: loraplus_lr_ratio is ",
                loraplus_lr_ratio, ", expected a finite number > 0");
    QLORA_CHECK(!std::isnan(max_grad_norm), "AdamW: max_grad_norm is nan, expected a number (<= 0: off)");
    QLORA_CHECK(grad_accum_steps >= 1, "AdamW: grad_accum_steps is ", grad_accum_steps, ", expected >= 1");
    schedule.validate();
  }
};

// What load_state does when the file was saved under other hyperparameters (lr, betas, schedule,
// a parameter's group, ...). Error is the default because a resumed run then is not the run that
// was saved, which is nearly always a mistake (a wrong config file); KeepCurrent is for changing
// them on purpose (e.g. a longer schedule): the moments and step count are restored, the
// optimizer's own config stays. There is no warning mode: the library does not log.
enum class ConfigMismatch { Error, KeepCurrent };

}  // namespace optim
}  // namespace qlora
