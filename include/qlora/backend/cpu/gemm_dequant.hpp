#pragma once
// Products with a weight that is decoded tile by tile: the large-M path of every format, and the
// generic path of the formats and shapes without a fused kernel.
//
//   forward:  y (M, N) = x (M, K) . W^T      threads split N; each decodes tiles of W rows
//   backward: dx (M, K) = dy (M, N) . W      threads split K; each decodes tiles of W columns
//
// A tile is decoded into a per-thread fp32 buffer by `deq(r0, r1, c0, c1, out, ld)` (rows [r0, r1),
// columns [c0, c1) of W, row stride ld) and multiplied with Eigen's GEMM on row-major maps. Eigen
// runs single-threaded here (no OpenMP): the split over threads is ours, so every thread writes a
// disjoint block of the output and nothing needs a reduction.
//
// Tile sizes: Eigen repacks the activation operand on every call, so a call must carry enough
// work to hide that (kTileRows weight rows per call: the packing of x costs ~1/(2 * 256) of the
// FLOPs); the decoded tile itself (kTileRows x up to kTileCols fp32, 4 MiB) stays in L2/L3 while
// Eigen reads it, so the weight comes from DRAM once, packed.
#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "qlora/backend/cpu/accumulate.hpp"
#include "qlora/backend/cpu/thread_pool.hpp"
#include "qlora/core/parallel.hpp"

namespace qlora {
namespace cpu {

using RowMatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstRowMap = Eigen::Map<const RowMatrixF, Eigen::Unaligned, Eigen::OuterStride<>>;
using RowMap = Eigen::Map<RowMatrixF, Eigen::Unaligned, Eigen::OuterStride<>>;

namespace tile {
constexpr std::int64_t kTileRows = 256;      // weight rows per GEMM call (large M)
constexpr std::int64_t kTileCols = 4096;     // weight columns per GEMM call
constexpr std::int64_t kSmallTileRows = 16;  // small M: a tile that stays in L1/L2
}  // namespace tile

// y (M, N) (+)= x (M, K) . W^T, W decoded by deq in tiles of `tile_rows` rows. Tile column starts
// are multiples of 32 (what the 4-bit grouped layout needs).
template <class Deq>
void forward_tiled(const Deq& deq, std::int64_t N, std::int64_t K, const float* x, std::int64_t M, float* y,
                   Accumulate acc, std::int64_t tile_rows) {
  if (M == 0 || N == 0) return;
  const std::int64_t kc_max = std::min(K, tile::kTileCols);
  pool_for(std::size_t(N), std::size_t(std::min(tile_rows, std::int64_t(16))), std::size_t(tile_rows),
           [&](std::size_t b, std::size_t e) {
             std::vector<float> buf(
                 std::size_t(std::min(tile_rows, std::int64_t(e - b)) * std::max<std::int64_t>(kc_max, 1)));
             for (std::int64_t n0 = std::int64_t(b); n0 < std::int64_t(e); n0 += tile_rows) {
               const std::int64_t nt = std::min(tile_rows, std::int64_t(e) - n0);
               RowMap yb(y + n0, M, nt, Eigen::OuterStride<>(N));  // (M, nt)
               if (K == 0) {
                 if (acc == Accumulate::No) yb.setZero();
                 continue;
               }
               for (std::int64_t k0 = 0; k0 < K; k0 += kc_max) {
                 const std::int64_t kc = std::min(kc_max, K - k0);
                 deq(n0, n0 + nt, k0, k0 + kc, buf.data(), kc);
                 ConstRowMap xb(x + k0, M, kc, Eigen::OuterStride<>(K));        // (M, kc)
                 ConstRowMap wb(buf.data(), nt, kc, Eigen::OuterStride<>(kc));  // (nt, kc)
                 if (k0 == 0 && acc == Accumulate::No)
                   yb.noalias() = xb * wb.transpose();
                 else
                   yb.noalias() += xb * wb.transpose();
               }
             }
           });
}

// dx (M, K) (+)= dy (M, N) . W, W decoded by deq in tiles of kTileRows rows x (a thread's columns,
// at most kTileCols). Threads split K at multiples of 32.
template <class Deq>
void backward_tiled(const Deq& deq, std::int64_t N, std::int64_t K, const float* dy, std::int64_t M,
                    float* dx, Accumulate acc, std::int64_t tile_rows) {
  if (M == 0 || K == 0) return;
  pool_for(std::size_t(K), 32, 256, [&](std::size_t b, std::size_t e) {
    const std::int64_t kc_max = std::min<std::int64_t>(std::int64_t(e - b), tile::kTileCols);
    std::vector<float> buf(std::size_t(std::min(tile_rows, std::max<std::int64_t>(N, 1)) * kc_max));
    for (std::int64_t k0 = std::int64_t(b); k0 < std::int64_t(e); k0 += kc_max) {
      const std::int64_t kc = std::min(kc_max, std::int64_t(e) - k0);
      RowMap dxb(dx + k0, M, kc, Eigen::OuterStride<>(K));  // (M, kc)
      if (N == 0 && acc == Accumulate::No) dxb.setZero();
      for (std::int64_t n0 = 0; n0 < N; n0 += tile_rows) {
        const std::int64_t nt = std::min(tile_rows, N - n0);
        deq(n0, n0 + nt, k0, k0 + kc, buf.data(), kc);
        ConstRowMap dyb(dy + n0, M, nt, Eigen::OuterStride<>(N));      // (M, nt)
        ConstRowMap wb(buf.data(), nt, kc, Eigen::OuterStride<>(kc));  // (nt, kc)
        if (n0 == 0 && acc == Accumulate::No)
          dxb.noalias() = dyb * wb;
        else
          dxb.noalias() += dyb * wb;
      }
    }
  });
}

// The dense fp32 weight needs no decoding: the same splits, one Eigen call per thread.
// W (N, K), x (M, K), y (M, N)
inline void forward_f32(const float* W, std::int64_t N, std::int64_t K, const float* x, std::int64_t M,
                        float* y, Accumulate acc) {
  if (M == 0 || N == 0) return;
  // GEMV: rows of W over threads (Eigen's matrix-vector product is single-threaded).
  const std::size_t min_rows = std::size_t(std::max<std::int64_t>(16, 65536 / std::max<std::int64_t>(K, 1)));
  pool_for(std::size_t(N), 16, min_rows, [&](std::size_t b, std::size_t e) {
    const std::int64_t nt = std::int64_t(e - b);
    RowMap yb(y + b, M, nt, Eigen::OuterStride<>(N));                             // (M, nt)
    ConstRowMap xb(x, M, K, Eigen::OuterStride<>(std::max<std::int64_t>(K, 1)));  // (M, K)
    ConstRowMap wb(W + std::int64_t(b) * K, nt, K,
                   Eigen::OuterStride<>(std::max<std::int64_t>(K, 1)));  // (nt, K)
    if (acc == Accumulate::No)
      yb.noalias() = xb * wb.transpose();
    else
      yb.noalias() += xb * wb.transpose();
  });
}

// W (N, K), dy (M, N), dx (M, K)
inline void backward_f32(const float* W, std::int64_t N, std::int64_t K, const float* dy, std::int64_t M,
                         float* dx, Accumulate acc) {
  if (M == 0 || K == 0) return;
  pool_for(std::size_t(K), 16, 256, [&](std::size_t b, std::size_t e) {
    const std::int64_t kc = std::int64_t(e - b);
    RowMap dxb(dx + b, M, kc, Eigen::OuterStride<>(K));                             // (M, kc)
    ConstRowMap dyb(dy, M, N, Eigen::OuterStride<>(std::max<std::int64_t>(N, 1)));  // (M, N)
    ConstRowMap wb(W + b, N, kc, Eigen::OuterStride<>(K));                          // (N, kc)
    if (acc == Accumulate::No)
      dxb.noalias() = dyb * wb;
    else
      dxb.noalias() += dyb * wb;
  });
}

}  // namespace cpu
}  // namespace qlora
