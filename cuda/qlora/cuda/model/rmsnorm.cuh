#pragma once
// RMSNorm (transformers' LlamaRMSNorm, model/rmsnorm.hpp) on the device, one block per row:
//
//   forward   y = w ⊙ x · r,  r = 1 / sqrt(mean(x²) + eps)
//   backward  dx = r·n − r³ · x · (n·x) / D,  n = dy ⊙ w          (w frozen: no dw)
//
// Precision: x is the fp32 residual stream and the sums are taken in double, as on the CPU; the
// output y is bf16 (the input of the next products, as LoraLinear<..., Cuda> takes them). The r of
// each row is kept for backward.
//
// Backward's dy is the sum of the gradients from the products that read y (q, k and v; gate and up;
// lm_head alone): up to three bf16 arrays, or one fp32 array, added in fp32 inside the kernel, so
// their sum is never stored. dx is added to the residual gradient (dres += dx) or written.
#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

#include "qlora/core/error.hpp"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/model/block_reduce.cuh"

namespace qlora {
namespace cuda {

// dy of rmsnorm_backward: Σ bf16[k][i] over k < n_bf16, plus f32[i] when f32 is set.
struct NormGrad {
  const __nv_bfloat16* bf16[3] = {nullptr, nullptr, nullptr};
  int n_bf16 = 0;
  const float* f32 = nullptr;
  __device__ float operator()(std::size_t i) const {
    float g = f32 ? f32[i] : 0.0f;
    for (int k = 0; k < n_bf16; ++k) g += __bfloat162float(bf16[k][i]);
    return g;
  }
};

namespace detail {

constexpr int kNormThreads = 256;

__global__ void __launch_bounds__(kNormThreads)
    rmsnorm_forward_kernel(const float* __restrict__ x, const float* __restrict__ w, int D, float eps,
                           __nv_bfloat16* __restrict__ y, float* __restrict__ rstd) {
  const std::size_t row = blockIdx.x;
  const float* xr = x + row * std::size_t(D);
  double ss = 0;
  for (int i = threadIdx.x; i < D; i += blockDim.x) ss += double(xr[i]) * double(xr[i]);
  ss = block_sum(ss);
  const float var = float(ss / double(D));
  const float r = 1.0f / sqrtf(var + eps);
  if (rstd && threadIdx.x == 0) rstd[row] = r;
  for (int i = threadIdx.x; i < D; i += blockDim.x)
    y[row * std::size_t(D) + i] = __float2bfloat16_rn(w[i] * (xr[i] * r));
}

__global__ void __launch_bounds__(kNormThreads)
    rmsnorm_backward_kernel(NormGrad dy, const float* __restrict__ x, const float* __restrict__ w,
                            const float* __restrict__ rstd, int D, bool accumulate, float* dres) {
  const std::size_t row = blockIdx.x, off = row * std::size_t(D);
  const double r = rstd[row];
  double nx = 0;
  for (int i = threadIdx.x; i < D; i += blockDim.x)
    nx += double(dy(off + i)) * double(w[i]) * double(x[off + i]);
  nx = block_sum(nx);
  const double c = r * r * r * nx / double(D);
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const float dx = float(r * double(dy(off + i)) * double(w[i]) - c * double(x[off + i]));
    dres[off + i] = accumulate ? dres[off + i] + dx : dx;
  }
}

}  // namespace detail

// x (M, D) fp32, w (D) -> y (M, D) bf16, rstd (M) (may be null).
inline void rmsnorm_forward(const Context& ctx, const float* x, const float* w, std::int64_t M,
                            std::int64_t D, float eps, __nv_bfloat16* y, float* rstd) {
  QLORA_CHECK(M <= 0x7fffffff, "cuda::rmsnorm_forward: ", M, " rows, expected at most 2^31 - 1");
  if (M == 0) return;
  ctx.activate();
  detail::rmsnorm_forward_kernel<<<unsigned(M), detail::kNormThreads, 0, ctx.stream()>>>(x, w, int(D), eps, y,
                                                                                         rstd);
  QLORA_CUDA_CHECK_LAUNCH("rmsnorm_forward_kernel");
}

// dy (M, D) (NormGrad), x (M, D) the forward's input, rstd (M) its r -> dres (M, D): += dx when
// accumulate, else = dx. dres may not alias x or a dy array.
inline void rmsnorm_backward(const Context& ctx, const NormGrad& dy, const float* x, const float* w,
                             const float* rstd, std::int64_t M, std::int64_t D, bool accumulate,
                             float* dres) {
  QLORA_CHECK(M <= 0x7fffffff, "cuda::rmsnorm_backward: ", M, " rows, expected at most 2^31 - 1");
  if (M == 0) return;
  ctx.activate();
  detail::rmsnorm_backward_kernel<<<unsigned(M), detail::kNormThreads, 0, ctx.stream()>>>(
      dy, x, w, rstd, int(D), accumulate, dres);
  QLORA_CUDA_CHECK_LAUNCH("rmsnorm_backward_kernel");
}

}  // namespace cuda
}  // namespace qlora
