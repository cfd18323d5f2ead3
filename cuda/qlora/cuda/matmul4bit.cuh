#pragma once
// y = x · Wᵀ for a 4-bit W on the GPU, choosing the path by the number of tokens M:
//   M ≤ kGemvMaxTokens (and a shape gemv_4bit takes): the tensor-core GEMV, reading W once;
//   otherwise: dequantize W into the caller's reused bf16 scratch, then cuBLAS bf16 GEMM.
//
// The large-M path in slices. Dequantizing a whole 14336×4096 weight costs ~50 µs on an H200 (it
// writes 117 MB), ~9% of the M = 4096 product; done first, all of it is added to the GEMM. Cut into
// `slices` row ranges, slice i + 1 is dequantized on the context's side stream while cuBLAS
// multiplies slice i (into columns of y, ldy = N), through two scratch halves that the events hand
// back and forth, so only the first slice's dequantization is exposed (as far as the GEMM leaves
// the SMs room), and the scratch shrinks to two slices. slices = 0 picks: 1 (no overlap) below
// kSliceMinTokens tokens, else enough slices that each is ≥ 1024 rows, at most 4.
#include <cuda_bf16.h>

#include <algorithm>

#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/dequantize4bit.cuh"
#include "qlora/cuda/gemm_bf16.cuh"
#include "qlora/cuda/gemv4bit.cuh"
#include "qlora/cuda/quantized4bit.cuh"

namespace qlora {
namespace cuda {

constexpr int kGemvMaxTokens = 64;
constexpr int kSliceMinTokens = 1024;

namespace detail {

inline int auto_slices(int M, int N, int K, int blocksize) {
  if (M < kSliceMinTokens) return 1;
  int s = std::min(4, std::max(1, N / 1024));
  // a slice starts at a whole absmax block and a multiple of 8 values
  while (s > 1 && ((std::int64_t(N / s) * K) % std::max(blocksize, 8) != 0 || N % s != 0)) --s;
  return s;
}

}  // namespace detail

// y (M, N) = x (M, K) · Wᵀ through the dequantized scratch, in `slices` row slices of W (0: auto).
inline void matmul_4bit_dequant(const Context& ctx, const DeviceQuantized4bit& w, const __nv_bfloat16* x, int M,
                                __nv_bfloat16* y, DeviceBuffer<__nv_bfloat16>& scratch, bool accumulate = false,
                                int slices = 0) {
  QLORA_CHECK(w.shape.size() == 2, "cuda::matmul_4bit: weight has ", w.shape.size(), " dimensions, expected 2");
  const int N = int(w.shape[0]), K = int(w.shape[1]);
  if (slices == 0) slices = detail::auto_slices(M, N, K, w.blocksize);
  QLORA_CHECK(slices == 1 || (slices > 1 && N % slices == 0 && (std::int64_t(N / slices) * K) % std::max(w.blocksize, 8) == 0),
              "cuda::matmul_4bit: ", slices, " slices of a (", N, ", ", K, ") weight with blocksize ", w.blocksize,
              " (each slice must be whole rows starting at a block boundary)");
  const float beta = accumulate ? 1.0f : 0.0f;
  if (slices == 1) {
    const std::size_t need = std::size_t(N) * std::size_t(K);
    if (scratch.size() < need) scratch = DeviceBuffer<__nv_bfloat16>(need);
    dequantize_4bit(ctx, w, scratch.data());
    gemm_bf16(ctx, x, M, K, scratch.data(), N, y, beta);
    return;
  }
  const int rows = N / slices;
  const std::size_t half = std::size_t(rows) * std::size_t(K);
  if (scratch.size() < 2 * half) scratch = DeviceBuffer<__nv_bfloat16>(2 * half);
  ctx.activate();
  const cudaStream_t main = ctx.stream(), side = ctx.side_stream();
  // events: 0 = main's earlier work done; 1, 2 = half b dequantized; 3, 4 = half b's GEMM done
  QLORA_CUDA_CHECK(cudaEventRecord(ctx.event(0), main));
  QLORA_CUDA_CHECK(cudaStreamWaitEvent(side, ctx.event(0), 0));
  for (int i = 0; i < slices; ++i) {
    const int b = i % 2;
    __nv_bfloat16* buf = scratch.data() + std::size_t(b) * half;
    if (i >= 2) QLORA_CUDA_CHECK(cudaStreamWaitEvent(side, ctx.event(3 + b), 0));
    dequantize_4bit_range(ctx, w, std::size_t(i) * half, half, buf, side);
    QLORA_CUDA_CHECK(cudaEventRecord(ctx.event(1 + b), side));
    QLORA_CUDA_CHECK(cudaStreamWaitEvent(main, ctx.event(1 + b), 0));
    gemm_bf16(ctx, x, M, K, buf, rows, y + std::size_t(i) * rows, beta, N);
    QLORA_CUDA_CHECK(cudaEventRecord(ctx.event(3 + b), main));
  }
  // main has waited on the last dequantization: the side stream holds nothing main has not joined
}

// x: (M, K), y: (M, N) device pointers; W: (N, K).
inline void matmul_4bit(const Context& ctx, const DeviceQuantized4bit& w, const __nv_bfloat16* x, int M,
                        __nv_bfloat16* y, DeviceBuffer<__nv_bfloat16>& scratch, bool accumulate = false) {
  QLORA_CHECK(w.shape.size() == 2, "cuda::matmul_4bit: weight has ", w.shape.size(), " dimensions, expected 2");
  if (M <= kGemvMaxTokens && gemv_4bit_supported(w, M)) return gemv_4bit(ctx, w, x, M, y, accumulate);
  matmul_4bit_dequant(ctx, w, x, M, y, scratch, accumulate);
}

}  // namespace cuda
}  // namespace qlora
