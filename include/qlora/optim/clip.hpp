#pragma once
// Gradient clipping by global L2 norm, as torch.nn.utils.clip_grad_norm_:
//   total_norm = sqrt(sum over all parameters of sum(grad^2))
//   clip_coef  = max_norm / (total_norm + 1e-6);  if clip_coef < 1, every grad *= clip_coef
//
// Differences from torch, all below float rounding of the result:
// - The sum of squares is accumulated in double (torch: float per-parameter norms, then the norm
//   of those). A float accumulator over millions of elements loses digits; double does not, and the
//   sum of squares of finite floats cannot overflow a double (at most 2^64 terms of < 2^256), so a
//   non-finite total means a non-finite gradient and nothing else.
// - The sum runs in fixed chunks of kNormChunk elements whose partial sums are added in order, so
//   the norm does not depend on the thread count (a resumed run on another machine matches).
// - A non-finite norm is an Error naming the first bad gradient element (torch's
//   error_if_nonfinite=True); torch's default would multiply every gradient by NaN.
// clip_coef is computed in double and the gradients are multiplied by it rounded to float (torch
// keeps it as a float32 tensor).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/parallel.hpp"
#include "qlora/optim/param.hpp"

namespace qlora {
namespace optim {

inline constexpr std::size_t kNormChunk = std::size_t(1) << 14;

namespace detail {

// Sum of double(float(g[i] * scale))^2: the squares of the gradient the optimizer will use.
inline double sum_squares(const float* g, std::size_t n, float scale) {
  std::vector<double> part((n + kNormChunk - 1) / kNormChunk);
  parallel_for(n, kNormChunk, std::size_t(1) << 16, [&](std::size_t b, std::size_t e) {
    for (std::size_t c = b; c < e; c += kNormChunk) {
      const std::size_t c_end = std::min(e, c + kNormChunk);
      double s = 0.0;
      for (std::size_t i = c; i < c_end; ++i) {
        const double x = double(g[i] * scale);
        s += x * x;
      }
      part[c / kNormChunk] = s;
    }
  });
  double s = 0.0;
  for (double p : part) s += p;
  return s;
}

[[noreturn]] inline void throw_bad_grad(const std::vector<Param>& params, float scale, double norm) {
  for (const Param& p : params)
    for (std::size_t i = 0; i < p.size; ++i)
      QLORA_CHECK(std::isfinite(p.grad[i] * scale), "gradient norm is ", norm, ": parameter '", p.name,
                  "' has grad[", i, "] = ", p.grad[i] * scale, ", expected a finite number");
  // Only reachable when every element is finite but the sum was not, which cannot happen (above).
  throw_error("gradient norm is ", norm, ", expected a finite number");
}

}  // namespace detail

// The L2 norm over all gradients, each multiplied by `scale` in float first (the optimizer passes
// 1/accumulation here). Throws an Error naming the first non-finite gradient element.
inline double global_grad_norm(const std::vector<Param>& params, float scale = 1.0f) {
  double s = 0.0;
  for (const Param& p : params) s += detail::sum_squares(p.grad, p.size, scale);
  const double norm = std::sqrt(s);
  if (!std::isfinite(norm)) detail::throw_bad_grad(params, scale, norm);
  return norm;
}

// torch's clip_coef, or 1 when clipping is off (max_norm <= 0) or not needed.
inline double clip_coefficient(double total_norm, double max_norm) {
  if (!(max_norm > 0.0)) return 1.0;
  const double coef = max_norm / (total_norm + 1e-6);
  return coef < 1.0 ? coef : 1.0;
}

inline void scale_grads(const std::vector<Param>& params, float scale) {
  for (const Param& p : params) {
    float* g = p.grad;
    parallel_for(p.size, 64, std::size_t(1) << 16, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) g[i] *= scale;
    });
  }
}

// torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=True): returns the norm
// before clipping; scales the gradients in place when it exceeds max_norm. max_norm <= 0: only
// measures.
inline double clip_grad_norm(const std::vector<Param>& params, double max_norm) {
  const double norm = global_grad_norm(params);
  const double coef = clip_coefficient(norm, max_norm);
  if (coef < 1.0) scale_grads(params, float(coef));
  return norm;
}

}  // namespace optim
}  // namespace qlora
