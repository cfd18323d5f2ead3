#pragma once
// gemv_4bit's sm_90 kernel: the same tensor-core work per unit as gemv4bit.cuh (16 rows × 64 values
// of K, mma.m16n8k16, the lane-replicated byte -> bf16-pair table, absmax applied in fp32), but the
// packed weights and their absmax reach shared memory through the copy engine, in a ring of stages
// that a producer warp keeps full, so the bytes in flight no longer depend on registers or on the
// consumers' progress.
//
// Why: the register-fed kernel can only have U units per warp in flight, and issues them in bursts
// between compute phases; on an H200 it moved 1.2 TB/s at M = 1 (27% of the read ceiling), bound by
// latency at low occupancy. Here an SM has S stages (≈ 10 KB each) in flight whatever the
// consumers are doing.
//
// Layout of the work
// - A stage is 16 rows (one tile) × 1024 values of K: per row 512 packed bytes (one bulk copy each,
//   to a row pitch of 544 bytes so the 4 rows a half-warp reads with 8-byte loads hit distinct
//   banks), the row's 16 absmax (16 code bytes, or 16 floats without double quantization; pitch 80
//   bytes, again distinct banks) and, with double quantization, the one nested absmax the row's 16
//   blocks share (a 4-byte cp.async: the 16 blocks start at a multiple of 16, so they never straddle
//   a nested block of 256).
// - One producer warp (warp 16): for stage s it waits until slot s % S is empty, posts the bytes to
//   expect on the slot's full barrier, and lanes 0..15 start their row's copies.
// - 16 consumer warps: warp u takes unit u (values 64u..64u+63 of the stage) of every stage, so a
//   tile's 16·(K / 1024) units are spread over all of them. It loads its x slice (global, L1-resident
//   for small M) before waiting on the slot, reads its fragments, releases the slot, and computes.
// - At the end of each tile the consumers leave their partial sums in shared memory, meet at a named
//   barrier (the producer runs on), add the 16 partials in warp order (deterministic) and store y.
// - Grid: one persistent block per SM, each owning a contiguous range of tiles.
//
// Takes: sm_90, blocksize 64, K % 1024 == 0, N % 16 == 0, M ≤ 64, nested blocksize 256 (the shapes
// of Llama's projections but down_proj of a 11008-wide MLP, which gemv4bit.cuh's kernel serves).
#include <cuda_bf16.h>

#include <cstdint>

#include "qlora/cuda/async_copy.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/gemv4bit_common.cuh"

namespace qlora {
namespace cuda {
namespace detail {

constexpr int kStreamConsumers = 16;                         // warps; one unit of each stage each
constexpr int kStreamThreads = (kStreamConsumers + 1) * 32;  // + the producer warp
constexpr int kStageK = 1024;                                // values of K per stage (16 units)
constexpr int kStageRowPitch = 512 + 32;
constexpr int kStageAmPitch = 80;
constexpr int kStageAmOff = 16 * kStageRowPitch;                   // 8704
constexpr int kStageNestedOff = kStageAmOff + 16 * kStageAmPitch;  // 9984
constexpr int kStageBytes = (kStageNestedOff + 16 * 4 + 127) / 128 * 128;
constexpr int kStreamMaxStages = 16;

// Stages in flight per SM by token tiles: the per-warp partials (16 warps × 16 rows × 8·NT floats)
// grow with NT and share the 227 KB.
template <int NT>
struct StreamStages {
  static constexpr int value = NT <= 2 ? 12 : NT == 4 ? 8 : 6;
};
inline int stream_stages(int nt) { return nt <= 2 ? 12 : nt == 4 ? 8 : 6; }

inline std::size_t stream_smem_bytes(int nt) {
  return std::size_t(kLutBytes) + 256 * sizeof(float) + 2 * kStreamMaxStages * sizeof(std::uint64_t) +
         std::size_t(stream_stages(nt)) * kStageBytes + std::size_t(kStreamConsumers) * 16 * 8 * nt * sizeof(float);
}

template <int NT, bool DQ>
__global__ void __launch_bounds__(kStreamThreads, 1) gemv4_stream_kernel(const GemvArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int S = StreamStages<NT>::value, kCols = 8 * NT, kConsumerThreads = kStreamConsumers * 32;
  extern __shared__ __align__(128) unsigned char stream_smem[];
  unsigned char* smem = stream_smem;
  unsigned char* s_lut = smem;
  float* s_map = reinterpret_cast<float*>(smem + kLutBytes);
  std::uint64_t* s_full = reinterpret_cast<std::uint64_t*>(smem + kLutBytes + 1024);
  std::uint64_t* s_empty = s_full + kStreamMaxStages;
  unsigned char* s_stage = smem + kLutBytes + 1024 + 2 * kStreamMaxStages * sizeof(std::uint64_t);
  float* s_slot = reinterpret_cast<float*>(s_stage + std::size_t(S) * kStageBytes);  // (warp, row 16, token 8·NT)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) {
    for (int i = 0; i < S; ++i) {
      mbar_init(&s_full[i], 1);  // the producer's arrive (+ its lanes' cp.async arrivals, + the bytes)
      mbar_init(&s_empty[i], kStreamConsumers);
    }
    mbar_fence_init();
  }
  fill_pair_lut(s_lut, a.code, tid, kStreamThreads);
  if (DQ)
    for (int i = warp; i < 256; i += kStreamThreads / 32)
      if (lane == 0) s_map[i] = a.map.v[i];  // a uniform index per warp
  __syncthreads();

  const int tile_begin = int(std::int64_t(blockIdx.x) * a.tiles / gridDim.x);
  const int tile_end = int(std::int64_t(blockIdx.x + 1) * a.tiles / gridDim.x);
  const int KS = a.K / kStageK;  // stages per tile
  const int stages = (tile_end - tile_begin) * KS;
  const std::size_t K = std::size_t(a.K);

  if (warp == kStreamConsumers) {  // the producer
    for (int s = 0; s < stages; ++s) {
      const int slot = s % S;
      if (lane == 0) mbar_wait(&s_empty[slot], ((s / S) & 1) ^ 1);
      __syncwarp();
      unsigned char* st = s_stage + std::size_t(slot) * kStageBytes;
      const std::size_t row = std::size_t(tile_begin + s / KS) * 16 + (lane & 15);
      const std::size_t e = row * K + std::size_t(s % KS) * kStageK;  // first value of the row's piece
      if (DQ && lane < 16) {
        cp_async4(st + kStageNestedOff + 4 * lane, a.am.absmax2 + (e >> (6 + a.am.nested_shift)));
        cp_async_arrive(&s_full[slot]);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive_expect_tx(&s_full[slot], 16u * (512u + (DQ ? 16u : 64u)));
      __syncwarp();
      if (lane < 16) {
        bulk_copy_g2s(st + lane * kStageRowPitch, a.packed + e / 2, 512, &s_full[slot]);
        if (DQ)
          bulk_copy_g2s(st + kStageAmOff + lane * kStageAmPitch, a.am.qabsmax + (e >> 6), 16, &s_full[slot]);
        else
          bulk_copy_g2s(st + kStageAmOff + lane * kStageAmPitch, a.am.absmax + (e >> 6), 64, &s_full[slot]);
      }
    }
    return;  // the consumers never meet the producer again (named barrier 1 is theirs)
  }

  const int g = lane >> 2, t = lane & 3, u = warp;
  const std::uint32_t lane4 = std::uint32_t(lane) * 4;
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  for (int s = 0; s < stages; ++s) {
    const int slot = s % S, ks = s % KS;
    uint4 xa[NT], xb[NT];
    load_x<NT>(a.x + std::size_t(g) * K + std::size_t(ks) * kStageK + 64 * u + 16 * t, K, g, a.M, xa, xb);
    mbar_wait(&s_full[slot], (s / S) & 1);
    const unsigned char* st = s_stage + std::size_t(slot) * kStageBytes;
    const uint2 wa = *reinterpret_cast<const uint2*>(st + g * kStageRowPitch + 32 * u + 8 * t);
    const uint2 wb = *reinterpret_cast<const uint2*>(st + (g + 8) * kStageRowPitch + 32 * u + 8 * t);
    float am0, am1;
    if (DQ) {
      const float* nested = reinterpret_cast<const float*>(st + kStageNestedOff);
      am0 = __fadd_rn(__fmul_rn(s_map[st[kStageAmOff + g * kStageAmPitch + u]], nested[g]), a.am.offset);
      am1 = __fadd_rn(__fmul_rn(s_map[st[kStageAmOff + (g + 8) * kStageAmPitch + u]], nested[g + 8]), a.am.offset);
    } else {
      am0 = reinterpret_cast<const float*>(st + kStageAmOff + g * kStageAmPitch)[u];
      am1 = reinterpret_cast<const float*>(st + kStageAmOff + (g + 8) * kStageAmPitch)[u];
    }
    __syncwarp();                            // every lane has its fragments ...
    if (lane == 0) mbar_arrive(&s_empty[slot]);  // ... so the slot may be refilled
    float tmp[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) tmp[j][0] = tmp[j][1] = tmp[j][2] = tmp[j][3] = 0.0f;
    mma_unit<NT>(s_lut, lane4, wa, wb, xa, xb, tmp);
    scale_add<NT>(acc, tmp, am0, am1);

    if (ks == KS - 1) {  // the tile is done: add the 16 warps' partials and store its 16 rows
      float* sl = s_slot + std::size_t(warp) * 16 * kCols;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        sl[g * kCols + 8 * j + 2 * t] = acc[j][0];
        sl[g * kCols + 8 * j + 2 * t + 1] = acc[j][1];
        sl[(g + 8) * kCols + 8 * j + 2 * t] = acc[j][2];
        sl[(g + 8) * kCols + 8 * j + 2 * t + 1] = acc[j][3];
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
      }
      named_barrier(1, kConsumerThreads);
      const std::size_t row0 = std::size_t(tile_begin + s / KS) * 16;
      for (int idx = tid; idx < 16 * a.M; idx += kConsumerThreads) {
        const int tok = idx / 16, r = idx % 16;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kStreamConsumers; ++w) sum += s_slot[(std::size_t(w) * 16 + r) * kCols + tok];
        const std::size_t o = std::size_t(tok) * a.N + row0 + r;
        a.y[o] = __float2bfloat16_rn(a.accumulate ? __bfloat162float(a.y[o]) + sum : sum);
      }
      named_barrier(1, kConsumerThreads);  // the slots are read before the next tile overwrites them
    }
  }
#else
  (void)a;
  __trap();  // launched only on sm_90 (gemv_4bit checks the device)
#endif
}

// Whether the streaming kernel takes this product (gemv_4bit_supported must hold too).
inline bool gemv_stream_supported(const Context& ctx, int blocksize, bool double_quant, int nested_blocksize,
                                  std::int64_t K) {
  return ctx.props().major >= 9 && blocksize == 64 && K % kStageK == 0 && (!double_quant || nested_blocksize == 256);
}

template <int NT, bool DQ>
void launch_gemv4_stream(const Context& ctx, const GemvArgs& args) {
  static_assert(StreamStages<NT>::value <= kStreamMaxStages, "too many stages for the barrier array");
  const auto kernel = gemv4_stream_kernel<NT, DQ>;
  const std::size_t smem = stream_smem_bytes(NT);
  QLORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int grid = std::min(args.tiles, ctx.sm_count());
  kernel<<<grid, kStreamThreads, smem, ctx.stream()>>>(args);
  QLORA_CUDA_CHECK_LAUNCH("gemv4_stream_kernel");
}

template <int NT>
void dispatch_gemv4_stream(const Context& ctx, const GemvArgs& args, bool dq) {
  if (dq)
    launch_gemv4_stream<NT, true>(ctx, args);
  else
    launch_gemv4_stream<NT, false>(ctx, args);
}

}  // namespace detail
}  // namespace cuda
}  // namespace qlora
