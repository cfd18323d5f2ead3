// CUDA benchmark of one LoRA layer training step (forward + backward: dx, dA, dB) on a 4-bit base
// beside the same step on a bf16 base, in one run (docs/performance.md, "CUDA"; issue 4's target:
// the QLoRA step within 1.15x of the bf16 one at 4096x4096, M = 4096, r = 16).
//
// Names lora_step/cuda/<type>/<N>x<K>/m<M>/r<R>; each figure is benchutil::time_graph's best of 5
// replays of a graph of 10 steps. The layer is LoraLinear<Quant, 16, Cuda> with α = 32, no dropout
// (as ../shared/ANCHORS.md's LoRA rows), B initialised non-zero so every product does real work;
// x and dy are random bf16. The weight is quantized on the GPU (NF4, blocksize 64, double quant).
// Usage: bench_cuda_lora [csv-output-path]
#include <cuda_bf16.h>

#include <cstdio>
#include <string>
#include <vector>

#include "bench_util.cuh"
#include "qlora/cuda/lora_linear.cuh"
#include "qlora/cuda/quantize4bit.cuh"

using namespace qlora;
using benchutil::fill;
using benchutil::fmt;
using benchutil::report;
using benchutil::time_graph;

namespace {

template <class Quant>
double time_step(const cuda::Context& ctx, const BaseWeight<Quant>& base, int M, int r,
                 const __nv_bfloat16* x, const __nv_bfloat16* dy, __nv_bfloat16* y, __nv_bfloat16* dx) {
  LoraConfig cfg;
  cfg.r = r;
  cfg.alpha = 2.0f * float(r);
  cfg.dropout = 0.0f;
  cfg.init = LoraInit::NonZero;
  LoraLinear<Quant, 16, Cuda> layer(ctx, base, cfg);
  typename LoraLinear<Quant, 16, Cuda>::Context keep;
  return time_graph(
      ctx,
      [&](int) {
        layer.forward(ctx, x, M, y, keep);
        layer.backward(ctx, keep, dy, dx, GradMode::Accumulate);
      },
      10, 5);
}

}  // namespace

int main(int argc, char** argv) {
  if (!benchutil::start(argc, argv)) return 0;
  cuda::Context ctx(0);
  std::printf("device: %s, %d SMs\n", ctx.name().c_str(), ctx.sm_count());
  const int r = 16;
  for (auto [N, K] : std::vector<std::pair<int, int>>{{4096, 4096}, {11008, 4096}}) {
    const std::size_t nk = std::size_t(N) * K;
    cuda::DeviceBuffer<__nv_bfloat16> wd(nk);
    fill(ctx, wd.data(), nk, 3, 0.05f);
    ctx.synchronize();
    std::vector<bf16> wh(nk);
    QLORA_CUDA_CHECK(cudaMemcpy(wh.data(), wd.data(), nk * sizeof(bf16), cudaMemcpyDeviceToHost));
    const BaseWeight<format::BF16> base_bf16(std::move(wh), N, K);
    const auto q =
        cuda::quantize_4bit(ctx, wd.data(), {N, K}, quant::Quant4Config{quant::Quant4Type::NF4, 64, true});
    const BaseWeight<format::NF4> base_nf4(cuda::to_host(q, ctx));
    const std::string shape = std::to_string(N) + "x" + std::to_string(K);
    for (int M : {512, 4096, 16384}) {
      cuda::DeviceBuffer<__nv_bfloat16> x(std::size_t(M) * K), dy(std::size_t(M) * N), y(std::size_t(M) * N),
          dx(std::size_t(M) * K);
      fill(ctx, x.data(), x.size(), 5 + M, 2.0f);
      fill(ctx, dy.data(), dy.size(), 7 + M, 0.02f);
      const std::string suffix = shape + "/m" + std::to_string(M) + "/r" + std::to_string(r);
      const double t_bf16 = time_step(ctx, base_bf16, M, r, x.data(), dy.data(), y.data(), dx.data());
      // the two base products (y = x·W0ᵀ, dx = dy·W0) dominate: 4·M·N·K FLOPs
      const double flops = 4.0 * M * double(nk);
      report("lora_step/cuda/bf16/" + suffix, t_bf16,
             fmt("%.0f TFLOP/s in the base products", flops / t_bf16 * 1e-6));
      const double t_nf4 = time_step(ctx, base_nf4, M, r, x.data(), dy.data(), y.data(), dx.data());
      report("lora_step/cuda/nf4dq/" + suffix, t_nf4,
             fmt("%.0f TFLOP/s in the base products; %.3fx the time of the bf16 step", flops / t_nf4 * 1e-6,
                 t_nf4 / t_bf16));
    }
  }
  if (benchutil::csv()) std::fclose(benchutil::csv());
  return 0;
}
