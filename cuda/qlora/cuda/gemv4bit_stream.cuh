#pragma once
// gemv_4bit's sm_90 kernel: the same tensor-core work per unit as gemv4bit.cuh (16 rows × 64 values
// of K, mma.m16n8k16, the lane-replicated byte -> bf16-pair table, absmax applied in fp32), but the
// packed weights and their absmax reach shared memory through the copy engine, in a ring of stages
// that a producer warp keeps full, so the bytes in flight no longer depend on registers or on the
// consumers' progress.
//
// Why: the register-fed kernel can only have U units per warp in flight, and issues them in bursts
// between compute phases; on an H200 it moved 1.2 TB/s at M = 1 (27% of the read ceiling), bound by
// latency at low occupancy. Here an SM has S stages (up to ~190 KB) in flight whatever the
// consumers are doing. A first version with 1024-value stages (48 copies of 4–512 bytes per 10 KB
// stage) ran at half the register kernel's speed: the copy engine wants few, large copies.
//
// Layout of the work
// - A stage is 16 rows (one tile) × stage_k values of K (all of K up to 4096; StageLayout): per row
//   one bulk copy of stage_k / 2 packed bytes, to a row pitch padded by 32 bytes so the 4 rows a
//   half-warp reads with 8-byte loads hit distinct banks; the absmax of the 16 rows (codes with
//   double quantization, floats without) in one copy when a stage is whole rows, else one per row.
// - The nested absmax (double quantization: one float per 16384 values) has no alignment a bulk
//   copy could use; the consumers load it from global memory one stage ahead.
// - One producer warp (warp 16): for stage s it waits until slot s % S is empty, posts the bytes to
//   expect on the slot's full barrier, and starts the copies.
// - 16 consumer warps: warp w takes units w, w + 16, ... (64 values each) of every stage, so a
//   tile's units are spread over all of them. Per unit it loads its x slice (global, L1-resident
//   for small M), reads its fragments, and computes; after its last read it releases the slot.
// - At the end of each tile the consumers leave their partial sums in shared memory, meet at a named
//   barrier (the producer runs on), add the 16 partials in warp order (deterministic) and store y.
// - Grid: one persistent block per SM, each owning a contiguous range of tiles.
//
// Takes: sm_90, blocksize 64, K % 1024 == 0 (and K ≤ 4096 or a multiple of 1024 dividing by one of
// 4096 / 2048 / 1024: every multiple of 1024), N % 16 == 0, M ≤ 64, nested blocksize 256: the shapes
// of Llama's projections but down_proj of a 11008-wide MLP, which gemv4bit.cuh's kernel serves.
#include <cuda_bf16.h>

#include <cstdint>

#include "qlora/cuda/async_copy.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/gemv4bit_common.cuh"

namespace qlora {
namespace cuda {
namespace detail {

constexpr int kStreamConsumers = 16;                         // warps
constexpr int kStreamThreads = (kStreamConsumers + 1) * 32;  // + the producer warp
constexpr int kStreamMaxStages = 16;
constexpr int kStreamMaxUnits = 4;  // units per consumer warp per stage (stage_k ≤ 4096)
constexpr int kStreamFixedBytes = kLutBytes + 256 * sizeof(float) + 2 * kStreamMaxStages * sizeof(std::uint64_t);

// A stage's layout for stage_k values of K per row: 16 rows of stage_k / 2 packed bytes at a pitch
// of stage_k / 2 + 32 (so the 4 rows a half-warp reads with 8-byte loads hit distinct banks), then
// 16 rows of absmax at a pitch of stage_k / 64 codes (double quantization) or floats.
struct StageLayout {
  int k, row_pitch, am_off, am_pitch, bytes;
  __host__ __device__ StageLayout(int stage_k, bool dq)
      : k(stage_k),
        row_pitch(stage_k / 2 + 32),
        am_off(16 * (stage_k / 2 + 32)),
        am_pitch(dq ? stage_k / 64 : stage_k / 16),
        bytes((16 * (stage_k / 2 + 32) + 16 * (dq ? stage_k / 64 : stage_k / 16) + 127) / 128 * 128) {}
};

// Values of K per stage: all of K up to 4096 (the absmax of a stage then arrives in one copy), else
// the largest of 4096, 2048, 1024 that divides it.
inline int stream_stage_k(std::int64_t K) {
  if (K <= 4096) return int(K);
  for (int k : {4096, 2048, 1024})
    if (K % k == 0) return k;
  return 0;
}

inline std::size_t stream_slot_bytes(int nt) { return std::size_t(kStreamConsumers) * 16 * 8 * nt * sizeof(float); }

// As many stages as fit in the opt-in shared memory beside the table and the partials.
inline int stream_stages(const Context& ctx, int nt, const StageLayout& L) {
  const long room = long(ctx.props().sharedMemPerBlockOptin) - kStreamFixedBytes - long(stream_slot_bytes(nt));
  return int(std::min<long>(kStreamMaxStages, room / L.bytes));
}

template <int NT, bool DQ>
__global__ void __launch_bounds__(kStreamThreads, 1) gemv4_stream_kernel(const GemvArgs a, const int S) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kCols = 8 * NT, kConsumerThreads = kStreamConsumers * 32;
  extern __shared__ __align__(128) unsigned char stream_smem[];
  unsigned char* smem = stream_smem;
  unsigned char* s_lut = smem;
  float* s_map = reinterpret_cast<float*>(smem + kLutBytes);
  std::uint64_t* s_full = reinterpret_cast<std::uint64_t*>(smem + kLutBytes + 1024);
  std::uint64_t* s_empty = s_full + kStreamMaxStages;
  unsigned char* s_stage = smem + kStreamFixedBytes;
  const StageLayout L(a.stage_k, DQ);
  float* s_slot = reinterpret_cast<float*>(s_stage + std::size_t(S) * L.bytes);  // (warp, row 16, token 8·NT)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) {
    for (int i = 0; i < S; ++i) {
      mbar_init(&s_full[i], 1);  // the producer's arrive, + the bytes
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
  const int KS = a.K / L.k;  // stages per tile
  const int stages = (tile_end - tile_begin) * KS;
  const std::size_t K = std::size_t(a.K);
  const int am_bytes = 16 * L.am_pitch;  // a stage's absmax bytes

  if (warp == kStreamConsumers) {  // the producer
    for (int s = 0; s < stages; ++s) {
      const int slot = s % S;
      if (lane == 0) mbar_wait(&s_empty[slot], ((s / S) & 1) ^ 1);
      __syncwarp();
      unsigned char* st = s_stage + std::size_t(slot) * L.bytes;
      const std::size_t row0 = std::size_t(tile_begin + s / KS) * 16;
      const std::size_t e = (row0 + (lane & 15)) * K + std::size_t(s % KS) * L.k;  // lane's row piece
      if (lane == 0) mbar_arrive_expect_tx(&s_full[slot], 16u * (L.k / 2) + am_bytes);
      __syncwarp();
      if (lane < 16) bulk_copy_g2s(st + lane * L.row_pitch, a.packed + e / 2, L.k / 2, &s_full[slot]);
      const void* am = DQ ? static_cast<const void*>(a.am.qabsmax + (e >> 6))
                          : static_cast<const void*>(a.am.absmax + (e >> 6));
      if (KS == 1) {  // the 16 rows are whole: their absmax is contiguous
        if (lane == 0) bulk_copy_g2s(st + L.am_off, am, am_bytes, &s_full[slot]);
      } else if (lane < 16) {
        bulk_copy_g2s(st + L.am_off + lane * L.am_pitch, am, L.am_pitch, &s_full[slot]);
      }
    }
    return;  // the consumers never meet the producer again (named barrier 1 is theirs)
  }

  const int g = lane >> 2, t = lane & 3;
  const int units = L.k / 64;  // per stage; warp w takes w, w + 16, ...
  const std::uint32_t lane4 = std::uint32_t(lane) * 4;
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  // The nested absmax of rows g, g + 8 for each of this warp's units of stage s, loaded from global
  // memory one stage ahead (tiny, and mostly L2 hits; no alignment a bulk copy could use).
  float nest[kStreamMaxUnits][2], nest_next[kStreamMaxUnits][2];
  auto load_nested = [&](int s, float (&n)[kStreamMaxUnits][2]) {
    if (!DQ || s >= stages) return;
    const std::size_t r0 = std::size_t(tile_begin + s / KS) * 16 + g;
    const std::size_t k0 = std::size_t(s % KS) * L.k + 64 * warp;
#pragma unroll
    for (int i = 0; i < kStreamMaxUnits; ++i)
      if (warp + 16 * i < units) {
        n[i][0] = __ldg(a.am.absmax2 + ((r0 * K + k0 + 1024 * i) >> (6 + a.am.nested_shift)));
        n[i][1] = __ldg(a.am.absmax2 + (((r0 + 8) * K + k0 + 1024 * i) >> (6 + a.am.nested_shift)));
      }
  };
  load_nested(0, nest_next);

  for (int s = 0; s < stages; ++s) {
    const int slot = s % S, ks = s % KS;
    if (DQ) {
#pragma unroll
      for (int i = 0; i < kStreamMaxUnits; ++i) nest[i][0] = nest_next[i][0], nest[i][1] = nest_next[i][1];
      load_nested(s + 1, nest_next);
    }
    const unsigned char* st = s_stage + std::size_t(slot) * L.bytes;
    mbar_wait(&s_full[slot], (s / S) & 1);
#pragma unroll
    for (int i = 0; i < kStreamMaxUnits; ++i) {
      const int u = warp + 16 * i;
      if (u >= units) break;  // uniform over the warp
      uint4 xa[NT], xb[NT];
      load_x<NT>(a.x + std::size_t(g) * K + std::size_t(ks) * L.k + 64 * u + 16 * t, K, g, a.M, xa, xb);
      const uint2 wa = *reinterpret_cast<const uint2*>(st + g * L.row_pitch + 32 * u + 8 * t);
      const uint2 wb = *reinterpret_cast<const uint2*>(st + (g + 8) * L.row_pitch + 32 * u + 8 * t);
      float am0, am1;
      if (DQ) {
        const unsigned char* c = st + L.am_off;
        am0 = __fadd_rn(__fmul_rn(s_map[c[g * L.am_pitch + u]], nest[i][0]), a.am.offset);
        am1 = __fadd_rn(__fmul_rn(s_map[c[(g + 8) * L.am_pitch + u]], nest[i][1]), a.am.offset);
      } else {
        am0 = reinterpret_cast<const float*>(st + L.am_off + g * L.am_pitch)[u];
        am1 = reinterpret_cast<const float*>(st + L.am_off + (g + 8) * L.am_pitch)[u];
      }
      if (u + 16 >= units) {                         // this warp's last read of the stage:
        __syncwarp();                                // every lane has its fragments ...
        if (lane == 0) mbar_arrive(&s_empty[slot]);  // ... so the slot may be refilled
      }
      float tmp[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) tmp[j][0] = tmp[j][1] = tmp[j][2] = tmp[j][3] = 0.0f;
      mma_unit<NT>(s_lut, lane4, wa, wb, xa, xb, tmp);
      scale_add<NT>(acc, tmp, am0, am1);
    }

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
  (void)S;
  __trap();  // launched only on sm_90 (gemv_4bit checks the device)
#endif
}

// Whether the streaming kernel takes this product (gemv_4bit_supported must hold too).
inline bool gemv_stream_supported(const Context& ctx, int blocksize, bool double_quant, int nested_blocksize,
                                  std::int64_t K) {
  return ctx.props().major >= 9 && blocksize == 64 && K % 1024 == 0 && stream_stage_k(K) > 0 &&
         (!double_quant || nested_blocksize == 256);
}

template <int NT, bool DQ>
void launch_gemv4_stream(const Context& ctx, GemvArgs args, int stage_k) {
  const auto kernel = gemv4_stream_kernel<NT, DQ>;
  args.stage_k = stage_k > 0 ? stage_k : stream_stage_k(args.K);
  QLORA_CHECK(args.stage_k % 1024 == 0 && args.stage_k <= kStreamMaxUnits * 1024 && args.K % args.stage_k == 0,
              "cuda::gemv_4bit: stage of ", args.stage_k, " values for K = ", args.K,
              " (expected a multiple of 1024, at most 4096, dividing K)");
  const StageLayout L(args.stage_k, DQ);
  const int S = stream_stages(ctx, NT, L);
  QLORA_CHECK(S >= 2, "cuda::gemv_4bit: ", S, " stages of ", L.bytes, " bytes fit in shared memory, expected >= 2");
  const std::size_t smem = kStreamFixedBytes + std::size_t(S) * L.bytes + stream_slot_bytes(NT);
  QLORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int grid = std::min(args.tiles, ctx.sm_count());
  kernel<<<grid, kStreamThreads, smem, ctx.stream()>>>(args, S);
  QLORA_CUDA_CHECK_LAUNCH("gemv4_stream_kernel");
}

template <int NT>
void dispatch_gemv4_stream(const Context& ctx, const GemvArgs& args, bool dq, int stage_k) {
  if (dq)
    launch_gemv4_stream<NT, true>(ctx, args, stage_k);
  else
    launch_gemv4_stream<NT, false>(ctx, args, stage_k);
}

}  // namespace detail
}  // namespace cuda
}  // namespace qlora
