#pragma once
// Block-wide reductions for the model's row kernels (one block per row of a norm, a softmax, a loss).
//
// Deterministic: warps reduce by shuffles in a fixed pattern, then every thread adds the warp totals
// in warp order, so every thread gets the same value and repeated runs give the same bits. Blocks
// must be whole warps (blockDim.x a multiple of 32, at most 1024).
#include <cuda_bf16.h>

#include "qlora/cuda/to_f32.cuh"

namespace qlora {
namespace cuda {
namespace detail {

struct SumOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

// v reduced over the block with op; the result in every thread. Synchronizes (all threads must call).
template <class T, class Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T warp_total[32];
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // a previous call's readers are done with warp_total
  if ((threadIdx.x & 31) == 0) warp_total[threadIdx.x / 32] = v;
  __syncthreads();
  T r = warp_total[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w) r = op(r, warp_total[w]);
  return r;
}
template <class T>
__device__ T block_sum(T v) {
  return block_reduce(v, SumOp{});
}
template <class T>
__device__ T block_max(T v) {
  return block_reduce(v, MaxOp{});
}

template <class T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// A grid-stride launch size for n elements of 256-thread blocks: enough blocks to fill the device.
inline int elementwise_grid(std::size_t n, int sm_count) {
  const std::size_t want = (n + 255) / 256, cap = std::size_t(sm_count) * 16;
  return int(want < cap ? (want > 0 ? want : 1) : cap);
}

}  // namespace detail
}  // namespace cuda
}  // namespace qlora
