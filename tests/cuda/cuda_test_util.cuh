#pragma once
// Shared by the [cuda] tests: skipping without a device, one Context per test binary, random data,
// and typed device copies of host vectors.
#include <cuda_bf16.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <random>
#include <vector>

#include "../test_util.hpp"
#include "qlora/core/half.hpp"
#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/context.cuh"

// Without a CUDA device (CI), a [cuda] test passes with a warning that says it was skipped.
#define QLORA_REQUIRE_CUDA_OR_SKIP()                                         \
  do {                                                                       \
    if (::qlora::cuda::device_count() == 0) {                                \
      WARN("no CUDA device: test skipped (it ran only as a compile check)"); \
      return;                                                                \
    }                                                                        \
  } while (0)

namespace cudatest {

inline qlora::cuda::Context& context() {
  static qlora::cuda::Context ctx(0);
  return ctx;
}

using testutil::gaussian;  // the CPU tests' generator: same seeds, same data

inline std::vector<qlora::bf16> to_bf16(const std::vector<float>& x) {
  std::vector<qlora::bf16> b(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) b[i] = qlora::to_bf16(x[i]);
  return b;
}

// qlora::bf16 and __nv_bfloat16 are both 16-bit patterns; copies go through the bits.
// cudaMemcpy runs on the legacy default stream, which does not wait for the context's non-blocking
// stream: both copies synchronize the device first, so they see (and are seen by) all work before.
inline qlora::cuda::DeviceBuffer<__nv_bfloat16> upload_bf16(const std::vector<qlora::bf16>& h) {
  qlora::cuda::DeviceBuffer<__nv_bfloat16> d(h.size());
  static_assert(sizeof(qlora::bf16) == sizeof(__nv_bfloat16), "bf16 layout");
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
  QLORA_CUDA_CHECK(cudaMemcpy(d.data(), h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
  return d;
}
inline std::vector<qlora::bf16> download_bf16(const qlora::cuda::DeviceBuffer<__nv_bfloat16>& d) {
  std::vector<qlora::bf16> h(d.size());
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
  QLORA_CUDA_CHECK(cudaMemcpy(h.data(), d.data(), h.size() * 2, cudaMemcpyDeviceToHost));
  return h;
}

}  // namespace cudatest
