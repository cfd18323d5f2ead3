#pragma once
// Conversion of a DeviceQuantized4bit between its two byte orders (Packed4Layout in
// quantized4bit.cuh): bitsandbytes' rows and the GEMV's tiles. Each conversion writes a new packed
// buffer (the matrix's packed bytes once more, briefly) and swaps it in; the absmax arrays do not
// move. Asynchronous on ctx's stream, like the kernels that then read the weight.
#include <algorithm>
#include <cstdint>

#include "qlora/cuda/context.cuh"
#include "qlora/cuda/error.cuh"
#include "qlora/cuda/quantized4bit.cuh"

namespace qlora {
namespace cuda {
namespace detail {

// One thread per 16-byte lane slice of a unit (32 per unit): 8 bytes of row g, 8 of row g + 8.
// ToTiles: rows -> tiles; else tiles -> rows.
template <bool ToTiles>
__global__ void relayout4_kernel(const std::uint8_t* __restrict__ src, std::uint8_t* __restrict__ dst,
                                 std::size_t units, std::size_t K) {
  const std::size_t row_bytes = K / 2, KC = K / 64;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < units * 32;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t unit = i / 32, l = i % 32, tile = unit / KC, kc = unit % KC;
    const std::size_t r = tile * 16 + l / 4, b = kc * 32 + (l % 4) * 8;
    const std::size_t lo = r * row_bytes + b, hi = lo + 8 * row_bytes;  // rows g and g + 8
    if (ToTiles) {
      const uint2 a = *reinterpret_cast<const uint2*>(src + lo),
                  c = *reinterpret_cast<const uint2*>(src + hi);
      *reinterpret_cast<uint4*>(dst + i * 16) = make_uint4(a.x, a.y, c.x, c.y);
    } else {
      const uint4 v = *reinterpret_cast<const uint4*>(src + i * 16);
      *reinterpret_cast<uint2*>(dst + lo) = make_uint2(v.x, v.y);
      *reinterpret_cast<uint2*>(dst + hi) = make_uint2(v.z, v.w);
    }
  }
}

}  // namespace detail

// Whether q can take the Tiles layout: an (N, K) matrix with N % 16 == 0 and K % 64 == 0.
inline bool tiles_supported(const DeviceQuantized4bit& q) {
  return q.shape.size() == 2 && q.shape[0] > 0 && q.shape[1] > 0 && q.shape[0] % 16 == 0 &&
         q.shape[1] % 64 == 0;
}

// q's packed bytes into `layout` (nothing to do when they already are).
inline void set_layout(const Context& ctx, DeviceQuantized4bit& q, Packed4Layout layout) {
  if (q.layout == layout) return;
  QLORA_CHECK(tiles_supported(q),
              "cuda::set_layout: the tiles layout needs an (N, K) matrix with N % 16 == 0 "
              "and K % 64 == 0, got shape (",
              q.rows(), ", ", q.cols(), ")");
  const std::size_t K = std::size_t(q.cols()), units = std::size_t(q.rows()) / 16 * (K / 64);
  QLORA_CHECK(q.packed.size() == units * 512, "cuda::set_layout: packed has ", q.packed.size(),
              " bytes, expected ", units * 512);
  ctx.activate();
  DeviceBuffer<std::uint8_t> out(q.packed.size());
  const unsigned grid =
      unsigned(std::min<std::size_t>((units * 32 + 255) / 256, std::size_t(ctx.sm_count()) * 8));
  if (layout == Packed4Layout::Tiles)
    detail::relayout4_kernel<true><<<grid, 256, 0, ctx.stream()>>>(q.packed.data(), out.data(), units, K);
  else
    detail::relayout4_kernel<false><<<grid, 256, 0, ctx.stream()>>>(q.packed.data(), out.data(), units, K);
  QLORA_CUDA_CHECK_LAUNCH("relayout4_kernel");
  q.packed = std::move(out);  // cudaFree of the old bytes waits for the device, so for the kernel
  q.layout = layout;
}

// The layout matmul_4bit is fastest with: Tiles where the shape allows it, else Rows.
inline void use_gemv_layout(const Context& ctx, DeviceQuantized4bit& q) {
  if (tiles_supported(q)) set_layout(ctx, q, Packed4Layout::Tiles);
}

}  // namespace cuda
}  // namespace qlora
