#pragma once
// AdamW for LoRA parameters: torch.optim.AdamW (amsgrad=False, maximize=False, foreach=False) with
// LoRA+ learning rates, global-norm clipping, gradient accumulation, an lr schedule, and a state
// file that resumes a run bit for bit.
//
// One step(), in this order:
//   1. lr factor    f = schedule.factor(steps done so far); group lr = base lr of its group * f
//                   (LoraB: lr * loraplus_lr_ratio, others: lr), as LambdaLR under the Trainer.
//   2. accumulation the caller ran grad_accum_steps micro-batches whose backward passes ADDED into
//                   grad; step() multiplies the sums by float(1 / grad_accum_steps), i.e. averages
//                   them as the Trainer does by dividing each micro-batch loss (the Trainer scales
//                   before summing, we after: a rounding-level difference, none for powers of 2).
//   3. norm         the global L2 norm of the averaged gradients (clip.hpp: in double). Not finite:
//                   an Error naming the first bad element, thrown before anything changed (weights,
//                   moments, gradients and the step count are as they were; the caller may
//                   zero_grad() and go on).
//   4. clipping     max_grad_norm > 0 and the norm above it: gradients *= max_norm / (norm + 1e-6).
//                   After step() the grad buffers hold the gradient that was applied (averaged,
//                   clipped), as after torch's clip_grad_norm_; they are not zeroed.
//   5. update       per parameter, torch's _single_tensor_adamw (see update()).
// step() returns the norm of step 3 (before clipping), as the Trainer logs it as grad_norm.
//
// Numerics. Scalars are doubles, as the Python floats torch computes them from (lr * factor,
// 1 - lr * wd, step_size = lr / (1 - beta1^t), sqrt(1 - beta2^t)); each reaches the tensor kernel
// rounded to float, as torch's CPU kernels take their scalar argument. State (exp_avg, exp_avg_sq)
// is float32. Every tensor operation of torch is one float rounding here too, in torch's order:
//     p = p * float(1 - lr*wd)                    param.mul_(1 - lr * weight_decay)
//     m = fma(float(1 - b1), g - m, m)            exp_avg.lerp_(grad, 1 - beta1)
//     v = v * float(b2)                           exp_avg_sq.mul_(beta2)
//     v = fma(float(1 - b2) * g, g, v)            .addcmul_(grad, grad, value=1 - beta2)
//     d = sqrt(v) / float(sqrt(bc2)) + float(eps) denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
//     p = p + (float(-step_size) * m) / d         param.addcdiv_(exp_avg, denom, value=-step_size)
// The lerp is an FMA because torch's vectorized CPU kernel and its CUDA kernel both compute it as
// one (weight < 0.5: fmadd(weight, end - self, self)). The addcmul is fused as nvcc fuses it on
// CUDA; torch's CPU build may round the product first (<= 1 ulp of v). Writing both FMAs explicitly,
// and doing the weight decay and the gradient scaling in their own passes, leaves the compiler no
// multiply-add to contract on its own (-ffp-contract=fast, GCC's default, contracts across
// statements); the one double product that feeds an add (1 - lr * wd) is rounded on its own, as in
// Python. So the result is the same bits under -O0, -O3 -march=native, GCC or Clang (checked), and
// anything short of -ffast-math. Known difference of torch CUDA: it divides by bc2_sqrt as a
// multiplication by its reciprocal (<= 1 ulp of d).
//
// State files (save_state / load_state) are adamw_state.hpp's safetensors: "<param>.exp_avg" and
// "<param>.exp_avg_sq" (F32, shape [size]) per parameter, and __metadata__ with the step count,
// every hyperparameter, the schedule and each parameter's group; cuda::AdamW writes and reads the
// same files. Loading checks everything before it changes anything; see load_state for the
// mismatch policy.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/parallel.hpp"
#include "qlora/optim/adamw_config.hpp"
#include "qlora/optim/adamw_state.hpp"
#include "qlora/optim/clip.hpp"
#include "qlora/optim/param.hpp"
#include "qlora/optim/schedule.hpp"

namespace qlora {
namespace optim {

class AdamW {
 public:
  AdamW(std::vector<Param> params, AdamWConfig config) : params_(std::move(params)), config_(config) {
    config_.validate();
    std::set<std::string> seen;
    for (const Param& p : params_) {
      QLORA_CHECK(!p.name.empty(), "AdamW: a parameter has an empty name");
      QLORA_CHECK(seen.insert(p.name).second, "AdamW: parameter '", p.name, "' is listed twice");
      QLORA_CHECK(p.size > 0, "AdamW: parameter '", p.name, "' has size 0, expected at least 1 element");
      QLORA_CHECK(p.value && p.grad, "AdamW: parameter '", p.name, "' has a null ",
                  p.value ? "grad" : "value", " pointer");
      exp_avg_.emplace_back(p.size, 0.0f);
      exp_avg_sq_.emplace_back(p.size, 0.0f);
    }
  }

  // One optimizer step (see the header comment); returns the gradient norm before clipping.
  double step() {
    const std::int64_t t = step_ + 1;  // torch increments the step before using it
    const float inv_accum = float(1.0 / double(config_.grad_accum_steps));
    const double norm =
        with_context("AdamW step " + std::to_string(t), [&] { return global_grad_norm(params_, inv_accum); });
    const double coef = clip_coefficient(norm, config_.max_grad_norm);
    if (inv_accum != 1.0f || coef < 1.0) {
      // Two roundings, as torch: the averaged gradient exists first, clip_grad_norm_ scales it.
      const float c = float(coef);
      for (const Param& p : params_) {
        float* g = p.grad;
        parallel_for(p.size, 64, kMinPerThread, [&](std::size_t b, std::size_t e) {
          for (std::size_t i = b; i < e; ++i) {
            float x = g[i] * inv_accum;
            if (coef < 1.0) x = x * c;
            g[i] = x;
          }
        });
      }
    }
    const double factor = config_.schedule.factor(step_);
    for (std::size_t k = 0; k < params_.size(); ++k) update(k, t, factor);
    step_ = t;
    return norm;
  }

  void zero_grad() {
    for (const Param& p : params_) std::fill(p.grad, p.grad + p.size, 0.0f);
  }

  // Optimizer steps taken (torch's state["step"]).
  std::int64_t step_count() const { return step_; }

  // The learning rate the next step() uses for a group (schedule included).
  double lr(ParamGroup g) const { return base_lr(g) * config_.schedule.factor(step_); }

  const AdamWConfig& config() const { return config_; }
  const std::vector<Param>& params() const { return params_; }
  const std::vector<float>& exp_avg(std::size_t k) const { return exp_avg_.at(k); }
  const std::vector<float>& exp_avg_sq(std::size_t k) const { return exp_avg_sq_.at(k); }

  // Writes the moments, step count and config atomically (a crash leaves the old file or none).
  // Parameter values are not included: they belong to the layers' own checkpoint.
  void save_state(const std::string& path) const {
    std::vector<const float*> m, v;
    for (std::size_t k = 0; k < params_.size(); ++k) {
      m.push_back(exp_avg_[k].data());
      v.push_back(exp_avg_sq_[k].data());
    }
    adamw_state::write(path, config_, params_, step_, m, v);
  }

  // Restores the moments and step count saved by save_state, so that the next step() is the one
  // the saved run would have taken (bit-identical when the parameters are restored bit for bit too).
  // The file must be an AdamW state file holding exactly this optimizer's parameters, each F32 with
  // its size and finite; hyperparameters that differ are handled by `on_mismatch`. Every check
  // runs before the state changes: a failed load leaves the optimizer as it was.
  void load_state(const std::string& path, ConfigMismatch on_mismatch = ConfigMismatch::Error) {
    adamw_state::Moments st = adamw_state::read(path, config_, params_, on_mismatch);
    exp_avg_ = std::move(st.exp_avg);
    exp_avg_sq_ = std::move(st.exp_avg_sq);
    step_ = st.step;
  }

 private:
  static constexpr std::size_t kMinPerThread = std::size_t(1) << 16;

  double base_lr(ParamGroup g) const {
    return g == ParamGroup::LoraB ? config_.lr * config_.loraplus_lr_ratio : config_.lr;
  }
  double weight_decay(ParamGroup g) const { return g == ParamGroup::Bias ? 0.0 : config_.weight_decay; }

  // torch's _single_tensor_adamw for one parameter at step t (1-based) under lr factor `factor`.
  void update(std::size_t k, std::int64_t t, double factor) {
    const Param& prm = params_[k];
    const double lr = base_lr(prm.group) * factor;
    const double wd = weight_decay(prm.group);
    const double b1 = config_.beta1, b2 = config_.beta2;

    // Weight decay in its own pass, as torch's separate mul_ kernel: fused into the loop below,
    // the compiler could turn p * decay + update into one FMA and skip a rounding torch does.
    const float decay = float(1.0 - detail::rounded(lr * wd));
    float* p = prm.value;
    if (decay != 1.0f)
      parallel_for(prm.size, 64, kMinPerThread, [&](std::size_t b, std::size_t e) {
        for (std::size_t i = b; i < e; ++i) p[i] = p[i] * decay;
      });

    const double bias_correction1 = 1.0 - std::pow(b1, double(t));
    const double bias_correction2 = 1.0 - std::pow(b2, double(t));
    const double step_size = lr / bias_correction1;
    const float neg_step = float(-step_size);
    const float bc2_sqrt = float(std::sqrt(bias_correction2));
    const float w1 = float(1.0 - b1), b2f = float(b2), c2 = float(1.0 - b2), eps = float(config_.eps);
    const float* g = prm.grad;
    float* m = exp_avg_[k].data();
    float* v = exp_avg_sq_[k].data();
    parallel_for(prm.size, 64, kMinPerThread, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) {
        const float gi = g[i];
        const float mi = std::fma(w1, gi - m[i], m[i]);
        const float vi = std::fma(c2 * gi, gi, v[i] * b2f);
        const float denom = std::sqrt(vi) / bc2_sqrt + eps;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] + (neg_step * mi) / denom;
      }
    });
  }

  std::vector<Param> params_;
  AdamWConfig config_;
  std::vector<std::vector<float>> exp_avg_;     // (size) per parameter: torch's state["exp_avg"]
  std::vector<std::vector<float>> exp_avg_sq_;  // (size) per parameter: torch's state["exp_avg_sq"]
  std::int64_t step_ = 0;
};

}  // namespace optim
}  // namespace qlora
