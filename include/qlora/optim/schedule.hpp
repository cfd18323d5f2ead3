#pragma once
// Learning-rate schedules: linear warmup from 0, then constant, linear or cosine decay, with the
// exact formulas of transformers' get_{constant,linear,cosine}_schedule_with_warmup (and
// get_cosine_with_min_lr_schedule_with_warmup for min_lr_ratio > 0).
//
// Convention (as torch's LambdaLR under the Trainer): factor(s) is the multiplier of the base lr for
// the optimizer step that follows s completed steps, s = 0, 1, ... So with warmup the first step
// runs at lr 0, exactly as in the Trainer (it calls scheduler.step() after optimizer.step()).
//
//   warmup   s < warmup:  s / max(1, warmup)
//   constant              1
//   linear                max(0, (total - s) / max(1, total - warmup))   (clamped before any floor)
//   cosine                max(0, 0.5 * (1 + cos(pi * progress))),
//                         progress = (s - warmup) / max(1, total - warmup)
//   min_lr_ratio r > 0    linear and cosine become max(0, factor * (1 - r) + r): transformers'
//                         cosine-with-min-lr order of operations (bitwise the same double as
//                         r + (1 - r) * factor). Linear with a floor is our extension in the same
//                         form; warmup still starts at 0; constant ignores r.
//
// Everything is computed in double, as Python does. Past total_steps the formulas are kept as they
// are (linear stays at 0 or r; cosine rises again, as transformers' does): a run should set
// total_steps to its real length.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "qlora/core/error.hpp"

namespace qlora {
namespace optim {

namespace detail {
// The value of a double product rounded on its own, as Python rounds it: a volatile round trip
// keeps the compiler from fusing the product into a following add (GCC contracts a * b + c into
// an FMA across statements under -march=native). For a few scalars per step, never in a loop.
inline double rounded(double x) {
  volatile double r = x;
  return r;
}
}  // namespace detail

enum class ScheduleKind { Constant, Linear, Cosine };

inline const char* schedule_name(ScheduleKind k) {
  switch (k) {
    case ScheduleKind::Constant: return "constant";
    case ScheduleKind::Linear: return "linear";
    case ScheduleKind::Cosine: return "cosine";
  }
  return "?";
}

inline ScheduleKind schedule_from_name(const std::string& name) {
  if (name == "constant") return ScheduleKind::Constant;
  if (name == "linear") return ScheduleKind::Linear;
  if (name == "cosine") return ScheduleKind::Cosine;
  throw_error("lr schedule '", name, "' is unknown, expected constant, linear or cosine");
}

struct Schedule {
  ScheduleKind kind = ScheduleKind::Constant;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 0;  // needed by linear and cosine only
  double min_lr_ratio = 0.0;     // floor of the decay, as a fraction of the base lr

  void validate() const {
    QLORA_CHECK(warmup_steps >= 0, "lr schedule: warmup_steps is ", warmup_steps, ", expected >= 0");
    QLORA_CHECK(std::isfinite(min_lr_ratio) && min_lr_ratio >= 0.0 && min_lr_ratio <= 1.0,
                "lr schedule: min_lr_ratio is ", min_lr_ratio, ", expected a number in [0, 1]");
    if (kind != ScheduleKind::Constant)
      QLORA_CHECK(total_steps >= warmup_steps && total_steps > 0, "lr schedule: ", schedule_name(kind),
                  " decay needs total_steps > 0 and >= warmup_steps (", warmup_steps, "), got ", total_steps);
  }

  // The lr multiplier after s completed optimizer steps (see the header comment).
  double factor(std::int64_t s) const {
    if (s < warmup_steps) return double(s) / double(std::max<std::int64_t>(1, warmup_steps));
    if (kind == ScheduleKind::Constant) return 1.0;
    const double span = double(std::max<std::int64_t>(1, total_steps - warmup_steps));
    double f;
    if (kind == ScheduleKind::Linear) {
      f = std::max(0.0, double(total_steps - s) / span);  // transformers clamps linear itself
    } else {
      const double progress = double(s - warmup_steps) / span;
      f = 0.5 * (1.0 + std::cos(kPi * progress));
    }
    if (min_lr_ratio > 0.0) f = detail::rounded(f * (1.0 - min_lr_ratio)) + min_lr_ratio;
    return f > 0.0 ? f : 0.0;
  }

 private:
  // math.pi; transformers writes pi * num_cycles * 2.0 * progress with num_cycles = 0.5, and the
  // two scalings are exact, so pi * progress is the same double.
  static constexpr double kPi = 3.141592653589793;
};

}  // namespace optim
}  // namespace qlora
