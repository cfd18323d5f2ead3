#pragma once
// y (M, N) = x (M, K) · Wᵀ (W: N, K), all bf16 row-major, fp32 accumulation, through cuBLAS on the
// context's handle, stream and workspace. This is both the large-M half of the 4-bit matmul (after
// dequantizing into a bf16 scratch) and the plain bf16 baseline the benchmarks compare against.
//
// Row-major y = x·Wᵀ is column-major yᵀ (N×M) = W (K×N col-major, transposed) · xᵀ (K×M col-major).
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include "qlora/cuda/context.cuh"

namespace qlora {
namespace cuda {

// beta = 0: y = x·Wᵀ; beta = 1: y += x·Wᵀ. ldy: y's row stride (default N; larger when y is a
// column slice of a wider matrix).
inline void gemm_bf16(const Context& ctx, const __nv_bfloat16* x, int M, int K, const __nv_bfloat16* w, int N,
                      __nv_bfloat16* y, float beta = 0.0f, int ldy = 0) {
  if (ldy == 0) ldy = N;
  QLORA_CHECK(ldy >= N, "cuda::gemm_bf16: row stride ", ldy, " of y is less than its ", N, " columns");
  QLORA_CHECK(M >= 0 && N >= 0 && K >= 0, "cuda::gemm_bf16: negative size M=", M, " N=", N, " K=", K);
  if (M == 0 || N == 0) return;
  ctx.activate();
  const float alpha = 1.0f;
  QLORA_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, w, CUDA_R_16BF, K,
                                  x, CUDA_R_16BF, K, &beta, y, CUDA_R_16BF, ldy, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
}

}  // namespace cuda
}  // namespace qlora
