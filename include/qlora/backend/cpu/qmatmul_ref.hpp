#pragma once
// The oracle of the frozen-weight products: plain loops over the dequantized weight, summed in
// double. Every fast path of QMatrix (fused GEMV, tiled GEMM, int8 activations) is tested against
// these two functions.
//
//   forward:  y (M, N) = x (M, K) . W^T      y[m, n]  = sum_k x[m, k] * W[n, k]
//   backward: dx (M, K) = dy (M, N) . W      dx[m, k] = sum_n dy[m, n] * W[n, k]
//
// With Accumulate::Yes the sum is added to the output's old value (in double, then rounded once).
#include <cstdint>
#include <vector>

#include "qlora/backend/cpu/accumulate.hpp"

namespace qlora {
namespace cpu {
namespace ref {

// W: (N, K), x: (M, K), y: (M, N)
inline void forward(const float* W, std::int64_t N, std::int64_t K, const float* x, std::int64_t M, float* y,
                    Accumulate acc) {
  for (std::int64_t m = 0; m < M; ++m)
    for (std::int64_t n = 0; n < N; ++n) {
      double s = acc == Accumulate::Yes ? double(y[m * N + n]) : 0.0;
      for (std::int64_t k = 0; k < K; ++k) s += double(x[m * K + k]) * double(W[n * K + k]);
      y[m * N + n] = float(s);
    }
}

// W: (N, K), dy: (M, N), dx: (M, K)
inline void backward(const float* W, std::int64_t N, std::int64_t K, const float* dy, std::int64_t M,
                     float* dx, Accumulate acc) {
  std::vector<double> row(static_cast<std::size_t>(K));  // (K): dx[m, :] in double
  for (std::int64_t m = 0; m < M; ++m) {
    for (std::int64_t k = 0; k < K; ++k) row[k] = acc == Accumulate::Yes ? double(dx[m * K + k]) : 0.0;
    for (std::int64_t n = 0; n < N; ++n) {
      const double g = dy[m * N + n];
      for (std::int64_t k = 0; k < K; ++k) row[k] += g * double(W[n * K + k]);
    }
    for (std::int64_t k = 0; k < K; ++k) dx[m * K + k] = float(row[k]);
  }
}

}  // namespace ref
}  // namespace cpu
}  // namespace qlora
