#pragma once
// dst (M, N) bf16 += alpha · mask ⊙ (P · Q): a rank-r update added into a bf16 activation in one
// pass, with P (M, r) and Q (r, N) in fp32, so the LoRA path's last product runs on the fp32 master
// weights and the (M, N) term is never stored. The layer uses it twice:
//   forward   y  += s · h · Bᵀ              Q(k, o) = B[o·r + k]   (q_k = 1, q_n = r)
//   backward  dx += (1/(1-p)) · keep ⊙ (dh · A)   Q(k, i) = A[k·in + i] (q_k = in, q_n = 1)
// mask (optional) is the dropout keep mask of dropout.cuh over (M, N): a dropped element gets no
// update at all. col_add (optional, forward only: not with a mask) is a per-column fp32 term added in
// the same pass, dst = bf16(dst + col_add[n] + alpha·(P·Q)): the layer's bias, in the Cpu backend's
// order (base + bias, then the LoRA term).
//
// Work: r fp32 FMAs per element, while the element's bf16 is read and written once; the kernel is
// bound by the dst traffic for small r. A block owns 256 columns × kRows rows: each thread keeps its
// column's kChunk values of Q in registers and kRows accumulators, and P's tile is broadcast from
// shared memory, so Q is read once per kRows rows.
#include <cuda_bf16.h>

#include <cstdint>

#include "qlora/cuda/context.cuh"

namespace qlora {
namespace cuda {
namespace detail {

constexpr int kLowrankRows = 16;   // rows of dst per block
constexpr int kLowrankChunk = 16;  // values of the rank dimension per pass

__global__ void __launch_bounds__(256)
    lowrank_add_kernel(__nv_bfloat16* __restrict__ dst, int M, int N, int r, float alpha,
                       const float* __restrict__ P, const float* __restrict__ Q, long long q_k, long long q_n,
                       const std::uint64_t* __restrict__ mask, const float* __restrict__ col_add) {
  __shared__ float s_p[kLowrankRows][kLowrankChunk];
  const int col = blockIdx.x * 256 + threadIdx.x;
  const int row0 = blockIdx.y * kLowrankRows;
  float acc[kLowrankRows];
#pragma unroll
  for (int t = 0; t < kLowrankRows; ++t) acc[t] = 0.0f;
  for (int k0 = 0; k0 < r; k0 += kLowrankChunk) {
    for (int e = threadIdx.x; e < kLowrankRows * kLowrankChunk; e += 256) {
      const int t = e / kLowrankChunk, j = e % kLowrankChunk;
      s_p[t][j] = (row0 + t < M && k0 + j < r) ? P[(long long)(row0 + t) * r + k0 + j] : 0.0f;
    }
    float q[kLowrankChunk];
#pragma unroll
    for (int j = 0; j < kLowrankChunk; ++j)
      q[j] = (col < N && k0 + j < r) ? __ldg(Q + (long long)(k0 + j) * q_k + (long long)col * q_n) : 0.0f;
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kLowrankRows; ++t)
#pragma unroll
      for (int j = 0; j < kLowrankChunk; ++j) acc[t] = fmaf(s_p[t][j], q[j], acc[t]);
    __syncthreads();
  }
  if (col >= N) return;
  const float add = col_add ? __ldg(col_add + col) : 0.0f;
#pragma unroll
  for (int t = 0; t < kLowrankRows; ++t) {
    const int row = row0 + t;
    if (row >= M) break;
    const long long idx = (long long)row * N + col;
    if (mask && !((__ldg(mask + idx / 64) >> (idx % 64)) & 1u)) continue;
    float v = __bfloat162float(dst[idx]);
    if (col_add) v = __fadd_rn(v, add);
    dst[idx] = __float2bfloat16_rn(v + alpha * acc[t]);
  }
}

}  // namespace detail

// dst: (M, N) bf16; P: (M, r) fp32 row-major; Q(k, n) = Q[k·q_k + n·q_n]; mask: (M·N) bits or null;
// col_add: (N) fp32 or null (not with a mask).
inline void lowrank_add(const Context& ctx, __nv_bfloat16* dst, int M, int N, int r, float alpha,
                        const float* P, const float* Q, long long q_k, long long q_n,
                        const std::uint64_t* mask = nullptr, const float* col_add = nullptr) {
  QLORA_CHECK(!(mask && col_add), "cuda::lowrank_add: a column term with a mask (the mask would drop it)");
  if (M == 0 || N == 0 || r == 0) return;
  ctx.activate();
  const dim3 grid(unsigned((N + 255) / 256), unsigned((M + detail::kLowrankRows - 1) / detail::kLowrankRows));
  detail::lowrank_add_kernel<<<grid, 256, 0, ctx.stream()>>>(dst, M, N, r, alpha, P, Q, q_k, q_n, mask,
                                                             col_add);
  QLORA_CUDA_CHECK_LAUNCH("lowrank_add_kernel");
}

}  // namespace cuda
}  // namespace qlora
