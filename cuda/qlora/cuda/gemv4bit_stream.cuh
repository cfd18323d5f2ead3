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
// - A stage is 16 rows (one tile) × stage_k values of K (4096, 2048 or 1024; StageLayout): per row
//   one bulk copy of stage_k / 2 packed bytes, to a row pitch padded by 32 bytes so the 4 rows a
//   half-warp reads with 8-byte loads hit distinct banks; the absmax of the 16 rows (codes with
//   double quantization, floats without) in one copy when a stage is whole rows, else one per row.
// - The nested absmax (double quantization: one float per 16384 values) has no alignment a bulk
//   copy could use; a stage's row piece lies in one nested block, so the consumers load one value
//   per row per stage from global memory, a stage ahead.
// - One producer warp (warp 16): for stage s it waits until slot s % S is empty, posts the bytes to
//   expect on the slot's full barrier, and starts the copies.
// - 16 consumer warps: warp w takes units w, w + 16, ... (64 values each) of every stage, so a
//   tile's units are spread over all of them. Per unit it loads its x slice (global, L1-resident
//   for small M), reads its fragments, and computes; after its last read it releases the slot.
// - At the end of each tile the consumers leave their partial sums in shared memory, meet at a named
//   barrier (the producer runs on), add the 16 partials in warp order (deterministic) and store y.
// - Grid: one persistent block per SM, each owning a contiguous range of tiles.
//
// Takes: sm_90, blocksize 64, K % 1024 == 0, N % 16 == 0, M ≤ 64, nested blocksize 256: the shapes
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
constexpr int kStreamFixedBytes =
    kLutBytes + 256 * sizeof(float) + 2 * kStreamMaxStages * sizeof(std::uint64_t);

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

// Values of K per stage: the largest of 4096, 2048, 1024 that divides K. A stage's row piece then
// starts at a multiple of its length, which divides the 16384 values of a nested absmax block, so
// it lies in one nested block; and with stage_k == K the absmax of a stage arrives in one copy.
inline int stream_stage_k(std::int64_t K) {
  for (int k : {4096, 2048, 1024})
    if (K % k == 0) return k;
  return 0;
}

inline std::size_t stream_slot_bytes(int nt) {
  return std::size_t(kStreamConsumers) * 16 * 8 * nt * sizeof(float);
}

// As many stages as fit in the opt-in shared memory beside the table and the partials.
inline int stream_stages(const Context& ctx, int nt, const StageLayout& L) {
  const long room =
      long(ctx.props().sharedMemPerBlockOptin) - kStreamFixedBytes - long(stream_slot_bytes(nt));
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
  fill_tables<DQ>(s_lut, s_map, a, tid, kStreamThreads);
  __syncthreads();

  const int tile_begin = split_point(blockIdx.x, a.tiles, gridDim.x);
  const int tile_end = split_point(blockIdx.x + 1, a.tiles, gridDim.x);
  const int KS = a.K / L.k;  // stages per tile
  const int stages = (tile_end - tile_begin) * KS;
  const std::size_t K = std::size_t(a.K);
  const int am_bytes = 16 * L.am_pitch;  // a stage's absmax bytes

  // Every index below advances by additions, stage by stage: the first version computed them from
  // s with divisions and 64-bit products, ~175 instructions per unit, most of them IMAD.
  if (warp == kStreamConsumers) {  // the producer
    const int r = lane & 15;
    const std::uint8_t* pw = a.packed + (std::size_t(tile_begin) * 16 + r) * K / 2;  // row r, stage 0
    const std::uint8_t* pc = DQ ? a.am.qabsmax + (std::size_t(tile_begin) * 16 + r) * K / 64 : nullptr;
    const float* pf = DQ ? nullptr : a.am.absmax + (std::size_t(tile_begin) * 16 + r) * K / 64;
    const std::size_t tile_step_w = 15 * K / 2, tile_step_am = 15 * K / 64;  // to row r of the next tile
    const std::uint32_t bytes = 16u * (L.k / 2) + am_bytes;
    int slot = 0, ks = 0;
    std::uint32_t parity = 1;  // a fresh barrier's previous phase counts as complete
    for (int s = 0; s < stages; ++s) {
      if (lane == 0) mbar_wait(&s_empty[slot], parity);
      __syncwarp();
      unsigned char* st = s_stage + std::size_t(slot) * L.bytes;
      if (lane == 0) mbar_arrive_expect_tx(&s_full[slot], bytes);
      __syncwarp();
      if (lane < 16) bulk_copy_g2s(st + r * L.row_pitch, pw, L.k / 2, &s_full[slot]);
      const void* am = DQ ? static_cast<const void*>(pc) : static_cast<const void*>(pf);
      if (KS == 1) {  // the 16 rows are whole: their absmax is contiguous
        if (lane == 0) bulk_copy_g2s(st + L.am_off, am, am_bytes, &s_full[slot]);
      } else if (lane < 16) {
        bulk_copy_g2s(st + L.am_off + r * L.am_pitch, am, L.am_pitch, &s_full[slot]);
      }
      pw += L.k / 2;
      if (DQ)
        pc += L.k / 64;
      else
        pf += L.k / 64;
      if (++ks == KS) {
        ks = 0;
        pw += tile_step_w;
        if (DQ)
          pc += tile_step_am;
        else
          pf += tile_step_am;
      }
      if (++slot == S) slot = 0, parity ^= 1;
    }
    return;  // the consumers never meet the producer again (named barrier 1 is theirs)
  }

  const int g = lane >> 2, t = lane & 3;
  const int upw = L.k / 1024;  // units per warp per stage (1..4): warp w takes units w, w + 16, ...
  const std::uint32_t lane4 = std::uint32_t(lane) * 4;
  const int w_off = g * L.row_pitch + 32 * warp + 8 * t;                 // (row g, unit w, lane's 8 bytes)
  const int w_off8 = w_off + 8 * L.row_pitch;                            // row g + 8
  const int c_off = L.am_off + g * L.am_pitch + (DQ ? warp : 4 * warp);  // byte of (row g, unit w)
  const int c_off8 = c_off + 8 * L.am_pitch;
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  // x of token g at this stage's first value for unit w; the nested absmax of rows g, g + 8 (a
  // stage's row piece lies in one nested block: stage_k divides 16384 and K), one stage ahead.
  const __nv_bfloat16* px = a.x + std::size_t(g) * K + 64 * warp + 16 * t;
  std::size_t e_g = (std::size_t(tile_begin) * 16 + g) * K;  // element index of (row g, stage start)
  const int nshift = 6 + a.am.nested_shift;
  float n0 = 0.0f, n1 = 0.0f, n0_next = 0.0f, n1_next = 0.0f;
  if (DQ && stages > 0) {
    n0_next = __ldg(a.am.absmax2 + (e_g >> nshift));
    n1_next = __ldg(a.am.absmax2 + ((e_g + 8 * K) >> nshift));
  }
  int slot = 0, ks = 0;
  std::uint32_t parity = 0;
  std::size_t row0 = std::size_t(tile_begin) * 16;
  const unsigned char* st = s_stage;
  for (int s = 0; s < stages; ++s) {
    // advance the element index to the next stage (and tile) and prefetch its nested absmax
    const std::size_t e_next = ks + 1 == KS ? e_g + L.k + 15 * K : e_g + L.k;
    if (DQ) {
      n0 = n0_next, n1 = n1_next;
      if (s + 1 < stages) {
        n0_next = __ldg(a.am.absmax2 + (e_next >> nshift));
        n1_next = __ldg(a.am.absmax2 + ((e_next + 8 * K) >> nshift));
      }
    }
    // this warp's x slices, then its fragments of every unit it owns (the loads first, so the
    // units' tensor-core chains can overlap)
    // (x of every unit up front for one token tile; with more, loaded per unit to spare registers)
    constexpr int kPre = NT == 1 ? kStreamMaxUnits : 1;
    uint4 xa[kPre][NT], xb[kPre][NT];
    if (NT == 1) {
#pragma unroll
      for (int i = 0; i < kPre; ++i)
        if (i < upw) load_x<NT>(px + 1024 * i, K, g, a.M, xa[i], xb[i]);
    }
    mbar_wait(&s_full[slot], parity);
    uint2 wa[kStreamMaxUnits], wb[kStreamMaxUnits];
    float am0[kStreamMaxUnits], am1[kStreamMaxUnits];
#pragma unroll
    for (int i = 0; i < kStreamMaxUnits; ++i)
      if (i < upw) {
        wa[i] = *reinterpret_cast<const uint2*>(st + w_off + 512 * i);
        wb[i] = *reinterpret_cast<const uint2*>(st + w_off8 + 512 * i);
        if (DQ) {
          am0[i] = nested_absmax(s_map[st[c_off + 16 * i]], n0, a.am.offset);
          am1[i] = nested_absmax(s_map[st[c_off8 + 16 * i]], n1, a.am.offset);
        } else {
          am0[i] = *reinterpret_cast<const float*>(st + c_off + 64 * i);
          am1[i] = *reinterpret_cast<const float*>(st + c_off8 + 64 * i);
        }
      }
    __syncwarp();                                // every lane has its fragments ...
    if (lane == 0) mbar_arrive(&s_empty[slot]);  // ... so the slot may be refilled
#pragma unroll
    for (int i = 0; i < kStreamMaxUnits; ++i)
      if (i < upw) {
        const int ix = NT == 1 ? i : 0;
        if (NT != 1) load_x<NT>(px + 1024 * i, K, g, a.M, xa[ix], xb[ix]);
        float tmp[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) tmp[j][0] = tmp[j][1] = tmp[j][2] = tmp[j][3] = 0.0f;
        mma_unit<NT>(PlainLut{s_lut, lane4}, wa[i], wb[i], xa[ix], xb[ix], tmp);
        scale_add<NT>(acc, tmp, am0[i], am1[i]);
      }

    px += L.k;
    if (++slot == S)
      slot = 0, parity ^= 1, st = s_stage;
    else
      st += L.bytes;
    e_g = e_next;
    if (++ks == KS) {  // the tile is done: add the 16 warps' partials and store its 16 rows
      ks = 0;
      px -= K;
      store_partials<NT>(s_slot + std::size_t(warp) * 16 * kCols, acc, g, t);
      named_barrier(1, kConsumerThreads);
      for (int idx = tid; idx < 16 * a.M; idx += kConsumerThreads) {
        const int tok = idx >> 4, rr = idx & 15;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kStreamConsumers; ++w) sum += s_slot[(w * 16 + rr) * kCols + tok];
        const std::size_t o = std::size_t(tok) * a.N + row0 + rr;
        a.y[o] = __float2bfloat16_rn(a.accumulate ? __bfloat162float(a.y[o]) + sum : sum);
      }
      named_barrier(1, kConsumerThreads);  // the slots are read before the next tile overwrites them
      row0 += 16;
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
  QLORA_CHECK(
      (args.stage_k == 1024 || args.stage_k == 2048 || args.stage_k == 4096) && args.K % args.stage_k == 0,
      "cuda::gemv_4bit: stage of ", args.stage_k, " values for K = ", args.K,
      " (expected 1024, 2048 or 4096, dividing K)");
  const StageLayout L(args.stage_k, DQ);
  const int S = stream_stages(ctx, NT, L);
  QLORA_CHECK(S >= 2, "cuda::gemv_4bit: ", S, " stages of ", L.bytes,
              " bytes fit in shared memory, expected >= 2");
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
