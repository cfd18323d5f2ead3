#pragma once
// y = x · Wᵀ for a 4-bit W on the GPU, choosing the path by the number of tokens M:
//   M ≤ kGemvMaxTokens (and a shape gemv_4bit takes): the tensor-core GEMV, reading W once;
//   M ≤ 2 · kGemvMaxTokens on a weight of ≥ kGemvTwiceMinValues values: the GEMV twice;
//   kSm90MinTokens < M ≤ kSm90MaxTokens on a weight of ≥ kSm90MinValues values (≤ kSm90MaxTokensLarge
//   on ≥ kSm90LargeValues), W in the tiles layout, an sm_90 GPU and sm_90a code in the build:
//   gemm_4bit_sm90 (wgmma, W decoded in registers);
//   otherwise: dequantize W into the caller's reused bf16 scratch, then cuBLAS bf16 GEMM.
// The scratch is grown on first use and kept (N·K bf16: the price of a large-M product is one
// dequantized copy of the largest weight, shared by all layers that use the same scratch).
//
// Tried and measured slower (docs/performance.md, "CUDA (H200)"): cutting the large-M product into
// row slices, each dequantized on a second stream while cuBLAS multiplied the one before. cuBLAS's
// large tiles leave no SM room for the dequantizer, so nothing overlapped, and the smaller GEMMs
// ran slower: 1.26–1.32x the bf16 time at M = 4096 against 1.14x unsliced. And on an H100
// (fourteenth session), the slices one after the other on one stream, each small enough that its bf16
// copy could stay in L2: 1.16–1.28x against 1.095x at 14336x4096; the slices' dequantization took
// longer than the whole weight's (75–112 µs against 60), not shorter.
#include <cuda_bf16.h>

#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/dequantize4bit.cuh"
#include "qlora/cuda/gemm4bit_sm90.cuh"
#include "qlora/cuda/gemm_bf16.cuh"
#include "qlora/cuda/gemv4bit.cuh"
#include "qlora/cuda/quantized4bit.cuh"

namespace qlora {
namespace cuda {

// Up to 32 tokens the GEMV wins; at 64 the dequantize + cuBLAS path does (H200, 14336x4096: the
// register GEMV took 99 µs at M = 64, the dequantize + cuBLAS path 86 µs at M = 128;
// docs/performance.md).
constexpr int kGemvMaxTokens = 32;

// From 33 to 64 tokens on a large weight, the GEMV twice (32 tokens, then the rest; the second call
// finds part of W in L2) beats dequantizing. H100 (docs/performance.md, "CUDA (H100)", eighth
// session): 14336x4096 M = 64 75.7 µs against 105.4 for dequantize + cuBLAS, M = 40 53.6; 11008x4096
// M = 40 / 64 48.5 / 67.7 µs, where dequantizing alone takes 47.4. At 4096x4096 the two paths are
// within 10% either way (M = 48: 26.1 twice against 29.1; M = 64: 32.2 against 29.2), so the smaller
// weights keep dequantize + cuBLAS. Weights of at least this many values take the two calls.
constexpr long long kGemvTwiceMinValues = 32ll << 20;

// The window where gemm_4bit_sm90 (exact table, 3 wgmma groups in flight) beat dequantize + cuBLAS on
// an H100 (docs/performance.md, "CUDA (H100)", tenth session, the kernel with its absmax warps): at
// 14336x4096, M = 128 / 256 / 512: 72.6 / 62.4 / 124.8 µs against 106.4 / 114.5 / 152.5; at
// 11008x4096, M = 128: 59.5 against 82.9. Its block owns 128 rows × 256 tokens and all of K; it wins
// while few waves of blocks cover the product: at M = 512 it won at 14336 rows (also by 6% in the
// ninth session) and lost at 11008 (124.8 against 115.3 µs: 172 blocks, 1.3 waves), and at 4096x4096
// (32 blocks per 256 tokens) it lost at every M. At M = 4096 it takes 1.3-1.4x cuBLAS bf16 (its
// decoding costs that), where dequantize + cuBLAS takes 1.09x (paired timing).
constexpr int kSm90MinTokens = 2 * kGemvMaxTokens;
constexpr int kSm90MaxTokens = 256;
constexpr long long kSm90MinValues = 40ll << 20;
constexpr int kSm90MaxTokensLarge = 512;            // on weights of ≥ kSm90LargeValues values
constexpr long long kSm90LargeValues = 56ll << 20;  // 14336 × 4096 and above

// Which path matmul_4bit takes for this product (the benchmarks print it).
enum class Matmul4Path { Gemv, GemvTwice, Sm90, DequantCublas };
inline Matmul4Path matmul_4bit_path(const Context& ctx, const DeviceQuantized4bit& w, const __nv_bfloat16* x,
                                    int M, const __nv_bfloat16* y) {
  if (w.shape.size() != 2) return Matmul4Path::DequantCublas;
  const long long values = w.shape[0] * w.shape[1];
  if (M <= kGemvMaxTokens && gemv_4bit_supported(w, M)) return Matmul4Path::Gemv;
  if (M <= 2 * kGemvMaxTokens && gemv_4bit_supported(w, M) && values >= kGemvTwiceMinValues)
    return Matmul4Path::GemvTwice;
  const int sm90_max = values >= kSm90LargeValues ? kSm90MaxTokensLarge : kSm90MaxTokens;
  if (M > kSm90MinTokens && M <= sm90_max && values >= kSm90MinValues &&
      gemm_4bit_sm90_supported(ctx, w, x, M, y))
    return Matmul4Path::Sm90;
  return Matmul4Path::DequantCublas;
}

// y (M, N) = x (M, K) · Wᵀ through the dequantized scratch (any M; matmul_4bit's path above 64
// tokens, and above 32 on weights under kGemvTwiceMinValues values).
inline void matmul_4bit_dequant(const Context& ctx, const DeviceQuantized4bit& w, const __nv_bfloat16* x,
                                int M, __nv_bfloat16* y, DeviceBuffer<__nv_bfloat16>& scratch,
                                bool accumulate = false) {
  QLORA_CHECK(w.shape.size() == 2, "cuda::matmul_4bit: weight has ", w.shape.size(),
              " dimensions, expected 2");
  const int N = int(w.shape[0]), K = int(w.shape[1]);
  const std::size_t need = std::size_t(N) * std::size_t(K);
  if (scratch.size() < need) scratch = DeviceBuffer<__nv_bfloat16>(need);
  dequantize_4bit(ctx, w, scratch.data());
  gemm_bf16(ctx, x, M, K, scratch.data(), N, y, accumulate ? 1.0f : 0.0f);
}

// x: (M, K), y: (M, N) device pointers; W: (N, K).
inline void matmul_4bit(const Context& ctx, const DeviceQuantized4bit& w, const __nv_bfloat16* x, int M,
                        __nv_bfloat16* y, DeviceBuffer<__nv_bfloat16>& scratch, bool accumulate = false) {
  QLORA_CHECK(w.shape.size() == 2, "cuda::matmul_4bit: weight has ", w.shape.size(),
              " dimensions, expected 2");
  switch (matmul_4bit_path(ctx, w, x, M, y)) {
    case Matmul4Path::Gemv: return gemv_4bit(ctx, w, x, M, y, accumulate);
    case Matmul4Path::GemvTwice: {  // rows 0..31, then 32..M-1, of x and y
      const int K = int(w.shape[1]), N = int(w.shape[0]);
      gemv_4bit(ctx, w, x, kGemvMaxTokens, y, accumulate);
      gemv_4bit(ctx, w, x + std::size_t(kGemvMaxTokens) * K, M - kGemvMaxTokens,
                y + std::size_t(kGemvMaxTokens) * N, accumulate);
      return;
    }
    case Matmul4Path::Sm90:
      return gemm_4bit_sm90(ctx, w, x, M, y, accumulate, Gemm4Sm90Variant{Gemm4Table::Exact, 3});
    case Matmul4Path::DequantCublas: break;
  }
  matmul_4bit_dequant(ctx, w, x, M, y, scratch, accumulate);
}

}  // namespace cuda
}  // namespace qlora
