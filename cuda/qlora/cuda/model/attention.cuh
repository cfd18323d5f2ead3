#pragma once
// Causal grouped-query self-attention (model/attention.hpp, transformers' eager Llama attention) on
// the device, after the projections and RoPE, without storing the (T, T) probabilities:
//
//   q (B·T, H·d), k, v (B·T, KV·d) bf16; query head h reads KV head h / (H / KV)
//   S = q·kᵀ / sqrt(d), keys after the query masked; P = softmax(S) in fp32; out = P·v (bf16)
//
// What forward keeps: per (b, h, query row i) the row's max m and the inverse of its sum of
// exponentials (two floats), so backward recomputes P_ij = exp(S_ij − m_i) · inv_i bit for bit (the
// same dot product in the same order, the same expf) instead of reading a stored P. That keeps
// attention's memory linear in T, like PyTorch's fused SDPA, at the cost of recomputing S twice in
// backward (the model this is for has T ≤ a few thousand and d = 32 .. 128: S is cheap).
//
// Backward (the CPU's formulas), with dP_ij = dout_i·v_j:
//   delta_i = Σ_j P_ij dP_ij,  dS_ij = P_ij (dP_ij − delta_i) / sqrt(d)
//   dq_i = Σ_j dS_ij k_j                              kernel 1, one block per query row
//   dv_j = Σ_{h, i ≥ j} P_ij dout_i,  dk_j = Σ_{h, i ≥ j} dS_ij q_i   kernel 2, one block per key row
// (h over the H / KV query heads sharing KV head j's head). Kernel 1 writes delta for kernel 2.
//
// The kernels are plain: a block of 128 threads per row, S by one thread per key (a d-long dot from
// L2-resident rows), sums over rows by d-wide thread groups reduced in a fixed order, so results are
// deterministic. Limits: d ≤ 128 and even, and the per-row arrays of kernel 1 (2T + 2d + 128 floats)
// in 48 KiB of shared memory, i.e. T ≤ ~5900.
#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "qlora/core/error.hpp"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/model/block_reduce.cuh"

namespace qlora {
namespace cuda {

struct AttentionShape {
  int batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
  __host__ __device__ int group() const { return heads / kv_heads; }
  __host__ __device__ int q_width() const { return heads * head_dim; }
  __host__ __device__ int kv_width() const { return kv_heads * head_dim; }
};

namespace detail {

constexpr int kAttnThreads = 128;
constexpr int kAttnChunk = 512;  // key-row kernel: (query head, row) pairs weighted per pass

// Σ_e a[e]·b[e] in order, one fused multiply-add per term: the same bits wherever it is evaluated
// (forward and both backward kernels recompute S and dP with it). The scaling and the max
// subtraction after it are __fmul_rn / __fsub_rn for the same reason: nvcc would otherwise fuse them
// into one FMA where the forward rounds in between.
template <class A, class B>
__device__ __forceinline__ float dot_ordered(const A* a, const B* b, int d) {
  float acc = 0.0f;
  for (int e = 0; e < d; ++e) acc = __fmaf_rn(to_f32(a[e]), to_f32(b[e]), acc);
  return acc;
}

// Σ_{p < n} w[p] · row(p)[e] for e < d, by the whole block: thread groups of d threads take every
// (blockDim / d)-th p, then thread e adds the groups' partials in group order. Thread e < d gets the
// sum for column e, the others 0. w must be visible to all threads (shared memory, synced).
template <class RowFn>
__device__ float weighted_rows(const float* w, int n, RowFn row, int d) {
  __shared__ float partial[kAttnThreads];
  const int groups = kAttnThreads / d, e = threadIdx.x % d, g = threadIdx.x / d;
  float acc = 0.0f;
  if (g < groups)
    for (int p = g; p < n; p += groups) acc = __fmaf_rn(w[p], to_f32(row(p)[e]), acc);
  __syncthreads();  // a previous call's readers are done with partial
  partial[threadIdx.x] = acc;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x < d)
    for (int k = 0; k < groups; ++k) total += partial[k * d + threadIdx.x];
  return total;
}

// grid (T, H, B): query row i of head h in batch b.
__global__ void __launch_bounds__(kAttnThreads)
    attention_forward_kernel(AttentionShape s, float scale, const __nv_bfloat16* __restrict__ q,
                             const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                             __nv_bfloat16* __restrict__ out, float* __restrict__ row_max,
                             float* __restrict__ row_inv) {
  extern __shared__ float attn_smem[];
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, T = s.seq, d = s.head_dim;
  const int g = h / s.group(), qw = s.q_width(), kw = s.kv_width();
  float* qs = attn_smem;     // (d) q_i
  float* p = attn_smem + d;  // (T) scores, then probabilities
  const std::size_t qrow = (std::size_t(b) * T + i) * qw + std::size_t(h) * d;
  for (int e = threadIdx.x; e < d; e += blockDim.x) qs[e] = __bfloat162float(q[qrow + e]);
  __syncthreads();
  const __nv_bfloat16* kb = k + std::size_t(b) * T * kw + std::size_t(g) * d;  // row j at j·kw
  float mx = -INFINITY;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) {
    p[j] = __fmul_rn(dot_ordered(qs, kb + std::size_t(j) * kw, d), scale);
    mx = fmaxf(mx, p[j]);
  }
  mx = block_max(mx);
  double sum = 0;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) {
    p[j] = expf(p[j] - mx);
    sum += p[j];
  }
  sum = block_sum(sum);
  const float inv = float(1.0 / sum);
  for (int j = threadIdx.x; j <= i; j += blockDim.x) p[j] *= inv;
  const std::size_t stat = (std::size_t(b) * s.heads + h) * T + i;
  if (threadIdx.x == 0) {
    row_max[stat] = mx;
    row_inv[stat] = inv;
  }
  __syncthreads();
  const __nv_bfloat16* vb = v + std::size_t(b) * T * kw + std::size_t(g) * d;
  const float o = weighted_rows(
      p, i + 1, [&](int j) { return vb + std::size_t(j) * kw; }, d);
  if (threadIdx.x < d) out[qrow + threadIdx.x] = __float2bfloat16_rn(o);
}

// grid (T, H, B): dq of query row i of head h; writes delta_i.
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_q_kernel(AttentionShape s, float scale, const __nv_bfloat16* __restrict__ q,
                                const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                                const float* __restrict__ row_max, const float* __restrict__ row_inv,
                                const __nv_bfloat16* __restrict__ dout, float* __restrict__ dq,
                                float* __restrict__ delta_out) {
  extern __shared__ float attn_smem[];
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, T = s.seq, d = s.head_dim;
  const int g = h / s.group(), qw = s.q_width(), kw = s.kv_width();
  float* qs = attn_smem;         // (d) q_i
  float* dos = attn_smem + d;    // (d) dout_i
  float* P = attn_smem + 2 * d;  // (T) P_ij, then dS_ij
  float* dP = P + T;             // (T) dP_ij
  const std::size_t qrow = (std::size_t(b) * T + i) * qw + std::size_t(h) * d;
  for (int e = threadIdx.x; e < d; e += blockDim.x) {
    qs[e] = __bfloat162float(q[qrow + e]);
    dos[e] = __bfloat162float(dout[qrow + e]);
  }
  __syncthreads();
  const std::size_t stat = (std::size_t(b) * s.heads + h) * T + i;
  const float m = row_max[stat], inv = row_inv[stat];
  const __nv_bfloat16* kb = k + std::size_t(b) * T * kw + std::size_t(g) * d;
  const __nv_bfloat16* vb = v + std::size_t(b) * T * kw + std::size_t(g) * d;
  double rowsum = 0;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) {
    P[j] = expf(__fsub_rn(__fmul_rn(dot_ordered(qs, kb + std::size_t(j) * kw, d), scale), m)) * inv;
    dP[j] = dot_ordered(dos, vb + std::size_t(j) * kw, d);
    rowsum += double(P[j]) * dP[j];
  }
  const float delta = float(block_sum(rowsum));
  for (int j = threadIdx.x; j <= i; j += blockDim.x) P[j] = P[j] * (dP[j] - delta) * scale;  // dS / sqrt(d)
  if (threadIdx.x == 0) delta_out[stat] = delta;
  __syncthreads();
  const float dqe = weighted_rows(
      P, i + 1, [&](int j) { return kb + std::size_t(j) * kw; }, d);
  if (threadIdx.x < d) dq[qrow + threadIdx.x] = dqe;
}

// grid (T, KV, B): dk and dv of key row j of KV head g, over the query heads of its group and the
// query rows i ≥ j.
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_kv_kernel(AttentionShape s, float scale, const __nv_bfloat16* __restrict__ q,
                                 const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                                 const float* __restrict__ row_max, const float* __restrict__ row_inv,
                                 const float* __restrict__ delta, const __nv_bfloat16* __restrict__ dout,
                                 float* __restrict__ dk, __nv_bfloat16* __restrict__ dv) {
  __shared__ float ks[kAttnThreads], vs[kAttnThreads];  // k_j, v_j (d ≤ 128)
  __shared__ float wp[kAttnChunk], wds[kAttnChunk];     // P_ij and dS_ij of the current chunk of pairs
  const int j = blockIdx.x, g = blockIdx.y, b = blockIdx.z, T = s.seq, d = s.head_dim;
  const int group = s.group(), qw = s.q_width(), kw = s.kv_width();
  const std::size_t krow = (std::size_t(b) * T + j) * kw + std::size_t(g) * d;
  for (int e = threadIdx.x; e < d; e += blockDim.x) {
    ks[e] = __bfloat162float(k[krow + e]);
    vs[e] = __bfloat162float(v[krow + e]);
  }
  __syncthreads();
  const int rows = T - j, n = group * rows;  // pair p: query head g·group + p / rows, row j + p % rows
  auto qoff = [&](int p) {
    const int h = g * group + p / rows, i = j + p % rows;
    return (std::size_t(b) * T + i) * qw + std::size_t(h) * d;
  };
  auto stat = [&](int p) {
    const int h = g * group + p / rows, i = j + p % rows;
    return (std::size_t(b) * s.heads + h) * T + i;
  };
  float accv = 0.0f, acck = 0.0f;
  for (int c0 = 0; c0 < n; c0 += kAttnChunk) {
    const int cn = min(kAttnChunk, n - c0);
    for (int c = threadIdx.x; c < cn; c += blockDim.x) {
      const std::size_t o = qoff(c0 + c), st = stat(c0 + c);
      // the forward's S_ij: dot(q_i, k_j) in the same order, so P_ij is the forward's bit for bit
      const float P = expf(__fsub_rn(__fmul_rn(dot_ordered(q + o, ks, d), scale), row_max[st])) * row_inv[st];
      const float dP = dot_ordered(dout + o, vs, d);
      wp[c] = P;
      wds[c] = P * (dP - delta[st]) * scale;
    }
    __syncthreads();
    accv += weighted_rows(
        wp, cn, [&](int c) { return dout + qoff(c0 + c); }, d);
    acck += weighted_rows(
        wds, cn, [&](int c) { return q + qoff(c0 + c); }, d);
    __syncthreads();  // the chunk's weights are read before the next chunk overwrites them
  }
  if (threadIdx.x < d) {
    dk[krow + threadIdx.x] = acck;
    dv[krow + threadIdx.x] = __float2bfloat16_rn(accv);
  }
}

inline void check_shape(const AttentionShape& s, const char* who) {
  QLORA_CHECK(s.head_dim > 0 && s.head_dim <= kAttnThreads && s.head_dim % 2 == 0, who, ": head_dim ",
              s.head_dim, ", expected an even number in [2, ", kAttnThreads, "]");
  QLORA_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, who, ": ", s.heads, " query heads over ",
              s.kv_heads, " KV heads, expected a multiple");
  QLORA_CHECK(s.heads <= 65535 && s.batch <= 65535, who, ": batch ", s.batch, " and heads ", s.heads,
              " must be at most 65535 (grid dimensions)");
}

}  // namespace detail

// Bytes of dynamic shared memory the query-row kernels need for sequence length T.
inline std::size_t attention_smem_bytes(const AttentionShape& s) {
  return (2 * std::size_t(s.seq) + 2 * std::size_t(s.head_dim)) * sizeof(float);
}

// q (B·T, H·d), k, v (B·T, KV·d) bf16 -> out (B·T, H·d) bf16; row_max, row_inv (B, H, T) kept.
inline void attention_forward(const Context& ctx, const AttentionShape& s, const __nv_bfloat16* q,
                              const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* out,
                              float* row_max, float* row_inv) {
  detail::check_shape(s, "cuda::attention_forward");
  const std::size_t smem = attention_smem_bytes(s);
  QLORA_CHECK(smem <= 48 * 1024, "cuda::attention_forward: sequence ", s.seq, " needs ", smem,
              " bytes of shared memory per block, expected at most 49152");
  if (s.batch == 0 || s.seq == 0) return;
  ctx.activate();
  const float scale = 1.0f / std::sqrt(float(s.head_dim));  // head_dim ** -0.5, as the CPU's
  detail::attention_forward_kernel<<<dim3(unsigned(s.seq), unsigned(s.heads), unsigned(s.batch)),
                                     detail::kAttnThreads, smem, ctx.stream()>>>(s, scale, q, k, v, out,
                                                                                 row_max, row_inv);
  QLORA_CUDA_CHECK_LAUNCH("attention_forward_kernel");
}

// dout (B·T, H·d) bf16 -> dq (B·T, H·d) fp32, dk (B·T, KV·d) fp32, dv (B·T, KV·d) bf16, overwritten.
// delta: (B, H, T) scratch.
inline void attention_backward(const Context& ctx, const AttentionShape& s, const __nv_bfloat16* q,
                               const __nv_bfloat16* k, const __nv_bfloat16* v, const float* row_max,
                               const float* row_inv, const __nv_bfloat16* dout, float* dq, float* dk,
                               __nv_bfloat16* dv, float* delta) {
  detail::check_shape(s, "cuda::attention_backward");
  const std::size_t smem = attention_smem_bytes(s);
  QLORA_CHECK(smem <= 48 * 1024, "cuda::attention_backward: sequence ", s.seq, " needs ", smem,
              " bytes of shared memory per block, expected at most 49152");
  if (s.batch == 0 || s.seq == 0) return;
  ctx.activate();
  const float scale = 1.0f / std::sqrt(float(s.head_dim));
  detail::attention_backward_q_kernel<<<dim3(unsigned(s.seq), unsigned(s.heads), unsigned(s.batch)),
                                        detail::kAttnThreads, smem, ctx.stream()>>>(
      s, scale, q, k, v, row_max, row_inv, dout, dq, delta);
  QLORA_CUDA_CHECK_LAUNCH("attention_backward_q_kernel");
  detail::attention_backward_kv_kernel<<<dim3(unsigned(s.seq), unsigned(s.kv_heads), unsigned(s.batch)),
                                         detail::kAttnThreads, 0, ctx.stream()>>>(
      s, scale, q, k, v, row_max, row_inv, delta, dout, dk, dv);
  QLORA_CUDA_CHECK_LAUNCH("attention_backward_kv_kernel");
}

}  // namespace cuda
}  // namespace qlora
