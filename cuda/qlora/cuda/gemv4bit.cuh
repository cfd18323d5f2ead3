#pragma once
// y = x · Wᵀ for a 4-bit W (N×K, NF4 / FP4, plain or double-quantized absmax) and few tokens
// (M ≤ 64), on the tensor cores, reading the packed weights and the absmax bytes once.
//
// Layout of the work
// - mma.m16n8k16 (bf16 in, fp32 accumulate) with W as the A operand (16 rows) and x as the B
//   operand (8 tokens per mma; M ≤ 8 is one mma column tile, M ≤ 64 up to 8 of them, NT).
// - A "unit" is 16 rows × 64 values of K (32 bytes per row, always inside one absmax block since
//   blocks hold ≥ 64 values). Lane (g = lane / 4, t = lane % 4) loads 8 bytes of row g and 8 of row
//   g + 8 at byte 8t of the unit: a warp's load covers 16 rows × 32 bytes, every sector used in full.
//   With the Tiles layout (quantized4bit.cuh) the same 16 bytes are one slice at byte 16·lane of the
//   unit's 512 contiguous bytes: one 16-byte load, and a warp reads 512 contiguous bytes. Same
//   values, same order of arithmetic: the two layouts give bit-identical y. Tiles measured 15-20%
//   faster at M ≤ 16 (docs/performance.md); the load-only probe read 16 rows × 32 bytes per warp
//   load at 2.5 TB/s, 512 contiguous bytes at 3.0.
// - The mma's k index is a permutation of the real k (a dot product does not care): lane t's byte
//   2s feeds fragment register a0 and byte 2s + 1 feeds a2 of mma s (s = 0..3), so the matching x
//   values are 4 consecutive bf16 at k = 16t + 4s: a lane reads its x for the unit as two 16-byte
//   loads, in memory order.
// - Codes -> bf16 pairs through a 256-entry table indexed by the packed byte (two values per
//   lookup), replicated once per lane (entry e of lane l at byte 256e + 4l) so that a warp's 32
//   lookups always fall in 32 different banks; the byte offset is one byte-permute of the packed
//   word and the lane's offset. Up to 16 tokens the table sits at a 64 KB boundary of the shared
//   window, so that byte permute yields the lookup's whole address (AlignedLut,
//   gemv4bit_common.cuh): one add fewer per lookup, as the compiler otherwise adds the table's
//   address in a register of its own. The 16 code values are therefore rounded to bf16
//   (an NF4 value moves by ≤ 2⁻⁹ relative); absmax is applied in fp32 to each unit's four mma
//   results, so it is never rounded: accuracy is that of dequantizing to bf16 and a bf16 GEMM
//   (tests/cuda/test_cuda_matmul.cu checks the bound).
// - Streaming: a warp issues the loads of U units (weights, absmax codes, nested absmax, its x
//   slices) before it computes the first of them; its position advances by pointer increments.
//   (A cp.async ring through shared memory measured slower here: more instructions per unit.)
// - Work split: persistent blocks, at most as many as fit at once (one per SM here), as few as take the
//   tiles in as many steps as a full grid (launch_persistent); block b owns a contiguous range of
//   16-row tiles; its (tile, unit) pairs are cut into W contiguous equal ranges, one per warp.
//   A warp stores the tiles it holds whole itself, and leaves its partial sums of the first and
//   last tile it shares in shared memory (two slots); after the block's barrier those are added in
//   warp order (deterministic) and written as bf16.
#include <cuda_bf16.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "qlora/cuda/async_copy.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/dequantize4bit.cuh"
#include "qlora/cuda/gemv4bit_common.cuh"
#include "qlora/cuda/gemv4bit_stream.cuh"
#include "qlora/cuda/quantized4bit.cuh"

namespace qlora {
namespace cuda {
namespace detail {

constexpr int kGemvWarps = 16;
constexpr int kGemvThreads = kGemvWarps * 32;

// The register-fed kernels' shared memory: the lane copies of the pair table, and the rest: the
// absmax code map, the partial-sum slots (warp, segment 2, row 16, token 8·nt) and each warp's
// first tile.
__host__ __device__ constexpr std::size_t gemv_rest_bytes(int nt) {
  return 256 * sizeof(float) + std::size_t(kGemvWarps) * 2 * 16 * 8 * nt * sizeof(float) +
         kGemvWarps * sizeof(int);
}

// Whether the kernels for nt token tiles keep the table 64 KB-aligned (AlignedLut): the rest comes
// first and the table at the next 64 KB boundary of the shared window (127 KB a block up to nt = 2).
// Measured on an H100 (docs/performance.md): 1-3% faster up to 16 tokens at 11008 and 14336 rows; at
// nt = 4 (M = 17-32) the 191 KB block was 2.5% slower at 14336x4096 and 1-2% faster at 4096 and
// 11008 rows (less room is left for L1, which holds x): no clear gain for 64 KB more a block.
constexpr bool gemv_aligned_lut(int nt) { return nt <= 2; }

// Dynamic shared memory of a block. `reserved`: the shared memory the system keeps at the start of
// each block's window (cudaDeviceProp::reservedSharedMemPerBlock, 1 KB on sm_80 and sm_90); the
// dynamic allocation starts after it, so the table's 64 KB boundary is found from there.
inline std::size_t gemv_smem_bytes(int nt, bool aligned, std::size_t reserved) {
  if (!aligned) return std::size_t(kLutBytes) + gemv_rest_bytes(nt);
  const std::size_t table = (reserved + gemv_rest_bytes(nt) + 0xffff) & ~std::size_t(0xffff);
  return table - reserved + kLutBytes;
}

// The register-fed kernels' pointers into their dynamic shared memory, and the lookups of the table.
template <int NT, bool AL>
struct GemvSmem {
  unsigned char* s_lut;
  float* s_map;
  float* s_slot;  // (warp, segment, row 16, token 8·NT)
  int* s_first;   // (warp)
  std::uint32_t lut_addr = 0;

  __device__ explicit GemvSmem(unsigned char* smem) {
    unsigned char* rest = smem + kLutBytes;
    s_lut = smem;
    if (AL) {
      const std::uint32_t base = std::uint32_t(__cvta_generic_to_shared(smem));
      lut_addr = (base + std::uint32_t(gemv_rest_bytes(NT)) + 0xffffu) & ~0xffffu;
      s_lut = smem + (lut_addr - base);
      rest = smem;
      // gemv_smem_bytes sized the allocation for this placement from the reserved size the device
      // reports; a window laid out otherwise would put the table past it.
      std::uint32_t dyn;
      asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
      if (lut_addr + kLutBytes > base + dyn) __trap();
    }
    s_map = reinterpret_cast<float*>(rest);
    s_slot = s_map + 256;
    s_first = reinterpret_cast<int*>(s_slot + kGemvWarps * 2 * 16 * 8 * NT);
  }
  __device__ auto lut(int lane) const {
    if constexpr (AL)
      return AlignedLut{lut_addr + std::uint32_t(lane) * 4};
    else
      return PlainLut{s_lut, std::uint32_t(lane) * 4};
  }
};

// acc (mma C layout, tile `tile` of the matrix) stored into y (or added, with a.accumulate): the
// warp owned every unit of the tile, so no other warp has a partial for it.
template <int NT>
__device__ __forceinline__ void store_tile(const GemvArgs& a, float (&acc)[NT][4], int tile, int g, int t) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int tok = 8 * j + 2 * t + (e & 1), row = tile * 16 + g + (e >= 2 ? 8 : 0);
      if (tok < a.M) {
        const std::size_t o = std::size_t(tok) * a.N + row;
        a.y[o] = __float2bfloat16_rn(a.accumulate ? __bfloat162float(a.y[o]) + acc[j][e] : acc[j][e]);
      }
      acc[j][e] = 0.0f;
    }
  }
}

// After the block's barrier: for each tile of [tile_begin, tile_end) that no single warp owned,
// the partials of the warps that touched it (slot 0 where it was a warp's first tile, else slot 1),
// added in warp order (deterministic) and stored. Warp w's work is [w·work/W, (w+1)·work/W) in
// steps of which `per_tile` make a tile; s_first[w] is its first block-local tile, −1 if it has no
// work. Each sum visits only the tile's warps, from the one holding its first step to the one
// holding its last (found by one division each). (It visited all W warps, with two products each:
// ~1.7 M of the 11.7 M warp instructions at 14336x4096, M = 16, run after the loads are done; and
// it recomputed each warp's first tile with a division per warp visited, which s_first replaced.)
template <int NT>
__device__ __forceinline__ void reduce_partials(const GemvArgs& a, const float* s_slot, const int* s_first,
                                                int tile_begin, int tile_end, int work, int per_tile,
                                                int tid) {
  constexpr int kCols = 8 * NT;
  // The last warp starting at or before step u, floor((W·(u + 1) − 1) / work): an empty warp starts
  // where the next one does, so this is the warp holding u. 32-bit where it fits (cheap), else 64.
  const bool narrow = work < (1 << 27);
  auto holder = [&](std::int64_t u) {
    return narrow ? int((std::uint32_t(kGemvWarps) * std::uint32_t(u + 1) - 1u) / std::uint32_t(work))
                  : int((kGemvWarps * (u + 1) - 1) / work);
  };
  const int rows_b = (tile_end - tile_begin) * 16;
  for (int idx = tid; idx < rows_b * a.M; idx += kGemvThreads) {
    const int tok = idx / rows_b, rl = idx - tok * rows_b, t_l = rl >> 4, r = rl & 15;
    const std::int64_t u0 = std::int64_t(t_l) * per_tile;
    const int w0 = holder(u0), w1 = holder(u0 + per_tile - 1);
    if (w0 == w1) continue;  // one warp held the whole tile and stored it
    float sum = 0.0f;
    for (int w = w0; w <= w1; ++w) {
      const int first = s_first[w];
      if (first < 0) continue;  // an empty warp
      sum += s_slot[(std::size_t(w * 2 + (first == t_l ? 0 : 1)) * 16 + r) * kCols + tok];
    }
    const std::size_t o = std::size_t(tok) * a.N + std::size_t(tile_begin) * 16 + rl;
    a.y[o] = __float2bfloat16_rn(a.accumulate ? __bfloat162float(a.y[o]) + sum : sum);
  }
}

// NT: token tiles of 8 (M ≤ 8·NT); U: units whose loads are issued before the first is used;
// MINB: blocks per SM the register budget is set for.
// TL: the packed bytes are in the Tiles layout.
template <int NT, int U, int MINB, bool DQ, bool TL, bool AL>
__global__ void __launch_bounds__(kGemvThreads, MINB) gemv4_kernel(const GemvArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const GemvSmem<NT, AL> sm(smem);
  unsigned char* s_lut = sm.s_lut;
  float* s_map = sm.s_map;
  float* s_slot = sm.s_slot;
  int* s_first = sm.s_first;
  constexpr int kCols = 8 * NT;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  pdl_launch_dependents();
  fill_tables<DQ>(s_lut, s_map, a, tid, kGemvThreads);
  pdl_wait();  // every load of x, W and absmax, and every store, come after
  __syncthreads();

  const int tile_begin = split_point(blockIdx.x, a.tiles, gridDim.x);
  const int tile_end = split_point(blockIdx.x + 1, a.tiles, gridDim.x);
  const int KC = a.K / 64;  // units per tile
  const int units = (tile_end - tile_begin) * KC;
  const int ub = split_point(warp, units, kGemvWarps), ue = split_point(warp + 1, units, kGemvWarps);
  const int g = lane >> 2, t = lane & 3;
  const auto lut = sm.lut(lane);
  const std::size_t row_bytes = std::size_t(a.K) / 2, K = std::size_t(a.K);
  const int shift = a.block_shift;

  // The warp's position: unit (tile, kc), as pointers advanced unit by unit.
  int tile = KC > 0 ? ub / KC : 0, kc = KC > 0 ? ub % KC : 0;
  const std::uint8_t* pw = nullptr;  // row g of the tile, this unit, lane's 8 bytes (TL: lane's slice)
  std::size_t e0 = 0;                // element index of (row g, first k of the unit)
  const __nv_bfloat16* px = a.x + std::size_t(g) * K + 16 * t;  // token g, this unit, lane's 16 values
  auto seek = [&]() {
    const std::size_t r0 = std::size_t(tile_begin + tile) * 16 + g;
    pw = TL ? a.packed + (std::size_t(tile_begin + tile) * KC + kc) * 512 + 16 * lane
            : a.packed + r0 * row_bytes + std::size_t(kc) * 32 + t * 8;
    e0 = r0 * K + std::size_t(kc) * 64;
    px = a.x + std::size_t(g) * K + std::size_t(kc) * 64 + 16 * t;
  };
  seek();

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  int cur_tile = tile;

  // Ends the warp's work on block-local tile tl: a tile wholly inside the warp's range is stored
  // by the warp; the first and last (shared with neighbours) go to slots 0 and 1.
  auto finish_tile = [&](int tl) {
    if (ub <= tl * KC && (tl + 1) * KC <= ue)
      store_tile<NT>(a, acc, tile_begin + tl, g, t);
    else
      store_partials<NT>(s_slot + std::size_t(warp * 2 + (tl == ub / KC ? 0 : 1)) * 16 * kCols, acc, g, t);
  };

  for (int u0 = ub; u0 < ue; u0 += U) {
    uint2 wa[U], wb[U];
    std::uint32_t c0[U], c1[U];  // 8-bit absmax codes (DQ) or float absmax bits
    float n0[U], n1[U];          // nested absmax (DQ)
    uint4 xa[U][NT], xb[U][NT];
    int tl[U];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      tl[i] = tile;
      if (u0 + i < ue) {
        load_unit<TL>(pw, 8 * row_bytes, wa[i], wb[i]);
        const std::size_t b0 = e0 >> shift, b1 = (e0 + 8 * K) >> shift;
        if (DQ) {
          c0[i] = __ldg(a.am.qabsmax + b0);
          c1[i] = __ldg(a.am.qabsmax + b1);
          n0[i] = __ldg(a.am.absmax2 + (b0 >> a.am.nested_shift));
          n1[i] = __ldg(a.am.absmax2 + (b1 >> a.am.nested_shift));
        } else {
          c0[i] = __float_as_uint(__ldg(a.am.absmax + b0));
          c1[i] = __float_as_uint(__ldg(a.am.absmax + b1));
          n0[i] = n1[i] = 0.0f;
        }
        load_x<NT>(px, K, g, a.M, xa[i], xb[i]);
        if (++kc == KC) {
          kc = 0;
          ++tile;
          seek();
        } else {
          pw += TL ? 512 : 32;
          e0 += 64;
          px += 64;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (u0 + i >= ue) break;  // uniform over the warp
      if (tl[i] != cur_tile) {
        finish_tile(cur_tile);
        cur_tile = tl[i];
      }
      float am0, am1;
      if (DQ) {
        am0 = nested_absmax(s_map[c0[i]], n0[i], a.am.offset);
        am1 = nested_absmax(s_map[c1[i]], n1[i], a.am.offset);
      } else {
        am0 = __uint_as_float(c0[i]);
        am1 = __uint_as_float(c1[i]);
      }
      float tmp[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) tmp[j][0] = tmp[j][1] = tmp[j][2] = tmp[j][3] = 0.0f;
      mma_unit<NT>(lut, wa[i], wb[i], xa[i], xb[i], tmp);
      scale_add<NT>(acc, tmp, am0, am1);
    }
  }
  if (ub < ue) finish_tile(cur_tile);
  if (lane == 0) s_first[warp] = ub < ue ? ub / KC : -1;
  __syncthreads();
  reduce_partials<NT>(a, s_slot, s_first, tile_begin, tile_end, units, KC, tid);
}

// The register kernel's work in groups of 4 consecutive units of one tile (16 rows × 256 values of
// K), for blocksize 64 and K % 256 == 0: a group's 4 absmax codes of a row are one aligned 4-byte
// load (4 floats: one 16-byte load without double quantization) and its nested absmax one load, the
// 8 weight loads of a lane sit at fixed offsets from one pointer, and the position advances once
// per group. Why: the per-unit kernel above executes ~157 warp instructions per unit, about 3x the
// decode and mma work (32 table lookups and byte permutes, 4 mma); most of the rest was per-unit
// address and absmax arithmetic, which this layout does once per 4 units (measured: 8.9 M -> 6.6 M
// warp instructions at 14336x4096, M = 1).
//
//
// The first group's loads are issued before the table is filled (they arrive during the fill), and
// x is read at compute time (L1-resident), not with the weights: its registers are what limits a
// warp's loads in flight. Tried and dropped (docs/performance.md): two register sets with the next
// group's loads issued before this group is computed (H200, and again on the H100 with the current
// code: 15.0-15.3 against 14.3-14.6 µs at 14336x4096, M = 1; 128 registers, a spill); the same
// kernel fed through a ring of 3-4 group slots per warp that the copy engine fills (2 KB bulk
// copies, one transaction barrier per slot; H100: 17.4 against 14.3 µs at M = 1, 32.6 against 22.5
// at M = 16). More bytes in flight per warp did not help: at M = 1 this kernel takes 1.2x the time
// of a bare read-only kernel over the same packed bytes (12.0 µs at 14336x4096).
struct GroupLoads {
  uint2 wa[4], wb[4];
  std::uint32_t c0, c1;  // 4 absmax codes of rows g, g + 8 (DQ)
  float n0, n1;          // their nested absmax (DQ)
  float4 f0, f1;         // 4 float absmax of rows g, g + 8 (no DQ)
};

template <int NT, bool DQ, bool TL, bool AL>
__global__ void __launch_bounds__(kGemvThreads, 1) gemv4g_kernel(const GemvArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const GemvSmem<NT, AL> sm(smem);
  unsigned char* s_lut = sm.s_lut;
  float* s_map = sm.s_map;
  float* s_slot = sm.s_slot;
  int* s_first = sm.s_first;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile_begin = split_point(blockIdx.x, a.tiles, gridDim.x);
  const int tile_end = split_point(blockIdx.x + 1, a.tiles, gridDim.x);
  const int KC = a.K / 64, KG = a.K / 256;  // units and groups per tile
  const int groups = (tile_end - tile_begin) * KG;
  const int gb = split_point(warp, groups, kGemvWarps), ge = split_point(warp + 1, groups, kGemvWarps);
  const int g = lane >> 2, t = lane & 3;
  const auto lut = sm.lut(lane);
  const std::size_t K = std::size_t(a.K), row_bytes = K / 2, far = 8 * row_bytes;  // row g + 8
  const std::size_t far_blocks = std::size_t(8) * std::size_t(KC);

  // The position of the next group to load: (tile, kg), as pointers.
  int tile = KG > 0 ? gb / KG : 0, kg = KG > 0 ? gb % KG : 0;
  const std::uint8_t* pw = nullptr;   // row g, the group's first unit, the lane's 8 bytes (TL: slice)
  std::size_t b0 = 0;                 // absmax block of (row g, the group's first unit)
  const __nv_bfloat16* px = nullptr;  // token g, the group's first k, the lane's 16 values
  auto seek = [&]() {
    const std::size_t r0 = std::size_t(tile_begin + tile) * 16 + g;
    pw = TL ? a.packed + (std::size_t(tile_begin + tile) * KC + std::size_t(kg) * 4) * 512 + 16 * lane
            : a.packed + r0 * row_bytes + std::size_t(kg) * 128 + t * 8;
    b0 = r0 * std::size_t(KC) + std::size_t(kg) * 4;
    px = a.x + std::size_t(g) * K + std::size_t(kg) * 256 + 16 * t;
  };
  seek();
  auto issue = [&](GroupLoads& L) {
#pragma unroll
    for (int u = 0; u < 4; ++u) load_unit<TL>(pw + (TL ? 512 : 32) * u, far, L.wa[u], L.wb[u]);
    if (DQ) {
      L.c0 = __ldg(reinterpret_cast<const std::uint32_t*>(a.am.qabsmax + b0));
      L.c1 = __ldg(reinterpret_cast<const std::uint32_t*>(a.am.qabsmax + b0 + far_blocks));
      L.n0 = __ldg(a.am.absmax2 + (b0 >> a.am.nested_shift));
      L.n1 = __ldg(a.am.absmax2 + ((b0 + far_blocks) >> a.am.nested_shift));
    } else {
      L.f0 = __ldg(reinterpret_cast<const float4*>(a.am.absmax + b0));
      L.f1 = __ldg(reinterpret_cast<const float4*>(a.am.absmax + b0 + far_blocks));
    }
  };
  auto advance = [&]() {
    if (++kg == KG) {
      kg = 0;
      ++tile;
      seek();
    } else {
      pw += TL ? 2048 : 128;
      b0 += 4;
      px += 256;
    }
  };

  // The first group's loads fly while the table is filled; launched with PDL, they come after the
  // wait by default (early_kb = -1), and the table fill is what overlaps the kernel before.
  // early_kb >= 0 (lab) issues the first group's loads of W and its absmax before
  // griddepcontrol.wait. Only the wait promises that the kernels before have written memory, so
  // this needs W and its absmax left unwritten by every kernel of the stream's PDL chain since its
  // last full dependency (a non-PDL launch boundary, an event, a synchronization). This library's
  // own kernels keep that (only the GEMV kernels trigger early, and they write y alone), a user's
  // kernel that triggers early and writes W would not; x is read after the wait either way. Timed in
  // alternation with the default (fourteenth session): 0.3-2.3% faster in 6 of 9 cases, 0.5-3.5%
  // slower in 3, so not the default. early_kb > 0 (lab) also has each warp prefetch up to early_kb
  // KB of the rest of its range (and its tiles' absmax codes) into L2 before the wait (slower at
  // 14336x4096, faster at 4096x4096 M = 1 in the thirteenth session; 4 KB slower everywhere in the
  // fourteenth).
  GroupLoads L;
  pdl_launch_dependents();
  const bool early = !a.pdl || a.early_kb >= 0;
  if (early && gb < ge) issue(L);
  if (a.pdl && a.early_kb > 0 && TL && gb + 1 < ge) {
    const std::uint8_t* base = a.packed + (std::size_t(tile_begin) * KC + std::size_t(gb + 1) * 4) * 512;
    const std::uint32_t bytes =
        std::uint32_t(min(std::int64_t(ge - gb - 1) * 2048, std::int64_t(a.early_kb) * 1024));
    for (std::uint32_t o = std::uint32_t(lane) * 16384; o < bytes; o += 32 * 16384)
      bulk_prefetch_l2(base + o, min(16384u, bytes - o));
    if (DQ) {  // the absmax codes of the warp's tiles: 16 rows × KC bytes each, contiguous
      const std::uint8_t* cb = a.am.qabsmax + std::size_t(tile_begin + gb / KG) * 16 * KC;
      const int lead = int(reinterpret_cast<std::uintptr_t>(cb) & 127);  // from the first whole line
      const int cbytes = ((ge - 1) / KG - gb / KG + 1) * 16 * KC + lead;
      for (int o = lane * 128; o < cbytes; o += 32 * 128) prefetch_l2(cb - lead + o);
    }
  }
  fill_tables<DQ>(s_lut, s_map, a, tid, kGemvThreads);
  pdl_wait();  // every load of x and every store come after (and W's, unless early)
  if (!early && gb < ge) issue(L);
  __syncthreads();

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  auto finish_tile = [&](int tl) {
    if (gb <= tl * KG && (tl + 1) * KG <= ge)
      store_tile<NT>(a, acc, tile_begin + tl, g, t);
    else
      store_partials<NT>(s_slot + std::size_t(warp * 2 + (tl == gb / KG ? 0 : 1)) * 16 * 8 * NT, acc, g, t);
  };

  int cur_tile = tile;
  // Computes the group in L (tile tl, x at pxg), whose loads were issued before.
  auto compute = [&](int tl, const __nv_bfloat16* pxg) {
    if (tl != cur_tile) {
      finish_tile(cur_tile);
      cur_tile = tl;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      uint4 xa[NT], xb[NT];
      load_x<NT>(pxg + 64 * u, K, g, a.M, xa, xb);
      float am0, am1;
      if (DQ) {
        am0 = nested_absmax(s_map[(L.c0 >> (8 * u)) & 0xffu], L.n0, a.am.offset);
        am1 = nested_absmax(s_map[(L.c1 >> (8 * u)) & 0xffu], L.n1, a.am.offset);
      } else {
        am0 = u == 0 ? L.f0.x : u == 1 ? L.f0.y : u == 2 ? L.f0.z : L.f0.w;
        am1 = u == 0 ? L.f1.x : u == 1 ? L.f1.y : u == 2 ? L.f1.z : L.f1.w;
      }
      float tmp[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) tmp[j][0] = tmp[j][1] = tmp[j][2] = tmp[j][3] = 0.0f;
      mma_unit<NT>(lut, L.wa[u], L.wb[u], xa, xb, tmp);
      scale_add<NT>(acc, tmp, am0, am1);
    }
  };

  for (int gi = gb; gi < ge; ++gi) {
    const int tl = tile;
    const __nv_bfloat16* pxg = px;
    advance();
    compute(tl, pxg);
    if (gi + 1 < ge) issue(L);
  }
  if (gb < ge) finish_tile(cur_tile);
  if (lane == 0) s_first[warp] = gb < ge ? gb / KG : -1;
  __syncthreads();
  reduce_partials<NT>(a, s_slot, s_first, tile_begin, tile_end, groups, KG, tid);
}

// Persistent blocks (at most as many as fit at once; launch_persistent's choice below), each owning
// a contiguous range of tiles: the launch of both register-fed kernels.
template <class Kernel>
void launch_persistent(const Context& ctx, Kernel kernel, const GemvArgs& args, int nt, bool aligned,
                       const char* name) {
  const std::size_t smem = gemv_smem_bytes(nt, aligned, ctx.props().reservedSharedMemPerBlock);
  QLORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int per_sm = 0;
  QLORA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kGemvThreads, smem));
  QLORA_CHECK(per_sm > 0, "cuda::gemv_4bit: the kernel does not fit on an SM (", smem,
              " bytes of shared memory)");
  // The fewest blocks that keep the largest share of tiles a block gets on a full grid: 896 tiles
  // (14336 rows) on 132 SMs are 7 tiles on 128 blocks rather than 6 or 7 on 132. Measured on an H100
  // (docs/performance.md, thirteenth session): 14336x4096 M = 1 13.5 against 14.2-14.7 µs, 4096x4096
  // 7.05 against 7.7; as the default (fourteenth session, paired rows) the full grid took 2.5-14%
  // longer at every shape and token count measured, 96-120 blocks too (at 11008 rows, 120 and the
  // balanced 115 tie). The slowest block does 7 tiles either way; why fewer blocks end sooner was not
  // isolated (fewer of them share the bandwidth; the idle SMs start the next kernel's blocks early).
  // max_blocks (lab) > 0: exactly that many blocks where they fit, unbalanced (the full grid:
  // sm_count · blocks per SM).
  const int fit = std::min(args.tiles, ctx.sm_count() * per_sm);
  const int per_block = (args.tiles + fit - 1) / fit;
  const int grid =
      args.max_blocks > 0 ? std::min(fit, args.max_blocks) : (args.tiles + per_block - 1) / per_block;
  cudaError_t e = cudaSuccess;
  if (args.pdl) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(grid));
    cfg.blockDim = dim3(unsigned(kGemvThreads));
    cfg.dynamicSmemBytes = smem;
    cfg.stream = ctx.stream();
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    e = cudaLaunchKernelEx(&cfg, kernel, args);
  } else {
    kernel<<<grid, kGemvThreads, smem, ctx.stream()>>>(args);
  }
  if (e == cudaSuccess) e = cudaGetLastError();  // QLORA_CUDA_CHECK_LAUNCH with a run-time name
  if (e != cudaSuccess) throw_cuda(e, (std::string("launch of ") + name).c_str(), __FILE__, __LINE__);
}

// Calls launch(std::integral_constant<bool, DQ>, ..TL, ..AL) with the run-time flags as types. AL:
// the aligned table where asked for (args.aligned_lut), where NT takes it (gemv_aligned_lut) and
// where its block fits the device's shared memory.
template <int NT, class Launch>
void dispatch_flags(const Context& ctx, const GemvArgs& args, bool dq, bool tl, Launch launch) {
  using T = std::true_type;
  using F = std::false_type;
  auto al = [&](auto d, auto l) {
    if constexpr (gemv_aligned_lut(NT)) {
      if (args.aligned_lut && gemv_smem_bytes(NT, true, ctx.props().reservedSharedMemPerBlock) <=
                                  ctx.props().sharedMemPerBlockOptin)
        return launch(d, l, T{});
    }
    launch(d, l, F{});
  };
  if (dq)
    tl ? al(T{}, T{}) : al(T{}, F{});
  else
    tl ? al(F{}, T{}) : al(F{}, F{});
}

template <int NT>
void dispatch_gemv4g(const Context& ctx, const GemvArgs& args, bool dq, bool tl) {
  dispatch_flags<NT>(ctx, args, dq, tl, [&](auto d, auto l, auto al) {
    launch_persistent(ctx, gemv4g_kernel<NT, decltype(d)::value, decltype(l)::value, decltype(al)::value>,
                      args, NT, al.value, "gemv4g_kernel");
  });
}

template <int NT, int U, int MINB>
void dispatch_gemv4_dq(const Context& ctx, const GemvArgs& args, bool dq, bool tl) {
  dispatch_flags<NT>(ctx, args, dq, tl, [&](auto d, auto l, auto al) {
    launch_persistent(ctx,
                      gemv4_kernel<NT, U, MINB, decltype(d)::value, decltype(l)::value, decltype(al)::value>,
                      args, NT, al.value, "gemv4_kernel");
  });
}

}  // namespace detail

// Whether gemv_4bit takes this weight and token count: W is (N, K) with N % 16 == 0, K % 64 == 0,
// blocksize ≥ 64 and dividing K, and 1 ≤ M ≤ 64.
inline bool gemv_4bit_supported(const DeviceQuantized4bit& w, int M) {
  if (w.shape.size() != 2 || M < 1 || M > 64) return false;
  const std::int64_t N = w.shape[0], K = w.shape[1];
  return N > 0 && K > 0 && N % 16 == 0 && K % 64 == 0 && w.blocksize >= 64 && K % w.blocksize == 0 &&
         N * K < (std::int64_t(1) << 40) && (!w.double_quant || w.nested_blocksize == 256) &&
         N / 16 < (std::int64_t(1) << 30);
}

// Which kernel gemv_4bit runs: Auto picks by the measured rule below between this header's two
// register-fed kernels (per unit, or grouped by 4 units); the others force one, the streaming sm_90
// kernel of gemv4bit_stream.cuh included (tests, the benchmarks' kernel lab). Stream or Grouped on a
// device or shape it does not take is an error.
enum class GemvKernel { Auto, Registers, Stream, Grouped };

// The grouped register kernel's shapes: blocksize 64 and K % 256 == 0 (beside gemv_4bit_supported's).
inline bool gemv_grouped_supported(int blocksize, std::int64_t K) { return blocksize == 64 && K % 256 == 0; }

// y (M, N) = x (M, K) · Wᵀ (or y += when accumulate), bf16 in and out, fp32 accumulation.
// x and y are device pointers with 16-byte aligned rows. Asynchronous on ctx's stream.
// U, MINB (register kernel, M ≤ 8 only): loads in flight per warp and blocks per SM; stage_k
// (streaming kernel): values of K per stage, 0 for stream_stage_k's choice (the benchmarks' lab).
// pdl (the two register-fed kernels, sm_90): launched as a programmatic dependent launch, so that the
// launch and the table fill overlap the end of the kernel before on the stream; every access to
// memory waits for that kernel to finish (griddepcontrol.wait), so the result and the ordering are
// a plain launch's (unless early_kb >= 0, below). Measured 0.2–2.3 µs faster per call in back-to-back
// GEMVs, the most on small matrices (docs/performance.md); false launches plainly (the benchmarks'
// lab).
// aligned_lut (the register-fed kernels, M ≤ 16 where the block fits the device's shared memory):
// the pair table at a 64 KB boundary (AlignedLut); false keeps it anywhere (PlainLut: the lab, and
// the test that both give the same y).
// early_kb (lab; the grouped kernel under PDL): -1 (default) issues every load after
// griddepcontrol.wait; 0 issues each warp's first loads of W and its absmax before it; > 0 also
// prefetches up to early_kb KB of each warp's range into L2 before it (tiles layout). Only for a W
// that no kernel of the stream's PDL chain writes (gemv4g_kernel says why); measured from 2.3%
// faster to 3.5% slower (docs/performance.md, fourteenth session). max_blocks (lab): the persistent
// grid's size, in place of the fewest blocks that take the tiles in as few steps as a full grid
// (launch_persistent).
template <int U = 4, int MINB = 1>
void gemv_4bit(const Context& ctx, const DeviceQuantized4bit& w, const __nv_bfloat16* x, int M,
               __nv_bfloat16* y, bool accumulate = false, GemvKernel kernel = GemvKernel::Auto,
               int stage_k = 0, bool pdl = true, bool aligned_lut = true, int early_kb = -1,
               int max_blocks = 0) {
  QLORA_CHECK(gemv_4bit_supported(w, M), "cuda::gemv_4bit: unsupported shape (", w.rows(), ", ", w.cols(),
              "), blocksize ", w.blocksize, ", M = ", M,
              " (needs N % 16 == 0, K % 64 == 0, blocksize >= 64, M <= 64)");
  QLORA_CHECK((reinterpret_cast<std::uintptr_t>(x) & 15) == 0, "cuda::gemv_4bit: x is not 16-byte aligned");
  QLORA_CHECK(early_kb >= -1 && early_kb <= (1 << 20), "cuda::gemv_4bit: early_kb ", early_kb,
              " outside [-1, 1048576]");
  QLORA_CHECK(max_blocks >= 0, "cuda::gemv_4bit: max_blocks ", max_blocks, " is negative");
  const bool stream_ok =
      detail::gemv_stream_supported(ctx, w.blocksize, w.double_quant, w.nested_blocksize, w.cols());
  const bool tl = w.layout == Packed4Layout::Tiles;
  QLORA_CHECK(kernel != GemvKernel::Stream || !tl,
              "cuda::gemv_4bit: the streaming kernel reads the rows layout; this weight is in the tiles "
              "layout (cuda::set_layout(ctx, w, Packed4Layout::Rows) first)");
  QLORA_CHECK(kernel != GemvKernel::Stream || stream_ok,
              "cuda::gemv_4bit: the streaming kernel needs sm_90 (device has sm_", ctx.props().major,
              ctx.props().minor, "), blocksize 64 (have ", w.blocksize, ") and K % 1024 == 0 (K = ", w.cols(),
              ")");
  const bool grouped_ok = gemv_grouped_supported(w.blocksize, w.cols());
  QLORA_CHECK(kernel != GemvKernel::Grouped || grouped_ok,
              "cuda::gemv_4bit: the grouped kernel needs blocksize 64 (have ", w.blocksize,
              ") and K % 256 == 0 (K = ", w.cols(), ")");
  ctx.activate();
  detail::GemvArgs args;
  detail::set_weight_args(args, w);
  args.x = x;
  args.y = y;
  args.M = M;
  args.tiles = args.N / 16;
  args.accumulate = accumulate;
  args.pdl = pdl && ctx.props().major >= 9;
  args.aligned_lut = aligned_lut;  // taken up to 16 tokens where the block fits (dispatch_flags)
  args.early_kb = early_kb;
  args.max_blocks = max_blocks;
  const bool dq = w.double_quant;
  // Auto: where each was faster on an H200 (docs/performance.md, "CUDA (H200)"): the grouped kernel
  // up to 16 tokens (at 4096, 11008 and 14336 rows it matched or beat the streaming kernel at every
  // M ≤ 16 once the partial sums' reduction was cut down, and the register kernel by 8–16%); the
  // register kernel for more tokens (x for 4 units of 4–8 token tiles costs the grouped kernel
  // registers) and for the shapes the grouped kernel refuses. The streaming kernel is run only when
  // asked for.
  const bool grouped_auto = grouped_ok && M <= 16;
  if (kernel == GemvKernel::Stream) {
    if (M <= 8)
      detail::dispatch_gemv4_stream<1>(ctx, args, dq, stage_k);
    else if (M <= 16)
      detail::dispatch_gemv4_stream<2>(ctx, args, dq, stage_k);
    else if (M <= 32)
      detail::dispatch_gemv4_stream<4>(ctx, args, dq, stage_k);
    else
      detail::dispatch_gemv4_stream<8>(ctx, args, dq, stage_k);
    return;
  }
  if (kernel == GemvKernel::Grouped || (kernel == GemvKernel::Auto && grouped_auto)) {
    if (M <= 8)
      detail::dispatch_gemv4g<1>(ctx, args, dq, tl);
    else if (M <= 16)
      detail::dispatch_gemv4g<2>(ctx, args, dq, tl);
    else if (M <= 32)
      detail::dispatch_gemv4g<4>(ctx, args, dq, tl);
    else
      detail::dispatch_gemv4g<8>(ctx, args, dq, tl);
    return;
  }
  if (M <= 8)
    detail::dispatch_gemv4_dq<1, U, MINB>(ctx, args, dq, tl);
  else if (M <= 16)
    detail::dispatch_gemv4_dq<2, 2, 1>(ctx, args, dq, tl);
  else if (M <= 32)
    detail::dispatch_gemv4_dq<4, 1, 1>(ctx, args, dq, tl);
  else
    detail::dispatch_gemv4_dq<8, 1, 1>(ctx, args, dq, tl);
}

}  // namespace cuda
}  // namespace qlora
