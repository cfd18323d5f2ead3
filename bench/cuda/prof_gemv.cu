// A minimal driver for Nsight Compute: one 4-bit GEMV shape, launched a few times.
//   prof_gemv N K M [stream|registers|grouped|auto [rows]]    (defaults 14336 4096 1, Auto's kernel;
//   the tiles layout LoraLinear keeps its weights in, or bitsandbytes' rows; stream reads rows)
//   prof_gemv N K M sm90|sm90fast                              (gemm_4bit_sm90, exact / fast table)
//   ncu --kernel-name regex:gemv4 --launch-skip 1 --launch-count 1 ./prof_gemv
//   ncu --kernel-name regex:gemm4 --launch-skip 1 --launch-count 1 ./prof_gemv 14336 4096 4096 sm90
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "qlora/cuda/gemm4bit_sm90.cuh"
#include "qlora/cuda/gemv4bit.cuh"
#include "qlora/cuda/layout4bit.cuh"
#include "qlora/cuda/quantize4bit.cuh"

namespace {
__global__ void fill(__nv_bfloat16* p, std::size_t n, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    std::uint32_t h = std::uint32_t(i) * 0x9E3779B1u;
    h ^= h >> 15, h *= 0x2C1B3C6Du, h ^= h >> 12;
    p[i] = __float2bfloat16_rn((float(h >> 8) * (1.0f / 16777216.0f) - 0.5f) * scale);
  }
}
}  // namespace

int main(int argc, char** argv) {
  using namespace qlora;
  if (cuda::device_count() == 0) return 0;
  const int N = argc > 1 ? std::atoi(argv[1]) : 14336, K = argc > 2 ? std::atoi(argv[2]) : 4096;
  const int M = argc > 3 ? std::atoi(argv[3]) : 1;
  cuda::Context ctx(0);
  cuda::DeviceBuffer<__nv_bfloat16> w(std::size_t(N) * K), x(std::size_t(M) * K), y(std::size_t(M) * N);
  fill<<<1024, 256, 0, ctx.stream()>>>(w.data(), w.size(), 0.05f);
  fill<<<64, 256, 0, ctx.stream()>>>(x.data(), x.size(), 2.0f);
  auto q = cuda::quantize_4bit(ctx, w.data(), {N, K}, quant::Quant4Config{});
  const std::string which = argc > 4 ? argv[4] : "";
  const bool rows = argc > 5 && std::string(argv[5]) == "rows";
  if (!rows && which != "stream") cuda::use_gemv_layout(ctx, q);  // the layout LoraLinear keeps
  const auto kernel = which == "stream"      ? cuda::GemvKernel::Stream
                      : which == "registers" ? cuda::GemvKernel::Registers
                      : which == "grouped"   ? cuda::GemvKernel::Grouped
                                             : cuda::GemvKernel::Auto;
  if (which == "sm90" || which == "sm90fast") {
    const cuda::Gemm4Sm90Variant v{which == "sm90" ? cuda::Gemm4Table::Exact : cuda::Gemm4Table::Fast, 3};
    for (int i = 0; i < 3; ++i) cuda::gemm_4bit_sm90(ctx, q, x.data(), M, y.data(), false, v);
  } else {
    for (int i = 0; i < 3; ++i) cuda::gemv_4bit(ctx, q, x.data(), M, y.data(), false, kernel);
  }
  ctx.synchronize();
  std::printf("%s %dx%d m%d (%s layout) done\n", which.c_str(), N, K, M,
              q.layout == cuda::Packed4Layout::Tiles ? "tiles" : "rows");
  return 0;
}
