#pragma once
// RMSNorm as transformers' LlamaRMSNorm: y = w ⊙ x · r with r = 1 / sqrt(mean(x²) + eps), no mean
// subtraction and no bias. Everything is fp32 here (the activation dtype), so the cast back that
// transformers does before multiplying by w is the identity. The mean of squares is accumulated in
// double: torch sums in fp32 in another order, and double makes ours the better-rounded one.
//
// Backward, for one row with n = dy ⊙ w and D features (w is frozen, so no dw):
//   dx = r·n − r³ · x · (n·x) / D
#include <cmath>
#include <cstdint>

namespace qlora {
namespace rmsnorm {

// x, y: (M, D); w: (D); rstd: (M), the r of each row, kept for backward (may be null).
inline void forward(const float* x, const float* w, std::int64_t M, std::int64_t D, float eps, float* y,
                    float* rstd) {
  for (std::int64_t t = 0; t < M; ++t) {
    const float* xr = x + t * D;
    double ss = 0;
    for (std::int64_t i = 0; i < D; ++i) ss += double(xr[i]) * double(xr[i]);
    const float var = float(ss / double(D));
    const float r = 1.0f / std::sqrt(var + eps);
    if (rstd) rstd[t] = r;
    for (std::int64_t i = 0; i < D; ++i) y[t * D + i] = w[i] * (xr[i] * r);
  }
}

// dy, x, dx: (M, D); dx is overwritten (dx may not alias dy).
inline void backward(const float* dy, const float* x, const float* w, const float* rstd, std::int64_t M,
                     std::int64_t D, float* dx) {
  for (std::int64_t t = 0; t < M; ++t) {
    const float* xr = x + t * D;
    const float* g = dy + t * D;
    const double r = rstd[t];
    double nx = 0;
    for (std::int64_t i = 0; i < D; ++i) nx += double(g[i]) * double(w[i]) * double(xr[i]);
    const double c = r * r * r * nx / double(D);
    for (std::int64_t i = 0; i < D; ++i)
      dx[t * D + i] = float(r * double(g[i]) * double(w[i]) - c * double(xr[i]));
  }
}

}  // namespace rmsnorm
}  // namespace qlora
