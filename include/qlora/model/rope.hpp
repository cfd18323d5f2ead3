#pragma once
// Rotary position embedding as transformers' Llama applies it ("default" rope_type):
//
//   inv_freq[i] = 1 / theta^(2i / d)           i < d/2, in float32 as transformers computes it
//   angle[t, i] = t · inv_freq[i]              float32 product (autocast off there)
//   cos/sin table (T, d) = cos/sin of cat(angle, angle)
//   x' = x ⊙ cos + rotate_half(x) ⊙ sin,  rotate_half(x) = cat(−x[d/2:], x[:d/2])
//
// i.e. the rotate-half layout: element i pairs with element i + d/2 (not interleaved pairs), and the
// pair is rotated by angle[t, i]. Backward is the transposed rotation (angle −angle[t, i]).
#include <cmath>
#include <cstdint>
#include <vector>

namespace qlora {

struct RopeTable {
  std::int64_t positions = 0, dim = 0;
  std::vector<float> cos, sin;  // (positions, dim), both halves equal as in transformers

  static RopeTable make(double theta, std::int64_t dim, std::int64_t positions) {
    RopeTable r;
    r.positions = positions;
    r.dim = dim;
    const std::int64_t half = dim / 2;
    std::vector<float> inv_freq(static_cast<std::size_t>(half));
    // torch: 1.0 / (base ** (arange(0, d, 2).float() / d)): exponent and power in float32 (a Python
    // float base raised to a float32 tensor stays float32)
    for (std::int64_t i = 0; i < half; ++i) {
      const float e = float(2 * i) / float(dim);
      inv_freq[std::size_t(i)] = 1.0f / std::pow(float(theta), e);
    }
    r.cos.resize(std::size_t(positions * dim));
    r.sin.resize(std::size_t(positions * dim));
    for (std::int64_t t = 0; t < positions; ++t)
      for (std::int64_t i = 0; i < half; ++i) {
        const float a = float(t) * inv_freq[std::size_t(i)];
        const float c = std::cos(a), s = std::sin(a);
        r.cos[std::size_t(t * dim + i)] = r.cos[std::size_t(t * dim + i + half)] = c;
        r.sin[std::size_t(t * dim + i)] = r.sin[std::size_t(t * dim + i + half)] = s;
      }
    return r;
  }

  // x: (B·T, heads·dim), row b·T + t at position t; rotated in place. inverse = true applies the
  // transposed rotation: the backward pass of the forward one.
  void apply(float* x, std::int64_t B, std::int64_t T, std::int64_t heads, bool inverse = false) const {
    const std::int64_t half = dim / 2, width = heads * dim;
    const float sign = inverse ? -1.0f : 1.0f;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t) {
        const float* c = cos.data() + t * dim;
        const float* s = sin.data() + t * dim;
        float* row = x + (b * T + t) * width;
        for (std::int64_t h = 0; h < heads; ++h) {
          float* v = row + h * dim;
          for (std::int64_t i = 0; i < half; ++i) {
            const float x1 = v[i], x2 = v[i + half];
            // transformers: x1·cos − x2·sin, x2·cos + x1·sin (two products, then the sum)
            v[i] = x1 * c[i] - x2 * (sign * s[i]);
            v[i + half] = x2 * c[i + half] + x1 * (sign * s[i + half]);
          }
        }
      }
  }
};

}  // namespace qlora
