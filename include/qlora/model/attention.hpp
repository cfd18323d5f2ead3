#pragma once
// Causal grouped-query self-attention (transformers' eager Llama attention), after the projections
// and RoPE:
//
//   q (B·T, H·d), k, v (B·T, KV·d): head h of a row is columns h·d .. h·d + d − 1
//   query head h reads KV head h / (H / KV)        (repeat_kv = repeat_interleave on the head axis)
//   S = q·kᵀ / sqrt(d), keys after the query masked; P = softmax(S) in fp32; out = P·v
//   out (B·T, H·d): heads concatenated back, the o_proj input
//
// Backward, per (batch, head), with dP = dout·vᵀ:
//   dv += Pᵀ·dout,  dS = P ⊙ (dP − rowsum(P ⊙ dP)),  dq = dS·k / sqrt(d),  dk += dSᵀ·q / sqrt(d)
// (dk, dv accumulate over the H / KV query heads that share a KV head.)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "qlora/core/error.hpp"

namespace qlora {
namespace attention {

struct Shape {
  std::int64_t batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
  std::int64_t group() const { return heads / kv_heads; }
  std::int64_t q_width() const { return heads * head_dim; }
  std::int64_t kv_width() const { return kv_heads * head_dim; }
};

// P: (B, H, T, T), the softmax probabilities kept for backward (may be null); entries above the
// diagonal are 0.
inline void forward(const Shape& s, const float* q, const float* k, const float* v, float* out, float* P) {
  const std::int64_t T = s.seq, d = s.head_dim, qw = s.q_width(), kw = s.kv_width();
  const float scale = 1.0f / std::sqrt(float(d));  // head_dim ** -0.5
  std::vector<float> p(static_cast<std::size_t>(T));
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads; ++h) {
      const std::int64_t g = h / s.group();
      for (std::int64_t i = 0; i < T; ++i) {
        const float* qi = q + (b * T + i) * qw + h * d;
        float mx = -INFINITY;
        for (std::int64_t j = 0; j <= i; ++j) {
          const float* kj = k + (b * T + j) * kw + g * d;
          float dot = 0;
          for (std::int64_t e = 0; e < d; ++e) dot += qi[e] * kj[e];
          p[std::size_t(j)] = dot * scale;
          mx = std::max(mx, p[std::size_t(j)]);
        }
        double sum = 0;
        for (std::int64_t j = 0; j <= i; ++j) {
          p[std::size_t(j)] = std::exp(p[std::size_t(j)] - mx);
          sum += p[std::size_t(j)];
        }
        const float inv = float(1.0 / sum);
        float* oi = out + (b * T + i) * qw + h * d;
        std::fill(oi, oi + d, 0.0f);
        for (std::int64_t j = 0; j <= i; ++j) {
          const float pj = p[std::size_t(j)] * inv;
          if (P) P[((b * s.heads + h) * T + i) * T + j] = pj;
          const float* vj = v + (b * T + j) * kw + g * d;
          for (std::int64_t e = 0; e < d; ++e) oi[e] += pj * vj[e];
        }
        if (P)
          for (std::int64_t j = i + 1; j < T; ++j) P[((b * s.heads + h) * T + i) * T + j] = 0.0f;
      }
    }
}

// dout (B·T, H·d) -> dq (B·T, H·d), dk, dv (B·T, KV·d), all overwritten.
inline void backward(const Shape& s, const float* q, const float* k, const float* v, const float* P,
                     const float* dout, float* dq, float* dk, float* dv) {
  const std::int64_t T = s.seq, d = s.head_dim, qw = s.q_width(), kw = s.kv_width();
  const float scale = 1.0f / std::sqrt(float(d));
  std::fill(dq, dq + s.batch * T * qw, 0.0f);
  std::fill(dk, dk + s.batch * T * kw, 0.0f);
  std::fill(dv, dv + s.batch * T * kw, 0.0f);
  std::vector<float> dp(static_cast<std::size_t>(T));
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads; ++h) {
      const std::int64_t g = h / s.group();
      for (std::int64_t i = 0; i < T; ++i) {
        const float* Pi = P + ((b * s.heads + h) * T + i) * T;
        const float* doi = dout + (b * T + i) * qw + h * d;
        double rowsum = 0;
        for (std::int64_t j = 0; j <= i; ++j) {
          const float* vj = v + (b * T + j) * kw + g * d;
          float* dvj = dv + (b * T + j) * kw + g * d;
          float dot = 0;
          for (std::int64_t e = 0; e < d; ++e) {
            dot += doi[e] * vj[e];
            dvj[e] += Pi[j] * doi[e];
          }
          dp[std::size_t(j)] = dot;
          rowsum += double(Pi[j]) * dot;
        }
        const float* qi = q + (b * T + i) * qw + h * d;
        float* dqi = dq + (b * T + i) * qw + h * d;
        for (std::int64_t j = 0; j <= i; ++j) {
          const float ds = Pi[j] * (dp[std::size_t(j)] - float(rowsum)) * scale;  // dS / sqrt(d)
          const float* kj = k + (b * T + j) * kw + g * d;
          float* dkj = dk + (b * T + j) * kw + g * d;
          for (std::int64_t e = 0; e < d; ++e) {
            dqi[e] += ds * kj[e];
            dkj[e] += ds * qi[e];
          }
        }
      }
    }
}

}  // namespace attention
}  // namespace qlora
