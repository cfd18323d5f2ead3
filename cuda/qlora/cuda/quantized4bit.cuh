#pragma once
// DeviceQuantized4bit: a 4-bit NF4 / FP4 tensor in device memory, in bitsandbytes' layout (the
// same bytes as quant::Quantized4bit, which docs/formats.md describes) or with its packed bytes
// reordered for the GEMV (Packed4Layout::Tiles, below), and the copies between the device and the
// host (always bitsandbytes' layout on the host). The code tables stay on the host side of the
// struct: launchers pass them to kernels by value.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/quant/blockwise4bit.hpp"

namespace qlora {
namespace cuda {

// The order of the packed bytes on the device.
// - Rows: bitsandbytes' (row-major, two codes per byte, the first in the high nibble).
// - Tiles: the same bytes permuted within each "unit" of 16 rows × 64 values (512 bytes) of an
//   (N, K) matrix (N % 16 == 0, K % 64 == 0): unit (tile T, kc) sits at byte (T·K/64 + kc)·512, and
//   inside it lane slice l = 4g + t (g < 8, t < 4) at bytes [16l, 16l + 16) holds row 16T + g's
//   bytes [32kc + 8t, +8) then row 16T + g + 8's. That is the order in which the GEMV's lanes read
//   their mma fragments, so a warp's load is 512 contiguous bytes instead of 16 rows × 32 bytes
//   (at 14336×4096, M = 1: 15.0 against 18.2 µs, docs/performance.md). The absmax arrays are
//   unchanged (bitsandbytes' block order). layout4bit.cuh converts between the two.
enum class Packed4Layout { Rows, Tiles };

// Byte offset in the Tiles layout of byte `b` of row `r` (Rows offset r·K/2 + b) of an (N, K) matrix.
__host__ __device__ inline std::size_t tiles_offset(std::size_t r, std::size_t b, std::size_t K) {
  const std::size_t kc = b / 32, in = b % 32, g = r % 16;
  return ((r / 16) * (K / 64) + kc) * 512 + 16 * (4 * (g % 8) + in / 8) + (g >= 8 ? 8 : 0) + in % 8;
}

struct DeviceQuantized4bit {
  quant::Quant4Type type = quant::Quant4Type::NF4;
  int blocksize = 64;
  std::vector<std::int64_t> shape;  // e.g. (out, in)
  std::string dtype = "bfloat16";
  quant::Code16 code = quant::code4(quant::Quant4Type::NF4);
  DeviceBuffer<std::uint8_t> packed;  // ((numel + 1) / 2), in `layout`'s order
  Packed4Layout layout = Packed4Layout::Rows;

  bool double_quant = false;
  DeviceBuffer<float> absmax;          // (blocks) when !double_quant
  DeviceBuffer<std::uint8_t> qabsmax;  // (blocks) when double_quant: 8-bit codes of absmax - offset
  DeviceBuffer<float> absmax2;         // (ceil(blocks / nested_blocksize)) when double_quant
  float offset = 0.0f;
  int nested_blocksize = 256;
  quant::Code256 nested_code = quant::dynamic_map_signed();

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  std::size_t blocks() const { return quant::num_blocks(std::size_t(numel()), blocksize); }
  std::int64_t rows() const { return shape.size() == 2 ? shape[0] : 1; }
  std::int64_t cols() const { return shape.size() == 2 ? shape[1] : numel(); }
  // The bytes a kernel that reads the weight once must move: packed codes + absmax (+ nested).
  std::size_t weight_bytes() const {
    return packed.bytes() + (double_quant ? qabsmax.bytes() + absmax2.bytes() : absmax.bytes());
  }
};

// Blocking copies (setup and tests).
inline DeviceQuantized4bit to_device(const quant::Quantized4bit& q, const Context& ctx) {
  quant::validate(q, "cuda::to_device");
  DeviceQuantized4bit d;
  d.type = q.type;
  d.blocksize = q.blocksize;
  d.shape = q.shape;
  d.dtype = q.dtype;
  d.code = q.code;
  d.packed = DeviceBuffer<std::uint8_t>::from_host(q.packed, ctx.stream());
  d.double_quant = q.double_quant;
  if (q.double_quant) {
    d.qabsmax = DeviceBuffer<std::uint8_t>::from_host(q.nested.codes, ctx.stream());
    d.absmax2 = DeviceBuffer<float>::from_host(q.nested.absmax, ctx.stream());
    d.offset = q.offset;
    d.nested_blocksize = q.nested.blocksize;
    d.nested_code = q.nested.code;
  } else {
    d.absmax = DeviceBuffer<float>::from_host(q.absmax, ctx.stream());
  }
  return d;
}

inline quant::Quantized4bit to_host(const DeviceQuantized4bit& d, const Context& ctx) {
  quant::Quantized4bit q;
  q.type = d.type;
  q.blocksize = d.blocksize;
  q.shape = d.shape;
  q.dtype = d.dtype;
  q.code = d.code;
  q.packed = d.packed.to_host(ctx.stream());
  if (d.layout == Packed4Layout::Tiles) {  // back to bitsandbytes' order
    const std::size_t N = std::size_t(d.rows()), K = std::size_t(d.cols()), rb = K / 2;
    std::vector<std::uint8_t> rows(q.packed.size());
    for (std::size_t r = 0; r < N; ++r)
      for (std::size_t b = 0; b < rb; ++b) rows[r * rb + b] = q.packed[tiles_offset(r, b, K)];
    q.packed = std::move(rows);
  }
  q.double_quant = d.double_quant;
  if (d.double_quant) {
    q.offset = d.offset;
    q.nested.blocksize = d.nested_blocksize;
    q.nested.code = d.nested_code;
    q.nested.codes = d.qabsmax.to_host(ctx.stream());
    q.nested.absmax = d.absmax2.to_host(ctx.stream());
  } else {
    q.absmax = d.absmax.to_host(ctx.stream());
  }
  return q;
}

}  // namespace cuda
}  // namespace qlora
