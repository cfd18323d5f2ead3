// [cuda] 4-bit quantization on the GPU against the CPU path: packed bytes, absmax, nested codes,
// nested absmax and offset bit for bit; dequantization to float / bf16 / fp16 bit for bit; errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_util.cuh"
#include "qlora/cuda/dequantize4bit.cuh"
#include "qlora/cuda/error.cuh"
#include "qlora/cuda/layout4bit.cuh"
#include "qlora/cuda/quantize4bit.cuh"
#include "qlora/quant/blockwise4bit.hpp"

using namespace qlora;

namespace {

void require_same(const quant::Quantized4bit& cpu, const quant::Quantized4bit& gpu) {
  REQUIRE(gpu.packed.size() == cpu.packed.size());
  for (std::size_t i = 0; i < cpu.packed.size(); ++i) {
    INFO("packed byte " << i);
    REQUIRE(int(gpu.packed[i]) == int(cpu.packed[i]));
  }
  REQUIRE(gpu.double_quant == cpu.double_quant);
  if (!cpu.double_quant) {
    REQUIRE(gpu.absmax.size() == cpu.absmax.size());
    for (std::size_t b = 0; b < cpu.absmax.size(); ++b) {
      INFO("absmax " << b);
      REQUIRE(float_bits(gpu.absmax[b]) == float_bits(cpu.absmax[b]));
    }
    return;
  }
  REQUIRE(float_bits(gpu.offset) == float_bits(cpu.offset));
  REQUIRE(gpu.nested.codes.size() == cpu.nested.codes.size());
  for (std::size_t b = 0; b < cpu.nested.codes.size(); ++b) {
    INFO("nested code " << b);
    REQUIRE(int(gpu.nested.codes[b]) == int(cpu.nested.codes[b]));
  }
  REQUIRE(gpu.nested.absmax.size() == cpu.nested.absmax.size());
  for (std::size_t b = 0; b < cpu.nested.absmax.size(); ++b) {
    INFO("nested absmax " << b);
    REQUIRE(float_bits(gpu.nested.absmax[b]) == float_bits(cpu.nested.absmax[b]));
  }
}

// Gaussian data with an all-zero block, a block with one large outlier, and values exactly on the
// NF4 / FP4 thresholds (scaled by the block's absmax of 1).
std::vector<float> probe_data(std::size_t n, int blocksize, unsigned seed) {
  auto x = cudatest::gaussian(n, seed, 0.05f);
  const std::size_t bs = std::size_t(blocksize);
  if (n >= 2 * bs)
    for (std::size_t i = bs; i < 2 * bs; ++i) x[i] = 0.0f;
  if (n >= 3 * bs) x[2 * bs + 3] = 40.0f;
  if (n >= 5 * bs) {
    std::size_t i = 4 * bs;
    x[i++] = 1.0f;  // absmax 1: the scaled value is the value itself
    for (float t : codebook::kNF4Thresholds)
      for (float v : {t, std::nextafter(t, -2.0f), std::nextafter(t, 2.0f)})
        if (i < 5 * bs) x[i++] = v;
    for (float t : codebook::kFP4Thresholds)
      for (float v : {t, -t, std::nextafter(t, 2.0f)})
        if (i < 5 * bs) x[i++] = v;
  }
  return x;
}

}  // namespace

TEST_CASE("cuda quantize_4bit equals the CPU bytes", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  unsigned seed = 1;
  for (int bs : {32, 64, 128, 256, 512, 1024, 2048, 4096})
    for (std::size_t n : {std::size_t(1), std::size_t(7), std::size_t(bs) * 5 + 3, std::size_t(bs) * 37,
                          std::size_t(200000) + 1})
      for (auto type : {quant::Quant4Type::NF4, quant::Quant4Type::FP4})
        for (bool dq : {false, true}) {
          INFO("blocksize " << bs << ", n " << n << ", " << quant::quant4_name(type) << ", double quant "
                            << dq);
          const auto x = probe_data(n, bs, seed++);
          const quant::Quant4Config cfg{type, bs, dq};
          const auto cpu = quant::quantize_4bit(x.data(), {std::int64_t(n)}, cfg);
          auto dx = cuda::DeviceBuffer<float>::from_host(x, ctx.stream());
          const auto gpu = cuda::quantize_4bit(ctx, dx.data(), {std::int64_t(n)}, cfg);
          require_same(cpu, cuda::to_host(gpu, ctx));
        }
}

TEST_CASE("cuda quantize_4bit of bf16 input equals the CPU bytes of the widened values", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const std::int64_t rows = 1024, cols = 4096;  // 16384 blocks of 64: the offset sums 512 per lane
  const auto xb = cudatest::to_bf16(cudatest::gaussian(std::size_t(rows * cols), 7, 0.02f));
  std::vector<float> xf(xb.size());
  for (std::size_t i = 0; i < xb.size(); ++i) xf[i] = to_float(xb[i]);
  auto dx = cudatest::upload_bf16(xb);
  for (auto type : {quant::Quant4Type::NF4, quant::Quant4Type::FP4})
    for (int bs : {64, 128}) {
      INFO(quant::quant4_name(type) << " blocksize " << bs);
      const quant::Quant4Config cfg{type, bs, true};
      const auto cpu = quant::quantize_4bit(xf.data(), {rows, cols}, cfg);
      const auto gpu = cuda::quantize_4bit(ctx, dx.data(), {rows, cols}, cfg);
      REQUIRE(gpu.dtype == "bfloat16");
      require_same(cpu, cuda::to_host(gpu, ctx));
    }
}

TEST_CASE("cuda dequantize_4bit equals the CPU values bit for bit", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  unsigned seed = 100;
  for (int bs : {32, 64, 256, 4096})
    for (std::size_t n : {std::size_t(5), std::size_t(bs) * 9 + 17, std::size_t(300000)})
      for (auto type : {quant::Quant4Type::NF4, quant::Quant4Type::FP4})
        for (bool dq : {false, true}) {
          INFO("blocksize " << bs << ", n " << n << ", " << quant::quant4_name(type) << ", double quant "
                            << dq);
          const auto x = probe_data(n, bs, seed++);
          const auto q = quant::quantize_4bit(x.data(), {std::int64_t(n)}, quant::Quant4Config{type, bs, dq});
          const auto d = cuda::to_device(q, ctx);
          std::vector<float> want_f(n);
          std::vector<bf16> want_b(n);
          std::vector<fp16> want_h(n);
          quant::dequantize(q, want_f.data());
          quant::dequantize(q, want_b.data());
          quant::dequantize(q, want_h.data());
          cuda::DeviceBuffer<float> of(n);
          cuda::DeviceBuffer<__nv_bfloat16> ob(n);
          cuda::DeviceBuffer<__half> oh(n);
          QLORA_CUDA_CHECK(
              cudaMemsetAsync(ob.data(), 0xff, ob.bytes(), ctx.stream()));  // NaN where nothing is written
          cuda::dequantize_4bit(ctx, d, of.data());
          cuda::dequantize_4bit(ctx, d, ob.data());
          cuda::dequantize_4bit(ctx, d, oh.data());
          const auto got_f = of.to_host(ctx.stream());
          const auto got_b = cudatest::download_bf16(ob);
          std::vector<fp16> got_h(n);
          QLORA_CUDA_CHECK(cudaMemcpy(got_h.data(), oh.data(), n * 2, cudaMemcpyDeviceToHost));
          for (std::size_t i = 0; i < n; ++i) {
            INFO("element " << i);
            REQUIRE(float_bits(got_f[i]) == float_bits(want_f[i]));
            REQUIRE(got_b[i].bits == want_b[i].bits);
            REQUIRE(got_h[i].bits == want_h[i].bits);
          }
        }
}

// A sub-range (whole rows of a matrix, say) gives the values of the whole at the same positions.
TEST_CASE("cuda dequantize_4bit_range equals the whole tensor's values", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const std::size_t n = 64 * 1000 + 40;
  const auto x = probe_data(n, 64, 7);
  const auto d =
      cuda::to_device(quant::quantize_4bit(x.data(), {std::int64_t(n)}, quant::Quant4Config{}), ctx);
  cuda::DeviceBuffer<float> all(n);
  cuda::dequantize_4bit(ctx, d, all.data());
  const auto want = all.to_host(ctx.stream());
  for (std::size_t first : {std::size_t(0), std::size_t(8), std::size_t(64 * 300), std::size_t(n - 40)})
    for (std::size_t count : {std::size_t(0), std::size_t(1), std::size_t(37), n - first}) {
      if (count > n - first) continue;
      INFO("first " << first << " count " << count);
      cuda::DeviceBuffer<float> part(std::max<std::size_t>(count, 1));
      cuda::dequantize_4bit_range(ctx, d, first, count, part.data());
      const auto got = part.to_host(ctx.stream());
      for (std::size_t i = 0; i < count; ++i) REQUIRE(got[i] == want[first + i]);
    }
  cuda::DeviceBuffer<float> out(16);
  REQUIRE_THROWS_WITH(cuda::dequantize_4bit_range(ctx, d, 4, 8, out.data()),
                      Catch::Contains("multiple of 8"));
  REQUIRE_THROWS_WITH(cuda::dequantize_4bit_range(ctx, d, n - 8, 16, out.data()),
                      Catch::Contains("of 64040 values"));
}
// The tiles layout (quantized4bit.cuh) is a permutation of the packed bytes: there and back gives
// the same bytes, to_host returns bitsandbytes' order, and dequantization (whole tensor and whole-tile
// ranges) gives the rows layout's values bit for bit.
TEST_CASE("cuda tiles layout: round trip, to_host and dequantization equal the rows layout",
          "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  struct Shape {
    std::int64_t N, K;
    int blocksize;
    bool dq;
  };
  for (const Shape sh : {Shape{16, 64, 64, true}, Shape{48, 1088, 64, false}, Shape{160, 4096, 256, true},
                         Shape{32, 192, 32, true}, Shape{4096, 1024, 4096, false}}) {
    INFO("shape " << sh.N << " x " << sh.K << " blocksize " << sh.blocksize << " dq " << sh.dq);
    const std::size_t n = std::size_t(sh.N * sh.K);
    const auto x = probe_data(n, sh.blocksize, 9);
    const auto q = quant::quantize_4bit(x.data(), {sh.N, sh.K},
                                        quant::Quant4Config{quant::Quant4Type::NF4, sh.blocksize, sh.dq});
    const auto rows = cuda::to_device(q, ctx);
    auto tiles = cuda::to_device(q, ctx);
    cuda::set_layout(ctx, tiles, cuda::Packed4Layout::Tiles);
    const auto tb = tiles.packed.to_host(ctx.stream());
    // the permutation itself, against its definition
    for (std::size_t r = 0; r < std::size_t(sh.N); ++r)
      for (std::size_t b = 0; b < std::size_t(sh.K) / 2; ++b)
        REQUIRE(int(tb[cuda::tiles_offset(r, b, std::size_t(sh.K))]) == int(q.packed[r * (sh.K / 2) + b]));
    REQUIRE(cuda::to_host(tiles, ctx).packed == q.packed);  // to_host: bitsandbytes' order
    cuda::DeviceBuffer<float> a(n), b(n);
    cuda::DeviceBuffer<__nv_bfloat16> ah(n), bh(n);
    cuda::dequantize_4bit(ctx, rows, a.data());
    cuda::dequantize_4bit(ctx, tiles, b.data());
    cuda::dequantize_4bit(ctx, rows, ah.data());
    cuda::dequantize_4bit(ctx, tiles, bh.data());
    const auto fa = a.to_host(ctx.stream()), fb = b.to_host(ctx.stream());
    for (std::size_t i = 0; i < n; ++i) REQUIRE(float_bits(fa[i]) == float_bits(fb[i]));
    const auto ha = cudatest::download_bf16(ah), hb = cudatest::download_bf16(bh);
    for (std::size_t i = 0; i < n; ++i) REQUIRE(ha[i].bits == hb[i].bits);
    if (sh.N >= 32) {  // the second tile alone
      const std::size_t tile = 16 * std::size_t(sh.K);
      cuda::DeviceBuffer<float> part(tile);
      cuda::dequantize_4bit_range(ctx, tiles, tile, tile, part.data());
      const auto fp = part.to_host(ctx.stream());
      for (std::size_t i = 0; i < tile; ++i) REQUIRE(float_bits(fp[i]) == float_bits(fa[tile + i]));
      REQUIRE_THROWS_WITH(cuda::dequantize_4bit_range(ctx, tiles, 8, tile, part.data()),
                          Catch::Contains("whole 16-row tiles"));
    }
    cuda::set_layout(ctx, tiles, cuda::Packed4Layout::Rows);
    REQUIRE(tiles.packed.to_host(ctx.stream()) == q.packed);
  }
  // shapes the tiles do not fit are refused; use_gemv_layout leaves them in rows
  const auto x = probe_data(24 * 64, 64, 3);
  auto odd = cuda::to_device(quant::quantize_4bit(x.data(), {24, 64}, quant::Quant4Config{}), ctx);
  REQUIRE_THROWS_WITH(cuda::set_layout(ctx, odd, cuda::Packed4Layout::Tiles),
                      Catch::Contains("shape (24, 64)"));
  cuda::use_gemv_layout(ctx, odd);
  REQUIRE(odd.layout == cuda::Packed4Layout::Rows);
}

TEST_CASE("cuda quantize_4bit refuses NaN and inf, naming the index", "[cuda][quant]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  auto x = cudatest::gaussian(10000, 3);
  x[7777] = std::numeric_limits<float>::quiet_NaN();
  x[9000] = std::numeric_limits<float>::infinity();
  auto dx = cuda::DeviceBuffer<float>::from_host(x, ctx.stream());
  REQUIRE_THROWS_WITH(cuda::quantize_4bit(ctx, dx.data(), {10000}, quant::Quant4Config{}, "layer.weight"),
                      Catch::Contains("layer.weight: value 7777 is nan"));
}

TEST_CASE("CUDA and cuBLAS failures become qlora::Error with the call and the error", "[cuda]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  REQUIRE_THROWS_AS(cuda::DeviceBuffer<float>(std::size_t(1) << 50), qlora::Error);
  REQUIRE_THROWS_WITH(cuda::DeviceBuffer<float>(std::size_t(1) << 50),
                      Catch::Contains("cudaMalloc") && Catch::Contains("cudaErrorMemoryAllocation"));
  REQUIRE_THROWS_WITH(cuda::Context(1000), Catch::Contains("device 1000 requested"));
  auto& ctx = cudatest::context();
  // cuBLAS: a negative leading dimension is an invalid value
  const float one = 1.0f;
  auto bad_gemm = [&] {
    QLORA_CUBLAS_CHECK(cublasSgemm(ctx.cublas(), CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one, nullptr, -1,
                                   nullptr, -1, &one, nullptr, -1));
  };
  REQUIRE_THROWS_WITH(
      bad_gemm(), Catch::Contains("cuBLAS: cublasSgemm") && Catch::Contains("CUBLAS_STATUS_INVALID_VALUE"));
}
