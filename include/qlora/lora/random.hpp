#pragma once
// Counter-based random numbers: the value for (seed, stream, index) is a pure function of the three,
// so any backend (a CUDA thread per element, a CPU loop over tokens) draws the same numbers in any
// order. This is what makes the dropout mask of the CUDA backend identical to the CPU one, and the
// init identical across platforms (std:: distributions are implementation-defined; these are not).
//
// The mixer is SplitMix64's finaliser applied to a combination of the inputs: cheap, well
// distributed, and two integer multiplies in CUDA.
#include <cmath>
#include <cstdint>

namespace qlora {
namespace rng {

inline std::uint64_t mix(std::uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// 64 random bits for element `index` of stream `stream` under `seed`.
inline std::uint64_t bits(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  return mix(mix(seed ^ 0x9e3779b97f4a7c15ull) ^ mix(stream * 0xd1b54a32d192ed03ull + index));
}

// Uniform in [0, 1) with 24 random bits (exact in float).
inline float uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  return float(bits(seed, stream, index) >> 40) * (1.0f / 16777216.0f);
}

// Standard normal by Box-Muller on two independent uniforms (computed in double, so the result does
// not depend on the platform's float libm).
inline float normal(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  const std::uint64_t b = bits(seed, stream, index);
  const double u1 = (double((b >> 11) & ((1ull << 26) - 1)) + 1.0) / double(1ull << 26);  // (0, 1]
  const double u2 = double(b >> 37) / double(1ull << 27);                                 // [0, 1)
  return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

// Streams used by the LoRA layer, so its draws never collide.
enum Stream : std::uint64_t { kInitA = 1, kInitB = 2, kDropoutBase = 1ull << 32 };

// Dropout keeps element `index` of the layer input in training call `call` when u >= p.
inline bool dropout_keep(std::uint64_t seed, std::uint64_t call, std::uint64_t index, float p) {
  return uniform(seed, kDropoutBase + call, index) >= p;
}

}  // namespace rng
}  // namespace qlora
