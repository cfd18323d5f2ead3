#pragma once
// The counter-based random numbers of lora/random.hpp, as device functions: the same SplitMix64
// finaliser on the same (seed, stream, index), so a CUDA thread draws bit for bit what the CPU loop
// draws for that element. The host header stays plain C++ (no __host__ __device__ in it); this copy
// is checked against it element by element in tests/cuda/test_cuda_lora.cu, and uses its Stream
// constants, so the streams cannot drift apart.
#include <cstdint>

#include "qlora/lora/random.hpp"

namespace qlora {
namespace cuda {
namespace rng {

__device__ __forceinline__ std::uint64_t mix(std::uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__device__ __forceinline__ std::uint64_t bits(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  return mix(mix(seed ^ 0x9e3779b97f4a7c15ull) ^ mix(stream * 0xd1b54a32d192ed03ull + index));
}

// 24 random bits scaled to [0, 1): both steps exact in float, so no rounding mode can differ.
__device__ __forceinline__ float uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  return __fmul_rn(float(std::uint32_t(bits(seed, stream, index) >> 40)), 1.0f / 16777216.0f);
}

__device__ __forceinline__ bool dropout_keep(std::uint64_t seed, std::uint64_t call, std::uint64_t index,
                                             float p) {
  return uniform(seed, ::qlora::rng::kDropoutBase + call, index) >= p;
}

}  // namespace rng
}  // namespace cuda
}  // namespace qlora
