#pragma once
// Next-token cross-entropy (model/cross_entropy.hpp, transformers' ForCausalLMLoss) on the device,
// one block per logits row: row b·T + t is scored against label [b, t + 1], the last position of a
// sequence and labels -100 not at all.
//
//   loss_row = lse(z) − z[y],  lse = max + log Σ exp(z − max)
//   dlogits = (softmax(z) − onehot(y)) / count,  0 on rows without a target
//
// The sum of exponentials is accumulated in double (expf per element), and the per-row losses are
// returned as doubles that the host adds in row order and divides by count, as the CPU does. The
// labels are checked and the targets counted on the host (cuda::LlamaModel) before this runs.
// dlogits is written in bf16: it is the dy of lm_head's bf16 product.
#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

#include "qlora/core/error.hpp"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/model/block_reduce.cuh"

namespace qlora {
namespace cuda {
namespace detail {

constexpr int kLossThreads = 256;

__global__ void __launch_bounds__(kLossThreads)
    cross_entropy_kernel(const float* __restrict__ logits, const std::int64_t* __restrict__ labels, int T,
                         int V, double inv_count, double* __restrict__ loss_rows,
                         __nv_bfloat16* __restrict__ dlogits) {
  const std::size_t row = blockIdx.x;
  const int t = int(row % std::size_t(T));
  const std::int64_t y = t + 1 < T ? labels[row + 1] : std::int64_t(-100);
  const float* z = logits + row * std::size_t(V);
  __nv_bfloat16* dz = dlogits ? dlogits + row * std::size_t(V) : nullptr;
  if (y < 0) {  // no target: no loss, no gradient
    if (threadIdx.x == 0) loss_rows[row] = 0.0;
    if (dz)
      for (int i = threadIdx.x; i < V; i += blockDim.x) dz[i] = __float2bfloat16_rn(0.0f);
    return;
  }
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, z[i]);
  mx = block_max(mx);
  double se = 0;
  for (int i = threadIdx.x; i < V; i += blockDim.x) se += double(expf(z[i] - mx));
  se = block_sum(se);
  const double lse = double(mx) + log(se);
  if (threadIdx.x == 0) loss_rows[row] = lse - double(z[y]);
  if (dz) {
    const float lse_f = float(lse);  // the gradient goes to bf16: fp32 exponentials are plenty
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float p = expf(z[i] - lse_f);
      dz[i] = __float2bfloat16_rn(float(double(i == y ? p - 1.0f : p) * inv_count));
    }
  }
}

}  // namespace detail

// logits (B·T, V) fp32, labels (B, T) device (checked: -100 or in [0, V)), count: the number of
// targets (> 0) -> loss_rows (B·T) double, dlogits (B·T, V) bf16 overwritten (may be null).
inline void cross_entropy(const Context& ctx, const float* logits, const std::int64_t* labels, std::int64_t B,
                          std::int64_t T, std::int64_t V, std::int64_t count, double* loss_rows,
                          __nv_bfloat16* dlogits) {
  QLORA_CHECK(count > 0, "cuda::cross_entropy: ", count, " targets, expected at least 1");
  QLORA_CHECK(B * T <= 0x7fffffff, "cuda::cross_entropy: ", B * T, " rows, expected at most 2^31 - 1");
  if (B * T == 0) return;
  ctx.activate();
  detail::cross_entropy_kernel<<<unsigned(B * T), detail::kLossThreads, 0, ctx.stream()>>>(
      logits, labels, int(T), int(V), 1.0 / double(count), loss_rows, dlogits);
  QLORA_CUDA_CHECK_LAUNCH("cross_entropy_kernel");
}

}  // namespace cuda
}  // namespace qlora
