#pragma once
// C (m, n) = alpha · op(A) · op(B) + beta · C for row-major matrices through cublasGemmEx, fp32
// accumulation, with the element types named per operand (bf16 inputs with an fp32 or bf16 C are
// what the LoRA layer uses). op(A) is (m, k), op(B) is (k, n); lda, ldb, ldc are the row strides of
// the matrices as stored.
//
// A row-major matrix is its transpose in column-major order, so row-major C = op(A)·op(B) is
// column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: one cuBLAS call with the operands swapped and the same op flags.
#include <cublas_v2.h>

#include "qlora/cuda/context.cuh"

namespace qlora {
namespace cuda {

enum class Op { N, T };

struct GemmOperand {
  const void* ptr;
  cudaDataType_t type;
  int ld;  // row stride of the stored matrix
  Op op = Op::N;
};

inline void gemm_rowmajor(const Context& ctx, int m, int n, int k, float alpha, const GemmOperand& a,
                          const GemmOperand& b, float beta, void* c, cudaDataType_t c_type, int ldc) {
  QLORA_CHECK(m >= 0 && n >= 0 && k >= 0, "cuda::gemm_rowmajor: negative size m=", m, " n=", n, " k=", k);
  if (m == 0 || n == 0) return;
  ctx.activate();
  const auto flag = [](Op o) { return o == Op::T ? CUBLAS_OP_T : CUBLAS_OP_N; };
  QLORA_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), flag(b.op), flag(a.op), n, m, k, &alpha, b.ptr, b.type, b.ld, a.ptr,
                                  a.type, a.ld, &beta, c, c_type, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace cuda
}  // namespace qlora
