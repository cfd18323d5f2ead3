#pragma once
// DeviceQuantized4bit: a 4-bit NF4 / FP4 tensor in device memory, in bitsandbytes' layout (the
// same bytes as quant::Quantized4bit, which docs/formats.md describes), and the copies between the
// two. The code tables stay on the host side of the struct: launchers pass them to kernels by value.
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/quant/blockwise4bit.hpp"

namespace qlora {
namespace cuda {

struct DeviceQuantized4bit {
  quant::Quant4Type type = quant::Quant4Type::NF4;
  int blocksize = 64;
  std::vector<std::int64_t> shape;  // e.g. (out, in)
  std::string dtype = "bfloat16";
  quant::Code16 code = quant::code4(quant::Quant4Type::NF4);
  DeviceBuffer<std::uint8_t> packed;  // ((numel + 1) / 2)

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
