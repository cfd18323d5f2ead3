#pragma once
// The LoRA layer written out in double precision with plain loops: the oracle every backend is tested
// against, and the derivation of the backward pass, step by step.
//
// Forward, for M tokens (rows of x):
//   xd = x ⊙ mask                         (M, in)   mask: 0 or 1/(1-p) per element; 1 without dropout
//   h  = xd · Aᵀ                          (M, r)
//   y  = x · W0ᵀ + bias + s · h · Bᵀ      (M, out)
// Backward, given dy = ∂L/∂y (M, out):
//   dbias = Σ_t dy[t, :]                  (out)     only when the bias is trained
//   dB    = s · dyᵀ · h                   (out, r)  ∂L/∂B[o, k] = Σ_t s · dy[t, o] · h[t, k]
//   dh    = s · dy · B                    (M, r)
//   dA    = dhᵀ · xd                      (r, in)   ∂L/∂A[k, i] = Σ_t dh[t, k] · xd[t, i]
//   dx    = dy · W0 + (dh · A) ⊙ mask     (M, in)   the base path plus the LoRA path through dropout
// W0 is frozen: no gradient. Only rank-r intermediates (h, dh) are ever formed; B·A (out, in) never is.
#include <cstdint>
#include <vector>

namespace qlora {
namespace lora {
namespace ref {

struct Params {
  std::int64_t in = 0, out = 0, r = 0;
  std::vector<double> W0;    // (out, in)
  std::vector<double> bias;  // (out) or empty
  std::vector<double> A;     // (r, in)
  std::vector<double> B;     // (out, r)
  double scaling = 1.0;
};

// mask: (M, in) multipliers, or empty for no dropout. y: (M, out).
inline void forward(const Params& p, const std::vector<double>& x, std::int64_t M,
                    const std::vector<double>& mask, std::vector<double>& y,
                    std::vector<double>* h_out = nullptr) {
  std::vector<double> h(std::size_t(M * p.r), 0.0);
  for (std::int64_t t = 0; t < M; ++t)
    for (std::int64_t k = 0; k < p.r; ++k) {
      double acc = 0;
      for (std::int64_t i = 0; i < p.in; ++i) {
        const double xd = x[t * p.in + i] * (mask.empty() ? 1.0 : mask[t * p.in + i]);
        acc += xd * p.A[k * p.in + i];
      }
      h[t * p.r + k] = acc;
    }
  y.assign(std::size_t(M * p.out), 0.0);
  for (std::int64_t t = 0; t < M; ++t)
    for (std::int64_t o = 0; o < p.out; ++o) {
      double base = p.bias.empty() ? 0.0 : p.bias[o];
      for (std::int64_t i = 0; i < p.in; ++i) base += x[t * p.in + i] * p.W0[o * p.in + i];
      double lora = 0;
      for (std::int64_t k = 0; k < p.r; ++k) lora += h[t * p.r + k] * p.B[o * p.r + k];
      y[t * p.out + o] = base + p.scaling * lora;
    }
  if (h_out) *h_out = h;
}

struct Grads {
  std::vector<double> dx;     // (M, in)
  std::vector<double> dA;     // (r, in)
  std::vector<double> dB;     // (out, r)
  std::vector<double> dbias;  // (out)
};

inline Grads backward(const Params& p, const std::vector<double>& x, std::int64_t M,
                      const std::vector<double>& mask, const std::vector<double>& dy) {
  std::vector<double> y, h;
  forward(p, x, M, mask, y, &h);
  Grads g;
  g.dbias.assign(std::size_t(p.out), 0.0);
  for (std::int64_t t = 0; t < M; ++t)
    for (std::int64_t o = 0; o < p.out; ++o) g.dbias[o] += dy[t * p.out + o];
  g.dB.assign(std::size_t(p.out * p.r), 0.0);
  for (std::int64_t o = 0; o < p.out; ++o)
    for (std::int64_t k = 0; k < p.r; ++k) {
      double acc = 0;
      for (std::int64_t t = 0; t < M; ++t) acc += dy[t * p.out + o] * h[t * p.r + k];
      g.dB[o * p.r + k] = p.scaling * acc;
    }
  std::vector<double> dh(std::size_t(M * p.r), 0.0);
  for (std::int64_t t = 0; t < M; ++t)
    for (std::int64_t k = 0; k < p.r; ++k) {
      double acc = 0;
      for (std::int64_t o = 0; o < p.out; ++o) acc += dy[t * p.out + o] * p.B[o * p.r + k];
      dh[t * p.r + k] = p.scaling * acc;
    }
  g.dA.assign(std::size_t(p.r * p.in), 0.0);
  for (std::int64_t k = 0; k < p.r; ++k)
    for (std::int64_t i = 0; i < p.in; ++i) {
      double acc = 0;
      for (std::int64_t t = 0; t < M; ++t)
        acc += dh[t * p.r + k] * x[t * p.in + i] * (mask.empty() ? 1.0 : mask[t * p.in + i]);
      g.dA[k * p.in + i] = acc;
    }
  g.dx.assign(std::size_t(M * p.in), 0.0);
  for (std::int64_t t = 0; t < M; ++t)
    for (std::int64_t i = 0; i < p.in; ++i) {
      double base = 0, lora = 0;
      for (std::int64_t o = 0; o < p.out; ++o) base += dy[t * p.out + o] * p.W0[o * p.in + i];
      for (std::int64_t k = 0; k < p.r; ++k) lora += dh[t * p.r + k] * p.A[k * p.in + i];
      g.dx[t * p.in + i] = base + lora * (mask.empty() ? 1.0 : mask[t * p.in + i]);
    }
  return g;
}

}  // namespace ref
}  // namespace lora
}  // namespace qlora
