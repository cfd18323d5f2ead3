#pragma once
// What the two 4-bit GEMV kernels share (gemv4bit.cuh: any sm_80+ GPU, loads straight into
// registers; gemv4bit_stream.cuh: sm_90, weights streamed into shared memory by the copy engine):
// their arguments, the byte -> bf16-pair table, and the tensor-core work on one "unit" of 16 rows ×
// 64 values of K. gemv4bit.cuh's header comment describes the unit's layout and the k permutation.
#include <cuda_bf16.h>

#include <cstdint>

#include "qlora/cuda/codes4bit.cuh"
#include "qlora/cuda/dequantize4bit.cuh"

namespace qlora {
namespace cuda {
namespace detail {

constexpr int kLutBytes = 256 * 256;  // 256 entries × 256 bytes (the lanes use the first 128)

struct GemvArgs {
  const std::uint8_t* packed;  // (N, K / 2)
  AbsmaxView am;
  const __nv_bfloat16* x;  // (M, K)
  __nv_bfloat16* y;        // (M, N)
  int M, N, K;
  int block_shift;   // log2(blocksize)
  int tiles;         // N / 16
  int stage_k;       // values of K per stage (the streaming kernel)
  bool pdl;          // register-fed kernels: launched as programmatic dependent launches (sm_90)
  bool accumulate;   // y += x · Wᵀ instead of y = x · Wᵀ
  bool aligned_lut;  // register-fed kernels: the table at a 64 KB boundary where it applies (AlignedLut)
  int early_kb;      // grouped kernel under PDL: -1 all loads after the wait; >= 0 see gemv_4bit
  int max_blocks;    // register-fed kernels: this many persistent blocks (0: launch_persistent's choice)
  Code16Param code;
  Code256Param map;
};

__device__ __forceinline__ std::uint32_t bf16_pair(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}

__device__ __forceinline__ uint2 load_stream(const std::uint8_t* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 load_stream16(const std::uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// The lane's 8 bytes of rows g (wa) and g + 8 (wb) of the unit at p: two 8-byte loads 8 rows apart
// (Rows layout; p at row g, byte 8t of the unit, `far` bytes to row g + 8) or one 16-byte load of
// the lane's slice (Tiles layout; p at byte 16·lane of the unit).
template <bool TL>
__device__ __forceinline__ void load_unit(const std::uint8_t* p, std::size_t far, uint2& wa, uint2& wb) {
  if (TL) {
    const uint4 v = load_stream16(p);
    wa = make_uint2(v.x, v.y);
    wb = make_uint2(v.z, v.w);
  } else {
    wa = load_stream(p);
    wb = load_stream(p + far);
  }
}

// Programmatic dependent launch (sm_90; no-ops before): a kernel launched with the attribute may
// start while the kernel before it on the stream is still running, and must not touch what that
// kernel writes before pdl_wait() returns (it waits for the whole previous grid and its memory).
// pdl_launch_dependents() lets the next such kernel start as soon as the SMs have room.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The pair table's lookups. Entry e of lane l lies at byte 256e + 4l of the table, so a lookup's
// address is the table's, with byte 1 replaced by the packed byte and byte 0 the lane's offset.
//
// PlainLut: the table anywhere in shared memory: one byte permute builds 256e + 4l, one add the
// table's address (the compiler keeps that address in an ordinary register in these kernels, so the
// add is one instruction per lookup, and the load takes the sum).
struct PlainLut {
  const unsigned char* s_lut;
  std::uint32_t lane4;  // 4 · lane
  template <int J>
  __device__ __forceinline__ std::uint32_t get(std::uint32_t word) const {
    const std::uint32_t off = __byte_perm(word, lane4, 0x5504u | (J << 4));  // byte J · 256 + lane · 4
    return *reinterpret_cast<const std::uint32_t*>(s_lut + off);
  }
};

// AlignedLut: the table at a 64 KB-aligned shared-memory address (bytes 0 and 1 of its address
// zero), so the byte permute of the packed word and `lane_addr` (the table's shared address + 4l)
// yields the lookup's whole address: no add (16 instructions fewer per unit of 16 × 64 weights, of
// ~110). The cost is shared memory: the table's 64 KB must start at the next 64 KB boundary.
struct AlignedLut {
  std::uint32_t lane_addr;  // shared-window address of the table + 4 · lane
  template <int J>
  __device__ __forceinline__ std::uint32_t get(std::uint32_t word) const {
    const std::uint32_t addr = __byte_perm(word, lane_addr, 0x7604u | (J << 4));
    std::uint32_t v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
  }
};

__device__ __forceinline__ void mma_bf16(float c[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                         std::uint32_t a3, std::uint32_t b0, std::uint32_t b1) {
  asm(  // not volatile: a pure function of its operands, so the compiler may interleave it with loads
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Lane copies of the 256-entry table: entry e (packed byte e -> bf16 pair of its two codes) of lane
// l at byte 256e + 4l, so a warp's 32 lookups fall in 32 different banks whatever the bytes.
// `threads` is the block size, a multiple of 32: e is then uniform over a warp, so the parameter
// reads are not divergent.
__device__ __forceinline__ void fill_pair_lut(unsigned char* s_lut, const Code16Param& code, int tid,
                                              int threads) {
  for (int i = tid; i < 256 * 32; i += threads) {
    const int e = i >> 5, l = i & 31;
    reinterpret_cast<std::uint32_t*>(s_lut)[e * 64 + l] = bf16_pair(code.v[e >> 4], code.v[e & 15]);
  }
}

// The 256 values of the absmax codes into shared memory, one per warp step (a uniform index per warp:
// a divergent index into the kernel parameters would serialize). `threads`: a multiple of 32.
__device__ __forceinline__ void fill_absmax_map(float* s_map, const Code256Param& map, int tid, int threads) {
  const int warp = tid >> 5, lane = tid & 31;
  for (int i = warp; i < 256; i += threads / 32)
    if (lane == 0) s_map[i] = map.v[i];
}

// The tables every GEMV kernel decodes with: the lane copies of the pair table, and with double
// quantization the 256 values of the absmax codes (s_map). The caller synchronizes the block.
template <bool DQ>
__device__ __forceinline__ void fill_tables(unsigned char* s_lut, float* s_map, const GemvArgs& a, int tid,
                                            int threads) {
  fill_pair_lut(s_lut, a.code, tid, threads);
  if (DQ) fill_absmax_map(s_map, a.map, tid, threads);
}

// The fields a 4-bit kernel's arguments (GemvArgs, Gemm4Args) take from the weight.
template <class Args>
void set_weight_args(Args& args, const DeviceQuantized4bit& w) {
  args.packed = w.packed.data();
  args.am = absmax_view(w);
  args.N = int(w.shape[0]);
  args.K = int(w.shape[1]);
  args.block_shift = log2_exact(w.blocksize);
  args.code = decode_table(w);
  args.map = map_param(w);
}

// Where part i of `total` items cut into `parts` contiguous parts starts (part i is
// [split_point(i), split_point(i + 1)), sizes differing by at most one): the blocks' tile ranges
// and the warps' ranges of units or groups.
__device__ __forceinline__ int split_point(int i, int total, int parts) {
  return int(std::int64_t(i) * total / parts);
}

// tmp[j] (16 rows × 8 tokens of tile j, mma C layout) += unit · x. wa / wb: this lane's 8 packed
// bytes of rows g and g + 8 (g = lane / 4) at byte 8·(lane % 4) of the unit; xa / xb: its 16 x
// values of token 8j + g at k = 16·(lane % 4) (two 16-byte loads; token M − 1's past M, load_x).
template <int NT, class Lut>
__device__ __forceinline__ void mma_unit(const Lut& lut, uint2 wa, uint2 wb, const uint4 (&xa)[NT],
                                         const uint4 (&xb)[NT], float (&tmp)[NT][4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const std::uint32_t wA = q < 2 ? wa.x : wa.y, wB = q < 2 ? wb.x : wb.y;
    std::uint32_t a0, a1, a2, a3;
    if (q % 2 == 0) {
      a0 = lut.template get<0>(wA), a2 = lut.template get<1>(wA);
      a1 = lut.template get<0>(wB), a3 = lut.template get<1>(wB);
    } else {
      a0 = lut.template get<2>(wA), a2 = lut.template get<3>(wA);
      a1 = lut.template get<2>(wB), a3 = lut.template get<3>(wB);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint4& xv = q < 2 ? xa[j] : xb[j];
      const std::uint32_t b0 = q % 2 == 0 ? xv.x : xv.z, b1 = q % 2 == 0 ? xv.y : xv.w;
      mma_bf16(tmp[j], a0, a1, a2, a3, b0, b1);
    }
  }
}

// acc += absmax · tmp: rows g (am0) and g + 8 (am1) of the unit, in fp32.
template <int NT>
__device__ __forceinline__ void scale_add(float (&acc)[NT][4], const float (&tmp)[NT][4], float am0,
                                          float am1) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    acc[j][0] = fmaf(am0, tmp[j][0], acc[j][0]);
    acc[j][1] = fmaf(am0, tmp[j][1], acc[j][1]);
    acc[j][2] = fmaf(am1, tmp[j][2], acc[j][2]);
    acc[j][3] = fmaf(am1, tmp[j][3], acc[j][3]);
  }
}

// Leaves acc (mma C layout) in s as (row 16, token 8·NT) floats and zeroes it: a warp's partial
// sums for the block's deterministic reduction.
template <int NT>
__device__ __forceinline__ void store_partials(float* s, float (&acc)[NT][4], int g, int t) {
  constexpr int kCols = 8 * NT;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    s[g * kCols + 8 * j + 2 * t] = acc[j][0];
    s[g * kCols + 8 * j + 2 * t + 1] = acc[j][1];
    s[(g + 8) * kCols + 8 * j + 2 * t] = acc[j][2];
    s[(g + 8) * kCols + 8 * j + 2 * t + 1] = acc[j][3];
    acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  }
}

// The 8 x values of token tile j that mma_unit wants, for the unit whose first k is at `px`
// (token g's row). Tokens at or past M read token M − 1's values instead of zeros: an mma's output
// column depends on its own column of x alone, and the columns of tokens past M are never stored
// (store_tile, reduce_partials and the streaming kernel's sum read tok < M only). Unconditional
// loads spare each unit the zeroing of its x registers and the predicate.
template <int NT>
__device__ __forceinline__ void load_x(const __nv_bfloat16* px, std::size_t K, int g, int M, uint4 (&xa)[NT],
                                       uint4 (&xb)[NT]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int skip = min(8 * j + g, M - 1) - g;  // token rows from token g's
    const uint4* p = reinterpret_cast<const uint4*>(px + std::ptrdiff_t(skip) * std::ptrdiff_t(K));
    xa[j] = __ldg(p);
    xb[j] = __ldg(p + 1);
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace qlora
