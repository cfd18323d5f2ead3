#pragma once
// The two 8-bit formats in device memory, byte for byte their CPU structs, and the copies between
// the two:
//   DeviceBlockwise8:   quant::Blockwise8 (bitsandbytes quantize_blockwise, the dynamic map)
//   DeviceRowwiseInt8:  quant::RowwiseInt8 (LLM.int8() weights: int8 codes and the row absmax SCB)
// As in DeviceQuantized4bit, the 256-value map stays on the host side of the struct: launchers pass
// it to kernels by value.
#include <cstdint>
#include <vector>

#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/quant/blockwise8bit.hpp"
#include "qlora/quant/rowwise_int8.hpp"

namespace qlora {
namespace cuda {

struct DeviceBlockwise8 {
  int blocksize = 256;
  DeviceBuffer<std::uint8_t> codes;  // (n)
  DeviceBuffer<float> absmax;        // (num_blocks(n, blocksize))
  quant::Code256 code = quant::dynamic_map_signed();

  std::size_t numel() const { return codes.size(); }
  std::size_t blocks() const { return quant::num_blocks(numel(), blocksize); }
  std::size_t weight_bytes() const { return codes.bytes() + absmax.bytes(); }
};

struct DeviceRowwiseInt8 {
  std::int64_t rows = 0, cols = 0;
  DeviceBuffer<std::int8_t> q;  // (rows, cols)
  DeviceBuffer<float> scb;      // (rows)

  std::int64_t numel() const { return rows * cols; }
  std::size_t weight_bytes() const { return q.bytes() + scb.bytes(); }
};

// Blocking copies (setup and tests). The host structs are checked first: a device struct with
// mismatched sizes would make the kernels read past a buffer.
inline DeviceBlockwise8 to_device(const quant::Blockwise8& t, const Context& ctx) {
  quant::check_blocksize8(t.blocksize);
  QLORA_CHECK(t.absmax.size() == quant::num_blocks(t.numel(), t.blocksize),
              "cuda::to_device: 8-bit blockwise has ", t.absmax.size(), " absmax values for ", t.numel(),
              " values in blocks of ", t.blocksize, ", expected ", quant::num_blocks(t.numel(), t.blocksize));
  DeviceBlockwise8 d;
  d.blocksize = t.blocksize;
  d.code = t.code;
  d.codes = DeviceBuffer<std::uint8_t>::from_host(t.codes, ctx.stream());
  d.absmax = DeviceBuffer<float>::from_host(t.absmax, ctx.stream());
  return d;
}

inline quant::Blockwise8 to_host(const DeviceBlockwise8& d, const Context& ctx) {
  quant::Blockwise8 t;
  t.blocksize = d.blocksize;
  t.code = d.code;
  t.codes = d.codes.to_host(ctx.stream());
  t.absmax = d.absmax.to_host(ctx.stream());
  return t;
}

inline DeviceRowwiseInt8 to_device(const quant::RowwiseInt8& t, const Context& ctx) {
  QLORA_CHECK(t.rows >= 0 && t.cols >= 0 && t.q.size() == std::size_t(t.rows * t.cols) &&
                  t.scb.size() == std::size_t(t.rows),
              "cuda::to_device: row-wise int8 has ", t.q.size(), " codes and ", t.scb.size(),
              " scales, expected ", t.rows * t.cols, " and ", t.rows, " for shape (", t.rows, ", ", t.cols,
              ")");
  DeviceRowwiseInt8 d;
  d.rows = t.rows;
  d.cols = t.cols;
  d.q = DeviceBuffer<std::int8_t>::from_host(t.q, ctx.stream());
  d.scb = DeviceBuffer<float>::from_host(t.scb, ctx.stream());
  return d;
}

inline quant::RowwiseInt8 to_host(const DeviceRowwiseInt8& d, const Context& ctx) {
  quant::RowwiseInt8 t;
  t.rows = d.rows;
  t.cols = d.cols;
  t.q = d.q.to_host(ctx.stream());
  t.scb = d.scb.to_host(ctx.stream());
  return t;
}

}  // namespace cuda
}  // namespace qlora
