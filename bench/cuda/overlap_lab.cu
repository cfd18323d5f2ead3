// Lab: the large-M 4-bit product as dequantize + cuBLAS, with the dequantization of the NEXT product's
// weight run on a side stream on k SMs while cuBLAS, told to target sm_count - k SMs
// (cublasSetSmCountTarget), multiplies with the weight dequantized one call earlier.
//
// Why: dequantize + cuBLAS is 1.09x cuBLAS bf16 at 14336x4096, M = 4096 on the H100 (dequantizing
// costs 60 µs of a 673 µs product), and slicing the product to overlap the two on a second stream
// without a carve-out found no room on the SMs (docs/performance.md). With k SMs carved out, the
// product loses k / 132 of the tensor cores and the dequantization is hidden, if k SMs can write
// N·K bf16 in the product's time.
//
// Rows (every ratio is the median of 11 rounds timed in alternation with cuBLAS bf16, time_graph_pair):
//   dq_cublas      dequantize (whole GPU) + cuBLAS, the path matmul_4bit takes today
//   carve_k        cuBLAS bf16 alone, targeting sm_count - k SMs (what the carve-out costs)
//   dq_only_k      the side dequantizer alone on k SMs (µs per weight; must fit in the product's time)
//   chain_k        the chain of 30 products (weights rotated) through Matmul4Chain: per product
// Usage: overlap_lab [csv]; OV_SHAPES="14336x4096,4096x4096", OV_M=4096, OV_KS="2,4,8",
// OV_VARIANTS="5,L" (the side kernel as single blocks; as the library launches it).
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "bench_util.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/dequantize4bit.cuh"
#include "qlora/cuda/gemm_bf16.cuh"
#include "qlora/cuda/layout4bit.cuh"
#include "qlora/cuda/matmul4bit.cuh"
#include "qlora/cuda/matmul4chain.cuh"
#include "qlora/cuda/quantize4bit.cuh"

using namespace qlora;
using namespace qlora::benchutil;  // chain_call, clone, fill, fmt, report, time_graph, time_graph_pair
using cuda::DeviceBuffer;

namespace {

// Variants of the side dequantizer: L, the library's launch (clusters of 2 blocks for an even k); 5, the
// same kernel as single blocks. (Run 1's first side kernel is in commit 5dfd57a; v2, the loads
// hoisted, in 1214534.)

std::vector<int> int_list(const char* env, std::vector<int> def) {
  const char* e = std::getenv(env);
  if (!e) return def;
  std::vector<int> v;
  std::istringstream in(e);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) v.push_back(std::atoi(item.c_str()));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (!benchutil::start(argc, argv)) return 0;
  cuda::Context ctx(0);
  const int sms = ctx.sm_count();
  std::printf("device: %s, %d SMs, L2 %d MB\n", ctx.name().c_str(), sms, ctx.props().l2CacheSize >> 20);
  std::vector<std::string> variants = {"5", "L"};
  if (const char* e = std::getenv("OV_VARIANTS")) {
    variants.clear();
    std::istringstream in(e);
    for (std::string item; std::getline(in, item, ',');)
      if (!item.empty()) variants.push_back(item);
  }
  DeviceBuffer<unsigned char> ws(std::size_t(32) << 20);

  std::vector<std::pair<int, int>> shapes = {{14336, 4096}, {4096, 4096}};
  if (const char* e = std::getenv("OV_SHAPES")) {
    shapes.clear();
    std::istringstream in(e);
    for (std::string item; std::getline(in, item, ',');) {
      int n = 0, k = 0;
      if (std::sscanf(item.c_str(), "%dx%d", &n, &k) == 2) shapes.emplace_back(n, k);
    }
  }
  const int M = int_list("OV_M", {4096})[0];
  const std::vector<int> ks = int_list("OV_KS", {2, 4, 8});

  for (const auto& nk_pair : shapes) {
    const int N = nk_pair.first, K = nk_pair.second;
    const std::string suffix = std::to_string(N) + "x" + std::to_string(K) + "/m" + std::to_string(M);
    const std::size_t nk = std::size_t(N) * K;
    const int nbf = rotation_copies(2 * nk);
    auto wb = random_weights(ctx, nk, nbf);
    std::vector<cuda::DeviceQuantized4bit> wq;
    wq.push_back(cuda::quantize_4bit(ctx, wb[0].data(), {N, K},
                                     quant::Quant4Config{quant::Quant4Type::NF4, 64, true}));
    const int nq = rotation_copies(wq[0].weight_bytes());
    for (int i = 1; i < nq; ++i) wq.push_back(clone(ctx, wq[0]));
    for (auto& w : wq) cuda::use_gemv_layout(ctx, w);
    DeviceBuffer<__nv_bfloat16> x(std::size_t(M) * K), y(std::size_t(M) * N);
    fill(ctx, x.data(), x.size(), 7, 2.0f);
    DeviceBuffer<__nv_bfloat16> scratch[2] = {DeviceBuffer<__nv_bfloat16>(nk),
                                              DeviceBuffer<__nv_bfloat16>(nk)};
    ctx.synchronize();

    auto base = [&](int i) { cuda::gemm_bf16(ctx, x.data(), M, K, wb[i % nbf].data(), N, y.data()); };
    const double flops = 2.0 * M * double(nk);
    {
      const PairTiming p = time_graph_pair(ctx, base, [&](int i) {
        cuda::matmul_4bit_dequant(ctx, wq[i % nq], x.data(), M, y.data(), scratch[0]);
      });
      report("ov/dq_cublas/" + suffix, p.best_b,
             fmt("%.3fx cuBLAS bf16 (median of 11, spread %.3f-%.3f); cuBLAS %.2f us", p.ratio_median,
                 p.ratio_min, p.ratio_max, p.best_a));
      std::printf("  cuBLAS bf16 %.1f TFLOP/s\n", flops / p.best_a * 1e-6);
    }
    for (int k : ks) {
      cublasHandle_t h;
      QLORA_CUBLAS_CHECK(cublasCreate(&h));
      QLORA_CUBLAS_CHECK(cublasSetStream(h, ctx.stream()));
      QLORA_CUBLAS_CHECK(cublasSetWorkspace(h, ws.data(), ws.bytes()));
      QLORA_CUBLAS_CHECK(cublasSetSmCountTarget(h, sms - k));
      {
        const PairTiming p = time_graph_pair(ctx, base, [&](int i) {
          cuda::gemm_bf16_on(h, x.data(), M, K, wb[i % nbf].data(), N, y.data());
        });
        report("ov/carve_" + std::to_string(k) + "/" + suffix, p.best_b,
               fmt("%.3fx cuBLAS bf16 (median of 11, spread %.3f-%.3f); cuBLAS targeting %.0f SMs",
                   p.ratio_median, p.ratio_min, p.ratio_max, double(sms - k)));
      }
      for (const std::string& v : variants) {
        const bool clusters = v == "L";
        if (k == ks[0]) {  // the side dequantizer gives the library's values
          cuda::dequantize_4bit(ctx, wq[1], scratch[0].data());
          QLORA_CUDA_CHECK(cudaMemsetAsync(scratch[1].data(), 0xff, scratch[1].bytes(), ctx.stream()));
          cuda::dequantize_4bit_on_sms(ctx, wq[1], scratch[1].data(), k, ctx.stream(), clusters);
          const auto a = scratch[0].to_host(ctx.stream()), b = scratch[1].to_host(ctx.stream());
          std::size_t bad = 0;
          for (std::size_t i = 0; i < nk; ++i) bad += std::memcmp(&a[i], &b[i], 2) != 0;
          std::printf("side dequantizer v%s on %d SMs against dequantize_4bit: %zu of %zu values differ\n",
                      v.c_str(), k, bad, nk);
        }
        {
          const double us = time_graph(ctx, [&](int i) {
            cuda::dequantize_4bit_on_sms(ctx, wq[i % nq], scratch[0].data(), k, ctx.stream(), clusters);
          });
          report("ov/dq_only_" + std::to_string(k) + "_v" + v + "/" + suffix, us,
                 fmt("%.3f TB/s on %.0f SMs (read + write)", (wq[0].weight_bytes() + 2.0 * nk) / us * 1e-6,
                     double(k)));
        }
        {  // the chain of 30 products through Matmul4Chain, this variant's launch
          cuda::Matmul4Chain chain(ctx, k, clusters);
          const int calls = 30;
          const PairTiming p = time_graph_pair(
              ctx, base,
              [&](int i) {
                chain_call(ctx, chain, wq[i % nq], &wq[(i + 1) % nq], x.data(), M, y.data(), i, calls);
              },
              calls);
          report("ov/chain_" + std::to_string(k) + "_v" + v + "/" + suffix, p.best_b,
                 fmt("%.3fx cuBLAS bf16 (median of 11, spread %.3f-%.3f); %.0f TFLOP/s", p.ratio_median,
                     p.ratio_min, p.ratio_max, flops / p.best_b * 1e-6));
        }
      }
      cublasDestroy(h);
    }
  }
  return 0;
}
