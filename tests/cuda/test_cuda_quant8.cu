// [cuda] 8-bit quantization on the GPU against the CPU path: blockwise (dynamic map) codes and absmax,
// row-wise int8 codes and SCB, bit for bit, from float32 and bf16; dequantization to float / bf16 /
// fp16 bit for bit; NaN / inf refused with the CPU's message; host <-> device copies.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_test_util.cuh"
#include "qlora/cuda/dequantize8bit.cuh"
#include "qlora/cuda/error.cuh"
#include "qlora/cuda/quantize8bit.cuh"
#include "qlora/quant/blockwise8bit.hpp"
#include "qlora/quant/rowwise_int8.hpp"

using namespace qlora;

namespace {

std::string show(std::uint8_t v) { return std::to_string(int(v)); }
std::string show(std::int8_t v) { return std::to_string(int(v)); }
std::string show(bf16 v) { return "bits " + std::to_string(v.bits); }
std::string show(fp16 v) { return "bits " + std::to_string(v.bits); }
std::string show(float v) {
  std::ostringstream s;
  s << v << " (bits " << float_bits(v) << ")";
  return s.str();
}

// One REQUIRE per vector (not per element): the first differing element, both values.
template <class T>
void require_bits_equal(const std::vector<T>& gpu, const std::vector<T>& cpu, const char* name) {
  REQUIRE(gpu.size() == cpu.size());
  for (std::size_t i = 0; i < cpu.size(); ++i)
    if (std::memcmp(&gpu[i], &cpu[i], sizeof(T)) != 0)
      FAIL(name << " " << i << ": GPU " << show(gpu[i]) << ", CPU " << show(cpu[i]));
}

void require_same(const quant::Blockwise8& cpu, const quant::Blockwise8& gpu) {
  REQUIRE(gpu.blocksize == cpu.blocksize);
  require_bits_equal(gpu.codes, cpu.codes, "code");
  require_bits_equal(gpu.absmax, cpu.absmax, "absmax");
}

void require_same(const quant::RowwiseInt8& cpu, const quant::RowwiseInt8& gpu) {
  REQUIRE(gpu.rows == cpu.rows);
  REQUIRE(gpu.cols == cpu.cols);
  require_bits_equal(gpu.q, cpu.q, "code");
  require_bits_equal(gpu.scb, cpu.scb, "SCB");
}

std::vector<float> widen(const std::vector<bf16>& b) {
  std::vector<float> f(b.size());
  for (std::size_t i = 0; i < b.size(); ++i) f[i] = to_float(b[i]);
  return f;
}

// Gaussian data with, block by block: an all-zero block, a block with one large outlier, a block of
// subnormals (its reciprocal absmax is inf: codes of +-inf and of 0 * inf = NaN), and then blocks
// that start with 1.0 (absmax 1: the scaled value is the value itself) holding every midpoint of
// the dynamic map and its two float neighbours.
std::vector<float> probe_blockwise(std::size_t n, int blocksize, unsigned seed) {
  auto x = cudatest::gaussian(n, seed, 0.05f);
  const std::size_t bs = std::size_t(blocksize);
  if (n >= 2 * bs)
    for (std::size_t i = bs; i < 2 * bs; ++i) x[i] = 0.0f;
  if (n >= 3 * bs) x[2 * bs + 3] = 40.0f;
  if (n >= 4 * bs)
    for (std::size_t i = 3 * bs; i < 4 * bs; ++i) x[i] = float(int(i % 7) - 3) * 1e-40f;
  std::vector<float> ties;
  const auto mid = quant::midpoints(quant::dynamic_map_signed());
  for (int i = 0; i < 255; ++i)
    for (float v : {mid[i], std::nextafter(mid[i], -2.0f), std::nextafter(mid[i], 2.0f)})
      if (std::fabs(v) <= 1.0f) ties.push_back(v);
  std::size_t t = 0;
  for (std::size_t lo = 4 * bs; lo + bs <= n && t < ties.size(); lo += bs) {
    x[lo] = 1.0f;
    for (std::size_t i = lo + 1; i < lo + bs && t < ties.size(); ++i) x[i] = ties[t++];
  }
  return x;
}

// Gaussian rows at several scales, with: a zero row, a row of SCB 127 (scale exactly 1) holding the
// ties k + 0.5, a row of SCB 254 (scale 0.5) with odd integers (ties again), a row of SCB 1e-37
// (127 / SCB overflows: the double-precision path), a row of subnormals, a row with an outlier.
std::vector<float> probe_rowwise(std::int64_t rows, std::int64_t cols, unsigned seed) {
  auto x = cudatest::gaussian(std::size_t(rows * cols), seed, 1.0f);
  for (std::int64_t r = 0; r < rows; ++r) {
    float* row = x.data() + r * cols;
    const float scale = std::ldexp(1.0f, int(r % 9) * 3 - 12);
    for (std::int64_t c = 0; c < cols; ++c) row[c] *= scale;
    if (cols == 0) continue;
    switch (r % 8) {
      case 1:
        for (std::int64_t c = 0; c < cols; ++c) row[c] = 0.0f;
        break;
      case 2:
        row[0] = 127.0f;
        for (std::int64_t c = 1; c < cols; ++c) row[c] = float((c * 37) % 254 - 127) + 0.5f;
        break;
      case 3:
        row[0] = -254.0f;
        for (std::int64_t c = 1; c < cols; ++c) row[c] = float(2 * ((c * 11) % 254 - 127) + 1);
        break;
      case 4:
        for (std::int64_t c = 0; c < cols; ++c) row[c] = 1e-37f * float((c * 13) % 255 - 127) / 127.0f;
        row[0] = 1e-37f;
        break;
      case 5:
        for (std::int64_t c = 0; c < cols; ++c) row[c] = float((c * 7) % 9 - 4) * 1e-41f;
        break;
      case 6: row[(r * 5) % cols] = 1000.0f; break;
      default: break;
    }
  }
  return x;
}

// The CPU error message for the same input, to compare the GPU's against.
template <class F>
std::string cpu_message(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(the CPU did not throw)";
}

// Dequantization of a CPU-quantized tensor uploaded with to_device (the upload path) into float,
// bf16 and fp16, against quant::dequantize.
template <class Q, class Dequant>
void require_dequantize_equal(const cuda::Context& ctx, const Q& cpu, std::size_t n, Dequant&& dequant) {
  std::vector<float> want_f(n);
  std::vector<bf16> want_b(n);
  std::vector<fp16> want_h(n);
  quant::dequantize(cpu, want_f.data());
  quant::dequantize(cpu, want_b.data());
  quant::dequantize(cpu, want_h.data());
  const auto d = cuda::to_device(cpu, ctx);
  cuda::DeviceBuffer<float> of(n);
  cuda::DeviceBuffer<__nv_bfloat16> ob(n);
  cuda::DeviceBuffer<__half> oh(n);
  QLORA_CUDA_CHECK(cudaMemset(ob.data(), 0xff, ob.bytes()));  // poison: NaN where nothing is written
  dequant(d, of.data());
  dequant(d, ob.data());
  dequant(d, oh.data());
  require_bits_equal(of.to_host(ctx.stream()), want_f, "float");
  require_bits_equal(cudatest::download_bf16(ob), want_b, "bf16");
  std::vector<fp16> got_h(n);
  QLORA_CUDA_CHECK(cudaMemcpy(got_h.data(), oh.data(), n * 2, cudaMemcpyDeviceToHost));
  require_bits_equal(got_h, want_h, "fp16");
}

}  // namespace

TEST_CASE("cuda quantize_blockwise8 equals the CPU bytes", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  unsigned seed = 1;
  for (int bs : {64, 128, 256, 512, 1024, 2048, 4096})
    for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(7), std::size_t(bs) + 1,
                          std::size_t(bs) * 5 + 3, std::size_t(bs) * 37, std::size_t(200000) + 1}) {
      INFO("blocksize " << bs << ", n " << n);
      const auto x = probe_blockwise(n, bs, seed++);
      const auto cpu = quant::quantize_blockwise8(x.data(), n, bs);
      auto dx = cuda::DeviceBuffer<float>::from_host(x, ctx.stream());
      const auto gpu = cuda::quantize_blockwise8(ctx, dx.data(), n, bs);
      require_same(cpu, cuda::to_host(gpu, ctx));
    }
}

TEST_CASE("cuda quantize_blockwise8 of bf16 input equals the CPU bytes of the widened values",
          "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  unsigned seed = 50;
  for (int bs : {64, 256, 4096})
    for (std::size_t n : {std::size_t(3), std::size_t(bs) * 7 + 5, std::size_t(1024) * 4096}) {
      INFO("blocksize " << bs << ", n " << n);
      const auto xb = cudatest::to_bf16(probe_blockwise(n, bs, seed++));
      const auto xf = widen(xb);
      const auto cpu = quant::quantize_blockwise8(xf.data(), n, bs);
      auto dx = cudatest::upload_bf16(xb);
      require_same(cpu, cuda::to_host(cuda::quantize_blockwise8(ctx, dx.data(), n, bs), ctx));
    }
}

TEST_CASE("cuda quantize_rowwise_int8 equals the CPU bytes", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  unsigned seed = 200;
  const std::vector<std::pair<std::int64_t, std::int64_t>> shapes = {
      {1, 1}, {3, 7}, {9, 64}, {17, 4099}, {64, 4096}, {300, 1000}, {16, 20000}, {4, 0}, {0, 5}};
  for (const auto& [rows, cols] : shapes) {
    INFO("shape (" << rows << ", " << cols << ")");
    const auto x = probe_rowwise(rows, cols, seed++);
    const auto cpu = quant::quantize_rowwise_int8(x.data(), rows, cols);
    auto dx = cuda::DeviceBuffer<float>::from_host(x, ctx.stream());
    require_same(cpu, cuda::to_host(cuda::quantize_rowwise_int8(ctx, dx.data(), rows, cols), ctx));
    if (x.empty()) continue;  // cudatest::upload_bf16 would cudaMemcpy into a null buffer
    const auto xb = cudatest::to_bf16(x);
    const auto xf = widen(xb);
    const auto cpu_b = quant::quantize_rowwise_int8(xf.data(), rows, cols);
    auto dxb = cudatest::upload_bf16(xb);
    require_same(cpu_b, cuda::to_host(cuda::quantize_rowwise_int8(ctx, dxb.data(), rows, cols), ctx));
  }
}

TEST_CASE("cuda quantize_rowwise_int8 of a large bf16 weight equals the CPU bytes", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const std::int64_t rows = 4096, cols = 4096;
  const auto xb = cudatest::to_bf16(cudatest::gaussian(std::size_t(rows * cols), 7, 0.02f));
  const auto xf = widen(xb);
  const auto cpu = quant::quantize_rowwise_int8(xf.data(), rows, cols);
  auto dx = cudatest::upload_bf16(xb);
  require_same(cpu, cuda::to_host(cuda::quantize_rowwise_int8(ctx, dx.data(), rows, cols), ctx));
}

TEST_CASE("cuda 8-bit quantizers of all-zero input equal the CPU", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const std::int64_t rows = 3, cols = 4096 + 17;  // also one ragged block of 4096
  const std::vector<float> x(std::size_t(rows * cols), 0.0f);
  auto dx = cuda::DeviceBuffer<float>::from_host(x, ctx.stream());
  for (int bs : {64, 4096}) {
    INFO("blocksize " << bs);
    const auto cpu = quant::quantize_blockwise8(x.data(), x.size(), bs);
    const auto gpu = cuda::quantize_blockwise8(ctx, dx.data(), x.size(), bs);
    require_same(cpu, cuda::to_host(gpu, ctx));
    std::vector<float> want(x.size());
    quant::dequantize(cpu, want.data());
    cuda::DeviceBuffer<float> out(x.size());
    cuda::dequantize_blockwise8(ctx, gpu, out.data());
    require_bits_equal(out.to_host(ctx.stream()), want, "dequantized");
  }
  const auto cpu = quant::quantize_rowwise_int8(x.data(), rows, cols);
  const auto gpu = cuda::quantize_rowwise_int8(ctx, dx.data(), rows, cols);
  require_same(cpu, cuda::to_host(gpu, ctx));
  for (float s : cuda::to_host(gpu, ctx).scb) REQUIRE(s == 0.0f);
  std::vector<float> want(x.size());
  quant::dequantize(cpu, want.data());
  cuda::DeviceBuffer<float> out(x.size());
  cuda::dequantize_rowwise_int8(ctx, gpu, out.data());
  require_bits_equal(out.to_host(ctx.stream()), want, "dequantized");
}

TEST_CASE("cuda dequantize_blockwise8 equals the CPU values bit for bit", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  unsigned seed = 100;
  for (int bs : {64, 256, 4096})
    for (std::size_t n : {std::size_t(5), std::size_t(bs) * 9 + 17, std::size_t(300000)}) {
      INFO("blocksize " << bs << ", n " << n);
      const auto x = probe_blockwise(n, bs, seed++);
      const auto cpu = quant::quantize_blockwise8(x.data(), n, bs);
      require_dequantize_equal(ctx, cpu, n, [&](const cuda::DeviceBlockwise8& d, auto* out) {
        cuda::dequantize_blockwise8(ctx, d, out);
      });
    }
}

TEST_CASE("cuda dequantize_rowwise_int8 equals the CPU values bit for bit", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  unsigned seed = 300;
  for (const auto& [rows, cols] : std::vector<std::pair<std::int64_t, std::int64_t>>{
           {1, 3}, {5, 7}, {17, 4099}, {64, 4096}, {300, 1000}}) {
    INFO("shape (" << rows << ", " << cols << ")");
    const auto x = probe_rowwise(rows, cols, seed++);
    const auto cpu = quant::quantize_rowwise_int8(x.data(), rows, cols);
    require_dequantize_equal(
        ctx, cpu, std::size_t(rows * cols),
        [&](const cuda::DeviceRowwiseInt8& d, auto* out) { cuda::dequantize_rowwise_int8(ctx, d, out); });
  }
}

TEST_CASE("cuda 8-bit to_device / to_host keep every byte", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const auto x = probe_blockwise(5000, 128, 9);
  const auto b = quant::quantize_blockwise8(x.data(), x.size(), 128);
  require_same(b, cuda::to_host(cuda::to_device(b, ctx), ctx));
  const auto r = quant::quantize_rowwise_int8(x.data(), 50, 100);
  require_same(r, cuda::to_host(cuda::to_device(r, ctx), ctx));
  auto bad = b;
  bad.absmax.pop_back();
  REQUIRE_THROWS_WITH(cuda::to_device(bad, ctx),
                      Catch::Contains("absmax values for 5000 values in blocks of 128"));
}

TEST_CASE("cuda 8-bit quantizers refuse NaN and inf with the CPU's message", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  auto x = cudatest::gaussian(10000, 3);
  x[7777] = std::numeric_limits<float>::quiet_NaN();
  x[9000] = std::numeric_limits<float>::infinity();
  auto dx = cuda::DeviceBuffer<float>::from_host(x, ctx.stream());
  const auto xb = cudatest::to_bf16(x);
  auto dxb = cudatest::upload_bf16(xb);

  const std::string block_msg = cpu_message([&] {
    quant::quantize_blockwise8(x.data(), x.size(), 256, quant::dynamic_map_signed(), "layer.weight");
  });
  REQUIRE_THAT(block_msg, Catch::Contains("layer.weight: value 7777 is nan"));
  REQUIRE_THROWS_WITH(
      cuda::quantize_blockwise8(ctx, dx.data(), x.size(), 256, quant::dynamic_map_signed(), "layer.weight"),
      block_msg);
  REQUIRE_THROWS_WITH(
      cuda::quantize_blockwise8(ctx, dxb.data(), x.size(), 256, quant::dynamic_map_signed(), "layer.weight"),
      block_msg);

  const std::string row_msg =
      cpu_message([&] { quant::quantize_rowwise_int8(x.data(), 100, 100, "layer.weight"); });
  REQUIRE_THAT(row_msg, Catch::Contains("layer.weight: value 7777 is nan"));
  REQUIRE_THROWS_WITH(cuda::quantize_rowwise_int8(ctx, dx.data(), 100, 100, "layer.weight"), row_msg);
  REQUIRE_THROWS_WITH(cuda::quantize_rowwise_int8(ctx, dxb.data(), 100, 100, "layer.weight"), row_msg);

  // inf alone, in the middle of a row and of a block
  auto y = cudatest::gaussian(10000, 4);
  y[4321] = -std::numeric_limits<float>::infinity();
  auto dy = cuda::DeviceBuffer<float>::from_host(y, ctx.stream());
  REQUIRE_THROWS_WITH(cuda::quantize_blockwise8(ctx, dy.data(), y.size(), 64),
                      Catch::Contains("value 4321 is -inf"));
  REQUIRE_THROWS_WITH(cuda::quantize_rowwise_int8(ctx, dy.data(), 10, 1000),
                      Catch::Contains("value 4321 is -inf"));
}

TEST_CASE("cuda quantize_blockwise8 refuses a blocksize the CPU refuses", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  cuda::DeviceBuffer<float> dx(100);
  for (int bs : {32, 96, 8192})
    REQUIRE_THROWS_WITH(
        cuda::quantize_blockwise8(ctx, dx.data(), 100, bs),
        Catch::Contains("blocksize must be a power of two in [64, 4096], got " + std::to_string(bs)));
  REQUIRE_THROWS_WITH(cuda::quantize_rowwise_int8(ctx, dx.data(), -1, 100),
                      Catch::Contains("non-negative shape, got (-1, 100)"));
}
