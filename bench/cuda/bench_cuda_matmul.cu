// CUDA benchmarks of the 4-bit (and int8 quantize / dequantize) kernels beside cuBLAS bf16, in one run
// (docs/performance.md, "CUDA").
//
// Every figure is the best of 5 replays of a CUDA graph of 30 calls, timed with CUDA events, divided
// by 30 (the method of ../shared/ANCHORS.md). The 30 calls cycle through copies of the weight
// totalling ≥ 512 MiB, so no call finds its weight in the 60 MB L2 left by the call before. Inputs
// are random (never zeros). Printed as Google-Benchmark-like lines,
//   name  time  [bytes or FLOP rate, fraction of the measured ceiling, baseline from this run]
// with the names matmul/cuda/<type>/<N>x<K>/m<M>; the ceilings (device-to-device copy bandwidth,
// read + write counted, and cuBLAS bf16 8192³) are measured first, in the same run.
// Usage: bench_cuda_matmul [csv-output-path]; QLORA_BENCH_SHAPES / QLORA_BENCH_MS (see main) keep
// some shapes and token counts only (lab runs).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "bench_util.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/dequantize4bit.cuh"
#include "qlora/cuda/dequantize8bit.cuh"
#include "qlora/cuda/gemm4bit_sm90.cuh"
#include "qlora/cuda/gemm_bf16.cuh"
#include "qlora/cuda/gemv4bit.cuh"
#include "qlora/cuda/layout4bit.cuh"
#include "qlora/cuda/matmul4bit.cuh"
#include "qlora/cuda/quantize4bit.cuh"
#include "qlora/cuda/quantize8bit.cuh"

using namespace qlora;
using benchutil::clone;
using benchutil::fill;
using benchutil::fmt;
using benchutil::PairTiming;
using benchutil::report;
using benchutil::time_blocking;
using benchutil::time_graph;
using benchutil::time_graph_pair;
using cuda::DeviceBuffer;

namespace {

__global__ void copy_kernel(const uint4* __restrict__ a, uint4* __restrict__ b, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x)
    b[i] = a[i];
}
// Reads everything, writes one word per thread (so the loads cannot be dropped).
__global__ void read_kernel(const uint4* __restrict__ a, std::size_t n, unsigned* out) {
  unsigned acc = 0;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcs(a + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

}  // namespace

int main(int argc, char** argv) {
  if (!benchutil::start(argc, argv)) return 0;
  cuda::Context ctx(0);
  std::printf("device: %s, %d SMs, L2 %d MB, cuda runtime %d\n", ctx.name().c_str(), ctx.sm_count(),
              ctx.props().l2CacheSize >> 20, CUDART_VERSION);

  // --- ceilings ------------------------------------------------------------------------------
  const std::size_t copy_bytes = std::size_t(2) << 30;
  double copy_tbs = 0, read_tbs = 0, gemm_tflops = 0;
  {
    DeviceBuffer<unsigned char> a(copy_bytes), b(copy_bytes);
    QLORA_CUDA_CHECK(cudaMemsetAsync(a.data(), 1, copy_bytes, ctx.stream()));
    const double us = time_graph(
        ctx,
        [&](int) {
          QLORA_CUDA_CHECK(
              cudaMemcpyAsync(b.data(), a.data(), copy_bytes, cudaMemcpyDeviceToDevice, ctx.stream()));
        },
        5, 5);
    const double memcpy_tbs = 2.0 * copy_bytes / us * 1e-6;
    report("copy/cuda/memcpy_d2d/2GiB", us, fmt("%.3f TB/s (read + write)", memcpy_tbs));
    const double us_k = time_graph(
        ctx,
        [&](int) {
          copy_kernel<<<ctx.sm_count() * 8, 512, 0, ctx.stream()>>>(
              reinterpret_cast<const uint4*>(a.data()), reinterpret_cast<uint4*>(b.data()), copy_bytes / 16);
          QLORA_CUDA_CHECK_LAUNCH("copy_kernel");
        },
        5, 5);
    const double kernel_tbs = 2.0 * copy_bytes / us_k * 1e-6;
    report("copy/cuda/kernel/2GiB", us_k,
           fmt("%.3f TB/s (read + write, 16-byte loads and stores)", kernel_tbs));
    const double us_r = time_graph(
        ctx,
        [&](int) {
          read_kernel<<<ctx.sm_count() * 8, 512, 0, ctx.stream()>>>(reinterpret_cast<const uint4*>(a.data()),
                                                                    copy_bytes / 16,
                                                                    reinterpret_cast<unsigned*>(b.data()));
          QLORA_CUDA_CHECK_LAUNCH("read_kernel");
        },
        5, 5);
    read_tbs = double(copy_bytes) / us_r * 1e-6;
    report("read/cuda/kernel/2GiB", us_r, fmt("%.3f TB/s (read only)", read_tbs));
    copy_tbs = std::max(memcpy_tbs, kernel_tbs);
  }
  {
    const int n = 8192;
    DeviceBuffer<__nv_bfloat16> a(std::size_t(n) * n), b(std::size_t(n) * n), c(std::size_t(n) * n);
    fill(ctx, a.data(), a.size(), 1, 2.0f);
    fill(ctx, b.data(), b.size(), 2, 2.0f);
    const double us = time_graph(
        ctx, [&](int) { cuda::gemm_bf16(ctx, a.data(), n, n, b.data(), n, c.data()); }, 10, 5);
    gemm_tflops = 2.0 * n * n * double(n) / us * 1e-6;
    report("gemm/cuda/bf16/8192x8192/m8192", us, fmt("%.1f TFLOP/s", gemm_tflops));
  }

  std::vector<std::pair<int, int>> shapes = {{4096, 4096}, {11008, 4096}, {14336, 4096}};
  std::vector<int> Ms = {1, 2, 8, 16, 32, 64, 128, 512, 4096};
  // A lab run may keep some of them: QLORA_BENCH_SHAPES="14336x4096,4096x4096", QLORA_BENCH_MS="1,32".
  if (const char* e = std::getenv("QLORA_BENCH_SHAPES")) {
    shapes.clear();
    std::istringstream in(e);
    for (std::string item; std::getline(in, item, ',');) {
      if (item.empty()) continue;
      int n = 0, k = 0;
      QLORA_CHECK(std::sscanf(item.c_str(), "%dx%d", &n, &k) == 2 && n > 0 && k > 0,
                  "QLORA_BENCH_SHAPES: item '", item, "', expected NxK");
      shapes.emplace_back(n, k);
    }
  }
  // A comma-separated list of positive integers in the environment variable `name`, if it is set.
  auto env_ints = [](const char* name, std::vector<int>& out) {
    const char* e = std::getenv(name);
    if (!e) return;
    out.clear();
    std::istringstream in(e);
    for (std::string item; std::getline(in, item, ',');) {
      if (item.empty()) continue;
      const int v = std::atoi(item.c_str());
      QLORA_CHECK(v > 0, name, ": item '", item, "', expected a positive integer");
      out.push_back(v);
    }
  };
  env_ints("QLORA_BENCH_MS", Ms);
  // Lab: GEMV grids to time beside the default, QLORA_BENCH_GRIDS="96,112,120" (rows *_grid<n>).
  std::vector<int> grids;
  env_ints("QLORA_BENCH_GRIDS", grids);
  for (const auto& nk_pair : shapes) {
    const int N = nk_pair.first, K = nk_pair.second;
    const std::string shape = std::to_string(N) + "x" + std::to_string(K);
    const std::size_t nk = std::size_t(N) * K;
    // bf16 weights (the baseline) and their NF4 + double-quant copies
    const int nbf = benchutil::rotation_copies(2 * nk);
    auto wb = benchutil::random_weights(ctx, nk, nbf);
    std::vector<cuda::DeviceQuantized4bit> wq;
    {
      const quant::Quant4Config cfg{quant::Quant4Type::NF4, 64, true};
      // quantize_4bit synchronizes (it reads the offset and the NaN check back), so no graph here
      wq.push_back(cuda::quantize_4bit(ctx, wb[0].data(), {N, K}, cfg));
      const double us = time_blocking(ctx, [&] {
        return cuda::quantize_4bit(ctx, wb[0].data(), {N, K}, cfg);
      });
      report("quantize/cuda/nf4dq/" + shape + "/bf16", us,
             "bf16 in, NF4 + double quant out; includes the offset read-back and the NaN check");
    }
    const std::size_t qbytes = wq[0].weight_bytes();
    const int nq = benchutil::rotation_copies(qbytes);
    for (int i = 1; i < nq; ++i) wq.push_back(clone(ctx, wq[0]));
    // wq: the tiles layout LoraLinear<..., Cuda> keeps its 4-bit weights in (layout4bit.cuh); wr: the
    // same bytes in bitsandbytes' rows, for the lab rows (and the streaming kernel, which reads rows)
    std::vector<cuda::DeviceQuantized4bit> wr;
    for (int i = 0; i < nq; ++i) wr.push_back(clone(ctx, wq[i]));
    for (auto& w : wq) cuda::use_gemv_layout(ctx, w);
    ctx.synchronize();

    DeviceBuffer<__nv_bfloat16> scratch(nk);
    {  // what streaming these packed bytes costs in this framing (a read-only kernel, weights rotated,
       // one launch per call): the practical floor of a GEMV at small M, beside the ceiling's bytes / rate
      const int blocks = ctx.sm_count() * 8;
      DeviceBuffer<unsigned> sink(std::size_t(blocks) * 512);
      const double us = time_graph(ctx, [&](int i) {
        read_kernel<<<blocks, 512, 0, ctx.stream()>>>(
            reinterpret_cast<const uint4*>(wq[i % nq].packed.data()), nk / 32, sink.data());
        QLORA_CUDA_CHECK_LAUNCH("read_kernel");
      });
      report("read/cuda/kernel/" + shape + "/packed", us,
             fmt("%.3f TB/s = %.0f%% of read; a read-only kernel over the %.1f MB of packed weights",
                 nk / 2.0 / us * 1e-6, 100.0 * nk / 2.0 / us * 1e-6 / read_tbs, nk / 2.0 * 1e-6));
    }
    {
      const double us =
          time_graph(ctx, [&](int i) { cuda::dequantize_4bit(ctx, wq[i % nq], scratch.data()); });
      const double bytes = double(qbytes) + 2.0 * nk;
      report("dequantize/cuda/nf4dq/" + shape + "/bf16", us,
             fmt("%.3f TB/s = %.0f%% of copy; tiles layout", bytes / us * 1e-6,
                 100.0 * bytes / us * 1e-6 / copy_tbs));
      const double us_r =
          time_graph(ctx, [&](int i) { cuda::dequantize_4bit(ctx, wr[i % nq], scratch.data()); });
      report("dequantize/cuda/nf4dq/" + shape + "/bf16_rows", us_r,
             fmt("%.3f TB/s = %.0f%% of copy; rows layout", bytes / us_r * 1e-6,
                 100.0 * bytes / us_r * 1e-6 / copy_tbs));
    }
    {  // int8, row-wise (LLM.int8 SCB) and blockwise (dynamic map, blocks of 256): the bytes moved
       // count the bf16 input once, though the row-wise kernel reads each row twice (the second time
       // from L2)
      const double bytes_q = 2.0 * nk + double(nk) + 4.0 * N;
      const double us_r =
          time_blocking(ctx, [&] { return cuda::quantize_rowwise_int8(ctx, wb[0].data(), N, K); });
      report(
          "quantize/cuda/int8row/" + shape + "/bf16", us_r,
          fmt("%.3f TB/s; bf16 in, int8 + SCB out; includes the NaN check read-back", bytes_q / us_r * 1e-6));
      const double us_b =
          time_blocking(ctx, [&] { return cuda::quantize_blockwise8(ctx, wb[0].data(), nk, 256); });
      report("quantize/cuda/int8blk256/" + shape + "/bf16", us_b,
             fmt("%.3f TB/s; bf16 in, codes + absmax out; includes the NaN check read-back",
                 (3.0 * nk + 4.0 * nk / 256) / us_b * 1e-6));
      // one int8 copy per bf16 copy: together at least 256 MiB, so the rotation defeats L2 here too
      std::vector<cuda::DeviceRowwiseInt8> wr;
      std::vector<cuda::DeviceBlockwise8> w8;
      for (int i = 0; i < nbf; ++i) {
        wr.push_back(cuda::quantize_rowwise_int8(ctx, wb[i].data(), N, K));
        w8.push_back(cuda::quantize_blockwise8(ctx, wb[i].data(), nk, 256));
      }
      const double us_dr =
          time_graph(ctx, [&](int i) { cuda::dequantize_rowwise_int8(ctx, wr[i % nbf], scratch.data()); });
      const double bytes_dr = double(wr[0].weight_bytes()) + 2.0 * nk;
      report("dequantize/cuda/int8row/" + shape + "/bf16", us_dr,
             fmt("%.3f TB/s = %.0f%% of copy", bytes_dr / us_dr * 1e-6,
                 100.0 * bytes_dr / us_dr * 1e-6 / copy_tbs));
      const double us_db =
          time_graph(ctx, [&](int i) { cuda::dequantize_blockwise8(ctx, w8[i % nbf], scratch.data()); });
      const double bytes_db = double(w8[0].weight_bytes()) + 2.0 * nk;
      report("dequantize/cuda/int8blk256/" + shape + "/bf16", us_db,
             fmt("%.3f TB/s = %.0f%% of copy", bytes_db / us_db * 1e-6,
                 100.0 * bytes_db / us_db * 1e-6 / copy_tbs));
    }
    for (int M : Ms) {
      DeviceBuffer<__nv_bfloat16> x(std::size_t(M) * K), y(std::size_t(M) * N);
      fill(ctx, x.data(), x.size(), 7 + M, 2.0f);
      const std::string suffix = shape + "/m" + std::to_string(M);
      const double t_bf16 = time_graph(
          ctx, [&](int i) { cuda::gemm_bf16(ctx, x.data(), M, K, wb[i % nbf].data(), N, y.data()); });
      const double flops = 2.0 * M * double(nk);
      const double bytes_bf16 = 2.0 * nk + 2.0 * M * (K + N);
      auto rate = [&](double us, double bytes) {
        if (M >= 512)
          return fmt("%.0f TFLOP/s = %.0f%% of bf16 8192^3", flops / us * 1e-6,
                     100.0 * flops / us * 1e-6 / gemm_tflops);
        return fmt("%.3f TB/s = %.0f%% of read", bytes / us * 1e-6, 100.0 * bytes / us * 1e-6 / read_tbs);
      };
      report("matmul/cuda/bf16/" + suffix, t_bf16, "cuBLAS; " + rate(t_bf16, bytes_bf16));
      const double t_q =
          time_graph(ctx, [&](int i) { cuda::matmul_4bit(ctx, wq[i % nq], x.data(), M, y.data(), scratch); });
      const double bytes_q = double(qbytes) + 2.0 * M * (K + N);
      report(
          "matmul/cuda/nf4dq/" + suffix, t_q,
          rate(t_q, bytes_q) + fmt("; %.2fx the time of cuBLAS bf16 (%.2f us)", t_q / t_bf16, t_bf16) +
              [&]() -> std::string {
            switch (cuda::matmul_4bit_path(ctx, wq[0], x.data(), M, y.data())) {
              case cuda::Matmul4Path::Gemv:
                return M <= 16 ? "; grouped register tensor-core GEMV" : "; register tensor-core GEMV";
              case cuda::Matmul4Path::GemvTwice: return "; the GEMV twice (32 tokens, then the rest)";
              case cuda::Matmul4Path::Sm90: return "; gemm_4bit_sm90 (wgmma, decoded in registers)";
              default: return "; dequantize + cuBLAS";
            }
          }());
      {  // the ratio to cuBLAS bf16 timed in alternation (time_graph_pair): the targets' figure
        const PairTiming p = time_graph_pair(
            ctx, [&](int i) { cuda::gemm_bf16(ctx, x.data(), M, K, wb[i % nbf].data(), N, y.data()); },
            [&](int i) { cuda::matmul_4bit(ctx, wq[i % nq], x.data(), M, y.data(), scratch); });
        report(
            "matmul_paired/cuda/nf4dq/" + suffix, p.best_b,
            fmt("%.3fx cuBLAS bf16: median of 11 alternating rounds (spread %.3f-%.3f); best cuBLAS %.2f us",
                p.ratio_median, p.ratio_min, p.ratio_max, p.best_a));
      }
      // The framing of ../shared/ANCHORS.md's figures: the same weight in every call, so a weight that
      // fits in L2 (14336x4096 NF4 + DQ: 30 MB of 50) is read from there after the first call. Beside
      // the rotated rows above, not instead of them.
      if (M <= 32) {
        const double a =
            time_graph(ctx, [&](int) { cuda::gemm_bf16(ctx, x.data(), M, K, wb[0].data(), N, y.data()); });
        const double b =
            time_graph(ctx, [&](int) { cuda::matmul_4bit(ctx, wq[0], x.data(), M, y.data(), scratch); });
        report("matmul_sameweight/cuda/nf4dq/" + suffix, b,
               fmt("one weight in all 30 calls (L2-resident where it fits); cuBLAS bf16 the same way %.2f us",
                   a));
      }
      if (M > 32) {  // lab: the large-M paths, each forced (matmul_4bit's rows above pick one of them)
        const double us_dq = time_graph(
            ctx, [&](int i) { cuda::matmul_4bit_dequant(ctx, wq[i % nq], x.data(), M, y.data(), scratch); });
        report("gemm4_lab/cuda/nf4dq/" + suffix + "/dequant_cublas", us_dq,
               rate(us_dq, bytes_q) + fmt("; %.2fx the time of cuBLAS bf16", us_dq / t_bf16));
        if (cuda::gemm_4bit_sm90_supported(ctx, wq[0], x.data(), M, y.data()))
          for (cuda::Gemm4Sm90Variant v : {cuda::Gemm4Sm90Variant{cuda::Gemm4Table::Exact, 3},
                                           cuda::Gemm4Sm90Variant{cuda::Gemm4Table::Fast, 3},
                                           cuda::Gemm4Sm90Variant{cuda::Gemm4Table::Exact, 2},
                                           cuda::Gemm4Sm90Variant{cuda::Gemm4Table::Fast, 2}}) {
            const double us = time_graph(
                ctx, [&](int i) { cuda::gemm_4bit_sm90(ctx, wq[i % nq], x.data(), M, y.data(), false, v); });
            report("gemm4_lab/cuda/nf4dq/" + suffix + "/sm90_" + cuda::gemm4_table_name(v.table) + "_d" +
                       std::to_string(v.depth),
                   us, rate(us, bytes_q) + fmt("; %.2fx the time of cuBLAS bf16", us / t_bf16));
          }
      }
      if (M <= 64) {  // kernel lab: the GEMV's kernels and options, forced
        // one lab row, `fn` timed in alternation with matmul_4bit's own choice (time_graph_pair): two
        // rows timed seconds apart drift by up to 0.5 µs at M = 1 (thirteenth session), as much as
        // the options move it
        auto paired = [&](const std::string& name, const std::function<void(int)>& fn) {
          const PairTiming p = time_graph_pair(
              ctx, [&](int i) { cuda::matmul_4bit(ctx, wq[i % nq], x.data(), M, y.data(), scratch); }, fn);
          report(
              "gemv_lab/cuda/nf4dq/" + suffix + "/" + name, p.best_b,
              rate(p.best_b, bytes_q) + fmt("; %.2fx the time of cuBLAS bf16; %.3fx matmul_4bit's (median of "
                                            "11 alternating rounds, spread %.3f-%.3f)",
                                            p.best_b / t_bf16, p.ratio_median, p.ratio_min, p.ratio_max));
        };
        // the register-fed kernel with U loads in flight per warp and B blocks per SM
        auto lab = [&](auto u_tag, auto b_tag, const char* name) {
          constexpr int U = decltype(u_tag)::value, B = decltype(b_tag)::value;
          paired(std::string("registers_") + name, [&](int i) {
            cuda::gemv_4bit<U, B>(ctx, wq[i % nq], x.data(), M, y.data(), false, cuda::GemvKernel::Registers);
          });
        };
        lab(std::integral_constant<int, 4>{}, std::integral_constant<int, 1>{}, "u4_b1");
        // `kern` on the weights `w` (tiles wq or rows wr), with gemv_4bit's lab options
        auto row = [&](const std::string& name, const std::vector<cuda::DeviceQuantized4bit>& w,
                       cuda::GemvKernel kern, int stage_k = 0, bool pdl = true, bool aligned = true,
                       int early_kb = -1, int max_blocks = 0) {
          paired(name, [&](int i) {
            cuda::gemv_4bit(ctx, w[i % nq], x.data(), M, y.data(), false, kern, stage_k, pdl, aligned,
                            early_kb, max_blocks);
          });
        };
        if (M > 32)  // the GEMV in two calls of ≤ 32 tokens (the second finds much of W in L2)
          paired("halves", [&](int i) {
            cuda::gemv_4bit(ctx, wq[i % nq], x.data(), 32, y.data());
            cuda::gemv_4bit(ctx, wq[i % nq], x.data() + std::size_t(32) * K, M - 32,
                            y.data() + std::size_t(32) * N);
          });
        for (int sk : {1024, 2048, 4096})  // the streaming kernel (rows only), by values of K per stage
          row("stream_k" + std::to_string(sk), wr, cuda::GemvKernel::Stream, sk);
        if (M <= 8) lab(std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{}, "u2_b2");
        row("grouped", wq, cuda::GemvKernel::Grouped);
        if (M <= 16)  // the first weight loads before the PDL wait (and L2 prefetches of 4 KB per warp)
          for (int kb : {0, 4})
            row("grouped_early" + std::to_string(kb), wq, cuda::GemvKernel::Grouped, 0, true, true, kb);
        for (auto kern : {cuda::GemvKernel::Registers, cuda::GemvKernel::Grouped}) {
          const std::string k = kern == cuda::GemvKernel::Grouped ? "grouped" : "registers";
          row(k + "_nopdl", wq, kern, 0, false);           // plain launches
          row(k + "_plainlut", wq, kern, 0, true, false);  // the table anywhere in shared memory
          row(k + "_rows", wr, kern);                      // bitsandbytes' rows
          row(k + "_fullgrid", wq, kern, 0, true, true, -1, ctx.sm_count());  // a block on every SM
          for (int g : grids) row(k + "_grid" + std::to_string(g), wq, kern, 0, true, true, -1, g);
        }
      }
    }
  }
  if (benchutil::csv()) std::fclose(benchutil::csv());
  return 0;
}
