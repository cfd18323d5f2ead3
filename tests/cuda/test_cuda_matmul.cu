// [cuda] y = x · Wᵀ with a 4-bit W on the GPU (tensor-core GEMV for M ≤ 64, dequantize + cuBLAS
// above) against a double-precision reference on the same inputs: x rounded to bf16 and W
// dequantized exactly (code · absmax in fp32, as the CPU computes it).
//
// Error measure, per output: |y − ref| / Σ_k |x_k · w_k|. The GPU paths round each weight to bf16
// (the GEMV: its code value; the large-M path: code · absmax) and round y to bf16, each a relative
// error ≤ 2⁻⁹, so the measure is at most 2⁻⁸ plus fp32 accumulation error; that is the bound.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda_test_util.cuh"
#include "qlora/cuda/gemm4bit_sm90.cuh"
#include "qlora/cuda/layout4bit.cuh"
#include "qlora/cuda/matmul4bit.cuh"
#include "qlora/quant/blockwise4bit.hpp"

using namespace qlora;

namespace {

struct Case {
  int N, K, M, blocksize;
  quant::Quant4Type type;
  bool dq;
};

struct Errors {
  double max_scaled = 0, rel_norm = 0;
};

// force_cublas: dequantize + cuBLAS; kernel: a GEMV kernel forced; sm90: gemm_4bit_sm90 on the tiles
// layout; else matmul_4bit's own choice.
Errors check_matmul(const Case& c, bool accumulate, bool force_cublas,
                    cuda::GemvKernel kernel = cuda::GemvKernel::Auto, bool sm90 = false,
                    cuda::Gemm4Sm90Variant variant = {}) {
  auto& ctx = cudatest::context();
  const auto wf = cudatest::gaussian(std::size_t(c.N) * c.K, 11 + c.N + c.K + c.M, 0.02f);
  const auto q = quant::quantize_4bit(wf.data(), {c.N, c.K}, quant::Quant4Config{c.type, c.blocksize, c.dq});
  std::vector<float> w(wf.size());
  quant::dequantize(q, w.data());
  const auto xb = cudatest::to_bf16(cudatest::gaussian(std::size_t(c.M) * c.K, 5 + c.M, 1.0f));
  const auto y0 = cudatest::to_bf16(cudatest::gaussian(std::size_t(c.M) * c.N, 9, 0.5f));

  auto dw = cuda::to_device(q, ctx);
  if (sm90) cuda::set_layout(ctx, dw, cuda::Packed4Layout::Tiles);
  auto dx = cudatest::upload_bf16(xb);
  auto dy =
      cudatest::upload_bf16(accumulate ? y0 : std::vector<bf16>(y0.size(), bf16{0xffff}));  // NaN poison
  cuda::DeviceBuffer<__nv_bfloat16> scratch;
  if (force_cublas) {
    scratch = cuda::DeviceBuffer<__nv_bfloat16>(std::size_t(c.N) * c.K);
    cuda::dequantize_4bit(ctx, dw, scratch.data());
    cuda::gemm_bf16(ctx, dx.data(), c.M, c.K, scratch.data(), c.N, dy.data(), accumulate ? 1.0f : 0.0f);
  } else if (sm90) {
    cuda::gemm_4bit_sm90(ctx, dw, dx.data(), c.M, dy.data(), accumulate, variant);
  } else if (kernel != cuda::GemvKernel::Auto) {
    cuda::gemv_4bit(ctx, dw, dx.data(), c.M, dy.data(), accumulate, kernel);
  } else {
    cuda::matmul_4bit(ctx, dw, dx.data(), c.M, dy.data(), scratch, accumulate);
  }
  ctx.synchronize();
  const auto y = cudatest::download_bf16(dy);

  Errors e;
  double num = 0, den = 0;
  for (int m = 0; m < c.M; ++m)
    for (int n = 0; n < c.N; ++n) {
      double ref = accumulate ? double(to_float(y0[std::size_t(m) * c.N + n])) : 0.0, scale = std::fabs(ref);
      for (int k = 0; k < c.K; ++k) {
        const double p = double(to_float(xb[std::size_t(m) * c.K + k])) * double(w[std::size_t(n) * c.K + k]);
        ref += p;
        scale += std::fabs(p);
      }
      const double got = to_float(y[std::size_t(m) * c.N + n]);
      const double err = std::fabs(got - ref);
      e.max_scaled = std::max(e.max_scaled, std::isfinite(got) ? err / scale : INFINITY);
      num += err * err;
      den += ref * ref;
    }
  e.rel_norm = std::sqrt(num / den);
  return e;
}

}  // namespace

TEST_CASE("cuda matmul_4bit matches the fp32 reference (GEMV and cuBLAS paths)", "[cuda][matmul]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  const auto NF4 = quant::Quant4Type::NF4, FP4 = quant::Quant4Type::FP4;
  const std::vector<Case> cases = {
      {256, 1024, 1, 64, NF4, true},        {256, 1024, 1, 64, NF4, false},
      {256, 1024, 1, 64, FP4, true},        {2128, 512, 1, 64, NF4, true},
      {16, 64, 1, 64, NF4, true},           {48, 4096, 3, 128, NF4, true},
      {1024, 768, 8, 64, FP4, false},       {1024, 768, 5, 256, NF4, true},
      {512, 1024, 9, 64, NF4, true},        {512, 1024, 16, 64, FP4, true},
      {512, 1024, 17, 4096 / 4, NF4, true}, {512, 1024, 32, 64, NF4, false},
      {512, 1024, 33, 64, NF4, true},       {512, 1024, 64, 64, NF4, true},
      {512, 1024, 65, 64, NF4, true},       {512, 1024, 200, 64, FP4, true},
      {250, 1000, 4, 64, NF4, true},        {256, 1024, 2, 32, NF4, true},
      {4096, 4096, 8, 64, NF4, true},       {1024, 11008, 1, 64, NF4, true},
      {512, 4096, 12, 4096, FP4, false},    {2048, 2048, 24, 128, NF4, true},
      {256, 11008, 8, 64, NF4, true},       {256, 11008, 7, 64, FP4, false},
      {8192, 4096, 40, 64, NF4, true},  // kGemvTwiceMinValues: the GEMV for tokens 0..31, then 32..39
  };
  for (const auto& c : cases)
    for (bool acc : {false, true}) {
      INFO("N " << c.N << " K " << c.K << " M " << c.M << " bs " << c.blocksize << " "
                << quant::quant4_name(c.type) << " dq " << c.dq << " accumulate " << acc << " gemv "
                << (c.M <= cuda::kGemvMaxTokens || (c.M <= 2 * cuda::kGemvMaxTokens &&
                                                    std::int64_t(c.N) * c.K >= cuda::kGemvTwiceMinValues)));
      const auto e = check_matmul(c, acc, false);
      std::printf(
          "matmul N=%d K=%d M=%d bs=%d %s dq=%d acc=%d: max scaled error %.3g (bound %.3g), rel norm %.3g\n",
          c.N, c.K, c.M, c.blocksize, quant::quant4_name(c.type), int(c.dq), int(acc), e.max_scaled,
          std::ldexp(1.0, -8), e.rel_norm);
      REQUIRE(e.max_scaled <= std::ldexp(1.0, -8) * 1.01);
      REQUIRE(e.rel_norm < 5e-3);
    }
}

// The sm_90 streaming kernel (blocksize 64, K % 1024 == 0), the register-fed kernel and its grouped
// form (blocksize 64, K % 256 == 0), each forced, on shapes that exercise one and several stages per
// tile, fewer tiles than SMs and several tiles per block, every token-tile width, both absmax forms,
// K not a multiple of 1024 and blocksize 128; and matrices tall enough that a warp's range spans
// more than two 16-row tiles, whose middle tiles it stores itself (135168 × 256 on 132 SMs: 64
// tiles per block, 4 per warp; 69632 × 1024: 33 per block, up to 3 per warp).
TEST_CASE("cuda gemv_4bit: streaming, register and grouped kernels meet the bound", "[cuda][matmul]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const auto NF4 = quant::Quant4Type::NF4, FP4 = quant::Quant4Type::FP4;
  const std::vector<Case> cases = {
      {16, 1024, 1, 64, NF4, true},    {4096, 1024, 1, 64, NF4, true},   {2064, 3072, 2, 64, NF4, false},
      {4096, 4096, 8, 64, FP4, true},  {1040, 2048, 13, 64, NF4, true},  {528, 1024, 16, 64, FP4, false},
      {3072, 2048, 27, 64, NF4, true}, {512, 4096, 40, 64, NF4, false},  {512, 2048, 64, 64, NF4, true},
      {48, 1088, 1, 64, NF4, true},    {1072, 1088, 2, 64, FP4, true},   {256, 11008, 1, 64, NF4, false},
      {4112, 4096, 2, 128, NF4, true}, {32, 14336, 1, 64, NF4, true},    {4096, 768, 1, 64, NF4, true},
      {135168, 256, 1, 64, NF4, true}, {69632, 1024, 2, 64, FP4, false}, {135168, 256, 24, 64, NF4, true},
  };
  const bool sm90 = ctx.props().major >= 9;
  if (!sm90)
    std::printf("device is sm_%d%d: the streaming kernel (sm_90) is not run\n", ctx.props().major,
                ctx.props().minor);
  for (const auto& c : cases)
    for (auto kernel : {cuda::GemvKernel::Registers, cuda::GemvKernel::Stream, cuda::GemvKernel::Grouped}) {
      if (kernel == cuda::GemvKernel::Stream && (!sm90 || c.K % 1024 != 0 || c.blocksize != 64)) continue;
      if (kernel == cuda::GemvKernel::Grouped && !cuda::gemv_grouped_supported(c.blocksize, c.K)) continue;
      const char* name = kernel == cuda::GemvKernel::Stream      ? "stream"
                         : kernel == cuda::GemvKernel::Registers ? "registers"
                                                                 : "grouped";
      for (bool acc : {false, true}) {
        INFO("N " << c.N << " K " << c.K << " M " << c.M << " " << quant::quant4_name(c.type) << " dq "
                  << c.dq << " accumulate " << acc << " kernel " << name);
        const auto e = check_matmul(c, acc, false, kernel);
        REQUIRE(e.max_scaled <= std::ldexp(1.0, -8) * 1.01);
        REQUIRE(e.rel_norm < 5e-3);
      }
    }
}

// The tiles layout only moves bytes: every kernel that reads it, and the dequantize + cuBLAS path,
// gives y bit for bit as from the rows layout (same values, same order of arithmetic).
TEST_CASE("cuda matmul_4bit: the tiles layout gives the rows layout's y bit for bit", "[cuda][matmul]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const auto NF4 = quant::Quant4Type::NF4, FP4 = quant::Quant4Type::FP4;
  const std::vector<Case> cases = {{4096, 1024, 1, 64, NF4, true},  {2064, 3072, 2, 64, NF4, false},
                                   {1040, 2048, 13, 64, FP4, true}, {3072, 2048, 27, 64, NF4, true},
                                   {48, 1088, 1, 64, NF4, true},    {4112, 4096, 32, 128, NF4, true},
                                   {69632, 256, 3, 64, FP4, false}, {512, 1024, 64, 64, NF4, true}};
  for (const auto& c : cases) {
    const auto wf = cudatest::gaussian(std::size_t(c.N) * c.K, 21 + c.N, 0.02f);
    const auto q =
        quant::quantize_4bit(wf.data(), {c.N, c.K}, quant::Quant4Config{c.type, c.blocksize, c.dq});
    const auto rows = cuda::to_device(q, ctx);
    auto tiles = cuda::to_device(q, ctx);
    cuda::set_layout(ctx, tiles, cuda::Packed4Layout::Tiles);
    REQUIRE(tiles.layout == cuda::Packed4Layout::Tiles);
    auto dx = cudatest::upload_bf16(cudatest::to_bf16(cudatest::gaussian(std::size_t(c.M) * c.K, 3, 1.0f)));
    cuda::DeviceBuffer<__nv_bfloat16> y1(std::size_t(c.M) * c.N), y2(std::size_t(c.M) * c.N), scratch;
    for (auto kernel : {cuda::GemvKernel::Auto, cuda::GemvKernel::Registers, cuda::GemvKernel::Grouped}) {
      if (kernel == cuda::GemvKernel::Grouped && !cuda::gemv_grouped_supported(c.blocksize, c.K)) continue;
      INFO("N " << c.N << " K " << c.K << " M " << c.M << " bs " << c.blocksize << " kernel " << int(kernel));
      if (kernel == cuda::GemvKernel::Auto) {  // matmul_4bit: the GEMV, or dequantize + cuBLAS at M = 64
        cuda::matmul_4bit(ctx, rows, dx.data(), c.M, y1.data(), scratch);
        cuda::matmul_4bit(ctx, tiles, dx.data(), c.M, y2.data(), scratch);
      } else {
        cuda::gemv_4bit(ctx, rows, dx.data(), c.M, y1.data(), false, kernel);
        cuda::gemv_4bit(ctx, tiles, dx.data(), c.M, y2.data(), false, kernel);
      }
      ctx.synchronize();
      const auto a = cudatest::download_bf16(y1), b = cudatest::download_bf16(y2);
      std::size_t differ = 0;
      for (std::size_t i = 0; i < a.size(); ++i) differ += a[i].bits != b[i].bits;
      REQUIRE(differ == 0);
    }
  }
  // the streaming kernel reads rows only
  const auto wf = cudatest::gaussian(std::size_t(64) * 1024, 5);
  auto dw = cuda::to_device(quant::quantize_4bit(wf.data(), {64, 1024}, quant::Quant4Config{}), ctx);
  cuda::set_layout(ctx, dw, cuda::Packed4Layout::Tiles);
  cuda::DeviceBuffer<__nv_bfloat16> x(1024), y(64);
  REQUIRE_THROWS_WITH(cuda::gemv_4bit(ctx, dw, x.data(), 1, y.data(), false, cuda::GemvKernel::Stream),
                      Catch::Contains("tiles layout"));
}

// The table's place in shared memory changes how a lookup's address is formed, not what it reads:
// the 64 KB-aligned table (the default up to 16 tokens) and the plain one give y bit for bit. Above
// 16 tokens both calls take the plain table, so the cases stay at M ≤ 16. The lab's other options
// move loads, and must not change y either: the first weight loads before the PDL wait (early_kb
// 0), and L2 prefetches too (1024; 4096 × 4096 gives a warp several groups, so the prefetch of the
// weights and of the absmax codes runs). A grid of another size (max_blocks: 7, several tiles per
// block) splits the work otherwise, so partial sums are added in another order: a value may move by
// a bf16 step, and one near zero (where the partials cancel) by more, hence the absolute term.
TEST_CASE(
    "cuda gemv_4bit: the aligned and the plain table and early loads give the same y; other grids agree",
    "[cuda][matmul]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const auto NF4 = quant::Quant4Type::NF4, FP4 = quant::Quant4Type::FP4;
  const std::vector<Case> cases = {{4096, 1024, 1, 64, NF4, true},   {2064, 3072, 2, 64, NF4, false},
                                   {1040, 2048, 13, 64, FP4, true},  {3072, 2048, 9, 64, NF4, true},
                                   {4112, 4096, 16, 128, NF4, true}, {69632, 256, 3, 64, FP4, false},
                                   {4096, 4096, 1, 64, NF4, true}};
  for (const auto& c : cases) {
    const auto wf = cudatest::gaussian(std::size_t(c.N) * c.K, 31 + c.N, 0.02f);
    auto dw = cuda::to_device(
        quant::quantize_4bit(wf.data(), {c.N, c.K}, quant::Quant4Config{c.type, c.blocksize, c.dq}), ctx);
    cuda::use_gemv_layout(ctx, dw);
    auto dx = cudatest::upload_bf16(cudatest::to_bf16(cudatest::gaussian(std::size_t(c.M) * c.K, 4, 1.0f)));
    cuda::DeviceBuffer<__nv_bfloat16> y1(std::size_t(c.M) * c.N), y2(std::size_t(c.M) * c.N);
    for (auto kernel : {cuda::GemvKernel::Registers, cuda::GemvKernel::Grouped}) {
      if (kernel == cuda::GemvKernel::Grouped && !cuda::gemv_grouped_supported(c.blocksize, c.K)) continue;
      INFO("N " << c.N << " K " << c.K << " M " << c.M << " kernel " << int(kernel));
      QLORA_CUDA_CHECK(cudaMemsetAsync(y1.data(), 0xff, y1.size() * 2, ctx.stream()));  // NaN poison
      cuda::gemv_4bit(ctx, dw, dx.data(), c.M, y1.data(), false, kernel, 0, true, true);
      const auto a = cudatest::download_bf16(y1);
      std::size_t nan = 0;
      float ymax = 0.0f;
      for (const auto v : a) {
        nan += (v.bits & 0x7fff) > 0x7f80;
        ymax = std::max(ymax, std::fabs(to_float(v)));
      }
      REQUIRE(nan == 0);
      struct Variant {
        const char* name;
        bool aligned;
        int early_kb, max_blocks;
      };
      for (const Variant v :
           {Variant{"plain table", false, -1, 0}, Variant{"early loads", true, 0, 0},
            Variant{"early loads + L2 prefetch", true, 1024, 0}, Variant{"grid of 7", true, -1, 7},
            Variant{"prefetch, grid of 7", true, 1024, 7}}) {
        INFO("variant " << v.name);
        QLORA_CUDA_CHECK(cudaMemsetAsync(y2.data(), 0xff, y2.size() * 2, ctx.stream()));
        cuda::gemv_4bit(ctx, dw, dx.data(), c.M, y2.data(), false, kernel, 0, true, v.aligned, v.early_kb,
                        v.max_blocks);
        ctx.synchronize();
        const auto b = cudatest::download_bf16(y2);
        std::size_t differ = 0, far = 0;
        for (std::size_t i = 0; i < a.size(); ++i) {
          differ += a[i].bits != b[i].bits;
          const float fa = to_float(a[i]), fb = to_float(b[i]);
          far += !(std::fabs(fa - fb) <=
                   std::ldexp(std::max(std::fabs(fa), std::fabs(fb)), -7) + std::ldexp(ymax, -16));
        }
        if (v.max_blocks == 0) REQUIRE(differ == 0);
        REQUIRE(far == 0);
        REQUIRE(differ <= a.size() / 100);
      }
    }
  }
}

TEST_CASE("cuda gemv_4bit refuses the streaming kernel where it does not apply, and bad lab options",
          "[cuda][matmul]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const auto wf = cudatest::gaussian(std::size_t(64) * 1536, 3);
  const auto dw = cuda::to_device(quant::quantize_4bit(wf.data(), {64, 1536}, quant::Quant4Config{}), ctx);
  cuda::DeviceBuffer<__nv_bfloat16> x(1536), y(64);
  REQUIRE_THROWS_WITH(cuda::gemv_4bit(ctx, dw, x.data(), 1, y.data(), false, cuda::GemvKernel::Stream),
                      Catch::Contains("K % 1024 == 0 (K = 1536)"));
  const auto wf2 = cudatest::gaussian(std::size_t(64) * 1088, 4);
  const auto dw2 = cuda::to_device(quant::quantize_4bit(wf2.data(), {64, 1088}, quant::Quant4Config{}), ctx);
  cuda::DeviceBuffer<__nv_bfloat16> x2(1088);
  REQUIRE_THROWS_WITH(cuda::gemv_4bit(ctx, dw2, x2.data(), 1, y.data(), false, cuda::GemvKernel::Grouped),
                      Catch::Contains("K % 256 == 0 (K = 1088)"));
  // the lab options out of range
  REQUIRE_THROWS_WITH(
      cuda::gemv_4bit(ctx, dw2, x2.data(), 1, y.data(), false, cuda::GemvKernel::Auto, 0, true, true, -2),
      Catch::Contains("early_kb -2 outside [-1, 1048576]"));
  REQUIRE_THROWS_WITH(
      cuda::gemv_4bit(ctx, dw2, x2.data(), 1, y.data(), false, cuda::GemvKernel::Auto, 0, true, true, -1, -3),
      Catch::Contains("max_blocks -3 is negative"));
}

TEST_CASE("cuda dequantize + cuBLAS path on the same shapes meets the same bound", "[cuda][matmul]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  for (int M : {1, 8, 64, 300}) {
    const auto e = check_matmul({1024, 1024, M, 64, quant::Quant4Type::NF4, true}, false, true);
    INFO("M " << M);
    REQUIRE(e.max_scaled <= std::ldexp(1.0, -8) * 1.01);
  }
}

// The Hopper kernel (wgmma, W decoded in registers), each variant, on shapes that exercise a partial
// block of rows (N % 256 != 0), partial token tiles, one unit of K, an odd number of units and more
// units than x stages, blocksizes 64 to 1024, both codes and both absmax forms, with and without
// accumulate. Bounds: the exact table rounds each weight once, as dequantize + cuBLAS does (2⁻⁸, the
// bound above); the fast one rounds the code, the absmax and their product (3 · 2⁻⁹), plus y's
// rounding: 2⁻⁷. With accumulate y is added in fp32 before the one rounding, so the bounds hold.
TEST_CASE("cuda gemm_4bit_sm90 meets the bound", "[cuda][matmul][sm90]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  if (!cudatest::context().sm90a_code()) {
    WARN("no sm_90 device with sm_90a code in this build: gemm_4bit_sm90 not run");
    return;
  }
  const auto NF4 = quant::Quant4Type::NF4, FP4 = quant::Quant4Type::FP4;
  const std::vector<Case> cases = {
      {256, 1024, 128, 64, NF4, true},   {272, 512, 300, 64, FP4, false}, {16, 4096, 129, 128, NF4, true},
      {512, 64, 200, 64, NF4, true},     {256, 192, 5, 64, NF4, false},   {1024, 2048, 96, 256, NF4, true},
      {768, 1024, 260, 1024, FP4, true}, {272, 1600, 64, 64, NF4, true},  {4096, 256, 1, 64, FP4, true},
  };
  for (auto table : {cuda::Gemm4Table::Exact, cuda::Gemm4Table::Fast})
    for (const auto& c : cases) {
      const int depth = 2 + int(c.M % 2);  // both depths over the cases
      const bool exact = table == cuda::Gemm4Table::Exact;
      for (bool acc : {false, true}) {
        INFO("N " << c.N << " K " << c.K << " M " << c.M << " bs " << c.blocksize << " "
                  << quant::quant4_name(c.type) << " dq " << c.dq << " accumulate " << acc << " table "
                  << int(table));
        const auto e = check_matmul(c, acc, false, cuda::GemvKernel::Auto, true, {table, depth});
        const double bound = std::ldexp(1.0, exact ? -8 : -7);
        std::printf(
            "gemm_4bit_sm90 %s d%d N=%d K=%d M=%d bs=%d %s dq=%d acc=%d: max scaled error %.3g "
            "(bound %.3g), rel norm %.3g\n",
            cuda::gemm4_table_name(table), depth, c.N, c.K, c.M, c.blocksize, quant::quant4_name(c.type),
            int(c.dq), int(acc), e.max_scaled, bound, e.rel_norm);
        REQUIRE(e.max_scaled <= bound * 1.01);
        REQUIRE(e.rel_norm < 5e-3);
      }
    }
}

// At a size the CPU reference would take minutes for: against dequantize + cuBLAS on the same inputs.
// The exact variant multiplies the very weights dequantize_4bit writes, so the two differ by the order
// of the fp32 sums and y's rounding; the fast one also by its weights' rounding.
TEST_CASE("cuda gemm_4bit_sm90 agrees with dequantize + cuBLAS at 4096 x 4096", "[cuda][matmul][sm90]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  if (!ctx.sm90a_code()) {
    WARN("no sm_90 device with sm_90a code in this build: gemm_4bit_sm90 not run");
    return;
  }
  const int N = 4096, K = 4096, M = 1000;
  const auto wf = cudatest::gaussian(std::size_t(N) * K, 41, 0.02f);
  auto dw = cuda::to_device(quant::quantize_4bit(wf.data(), {N, K}, quant::Quant4Config{}), ctx);
  cuda::set_layout(ctx, dw, cuda::Packed4Layout::Tiles);
  auto dx = cudatest::upload_bf16(cudatest::to_bf16(cudatest::gaussian(std::size_t(M) * K, 42, 1.0f)));
  cuda::DeviceBuffer<__nv_bfloat16> y1(std::size_t(M) * N), y2(std::size_t(M) * N), scratch;
  cuda::matmul_4bit_dequant(ctx, dw, dx.data(), M, y2.data(), scratch);
  for (auto table : {cuda::Gemm4Table::Exact, cuda::Gemm4Table::Fast})
    for (int depth : {2, 3}) {
      const bool exact = table == cuda::Gemm4Table::Exact;
      QLORA_CUDA_CHECK(cudaMemset(y1.data(), 0xff, y1.size() * 2));  // NaN poison
      cuda::gemm_4bit_sm90(ctx, dw, dx.data(), M, y1.data(), false, {table, depth});
      ctx.synchronize();
      const auto a = cudatest::download_bf16(y1), b = cudatest::download_bf16(y2);
      double num = 0, den = 0;
      std::size_t bad = 0;
      for (std::size_t i = 0; i < a.size(); ++i) {
        const double u = to_float(a[i]), v = to_float(b[i]);
        bad += !std::isfinite(u);
        num += (u - v) * (u - v);
        den += v * v;
      }
      std::printf("gemm_4bit_sm90 %s d%d 4096x4096 M=%d against dequantize + cuBLAS: rel norm %.3g\n",
                  cuda::gemm4_table_name(table), depth, M, std::sqrt(num / den));
      INFO("table " << cuda::gemm4_table_name(table) << " depth " << depth);
      REQUIRE(bad == 0);
      REQUIRE(std::sqrt(num / den) < (exact ? 2e-3 : 6e-3));
    }
  // the rows layout is refused with a message that says what is needed
  auto rows = cuda::to_device(quant::quantize_4bit(wf.data(), {N, K}, quant::Quant4Config{}), ctx);
  REQUIRE_THROWS_WITH(cuda::gemm_4bit_sm90(ctx, rows, dx.data(), M, y1.data()),
                      Catch::Contains("layout rows"));
}

// matmul_4bit takes gemm_4bit_sm90 in its window (a weight of ≥ kSm90MinValues values in the tiles
// layout, kSm90MinTokens < M ≤ kSm90MaxTokens, or ≤ kSm90MaxTokensLarge on a weight of ≥
// kSm90LargeValues values) and gives that kernel's y; outside it, the other paths.
TEST_CASE("cuda matmul_4bit routes its sm90 window to gemm_4bit_sm90", "[cuda][matmul][sm90]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const int N = 11008, K = 4096, M = 200;
  static_assert(std::int64_t(N) * K >= cuda::kSm90MinValues, "the weight must be in the window");
  const auto wf = cudatest::gaussian(std::size_t(N) * K, 43, 0.02f);
  auto dw = cuda::to_device(quant::quantize_4bit(wf.data(), {N, K}, quant::Quant4Config{}), ctx);
  auto dx = cudatest::upload_bf16(cudatest::to_bf16(cudatest::gaussian(std::size_t(M) * K, 44, 1.0f)));
  cuda::DeviceBuffer<__nv_bfloat16> y1(std::size_t(M) * N), y2(std::size_t(M) * N), scratch;
  // rows layout: never the sm90 kernel
  REQUIRE(cuda::matmul_4bit_path(ctx, dw, dx.data(), M, y1.data()) == cuda::Matmul4Path::DequantCublas);
  cuda::set_layout(ctx, dw, cuda::Packed4Layout::Tiles);
  const auto path = cuda::matmul_4bit_path(ctx, dw, dx.data(), M, y1.data());
  REQUIRE(path == (ctx.sm90a_code() ? cuda::Matmul4Path::Sm90 : cuda::Matmul4Path::DequantCublas));
  REQUIRE(cuda::matmul_4bit_path(ctx, dw, dx.data(), cuda::kSm90MaxTokens + 1, y1.data()) ==
          cuda::Matmul4Path::DequantCublas);
  REQUIRE(cuda::matmul_4bit_path(ctx, dw, dx.data(), 40, y1.data()) == cuda::Matmul4Path::GemvTwice);
  {  // a weight of ≥ kSm90LargeValues values keeps the kernel up to kSm90MaxTokensLarge tokens. The path
     // depends on the weight's shape and format only, so a weight without data stands for it.
    const int NL = 14336;
    static_assert(std::int64_t(NL) * K >= cuda::kSm90LargeValues, "the weight must be a large one");
    static_assert(std::int64_t(N) * K < cuda::kSm90LargeValues, "and the one above must not");
    cuda::DeviceQuantized4bit big;
    big.shape = {NL, K};
    big.blocksize = dw.blocksize;
    big.double_quant = dw.double_quant;
    big.nested_blocksize = dw.nested_blocksize;
    big.layout = cuda::Packed4Layout::Tiles;
    const auto large_path = [&](int m) { return cuda::matmul_4bit_path(ctx, big, dx.data(), m, y1.data()); };
    REQUIRE(large_path(cuda::kSm90MaxTokensLarge) ==
            (ctx.sm90a_code() ? cuda::Matmul4Path::Sm90 : cuda::Matmul4Path::DequantCublas));
    REQUIRE(large_path(cuda::kSm90MaxTokensLarge + 1) == cuda::Matmul4Path::DequantCublas);
    REQUIRE(cuda::matmul_4bit_path(ctx, dw, dx.data(), cuda::kSm90MaxTokensLarge, y1.data()) ==
            cuda::Matmul4Path::DequantCublas);
  }
  if (!ctx.sm90a_code()) {
    WARN("no sm_90 device with sm_90a code in this build: the sm90 window falls back to dequantize + cuBLAS");
    return;
  }
  cuda::matmul_4bit(ctx, dw, dx.data(), M, y1.data(), scratch);
  cuda::gemm_4bit_sm90(ctx, dw, dx.data(), M, y2.data(), false,
                       cuda::Gemm4Sm90Variant{cuda::Gemm4Table::Exact, 3});
  ctx.synchronize();
  const auto a = cudatest::download_bf16(y1), b = cudatest::download_bf16(y2);
  std::size_t differ = 0;
  for (std::size_t i = 0; i < a.size(); ++i) differ += a[i].bits != b[i].bits;
  REQUIRE(differ == 0);
}

TEST_CASE("cuda gemv_4bit is deterministic", "[cuda][matmul]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const int N = 4096, K = 4096, M = 4;
  const auto wf = cudatest::gaussian(std::size_t(N) * K, 1);
  const auto dw = cuda::to_device(quant::quantize_4bit(wf.data(), {N, K}, quant::Quant4Config{}), ctx);
  auto dx = cudatest::upload_bf16(cudatest::to_bf16(cudatest::gaussian(std::size_t(24) * K, 2, 1.0f)));
  cuda::DeviceBuffer<__nv_bfloat16> y1(std::size_t(24) * N), y2(std::size_t(24) * N);
  const bool sm90 = ctx.props().major >= 9;
  for (auto kernel : {cuda::GemvKernel::Auto, cuda::GemvKernel::Registers, cuda::GemvKernel::Grouped,
                      cuda::GemvKernel::Stream})
    for (int m : {M, 1, 24}) {  // every kernel, with tiles owned by one warp and split across warps
      if (kernel == cuda::GemvKernel::Stream && !sm90) continue;
      INFO("kernel " << int(kernel) << " M " << m);
      cuda::gemv_4bit(ctx, dw, dx.data(), m, y1.data(), false, kernel);
      cuda::gemv_4bit(ctx, dw, dx.data(), m, y2.data(), false, kernel);
      ctx.synchronize();
      const auto a = cudatest::download_bf16(y1), b = cudatest::download_bf16(y2);
      for (std::size_t i = 0; i < std::size_t(m) * N; ++i) REQUIRE(a[i].bits == b[i].bits);
    }
}

namespace {
// x = src + add, after spinning for `spin` cycles: a slow producer that, like a PDL-aware kernel,
// lets the next kernel start at once (griddepcontrol.launch_dependents), so a GEMV launched with
// PDL that read x before its wait would read the previous x.
__global__ void slow_fill(__nv_bfloat16* x, const __nv_bfloat16* src, int n, float add, long long spin) {
  cuda::detail::pdl_launch_dependents();
  const long long t0 = clock64();
  while (clock64() - t0 < spin) {
  }
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    x[i] = __float2bfloat16_rn(__bfloat162float(src[i]) + add);
}
}  // namespace

// gemv_4bit launches its register-fed kernels as programmatic dependent launches on sm_90: they may
// start while the kernel before is running. Chains where each kernel reads what the one before wrote
// (a producer of x, then y1 = W1·x, then y2 = W2·y1, all on one stream, and the same chain replayed
// from a CUDA graph) must give the y of plain launches run one at a time, bit for bit, also with the
// lab option that loads W before the wait (W is written by no kernel of the chain). W1 has 64
// tiles, so on a 132-SM GPU the second GEMV's blocks find free SMs while the first one runs.
TEST_CASE("cuda gemv_4bit: PDL launches wait for the kernel before them", "[cuda][matmul]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const int N1 = 1024, K1 = 2048, N2 = 512;
  const auto w1f = cudatest::gaussian(std::size_t(N1) * K1, 41, 0.02f);
  const auto w2f = cudatest::gaussian(std::size_t(N2) * N1, 42, 0.02f);
  auto w1 = cuda::to_device(quant::quantize_4bit(w1f.data(), {N1, K1}, quant::Quant4Config{}), ctx);
  auto w2 = cuda::to_device(quant::quantize_4bit(w2f.data(), {N2, N1}, quant::Quant4Config{}), ctx);
  cuda::use_gemv_layout(ctx, w1);
  cuda::use_gemv_layout(ctx, w2);
  constexpr int kIters = 4;
  for (int M : {1, 24}) {  // the grouped kernel, the register kernel
    INFO("M " << M);
    auto src = cudatest::upload_bf16(cudatest::to_bf16(cudatest::gaussian(std::size_t(M) * K1, 43, 1.0f)));
    cuda::DeviceBuffer<__nv_bfloat16> x(std::size_t(M) * K1), y1(std::size_t(M) * N1);
    std::vector<cuda::DeviceBuffer<__nv_bfloat16>> y2;
    for (int i = 0; i < kIters; ++i) y2.emplace_back(std::size_t(M) * N2);
    auto chain = [&](bool pdl, bool one_at_a_time, int early_kb = -1) {
      for (int i = 0; i < kIters; ++i) {
        slow_fill<<<8, 256, 0, ctx.stream()>>>(x.data(), src.data(), M * K1, 0.25f * float(i + 1), 20000);
        QLORA_CUDA_CHECK_LAUNCH("slow_fill");
        if (one_at_a_time) ctx.synchronize();
        cuda::gemv_4bit(ctx, w1, x.data(), M, y1.data(), false, cuda::GemvKernel::Auto, 0, pdl, true,
                        early_kb);
        if (one_at_a_time) ctx.synchronize();
        cuda::gemv_4bit(ctx, w2, y1.data(), M, y2[i].data(), false, cuda::GemvKernel::Auto, 0, pdl, true,
                        early_kb);
        if (one_at_a_time) ctx.synchronize();
      }
    };
    auto results = [&] {
      ctx.synchronize();
      std::vector<std::vector<std::uint16_t>> r;
      for (auto& y : y2) {
        r.emplace_back();
        for (const bf16 v : cudatest::download_bf16(y)) r.back().push_back(v.bits);
      }
      return r;
    };
    chain(false, true);
    const auto want = results();
    REQUIRE(want[0] != want[1]);  // each iteration's x differs, so a stale read would show
    chain(true, false);
    CHECK(results() == want);
    for (int early_kb : {0, 1024}) {  // W's first loads (and L2 prefetches) before the wait; x still after
      INFO("early_kb " << early_kb);
      chain(true, false, early_kb);
      CHECK(results() == want);
    }
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    QLORA_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
    chain(true, false);
    QLORA_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &graph));
    QLORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (auto& y : y2) QLORA_CUDA_CHECK(cudaMemsetAsync(y.data(), 0xff, y.bytes(), ctx.stream()));
    QLORA_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream()));
    const auto got = results();
    QLORA_CUDA_CHECK(cudaGraphExecDestroy(exec));
    QLORA_CUDA_CHECK(cudaGraphDestroy(graph));
    CHECK(got == want);
  }
}
