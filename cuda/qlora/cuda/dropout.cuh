#pragma once
// The LoRA dropout mask on the GPU: for training call `call`, element idx of the (M, in) input is kept
// when rng::dropout_keep(seed, call, idx, p), exactly as LoraLinear<..., Cpu> decides it, and the mask
// is stored in the CPU's layout: bit (idx % 64) of 64-bit word idx / 64.
//
// The kernel writes the masked input xm = keep ? x : 0 in bf16 (exact: no scaling here; the
// 1 / (1 - p) of inverted dropout goes into the alpha of the products that read xm, so masking adds
// no rounding). A warp handles one word per step: lane l draws elements 64w + l and 64w + 32 + l
// (coalesced loads and stores), two ballots assemble the word, lane 0 stores it (one writer, no
// atomics).
#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

#include "qlora/cuda/context.cuh"
#include "qlora/cuda/random.cuh"

namespace qlora {
namespace cuda {
namespace detail {

__global__ void __launch_bounds__(256)
    dropout_mask_kernel(const __nv_bfloat16* __restrict__ x, std::size_t n, std::uint64_t seed, std::uint64_t call,
                        float p, __nv_bfloat16* __restrict__ xm, std::uint64_t* __restrict__ keep) {
  const std::size_t words = (n + 63) / 64;
  const unsigned lane = threadIdx.x & 31u;
  const std::size_t warps = std::size_t(gridDim.x) * (blockDim.x / 32);
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.0f);
  for (std::size_t w = (std::size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; w < words; w += warps) {
    const std::size_t i0 = w * 64 + lane, i1 = i0 + 32;
    const bool k0 = i0 < n && rng::dropout_keep(seed, call, i0, p);
    const bool k1 = i1 < n && rng::dropout_keep(seed, call, i1, p);
    if (i0 < n) xm[i0] = k0 ? x[i0] : zero;
    if (i1 < n) xm[i1] = k1 ? x[i1] : zero;
    const unsigned lo = __ballot_sync(0xffffffffu, k0), hi = __ballot_sync(0xffffffffu, k1);
    if (lane == 0) keep[w] = std::uint64_t(lo) | (std::uint64_t(hi) << 32);
  }
}

}  // namespace detail

// x, xm: (n) bf16 device pointers (n = M * in); keep: ((n + 63) / 64) words.
inline void dropout_mask(const Context& ctx, const __nv_bfloat16* x, std::size_t n, std::uint64_t seed,
                         std::uint64_t call, float p, __nv_bfloat16* xm, std::uint64_t* keep) {
  if (n == 0) return;
  ctx.activate();
  const std::size_t words = (n + 63) / 64;
  const std::size_t want = (words + 7) / 8;  // 8 warps per block, one word each per step
  const int blocks = int(want < std::size_t(ctx.sm_count()) * 16 ? want : std::size_t(ctx.sm_count()) * 16);
  detail::dropout_mask_kernel<<<blocks, 256, 0, ctx.stream()>>>(x, n, seed, call, p, xm, keep);
  QLORA_CUDA_CHECK_LAUNCH("dropout_mask_kernel");
}

}  // namespace cuda
}  // namespace qlora
