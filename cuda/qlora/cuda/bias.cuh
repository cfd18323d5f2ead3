#pragma once
// The LoRA layer's bias on the GPU: its forward term and its gradient.
//   add_bias     y (M, N) bf16 += bias (N) fp32, each element rounded to bf16 once (the layer's
//                merged path; unmerged, lowrank_add adds the bias in the pass it makes anyway)
//   column_sums  out (N) fp32 = (or +=) Σ_t x[t, :] over the M rows of a bf16 x: dbias = Σ_t dy[t, :]
//
// column_sums is deterministic and independent of the device: no atomics. The rows are cut into
// chunks of kColsumRows; one thread per column sums a chunk in row order in fp32 (coalesced: a warp
// reads 32 adjacent columns of a row), and the chunks' partial sums are then added in chunk order.
// With one chunk (M ≤ kColsumRows) and `accumulate` false this is exactly the Cpu backend's loop
// (0 + x[0] + x[1] + ... per column), so the result is bit for bit the CPU's; otherwise the
// grouping differs from the CPU's sequential sum by fp32 rounding only.
#include <cuda_bf16.h>

#include <cstdint>

#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/context.cuh"

namespace qlora {
namespace cuda {
namespace detail {

constexpr int kColsumRows = 256;  // rows per partial sum

__global__ void __launch_bounds__(256)
    add_bias_kernel(__nv_bfloat16* __restrict__ y, int M, int N, const float* __restrict__ bias) {
  const int col = blockIdx.x * 256 + threadIdx.x;
  if (col >= N) return;
  const float b = __ldg(bias + col);
  for (int row = blockIdx.y; row < M; row += gridDim.y) {
    const long long idx = (long long)row * N + col;
    y[idx] = __float2bfloat16_rn(__fadd_rn(__bfloat162float(y[idx]), b));
  }
}

// Chunk blockIdx.y of the rows, column col: partial[chunk·N + col], or straight into out (+= when
// accumulate) when there is one chunk.
__global__ void __launch_bounds__(256)
    column_sums_chunk_kernel(const __nv_bfloat16* __restrict__ x, int M, int N, float* __restrict__ dst,
                             bool accumulate) {
  const int col = blockIdx.x * 256 + threadIdx.x;
  if (col >= N) return;
  const int r0 = blockIdx.y * kColsumRows, r1 = min(M, r0 + kColsumRows);
  float s = 0.0f;
  for (int row = r0; row < r1; ++row) s = __fadd_rn(s, __bfloat162float(x[(long long)row * N + col]));
  float* o = dst + (long long)blockIdx.y * N + col;
  *o = accumulate ? __fadd_rn(*o, s) : s;
}

__global__ void __launch_bounds__(256)
    column_sums_combine_kernel(const float* __restrict__ partial, int chunks, int N, float* __restrict__ out,
                               bool accumulate) {
  const int col = blockIdx.x * 256 + threadIdx.x;
  if (col >= N) return;
  float s = 0.0f;
  for (int c = 0; c < chunks; ++c) s = __fadd_rn(s, partial[(long long)c * N + col]);
  out[col] = accumulate ? __fadd_rn(out[col], s) : s;
}

}  // namespace detail

// y: (M, N) bf16, bias: (N) fp32, device pointers. Asynchronous.
inline void add_bias(const Context& ctx, __nv_bfloat16* y, int M, int N, const float* bias) {
  QLORA_CHECK(M >= 0 && N >= 0, "cuda::add_bias: negative size M=", M, " N=", N);
  if (M == 0 || N == 0) return;
  ctx.activate();
  const dim3 grid(unsigned((N + 255) / 256), unsigned(M < 1024 ? M : 1024));
  detail::add_bias_kernel<<<grid, 256, 0, ctx.stream()>>>(y, M, N, bias);
  QLORA_CUDA_CHECK_LAUNCH("add_bias_kernel");
}

// x: (M, N) bf16, out: (N) fp32, device pointers; partial: scratch, grown to the chunks' partial sums
// when M > kColsumRows. out = Σ_t x[t, :] (accumulate false; 0 when M = 0) or out += it. Asynchronous.
inline void column_sums(const Context& ctx, const __nv_bfloat16* x, int M, int N,
                        DeviceBuffer<float>& partial, float* out, bool accumulate) {
  QLORA_CHECK(M >= 0 && N >= 0, "cuda::column_sums: negative size M=", M, " N=", N);
  if (N == 0) return;
  ctx.activate();
  if (M == 0) {
    if (!accumulate) QLORA_CUDA_CHECK(cudaMemsetAsync(out, 0, std::size_t(N) * sizeof(float), ctx.stream()));
    return;
  }
  const int chunks = (M + detail::kColsumRows - 1) / detail::kColsumRows;
  QLORA_CHECK(chunks <= 65535, "cuda::column_sums: ", M, " rows, expected at most ",
              65535 * detail::kColsumRows);
  const unsigned col_blocks = unsigned((N + 255) / 256);
  if (chunks == 1) {
    detail::column_sums_chunk_kernel<<<dim3(col_blocks, 1), 256, 0, ctx.stream()>>>(x, M, N, out, accumulate);
    QLORA_CUDA_CHECK_LAUNCH("column_sums_chunk_kernel");
    return;
  }
  const std::size_t need = std::size_t(chunks) * std::size_t(N);
  if (partial.size() < need) partial = DeviceBuffer<float>(need);
  detail::column_sums_chunk_kernel<<<dim3(col_blocks, unsigned(chunks)), 256, 0, ctx.stream()>>>(
      x, M, N, partial.data(), false);
  QLORA_CUDA_CHECK_LAUNCH("column_sums_chunk_kernel");
  detail::column_sums_combine_kernel<<<col_blocks, 256, 0, ctx.stream()>>>(partial.data(), chunks, N, out,
                                                                           accumulate);
  QLORA_CUDA_CHECK_LAUNCH("column_sums_combine_kernel");
}

}  // namespace cuda
}  // namespace qlora
