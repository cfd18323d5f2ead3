#pragma once
// y (M, N) = x (M, K) · Wᵀ for a 4-bit W (NF4 / FP4, plain or double-quantized absmax, tiles layout)
// and many tokens, on Hopper's warpgroup tensor cores (wgmma; sm_90a), W dequantized in registers as
// it is multiplied: no bf16 copy of W is written or read.
//
// The product computed is yᵀ (N × M) = W (N × K) · xᵀ (K × M), because wgmma takes its A operand
// from registers and its B operand from shared memory only: W is the A operand, decoded by the
// warps that multiply it, and x the B operand, staged by the copy engine (TMA, 128-byte swizzle).
//
// A block owns 128 rows of W × 256 tokens (G4Config<1>) and all of K, and runs 3 warpgroups:
// - warpgroup 0, the producers. One thread streams x in stages of 256 tokens × 64 values (32 KB, 4 of
//   them in a ring) with one TMA copy each, on full / empty transaction barriers. Tokens past M
//   arrive as zeros (the tensor map's bounds) and are never stored. Two warps (the absmax warps)
//   decode the absmax of the block's 128 rows for each stage into an absmax ring (512 bytes a stage)
//   on the same barriers: a stage is full when x's bytes and the 64 absmax lanes have arrived.
// - warpgroups 1 and 2: the consumers, 64 rows of W each (one wgmma m64n256k16 per 16 values of K;
//   accumulators 128 fp32 per thread). Each warp owns 16 rows and reads them unit by unit (16 rows ×
//   64 values = 512 contiguous bytes in the tiles layout, quantized4bit.cuh), one 16-byte load per
//   lane per unit, two units ahead of their use.
//
// Decoding (per unit, per lane). The tiles layout gives lane (g, t) bytes [8t, 8t + 8) of rows g and
// g + 8 of the unit, i.e. k ∈ [16t, 16t + 16), which is what the GEMV's permuted k wants
// (gemv4bit.cuh). wgmma's B operand is x in memory order, so here the 16 values of K of slab s must
// be k ∈ [16s, 16s + 16), and lane t needs rows g / g + 8's bytes 8s + t (its fragment register
// a0 / a1) and 8s + t + 4 (a2 / a3) for s = 0..3. Those are byte t (and t + 4) of each of the four
// lanes of its quad: a 4 × 4 byte transpose of each of the lane's 4 words across the quad (two
// shuffles and two byte permutes per word). Then each byte (two codes) goes through a lane-replicated
// table (conflict-free) and is multiplied by its block's absmax (G4Lut: exact or fast, below). A
// unit's four slabs are decoded at once, during the unit before (two sets of A registers); the absmax
// pair of rows g and g + 8 is one 8-byte read of the absmax ring.
//
// Accuracy. Exact table (the default): code · absmax in fp32 rounded to bf16 once, the weights
// dequantize_4bit writes, so the bound of tests/cuda/test_cuda_matmul.cu (2⁻⁸ of Σ|x·w| per output)
// holds as for dequantize + cuBLAS. Fast table: the code, the absmax and their product each rounded to
// bf16 (3 · 2⁻⁹), bound 2⁻⁷. The tensor cores accumulate in fp32; y is rounded to bf16 once (with
// accumulate, y is added to the fp32 accumulators first).
//
// Epilogue: each consumer warpgroup writes its 64 rows × 256 tokens through shared memory (the x
// ring, free by then): with accumulate, ldmatrix.trans brings y's tile into the accumulators' layout;
// stmatrix.trans turns the accumulators' column pairs into token rows of 8 contiguous outputs, then
// 16-byte stores of y's rows.
//
// Speed (docs/performance.md, "CUDA (H100)", ninth and tenth sessions): 1.28-1.36x cuBLAS bf16 at
// M = 4096 (exact table), where dequantize + cuBLAS takes 1.09x; the same kernel with its decoding
// replaced by bit operations (QLORA_G4_NODECODE=1, a lab probe) ran at 1.0x before the absmax warps
// existed, so the decoding is what costs: the table reads, and the absmax warps' own cost (probe 1 with
// them: 1.19x; QLORA_G4_AMCONST=1, the warps loading nothing: 1.06-1.11x). Over few waves of blocks it
// beats dequantize + cuBLAS on large weights; matmul_4bit takes it there (kSm90* in matmul4bit.cuh).
//
// Needs sm_90a code in the binary (CMake's CUDA architectures "90a"; plain "90" has no wgmma):
// gemm_4bit_sm90_supported says whether this binary and device can run it.
#include <cuda.h>          // CUtensorMap (types only; the encoder is reached through the runtime)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "qlora/cuda/async_copy.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/dequantize4bit.cuh"
#include "qlora/cuda/gemv4bit_common.cuh"
#include "qlora/cuda/quantized4bit.cuh"

namespace qlora {
namespace cuda {
namespace detail {

// A block's shape: H halves of 64 rows per consumer warpgroup (2 warpgroups: 128·H rows of W) × T
// tokens (wgmma's N), with H·T = 256 (the accumulators: 128 fp32 per thread either way). H = 1,
// T = 256 is the one launched: each decoded weight serves 256 tokens. H = 2, T = 128 would halve x's
// L2 traffic per product, but decodes twice as much per product; on an H100 it measured 1.4-1.5x
// the time of H = 1 at M = 128 .. 4096 (docs/performance.md), and is no longer instantiated (its
// wgmma m64n128k16 wrapper went with it: commit 44ebdeb has it).
// Lab switch QLORA_G4_SHARED_FEED=1 (correct; on an H100, eleventh session, its first version took
// 1.8x the register feed's time, this second one 1.13-1.25x: docs/performance.md): three warps of the
// producer warpgroup decode W into a ring of bf16 tiles in shared memory (128 rows × 64 values a
// stage, 128-byte swizzle, the layout TMA gives x), and the consumers issue wgmma with both operands
// in shared memory and decode nothing. Why: the consumers' decoding stands between their wgmma issues
// (docs/performance.md, tenth session); here it runs beside them. The x ring drops to 3 stages to make
// room; the packed W and the absmax come by TMA and bulk copies (second version: the first one's
// decoders waited on their own global loads).
#ifndef QLORA_G4_SHARED_FEED
#define QLORA_G4_SHARED_FEED 0
#endif
constexpr bool kG4SharedFeed = QLORA_G4_SHARED_FEED != 0;
// The shared feed's decoded W ring: 2 stages (16 KB each), or 3 (-DQLORA_G4_WSTAGES=3: 219 KB of shared
// memory in all), which lets the decoders run two units ahead of the consumers instead of one.
#ifndef QLORA_G4_WSTAGES
#define QLORA_G4_WSTAGES 2
#endif
// and its ring of packed W, by TMA (4 stages; with 3 W stages only 3 fit: -DQLORA_G4_PKSTAGES=3)
#ifndef QLORA_G4_PKSTAGES
#define QLORA_G4_PKSTAGES 4
#endif
// and its decoder warps: 3 (warps 1-3 of the producer warpgroup, thread 0 the TMA thread), or 4
// (-DQLORA_G4_DECODERS=4: the whole producer warpgroup, two tiles a warp instead of up to three; the
// TMA copies are then issued by the first consumer thread, the packed W stages as soon as their slots
// are free, polled while it waits for W; with -DQLORA_G4_PKSTAGES=5 that ring is a unit deeper).
#ifndef QLORA_G4_DECODERS
#define QLORA_G4_DECODERS 3
#elif !QLORA_G4_SHARED_FEED
#error "QLORA_G4_DECODERS sets the shared feed's decoders: it needs QLORA_G4_SHARED_FEED=1"
#endif
constexpr int kG4Decoders = QLORA_G4_DECODERS;
static_assert(kG4Decoders == 3 || kG4Decoders == 4, "QLORA_G4_DECODERS: 3 or 4");
#if QLORA_G4_SHARED_FEED && (defined(QLORA_G4_NODECODE) || defined(QLORA_G4_AMCONST))
#error "QLORA_G4_SHARED_FEED decodes in its own warps: the register feed's lab switches do not apply to it"
#endif

template <int H>
struct G4Config {
  static constexpr int kRows = 128 * H;              // rows of W per block
  static constexpr int kTokens = 256 / H;            // tokens per block
  static constexpr int kStageBytes = kTokens * 128;  // x: kTokens rows of 64 bf16 (128 B, swizzled)
  static constexpr int kStages = H == 2 ? 6 : (kG4SharedFeed ? 3 : 4);     // 96 or 128 KB of x ring
  static constexpr int kWStages = kG4SharedFeed ? QLORA_G4_WSTAGES : 0;    // shared feed: decoded W ring
  static constexpr int kWStageBytes = kRows * 128;                         // kRows rows of 64 bf16
  static constexpr int kPkStages = kG4SharedFeed ? QLORA_G4_PKSTAGES : 0;  // shared feed: packed W ring
  static constexpr int kPkStageBytes = kRows / 16 * 512;  // a unit of the block's 16-row tiles
  static constexpr int kAmStages = 8;                 // absmax ring (kRows fp32 a stage): deeper than x's,
                                                      // so its warps' load latency hides behind it
  static constexpr int kOutStride = 64 * H * 2 + 16;  // epilogue: bytes per token row of a warpgroup's
                                                      // 64·H outputs (+16: stmatrix rows hit 8 bank groups)
  // Dynamic shared memory: x ring, decoded W ring (shared feed only), pair table, absmax code map,
  // absmax ring (kRows fp32 per stage), barriers; +1 KB to align the rings to 1024 bytes (the 128-byte
  // swizzle's period, which the wgmma descriptor's base offset 0 assumes).
  static constexpr std::size_t kSmemBytes =
      1024 + std::size_t(kStages) * kStageBytes + std::size_t(kWStages) * kWStageBytes +
      std::size_t(kPkStages) * kPkStageBytes + kLutBytes + 256 * sizeof(float) +
      std::size_t(kAmStages) * kRows * sizeof(float) + 2 * (kStages + kAmStages + kWStages + kPkStages) * 8;
  static_assert(2 * kTokens * kOutStride <= kStages * kStageBytes, "epilogue tiles must fit in the ring");
  static_assert(kSmemBytes <= 227 * 1024, "more than an sm_90 block's dynamic shared memory");
};
constexpr int kG4Threads = 384;  // producer warpgroup (with the shared feed: also the decoders) + 2 consumers

struct Gemm4Args {
  const std::uint8_t* packed;  // tiles layout
  AbsmaxView am;
  __nv_bfloat16* y;  // (M, N)
  int M, N, K;
  int block_shift;  // log2(blocksize)
  bool accumulate;  // y += x · Wᵀ
  Code16Param code;
  Code256Param map;
  const float* am_tiles;  // QLORA_G4_AMTMA: the absmax decoded by g4_absmax_tiles_kernel, else null
};

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#endif
}

// wgmma m64n256's 128 fp32 accumulators as inline-asm operands %0..%127 (the list, then the operands
// of the float array d), shared by the register-fed and the shared-fed product.
#define QLORA_G4_D128_LIST                                                                       \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                       \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "             \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "             \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "             \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "             \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "             \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define QLORA_G4_D128_OPERANDS(d)                                                                           \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),           \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),            \
      "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),            \
      "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),            \
      "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),            \
      "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),            \
      "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]),            \
      "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]),            \
      "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),            \
      "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]),            \
      "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]),            \
      "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]),            \
      "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]),            \
      "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]),     \
      "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]),     \
      "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]),     \
      "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// d (64 rows × N tokens of fp32, wgmma's accumulator layout) += A (64 × 16 bf16 from registers: this
// lane's a0..a3, in mma.m16n8k16's A layout for the warp's 16 rows) · B (16 × N, the descriptor's
// shared-memory tile). The accumulator is always added to (scale-d true: d starts at zero).
template <int N>
__device__ __forceinline__ void wgmma_m64k16_rs(float (&d)[N / 2], const std::uint32_t (&a)[4],
                                                std::uint64_t desc);
template <>
__device__ __forceinline__ void wgmma_m64k16_rs<256>(float (&d)[128], const std::uint32_t (&a)[4],
                                                     std::uint64_t desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" QLORA_G4_D128_LIST
      "}, "
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
      : QLORA_G4_D128_OPERANDS(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
#endif
}

// The shared feed's product: d += A (64 × 16 bf16, the descriptor da's K-major tile, 128-byte swizzle)
// · B (16 × 256, db's), both from shared memory.
__device__ __forceinline__ void wgmma_m64n256k16_ss(float (&d)[128], std::uint64_t da, std::uint64_t db) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" QLORA_G4_D128_LIST
      "}, "
      "%128, %129, p, 1, 1, 0, 0;\n}\n"
      : QLORA_G4_D128_OPERANDS(d)
      : "l"(da), "l"(db), "r"(1));
#endif
}

// The shared-memory descriptor of a K-major bf16 tile with 128-byte swizzle (rows of 64 values, 8-row
// groups 1024 bytes apart): start address >> 4, leading offset 16 B (unused when swizzled), stride
// offset 1024 B, layout type 1 (128B swizzle) in bits 62-63.
__device__ __forceinline__ std::uint64_t sw128_desc(std::uint32_t saddr) {
  return std::uint64_t((saddr & 0x3ffff) >> 4) | (std::uint64_t(16 >> 4) << 16) |
         (std::uint64_t(1024 >> 4) << 32) | (std::uint64_t(1) << 62);
}

// One TMA copy of the box at (c0 = k, c1 = token) of x's tensor map into shared memory, counted on bar.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1,
                                            std::uint64_t* bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
#endif
}

// Column q of a 4 × 4 byte matrix held one row per lane of a quad (lane t of the quad holds row t in
// w): returns (row 0 byte t, row 1 byte t, row 2 byte t, row 3 byte t). sel_a / sel_b: the lane's
// byte-permute selectors (g4_transpose_selectors).
__device__ __forceinline__ std::uint32_t quad_transpose(std::uint32_t w, std::uint32_t sel_a,
                                                        std::uint32_t sel_b) {
  const std::uint32_t a = __byte_perm(w, __shfl_xor_sync(0xffffffffu, w, 2), sel_a);
  return __byte_perm(a, __shfl_xor_sync(0xffffffffu, a, 1), sel_b);
}

// Step a (partner t ^ 2): lanes 0, 1 keep bytes 0, 1 and take the partner's 0, 1; lanes 2, 3 take the
// partner's bytes 2, 3 and keep theirs. Step b (partner t ^ 1): even lanes (own 0, partner 0, own 2,
// partner 2), odd lanes (partner 1, own 1, partner 3, own 3).
__device__ __forceinline__ void g4_transpose_selectors(int t, std::uint32_t& sel_a, std::uint32_t& sel_b) {
  sel_a = t < 2 ? 0x5410u : 0x3276u;
  sel_b = (t & 1) ? 0x3715u : 0x6240u;
}

// One unit of one half as loaded, not yet used (so the load stays in flight): the lane's 16 packed
// bytes. (The absmax reaches the consumers through the absmax ring: G4AbsmaxRows.)
struct G4Unit {
  uint4 w;
};

__device__ __forceinline__ void g4_load(G4Unit& u, const std::uint8_t* p, bool valid) {
  u.w = valid ? load_stream16(p) : make_uint4(0, 0, 0, 0);
}

// The unit's fragments, decoded: words q[0..3] (row g bytes 8s + t, row g bytes 8s + t + 4, row g + 8
// likewise; byte s of each for slab s) and the absmax of rows g and g + 8, as block_absmax computes it.
struct G4Frag {
  std::uint32_t q[4];
  float am0, am1;
};

// Where row r (0 .. 127 of the block) keeps its absmax in a stage of the absmax ring: the 16 rows of
// a warp's tile together, rows g and g + 8 side by side, so a consumer lane reads its pair with one
// 8-byte load and a warp's 8 distinct pairs are one 64-byte wavefront.
__device__ __forceinline__ int g4_am_slot(int r) { return (r >> 4) * 16 + (r & 7) * 2 + ((r >> 3) & 1); }

__device__ __forceinline__ void g4_decode(G4Frag& f, const G4Unit& u, const float* s_am_pair,
                                          std::uint32_t sel_a, std::uint32_t sel_b) {
  f.q[0] = quad_transpose(u.w.x, sel_a, sel_b);
  f.q[1] = quad_transpose(u.w.y, sel_a, sel_b);
  f.q[2] = quad_transpose(u.w.z, sel_a, sel_b);
  f.q[3] = quad_transpose(u.w.w, sel_a, sel_b);
  const float2 am = *reinterpret_cast<const float2*>(s_am_pair);
  f.am0 = am.x;
  f.am1 = am.y;
}

// The absmax warps (warps 1 and 2 of the producer warpgroup): for each unit kc, the absmax of the
// block's 128 rows (block_absmax's value for the block of (row, 64·kc)) into stage kc % kAmStages of the
// absmax ring, on its own full / empty barriers. Why warps of their own: decoded by the consumers
// (as the first version of this kernel did), each unit cost every consumer lane 4 scattered global
// loads (2 codes, 2 nested absmax of rows g and g + 8: 8 sectors per warp load) and their decoding;
// with the table left out (lab probe 3) the kernel still took 1.35x cuBLAS against 1.0x without them.
// Here a lane owns 2 rows (G4Config<1>), and loads a row's codes 4 at a time (the aligned 32-bit word that
// holds the code: 4 units for blocksize 64) and its nested absmax only when its index changes.
template <int kRowsPerLane>
struct G4AbsmaxRows {
  const std::uint8_t* code_word[kRowsPerLane];  // the word held (double quantization)
  std::uint32_t codes[kRowsPerLane];
  std::size_t nested[kRowsPerLane];  // index of the nested absmax held
  float nested_v[kRowsPerLane];
  std::size_t plain[kRowsPerLane];  // index of the plain absmax held
  float plain_v[kRowsPerLane];
  __device__ G4AbsmaxRows() {  // nothing held: every first use loads
#pragma unroll
    for (int j = 0; j < kRowsPerLane; ++j) {
      code_word[j] = nullptr;
      nested[j] = plain[j] = ~std::size_t(0);
    }
  }
};

template <int R>
__device__ __forceinline__ float g4_row_absmax(G4AbsmaxRows<R>& c, int j, const AbsmaxView& am,
                                               const float* s_map, std::size_t b) {
  if (am.absmax) {
    if (b != c.plain[j]) {
      c.plain[j] = b;
      c.plain_v[j] = __ldg(am.absmax + b);
    }
    return c.plain_v[j];
  }
  const std::uint8_t* p = am.qabsmax + b;
  const std::uint8_t* wp =
      reinterpret_cast<const std::uint8_t*>(reinterpret_cast<std::uintptr_t>(p) & ~std::uintptr_t(3));
  // The aligned word that holds a code lies within the codes: the array is an allocation of its own
  // (DeviceQuantized4bit::qabsmax, 256-byte aligned), and with N % 16 == 0 it holds a multiple of 16.
  if (wp != c.code_word[j]) {
    c.code_word[j] = wp;
    c.codes[j] = __ldg(reinterpret_cast<const std::uint32_t*>(wp));
  }
  const std::size_t n = b >> am.nested_shift;
  if (n != c.nested[j]) {
    c.nested[j] = n;
    c.nested_v[j] = __ldg(am.absmax2 + n);
  }
  const std::uint32_t code = (c.codes[j] >> (8 * (p - wp))) & 0xffu;
  return nested_absmax(s_map[code], c.nested_v[j], am.offset);
}

// The code tables (G4Table). Fast: the GEMV's pair table (bf16 pairs) in shared memory, times the
// absmax rounded to bf16 in one bf16x2 multiply: three roundings per weight. Exact: a table of fp32
// pairs (entry e of lane l at byte 256e + 8l, conflict-free like the GEMV's), code · absmax in fp32
// rounded once: the weights dequantize_4bit writes, bit for bit. (A third, the fast table's values
// from a codebook held in 8 registers by byte permutes, no shared-memory reads, gave the same y and
// the same speed on the H100; it was removed: commit 3a7f59e has it, docs/performance.md the figures.)
enum G4Table : int { kG4Fast = 0, kG4Exact = 1 };

template <int Table>
struct G4Lut;

template <int S, class Lut>
__device__ __forceinline__ void g4_slab(std::uint32_t (&ra)[4], const G4Frag& f, const Lut& lut,
                                        typename Lut::Scale s0, typename Lut::Scale s1);

// A unit's four slabs of A fragments through a shared-memory table (g4_slab, slab by slab).
template <class Lut>
__device__ __forceinline__ void g4_unit_lut(std::uint32_t (&ra)[4][4], const G4Frag& f, const Lut& lut,
                                            typename Lut::Scale s0, typename Lut::Scale s1) {
  g4_slab<0>(ra[0], f, lut, s0, s1);
  g4_slab<1>(ra[1], f, lut, s0, s1);
  g4_slab<2>(ra[2], f, lut, s0, s1);
  g4_slab<3>(ra[3], f, lut, s0, s1);
}

__device__ __forceinline__ std::uint32_t bf16x2_scale(std::uint32_t v, __nv_bfloat162 s) {
  const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&v), s);
  return *reinterpret_cast<const std::uint32_t*>(&r);
}

template <>
struct G4Lut<kG4Fast> {
  PlainLut lut;
  __device__ G4Lut(const unsigned char* s_lut, int lane) : lut{s_lut, std::uint32_t(lane) * 4} {}
  __device__ static void fill(unsigned char* s_lut, const Code16Param& code, int tid, int threads) {
    fill_pair_lut(s_lut, code, tid, threads);
  }
  struct Scale {
    __nv_bfloat162 v;
  };
  __device__ static Scale scale(float am) { return Scale{__float2bfloat162_rn(am)}; }
  template <int J>
  __device__ std::uint32_t get(std::uint32_t word, Scale s) const {
    return bf16x2_scale(lut.template get<J>(word), s.v);
  }
  __device__ void unit(std::uint32_t (&ra)[4][4], const G4Frag& f, Scale s0, Scale s1) const {
    g4_unit_lut(ra, f, *this, s0, s1);
  }
};

template <>
struct G4Lut<kG4Exact> {
  const unsigned char* s_lut;
  std::uint32_t lane8;  // 8 · lane
  __device__ G4Lut(const unsigned char* s, int lane) : s_lut(s), lane8(std::uint32_t(lane) * 8) {}
  __device__ static void fill(unsigned char* s_lut, const Code16Param& code, int tid, int threads) {
    for (int i = tid; i < 256 * 32; i += threads) {
      const int e = i >> 5, l = i & 31;
      reinterpret_cast<float2*>(s_lut)[e * 32 + l] = make_float2(code.v[e >> 4], code.v[e & 15]);
    }
  }
  struct Scale {
    float v;
  };
  __device__ static Scale scale(float am) { return Scale{am}; }
  template <int J>
  __device__ std::uint32_t get(std::uint32_t word, Scale s) const {
    const std::uint32_t off = __byte_perm(word, lane8, 0x5504u | (J << 4));  // byte J · 256 + lane · 8
    const float2 c = *reinterpret_cast<const float2*>(s_lut + off);
    return bf16_pair(__fmul_rn(c.x, s.v), __fmul_rn(c.y, s.v));
  }
  __device__ void unit(std::uint32_t (&ra)[4][4], const G4Frag& f, Scale s0, Scale s1) const {
    g4_unit_lut(ra, f, *this, s0, s1);
  }
};

// Slab S's A fragment of the unit: a0 (row g, k 16S + 2t, +1), a1 (row g + 8, same k), a2 (row g,
// k + 8), a3 (row g + 8, k + 8).
template <int S, class Lut>
__device__ __forceinline__ void g4_slab(std::uint32_t (&ra)[4], const G4Frag& f, const Lut& lut,
                                        typename Lut::Scale s0, typename Lut::Scale s1) {
  ra[0] = lut.template get<S>(f.q[0], s0);
  ra[1] = lut.template get<S>(f.q[2], s1);
  ra[2] = lut.template get<S>(f.q[1], s0);
  ra[3] = lut.template get<S>(f.q[3], s1);
}

// ldmatrix's inverse: the four 8 × 8 bf16 matrices whose rows lanes 8j..8j + 7 address, transposed,
// into the fragment layout (v[j]: matrix j's elements (2t, g), (2t + 1, g) of the stored rows).
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t saddr, std::uint32_t (&v)[4]) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
               : "r"(saddr)
               : "memory");
#endif
}

__device__ __forceinline__ void stmatrix_x4_trans(std::uint32_t saddr, std::uint32_t r0, std::uint32_t r1,
                                                  std::uint32_t r2, std::uint32_t r3) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(saddr), "r"(r0),
               "r"(r1), "r"(r2), "r"(r3)
               : "memory");
#endif
}

#ifndef QLORA_G4_AMCONST  // lab switch (wrong results): the absmax warps write 1 and load nothing
#define QLORA_G4_AMCONST 0
#endif
// Lab switch QLORA_G4_AMTMA=1: no absmax warps; gemm_4bit_sm90 first writes the absmax decoded, in
// the ring's order (g4_absmax_tiles_kernel), and the TMA thread brings each stage's 512 bytes with one
// bulk copy on the absmax ring's barriers. Measured on an H100 (eleventh session): 2-4% faster at
// M = 4096, 10 µs slower at M = 256 (the pass reads and writes the whole absmax every call): not the
// default (docs/performance.md).
#ifndef QLORA_G4_AMTMA
#define QLORA_G4_AMTMA 0
#endif
// The absmax by that pass and bulk copies: with QLORA_G4_AMTMA, and always in the shared feed (whose
// decoders then read no global memory).
constexpr bool kG4AmPass = QLORA_G4_AMTMA != 0 || kG4SharedFeed;

// QLORA_G4_AMTMA's pass: out[(row block, unit kc) · kRows + g4_am_slot(r)] = the absmax of row
// 128·(row block) + r for the block of (row, 64·kc) (0 past N). One thread per value; blockDim 256.
template <int = 0>  // a template: one definition for every translation unit that includes this header
__global__ void g4_absmax_tiles_kernel(Gemm4Args a, float* out, std::size_t count) {
  __shared__ float s_map[256];
  if (!a.am.absmax) fill_absmax_map(s_map, a.map, threadIdx.x, blockDim.x);
  __syncthreads();
  const int KC = a.K / 64;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < count;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const int r = int(i % 128);
    const std::size_t tile = i / 128;  // (row block, kc)
    const std::size_t row = (tile / KC) * 128 + r, kc = tile % KC;
    const float v = row < std::size_t(a.N)
                        ? block_absmax(a.am, s_map, (row * std::size_t(a.K) + kc * 64) >> a.block_shift)
                        : 0.0f;
    out[tile * 128 + g4_am_slot(r)] = v;
  }
}

// The shared feed's decoders (QLORA_G4_SHARED_FEED): decoder warp dw (0 .. kG4Decoders - 1) of a block
// decodes the block's 16-row tiles dw, dw + kG4Decoders, .. (< 8), unit by unit, into the decoded W ring
// (stage kc % SW: row r's 64 values at 128·r bytes, 16-byte chunk j at chunk j ^ (r % 8), the 128-byte
// swizzle of wgmma's K-major operand, as TMA writes x). Lane (g, t) holds bytes [8t, 8t + 8) of rows g and g
// + 8 of a unit (the tiles layout), i.e. chunks 2t and 2t + 1 of both rows: no transposes. The packed bytes
// come by TMA (ring s_pk) and the absmax by the pass's bulk copies (ring s_am): these warps read no global
// memory, whose latency had held the first version (loads one unit ahead, 2.4x cuBLAS).
template <class C, int Table>
__device__ __forceinline__ void g4_decode_w(const unsigned char* s_lut, const unsigned char* s_pk,
                                            const float* s_am, unsigned char* s_w, std::uint64_t* pk_full,
                                            std::uint64_t* pk_empty, std::uint64_t* am_full,
                                            std::uint64_t* am_empty, std::uint64_t* w_full,
                                            std::uint64_t* w_empty, int dw, int lane, int KC) {
  constexpr int kMaxTiles = (C::kRows / 16 + kG4Decoders - 1) / kG4Decoders;
  constexpr int SW = C::kWStages, SP = C::kPkStages, SA = C::kAmStages;
  const int g = lane >> 2, t = lane & 3;
  const G4Lut<Table> lut(s_lut, lane);
  int rb[kMaxTiles];  // the tile's first row in the block
#pragma unroll
  for (int i = 0; i < kMaxTiles; ++i) rb[i] = 16 * (dw + kG4Decoders * i);
  const std::uint32_t w_base = smem_addr(s_w);
  for (int kc = 0; kc < KC; ++kc) {
    const int sw = kc % SW, sp = kc % SP, sa = kc % SA;
    uint4 q[kMaxTiles];
    float2 am[kMaxTiles];
    mbar_wait(&pk_full[sp], (kc / SP) & 1);
    mbar_wait(&am_full[sa], (kc / SA) & 1);
#pragma unroll
    for (int i = 0; i < kMaxTiles; ++i) {
      if (rb[i] >= C::kRows) continue;  // 3 decoders: warp 2 has two tiles
      q[i] = *reinterpret_cast<const uint4*>(s_pk + sp * C::kPkStageBytes + rb[i] * 32 + lane * 16);
      am[i] = *reinterpret_cast<const float2*>(s_am + sa * C::kRows + g4_am_slot(rb[i] + g));  // g, g + 8
    }
    mbar_arrive(&pk_empty[sp]);  // release: the loads above are done before the stages are refilled
    mbar_arrive(&am_empty[sa]);
    mbar_wait(&w_empty[sw], ((kc / SW) & 1) ^ 1);
#pragma unroll
    for (int i = 0; i < kMaxTiles; ++i) {
      if (rb[i] >= C::kRows) continue;
      const auto s0 = G4Lut<Table>::scale(am[i].x), s1 = G4Lut<Table>::scale(am[i].y);
      const int r0 = rb[i] + g;
      // the stores carry no memory clobber: the table reads of later chunks may be issued before them
      // (only wgmma reads s_w, after the proxy fence below, which the volatile asm keeps in order)
      auto put = [&](int r, int ch, std::uint32_t word, typename G4Lut<Table>::Scale sc) {
        const std::uint32_t addr =
            w_base + std::uint32_t(sw * C::kWStageBytes + r * 128 + ((ch ^ (r & 7)) << 4));
        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr),
                     "r"(lut.template get<0>(word, sc)), "r"(lut.template get<1>(word, sc)),
                     "r"(lut.template get<2>(word, sc)), "r"(lut.template get<3>(word, sc)));
      };
      put(r0, 2 * t, q[i].x, s0);
      put(r0, 2 * t + 1, q[i].y, s0);
      put(r0 + 8, 2 * t, q[i].z, s1);
      put(r0 + 8, 2 * t + 1, q[i].w, s1);
    }
    // the stores above are read by wgmma, the async proxy: fence them into it, then release the stage
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    mbar_arrive(&w_full[sw]);
  }
}

// D: wgmma groups (one per slab of 16 values of K) a warpgroup may have issued and not finished:
// after each slab's wait, at most D - 1 stay in flight.
template <int H, int Table, int D>
__global__ void __launch_bounds__(kG4Threads, 1)
    gemm4_sm90_kernel(const __grid_constant__ CUtensorMap xmap, const __grid_constant__ CUtensorMap wmap,
                      const Gemm4Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = G4Config<H>;
  constexpr int T = C::kTokens, S = C::kStages, SB = C::kStageBytes;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Aligned by an offset from the shared array itself (not by rounding a generic pointer), so that
  // the compiler still knows every pointer below is shared memory and emits LDS, not generic loads.
  const std::uint32_t raw = smem_addr(smem_raw);
  unsigned char* smem = smem_raw + (((raw + 1023u) & ~1023u) - raw);
  unsigned char* s_x = smem;                                      // (stage, token T, k 64) swizzled
  unsigned char* s_w = smem + S * SB;                             // shared feed: (stage, row, k 64) swizzled
  unsigned char* s_pk = s_w + C::kWStages * C::kWStageBytes;      // shared feed: (stage, tile, 512 B) packed
  unsigned char* s_lut = s_pk + C::kPkStages * C::kPkStageBytes;  // code table, lane copies
  float* s_map = reinterpret_cast<float*>(s_lut + kLutBytes);     // absmax codes (double quantization)
  float* s_am = s_map + 256;                                      // (am stage, C::kRows) absmax ring
  constexpr int SA = C::kAmStages;
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(s_am + SA * C::kRows);
  std::uint64_t* empty = full + S;
  std::uint64_t* am_full = empty + S;
  std::uint64_t* am_empty = am_full + SA;
  constexpr int SW = C::kWStages;
  std::uint64_t* w_full = am_empty + SA;  // shared feed: the decoded W ring
  std::uint64_t* w_empty = w_full + SW;
  constexpr int SP = C::kPkStages;
  std::uint64_t* pk_full = w_empty + SW;  // shared feed: the packed W ring
  std::uint64_t* pk_empty = pk_full + SP;

  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);   // the thread that issues the copies (and the copy's bytes)
      mbar_init(&empty[s], 8);  // one arrival per consumer warp
    }
    for (int s = 0; s < SA; ++s) {
      mbar_init(&am_full[s], kG4AmPass ? 1 : 64);  // the absmax warps' lanes (or the TMA thread)
      mbar_init(&am_empty[s], kG4SharedFeed ? 32 * kG4Decoders : 8);  // consumer warps (decoder lanes)
    }
    for (int s = 0; s < SW; ++s) {
      mbar_init(&w_full[s], 32 * kG4Decoders);  // the decoder lanes
      mbar_init(&w_empty[s], 8);                // the consumer warps
    }
    for (int s = 0; s < SP; ++s) {
      mbar_init(&pk_full[s], 1);                  // the issuing thread (and the copy's bytes)
      mbar_init(&pk_empty[s], 32 * kG4Decoders);  // the decoder lanes
    }
    mbar_fence_init();
  }
  G4Lut<Table>::fill(s_lut, a.code, tid, kG4Threads);
  if (!a.am.absmax) fill_absmax_map(s_map, a.map, tid, kG4Threads);
  __syncthreads();

  const int KC = a.K / 64;  // units (stages) along K
  const int row0 = blockIdx.x * C::kRows, tok0 = blockIdx.y * T;
  const int wg = tid / 128;
  // the TMA thread: x's stage for unit kc, once the ring has room (wait: whether to wait for that, or to
  // issue a slot already seen free)
  auto load_x_stage = [&](int kc, bool wait = true) {
    const int s = kc % S;
    if (wait) mbar_wait(&empty[s], ((kc / S) & 1) ^ 1);
    mbar_arrive_expect_tx(&full[s], SB);
    tma_load_2d(s_x + s * SB, &xmap, kc * 64, tok0, &full[s]);
  };
  // The absmax pass (kG4AmPass): unit kc's 512 bytes of absmax by bulk copy, once its ring slot is free
  // (wait: whether to wait for that, or to issue a slot already seen free).
  auto load_am_stage = [&](int kc, bool wait = true) {
    const int sa = kc % SA;
    if (wait) mbar_wait(&am_empty[sa], ((kc / SA) & 1) ^ 1);
    mbar_arrive_expect_tx(&am_full[sa], C::kRows * 4);
    bulk_copy_g2s(s_am + sa * C::kRows, a.am_tiles + (std::size_t(blockIdx.x) * KC + kc) * C::kRows,
                  C::kRows * 4, &am_full[sa]);
  };
  // The shared feed: unit kc's absmax and packed W (one 2D TMA box: the block's 8 tiles × 512 bytes).
  auto load_w_stage = [&](int kc, bool wait = true) {
    constexpr int SPn = SP > 0 ? SP : 1;  // (the register feed has no packed ring and never calls this)
    const int sp = kc % SPn;
    load_am_stage(kc, wait);
    if (wait) mbar_wait(&pk_empty[sp], ((kc / SPn) & 1) ^ 1);
    mbar_arrive_expect_tx(&pk_full[sp], C::kPkStageBytes);
    tma_load_2d(s_pk + sp * C::kPkStageBytes, &wmap, kc * 128, row0 / 16, &pk_full[sp]);
  };
  // 3 decoders: the TMA thread issues W stage kc + kWAhead before x stage kc, so that the decoders, who
  // run ahead of the consumers, find them landed
  constexpr int kWAhead = SP - 1;  // < SA too

  if constexpr (kG4SharedFeed) {
    // The shared feed (QLORA_G4_SHARED_FEED): no register rebalancing (168 a thread serve everyone).
    // Warpgroup 0: 3 decoders: thread 0 streams x, the packed W and the absmax, warps 1-3 decode W,
    // tiles w - 1, w + 2, w + 5 (< 8) of the block; 4 decoders: warp w decodes tiles w, w + 4, and the
    // first consumer thread issues the copies (below).
    if (wg == 0) {
      if (kG4Decoders == 4) {
        g4_decode_w<C, Table>(s_lut, s_pk, s_am, s_w, pk_full, pk_empty, am_full, am_empty, w_full, w_empty,
                              tid / 32, tid & 31, KC);
      } else if (tid == 0) {
        for (int kc = 0; kc < kWAhead && kc < KC; ++kc) load_w_stage(kc);
        for (int kc = 0; kc < KC; ++kc) {
          if (kc + kWAhead < KC) load_w_stage(kc + kWAhead);
          load_x_stage(kc);
        }
      } else if (tid >= 32) {
        g4_decode_w<C, Table>(s_lut, s_pk, s_am, s_w, pk_full, pk_empty, am_full, am_empty, w_full, w_empty,
                              tid / 32 - 1, tid & 31, KC);
      }
      return;
    }
  } else {
    if (wg == 0) {  // the producers
      // 40 registers: the producers' code (TMA thread and absmax warps) uses R0-R37 in the sm_90a SASS
      // (nvdisasm, tenth session); a change to it should be checked the same way.
      asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
      if (tid == 0) {  // x, by TMA
        for (int kc = 0; kc < KC; ++kc) {
          if (kG4AmPass) load_am_stage(kc);  // the stage's absmax first: its ring is the deeper one
          load_x_stage(kc);
        }
      } else if (!kG4AmPass && tid >= 32 && tid < 96) {  // the absmax of rows tid - 32 + 64j (G4AbsmaxRows)
        constexpr int R = C::kRows / 64;
        G4AbsmaxRows<R> cache;
        std::size_t e0[R];  // element index of (row, 0)
        bool live[R];
#pragma unroll
        for (int j = 0; j < R; ++j) {
          const int r = row0 + tid - 32 + 64 * j;
          live[j] = r < a.N;
          e0[j] = std::size_t(live[j] ? r : 0) * std::size_t(a.K);
        }
        for (int kc = 0; kc < KC; ++kc) {
          const int s = kc % SA;
          float v[R];
#pragma unroll
          for (int j = 0; j < R; ++j)  // the loads before the wait: they overlap it
            v[j] =
                QLORA_G4_AMCONST || !live[j]
                    ? float(live[j])
                    : g4_row_absmax(cache, j, a.am, s_map, (e0[j] + std::size_t(kc) * 64) >> a.block_shift);
          mbar_wait_sleep(&am_empty[s], ((kc / SA) & 1) ^ 1);
#pragma unroll
          for (int j = 0; j < R; ++j) s_am[s * C::kRows + g4_am_slot(tid - 32 + 64 * j)] = v[j];
          mbar_arrive(&am_full[s]);  // release: the stores above are seen by whoever waits for the phase
        }
      }
      return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  }

  const int c = wg - 1, wt = tid % 128, wi = wt / 32, lane = tid & 31, g = lane >> 2, t = lane & 3;
  float acc[H][T / 2];  // zeroed in each feed's branch (where the register feed always did it)
  auto zero_acc = [&] {
#pragma unroll
    for (int h = 0; h < H; ++h)
#pragma unroll
      for (int i = 0; i < T / 2; ++i) acc[h][i] = 0.0f;
  };

  if constexpr (kG4SharedFeed) {  // the consumers only multiply
    static_assert(H == 1, "the shared feed is written for 128-row blocks");
    zero_acc();
    const std::uint32_t x_base = smem_addr(s_x), w_base = smem_addr(s_w);
    // 4 decoders: this thread issues the copies, at its releases, every stage whose slot is then free
    // (tested, not waited for: a wait here would hold its warpgroup's next wgmma until the other
    // warpgroup's release). Enough for progress: when it releases unit kc - 1 it has seen unit kc's W,
    // so the decoders have freed the packed slots through unit kc + SP - 1. An x stage not yet issued
    // when its unit comes is issued then, waiting.
    const bool issuer = kG4Decoders == 4 && tid == 128;
    int next_w = 0, next_x = 0;  // the next packed W and x stages to issue
    auto pump = [&] {
      while (next_x < KC && mbar_test(&empty[next_x % S], ((next_x / S) & 1) ^ 1))
        load_x_stage(next_x++, false);
      while (next_w < KC && mbar_test(&pk_empty[next_w % SP], ((next_w / SP) & 1) ^ 1) &&
             mbar_test(&am_empty[next_w % SA], ((next_w / SA) & 1) ^ 1))
        load_w_stage(next_w++, false);
    };
    if (issuer) pump();  // x's first S stages, then the packed ring's SP
    for (int kc = 0; kc < KC; ++kc) {
      const int s = kc % S, sw = kc % SW;
      if (issuer)
        while (next_x <= kc) load_x_stage(next_x++);
      mbar_wait(&full[s], (kc / S) & 1);
      mbar_wait(&w_full[sw], (kc / SW) & 1);
      const std::uint64_t db = sw128_desc(x_base + s * SB);
      const std::uint64_t da =
          sw128_desc(w_base + sw * C::kWStageBytes + c * 64 * 128);  // this warpgroup's 64 rows
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wgmma_fence();
        wgmma_m64n256k16_ss(acc[0], da + 2 * j, db + 2 * j);
        wgmma_commit();
        wgmma_wait<D - 1>();
        if (j == D - 2 && kc > 0 && lane == 0) {  // unit kc - 1's x and W are done
          mbar_arrive(&empty[(kc - 1) % S]);
          mbar_arrive(&w_empty[(kc - 1) % SW]);
          if (issuer) pump();
        }
      }
    }
  } else {
    std::uint32_t sel_a, sel_b;
    g4_transpose_selectors(t, sel_a, sel_b);
    const G4Lut<Table> lut(s_lut, lane);
    const int tiles = a.N / 16;

    // This warp's 16-row tile of each half h (rows row0 + 64·(H·c + h) + 16·wi ..): packed pointer at
    // the lane's slice of unit 0, whether the tile exists, where rows g and g + 8's absmax pair lies in a
    // stage of the absmax ring.
    const std::uint8_t* pw[H];
    bool valid[H];
    int am_slot[H];
#pragma unroll
    for (int h = 0; h < H; ++h) {
      const int tile = (row0 + 64 * (H * c + h) + 16 * wi) / 16;
      valid[h] = tile < tiles;
      pw[h] = a.packed + std::size_t(valid[h] ? tile : 0) * KC * 512 + lane * 16;
      am_slot[h] = g4_am_slot(64 * (H * c + h) + 16 * wi + g);
    }
    zero_acc();

    // Units kc and kc + 1 in flight (a ring of two per half, by the parity of kc); their values are
    // first used a unit later (g4_decode), so a load has a unit's worth of products to land.
    G4Unit u[2][H];
#pragma unroll
    for (int h = 0; h < H; ++h) {
      g4_load(u[0][h], pw[h], valid[h]);
      if (KC > 1) g4_load(u[1][h], pw[h] + 512, valid[h]);
    }

    const std::uint32_t x_base = smem_addr(s_x);
    // Decoding a unit: all four slabs' A fragments at once, into one of two sets of A registers (by
    // the unit's parity). It runs during the unit before, as soon as the unit before that is done
    // (after slab D - 2's wait, when at most D - 1 groups of this unit are in flight): the table reads
    // and the multiplies then overlap the wgmmas in flight instead of standing between one unit's last
    // wgmma and the next one's first. The set written was last read by that finished unit.
    auto decode = [&](int kc, G4Unit(&uu)[H], std::uint32_t(&ra)[H][4][4]) {
      const int sd = kc % SA;
      mbar_wait(&am_full[sd], (kc / SA) & 1);  // the unit's absmax
#pragma unroll
      for (int h = 0; h < H; ++h) {
        G4Frag f;
        g4_decode(f, uu[h], s_am + sd * C::kRows + am_slot[h], sel_a, sel_b);
        if (kc + 2 < KC)  // the unit two ahead into the registers just decoded
          g4_load(uu[h], pw[h] + std::size_t(kc + 2) * 512, valid[h]);
        const auto s0 = G4Lut<Table>::scale(f.am0), s1 = G4Lut<Table>::scale(f.am1);
#ifdef QLORA_G4_NODECODE  // lab probes (wrong results): which part of the decoding costs
        // 1: the transposed words masked to exponent bits (zero mantissas), no table, absmax unused (the
        // absmax warps still run; with QLORA_G4_AMCONST=1 they load nothing); 2: the same with random
        // signs and mantissas (tensor-core activity like real weights'); 3: as 2, times the absmax (one
        // bf16x2 multiply per register); 4: the table reads of the chosen table, absmax 1. (Before the
        // absmax warps, 1 and 4 also dropped the consumers' absmax loads: docs/performance.md.)
        constexpr std::uint32_t kKeep = QLORA_G4_NODECODE == 1 ? 0x3f803f80u : 0x807f807fu;
        constexpr std::uint32_t kSet = QLORA_G4_NODECODE == 1 ? 0u : 0x3f003f00u;
        if constexpr (QLORA_G4_NODECODE == 4) {
          lut.unit(ra[h], f, G4Lut<Table>::scale(1.0f), G4Lut<Table>::scale(1.0f));
        } else {
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const std::uint32_t v = (f.q[j] & kKeep) | kSet;
              ra[h][j][r] =
                  QLORA_G4_NODECODE == 3 ? bf16x2_scale(v, __float2bfloat162_rn(r & 1 ? f.am1 : f.am0)) : v;
            }
        }
#else
        lut.unit(ra[h], f, s0, s1);
#endif
      }
    };
    // Unit kc's wgmmas from its decoded set ra; after slab D - 2's wait, the next unit's decoding into rn.
    auto unit = [&](int kc, std::uint32_t(&ra)[H][4][4], G4Unit(&un)[H], std::uint32_t(&rn)[H][4][4]) {
      const int s = kc % S;
      mbar_wait(&full[s], (kc / S) & 1);
      const std::uint64_t desc = sw128_desc(x_base + s * SB);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wgmma_fence();
#pragma unroll
        for (int h = 0; h < H; ++h) wgmma_m64k16_rs<T>(acc[h], ra[h][j], desc + 2 * j);
        wgmma_commit();
        wgmma_wait<D - 1>();
        if (j == D - 2 && kc > 0 &&
            lane == 0) {  // unit kc - 1's x and absmax (read in its decoding) are done
          mbar_arrive(&empty[(kc - 1) % S]);
          mbar_arrive(&am_empty[(kc - 1) % SA]);
        }
        if (j == D - 2 && kc + 1 < KC) decode(kc + 1, un, rn);
      }
    };
    std::uint32_t ra[2][H][4][4];
    decode(0, u[0], ra[0]);
    int kc = 0;
    for (; kc + 1 < KC; kc += 2) {
      unit(kc, ra[0], u[1], ra[1]);
      unit(kc + 1, ra[1], u[0], ra[0]);
    }
    if (kc < KC) unit(kc, ra[0], u[1], ra[1]);
  }  // the register feed
  wgmma_wait<0>();

  // Epilogue. Every consumer warp is done with the ring (its last wgmma has completed) before either
  // warpgroup overwrites it.
  named_barrier(1, 256);
  unsigned char* s_out = smem + std::size_t(c) * T * C::kOutStride;  // (token T, row 64·H) bf16
  const std::uint32_t out_base = smem_addr(s_out);
  const int n0 = row0 + 64 * H * c;
  constexpr int kChunks = 8 * H;            // 16-byte chunks per token row of the warpgroup's outputs
  const int mat = lane >> 3, r = lane & 7;  // the ldmatrix / stmatrix row this lane addresses
  auto frag_addr = [&](int h, int i) {      // token tiles i, i + 1; rows g, g + 8 of the warp's 16
    const int tok = 8 * (i + (mat >> 1)) + r, row = 64 * h + 16 * wi + 8 * (mat & 1);
    return out_base + std::uint32_t(tok * C::kOutStride + row * 2);
  };
  if (a.accumulate) {  // y's tile into shared memory, then into the fp32 accumulators: one rounding
    for (int idx = wt; idx < T * kChunks; idx += 128) {
      const int tok = idx / kChunks, ch = idx % kChunks, n = n0 + 8 * ch;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (tok0 + tok < a.M && n < a.N)
        v = *reinterpret_cast<const uint4*>(a.y + std::size_t(tok0 + tok) * a.N + n);
      *reinterpret_cast<uint4*>(s_out + tok * C::kOutStride + ch * 16) = v;
    }
    named_barrier(2 + c, 128);
#pragma unroll
    for (int h = 0; h < H; ++h)
#pragma unroll
      for (int i = 0; i < T / 8; i += 2) {
        std::uint32_t v[4];
        ldmatrix_x4_trans(frag_addr(h, i), v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v[j]));
          acc[h][4 * i + 2 * j] += f.x;
          acc[h][4 * i + 2 * j + 1] += f.y;
        }
      }
    // each warp's stmatrix below writes the very locations its ldmatrix read: no barrier between
  }
#pragma unroll
  for (int h = 0; h < H; ++h)
#pragma unroll
    for (int i = 0; i < T / 8; i += 2)
      stmatrix_x4_trans(frag_addr(h, i), bf16_pair(acc[h][4 * i], acc[h][4 * i + 1]),
                        bf16_pair(acc[h][4 * i + 2], acc[h][4 * i + 3]),
                        bf16_pair(acc[h][4 * i + 4], acc[h][4 * i + 5]),
                        bf16_pair(acc[h][4 * i + 6], acc[h][4 * i + 7]));
  named_barrier(2 + c, 128);
  for (int idx = wt; idx < T * kChunks; idx += 128) {
    const int tok = idx / kChunks, ch = idx % kChunks, n = n0 + 8 * ch;
    if (tok0 + tok < a.M && n < a.N)
      *reinterpret_cast<uint4*>(a.y + std::size_t(tok0 + tok) * a.N + n) =
          *reinterpret_cast<const uint4*>(s_out + tok * C::kOutStride + ch * 16);
  }
#else
  __trap();  // launched only where gemm_4bit_sm90_supported found sm_90a code
#endif
}

inline PFN_cuTensorMapEncodeTiled_v12000 g4_tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    QLORA_CUDA_CHECK(
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
    QLORA_CHECK(q == cudaDriverEntryPointSuccess && fn != nullptr,
                "cuda::gemm_4bit_sm90: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// x (M, K) row-major bf16 as a TMA tensor map: boxes of `tokens` tokens × 64 values, 128-byte swizzle,
// zeros past M.
inline CUtensorMap g4_x_map(const __nv_bfloat16* x, int M, int K, int tokens) {
  const auto encode = g4_tensor_map_encoder();
  CUtensorMap map{};
  const cuuint64_t dims[2] = {cuuint64_t(K), cuuint64_t(M)};
  const cuuint64_t strides[1] = {cuuint64_t(K) * 2};
  const cuuint32_t box[2] = {64, cuuint32_t(tokens)};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<__nv_bfloat16*>(x), dims,
                            strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  QLORA_CHECK(r == CUDA_SUCCESS, "cuda::gemm_4bit_sm90: cuTensorMapEncodeTiled failed (CUresult ", int(r),
              ") for x of (", M, ", ", K, ")");
  return map;
}

// The packed weights of the tiles layout (tile, unit kc, 512 bytes) as a 2D map of 32-bit words:
// (tiles, KC · 128); boxes of `box_tiles` tiles × one unit, zeros past the last tile.
inline CUtensorMap g4_w_map(const std::uint8_t* packed, int tiles, int KC, int box_tiles) {
  const auto encode = g4_tensor_map_encoder();
  CUtensorMap map{};
  const cuuint64_t dims[2] = {cuuint64_t(KC) * 128, cuuint64_t(tiles)};
  const cuuint64_t strides[1] = {cuuint64_t(KC) * 512};
  const cuuint32_t box[2] = {128, cuuint32_t(box_tiles)};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r =
      encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT32, 2, const_cast<void*>(static_cast<const void*>(packed)),
             dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  QLORA_CHECK(r == CUDA_SUCCESS, "cuda::gemm_4bit_sm90: cuTensorMapEncodeTiled failed (CUresult ", int(r),
              ") for the packed weights (", tiles, " tiles, ", KC, " units)");
  return map;
}

}  // namespace detail

// Whether gemm_4bit_sm90 takes this product: sm_90a code on an sm_90 device, W in the tiles layout
// (N % 16 == 0, K % 64 == 0), blocksize ≥ 64 dividing K, nested blocksize 256, M ≥ 1, x and y with
// 16-byte aligned rows.
inline bool gemm_4bit_sm90_supported(const Context& ctx, const DeviceQuantized4bit& w, const __nv_bfloat16* x,
                                     int M, const __nv_bfloat16* y) {
  if (w.shape.size() != 2 || M < 1 || w.layout != Packed4Layout::Tiles) return false;
  const std::int64_t N = w.shape[0], K = w.shape[1];
  if (!(N > 0 && K > 0 && N % 16 == 0 && K % 64 == 0 && w.blocksize >= 64 && K % w.blocksize == 0 &&
        N * K < (std::int64_t(1) << 40) && N < (std::int64_t(1) << 30) && K < (std::int64_t(1) << 30) &&
        (!w.double_quant || w.nested_blocksize == 256)))
    return false;
  if ((reinterpret_cast<std::uintptr_t>(x) & 15) || (reinterpret_cast<std::uintptr_t>(y) & 15)) return false;
  return ctx.sm90a_code();
}

// The kernel's variants (the benchmarks' lab compares them): the code table (G4Lut: Exact, the
// weights of dequantize_4bit; Fast, bf16 roundings); depth, the wgmma groups a warpgroup keeps in
// flight (the kernel's D). The block shape is G4Config<1>.
enum class Gemm4Table { Fast = detail::kG4Fast, Exact = detail::kG4Exact };
inline const char* gemm4_table_name(Gemm4Table t) { return t == Gemm4Table::Exact ? "exact" : "fast"; }
struct Gemm4Sm90Variant {
  Gemm4Table table = Gemm4Table::Exact;
  int depth = 2;  // wgmma groups in flight per warpgroup: 2 or 3
};

// y (M, N) = x (M, K) · Wᵀ (or y += with accumulate) through the kernel above. Asynchronous on ctx's
// stream; throws where gemm_4bit_sm90_supported is false.
inline void gemm_4bit_sm90(const Context& ctx, const DeviceQuantized4bit& w, const __nv_bfloat16* x, int M,
                           __nv_bfloat16* y, bool accumulate = false, Gemm4Sm90Variant v = {}) {
  QLORA_CHECK(gemm_4bit_sm90_supported(ctx, w, x, M, y), "cuda::gemm_4bit_sm90: unsupported product: W (",
              w.rows(), ", ", w.cols(), "), blocksize ", w.blocksize, ", layout ",
              w.layout == Packed4Layout::Tiles ? "tiles" : "rows", ", M = ", M, ", device sm_",
              ctx.props().major, ctx.props().minor,
              " (needs sm_90a code, the tiles layout, blocksize >= 64 and 16-byte aligned x, y)");
  ctx.activate();
  detail::Gemm4Args args;
  detail::set_weight_args(args, w);
  args.y = y;
  args.M = M;
  args.accumulate = accumulate;
  args.am_tiles = nullptr;
  QLORA_CHECK(v.depth == 2 || v.depth == 3, "cuda::gemm_4bit_sm90: depth ", v.depth, ", expected 2 or 3");
  auto launch = [&](auto h_tag, auto table_tag, auto depth_tag) {
    constexpr int H = decltype(h_tag)::value;
    using C = detail::G4Config<H>;
    auto kernel = detail::gemm4_sm90_kernel<H, decltype(table_tag)::value, decltype(depth_tag)::value>;
    const CUtensorMap map = detail::g4_x_map(x, M, args.K, C::kTokens);
    // the shared feed's packed W (the register feed loads its own: it gets x's map, unused)
    const CUtensorMap wmap =
        detail::kG4SharedFeed ? detail::g4_w_map(args.packed, args.N / 16, args.K / 64, C::kRows / 16) : map;
    QLORA_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::kSmemBytes)));
    const dim3 grid(unsigned((args.N + C::kRows - 1) / C::kRows),
                    unsigned((M + C::kTokens - 1) / C::kTokens));
    QLORA_CHECK(grid.y <= 65535u, "cuda::gemm_4bit_sm90: M = ", M, " needs ", grid.y,
                " token tiles, at most 65535");
    if constexpr (detail::kG4AmPass) {  // lab: stream-ordered scratch (graph-capturable), freed after
      static_assert(H == 1, "QLORA_G4_AMTMA: the pass writes 128-row tiles");
      const std::size_t count = std::size_t(grid.x) * (args.K / 64) * C::kRows;
      float* am_tiles = nullptr;
      QLORA_CUDA_CHECK(
          cudaMallocAsync(reinterpret_cast<void**>(&am_tiles), count * sizeof(float), ctx.stream()));
      struct Free {  // also when a launch check below throws
        float* p;
        cudaStream_t s;
        ~Free() { cudaFreeAsync(p, s); }
      } const free_am{am_tiles, ctx.stream()};
      detail::g4_absmax_tiles_kernel<>
          <<<unsigned(std::min<std::size_t>((count + 255) / 256, 4096)), 256, 0, ctx.stream()>>>(
              args, am_tiles, count);
      QLORA_CUDA_CHECK_LAUNCH("g4_absmax_tiles_kernel");
      args.am_tiles = am_tiles;
      kernel<<<grid, detail::kG4Threads, C::kSmemBytes, ctx.stream()>>>(map, wmap, args);
      QLORA_CUDA_CHECK_LAUNCH("gemm4_sm90_kernel");
      return;
    }
    kernel<<<grid, detail::kG4Threads, C::kSmemBytes, ctx.stream()>>>(map, wmap, args);
    QLORA_CUDA_CHECK_LAUNCH("gemm4_sm90_kernel");
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I3 = std::integral_constant<int, 3>;
  auto by_depth = [&](auto e) { v.depth == 2 ? launch(I1{}, e, I2{}) : launch(I1{}, e, I3{}); };
  switch (v.table) {
    case Gemm4Table::Fast: return by_depth(std::integral_constant<int, detail::kG4Fast>{});
    case Gemm4Table::Exact: return by_depth(std::integral_constant<int, detail::kG4Exact>{});
  }
  QLORA_CHECK(false, "cuda::gemm_4bit_sm90: unknown table ", int(v.table));
}

}  // namespace cuda
}  // namespace qlora
