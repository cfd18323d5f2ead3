// [cuda] LoraLinear<..., Cuda> against LoraLinear<NF4, Dynamic, Cpu> (cpu_lora_reference.cpp) on the same NF4
// weight, the same init (both draw A and B from the same counters) and the same bf16-rounded inputs; the
// dropout mask bit for bit; cuda::AdamW against optim::AdamW.
//
// Tolerances (layer). The CPU computes in fp32 from the same bf16 inputs (its 4-bit product set to
// exact fp32 activations). The GPU rounds, each at most 2⁻⁹ relative: the NF4 weights to bf16 in the
// base products (the GEMV: the code value; the cuBLAS path: code·absmax), A and B to bf16 as cuBLAS
// operands of x·Aᵀ and dy·B, h and dh to bf16 as operands of dB and dA, and y, dx to bf16 twice (the
// base product's output, then with the LoRA term added). A handful of independent 2⁻⁹ roundings
// give a relative error norm of a few 1e-3: the bound is ||gpu - cpu|| / ||cpu|| < 1e-2 for y, dx,
// dA, dB, and every element within 3e-2 · max|cpu| (no single element may go astray).
//
// AdamW: the GPU kernel does the CPU's float operations one by one in the same order (adamw.cuh),
// so the parameters, moments and gradients are compared in ulps, expecting 0 and bounded by 4 (the
// norm is a double sum in another order: should float(clip coefficient) ever round differently,
// everything would move by about one ulp).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_lora_reference.hpp"
#include "cuda_test_util.cuh"
#include "qlora/cuda/adamw.cuh"
#include "qlora/cuda/lora_linear.cuh"
#include "qlora/cuda/random.cuh"
#include "qlora/optim/adamw.hpp"

using namespace qlora;

namespace {

using GpuLayer = LoraLinear<format::NF4, Dynamic, Cuda>;

struct Diff {
  double rel_norm = 0, max_rel = 0;  // ||a - b|| / ||b||, max |a - b| / max |b|
};

Diff diff(const std::vector<float>& got, const std::vector<float>& ref) {
  REQUIRE(got.size() == ref.size());
  double num = 0, den = 0, maxd = 0, maxr = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double d = std::isfinite(got[i]) ? double(got[i]) - double(ref[i]) : INFINITY;
    num += d * d;
    den += double(ref[i]) * ref[i];
    maxd = std::max(maxd, std::fabs(d));
    maxr = std::max(maxr, std::fabs(double(ref[i])));
  }
  return {std::sqrt(num / den), maxd / maxr};
}

std::vector<float> as_float(const std::vector<bf16>& b) {
  std::vector<float> f(b.size());
  for (std::size_t i = 0; i < b.size(); ++i) f[i] = to_float(b[i]);
  return f;
}

void check_close(const char* what, const std::vector<float>& got, const std::vector<float>& ref) {
  const Diff d = diff(got, ref);
  std::printf("  %-3s rel norm error %.3g (bound 1e-2), max error / max|ref| %.3g (bound 3e-2)\n", what,
              d.rel_norm, d.max_rel);
  INFO(what);
  CHECK(d.rel_norm < 1e-2);
  CHECK(d.max_rel < 3e-2);
}

__global__ void uniform_kernel(std::uint64_t seed, std::uint64_t stream, std::size_t n, float* out) {
  const std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = cuda::rng::uniform(seed, stream, i);
}

std::uint32_t ulp_distance(float a, float b) {
  const std::int64_t ia = std::int32_t(float_bits(a)), ib = std::int32_t(float_bits(b));
  const auto ord = [](std::int64_t i) { return i < 0 ? std::int64_t(INT32_MIN) - i : i; };
  return std::uint32_t(std::llabs(ord(ia) - ord(ib)));
}

}  // namespace

TEST_CASE("cuda rng::uniform draws the CPU's numbers bit for bit", "[cuda][lora][dropout]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& ctx = cudatest::context();
  const std::size_t n = std::size_t(1) << 20;
  cuda::DeviceBuffer<float> d(n);
  for (std::uint64_t seed : {0ull, 42ull, 0xdeadbeefcafef00dull})
    for (std::uint64_t stream : {std::uint64_t(rng::kInitA), std::uint64_t(rng::kDropoutBase) + 7}) {
      uniform_kernel<<<unsigned((n + 255) / 256), 256, 0, ctx.stream()>>>(seed, stream, n, d.data());
      QLORA_CUDA_CHECK_LAUNCH("uniform_kernel");
      const auto g = d.to_host(ctx.stream());
      std::size_t bad = 0;
      for (std::size_t i = 0; i < n; ++i)
        bad += float_bits(g[i]) != float_bits(rng::uniform(seed, stream, i));
      INFO("seed " << seed << " stream " << stream);
      REQUIRE(bad == 0);
    }
}

TEST_CASE("cuda LoraLinear<NF4> forward / backward match the Cpu backend", "[cuda][lora]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& dev = cudatest::context();
  struct Case {
    int out, in, r, M;
    float dropout;
  };
  // M = 5 and 64: the GEMV base product; 100 and 300: dequantize + cuBLAS. in = 520 leaves a partial
  // 64-bit mask word per row; r = 20 a partial rank chunk in lowrank_add.
  const std::vector<Case> cases = {{384, 512, 8, 5, 0.0f},    {384, 512, 8, 5, 0.1f},
                                   {384, 512, 16, 100, 0.0f}, {384, 512, 16, 100, 0.25f},
                                   {256, 520, 20, 300, 0.1f}, {1024, 1024, 16, 64, 0.05f}};
  for (const Case& c : cases) {
    std::printf("LoraLinear<NF4, Cuda> out=%d in=%d r=%d M=%d dropout=%.2f\n", c.out, c.in, c.r, c.M,
                c.dropout);
    INFO("out " << c.out << " in " << c.in << " r " << c.r << " M " << c.M << " dropout " << c.dropout);
    const auto wf = cudatest::gaussian(std::size_t(c.out) * c.in, 3 + c.M, 0.02f);
    const auto base = BaseWeight<format::NF4>::quantize(wf.data(), c.out, c.in, 64, true);
    LoraConfig cfg;
    cfg.r = c.r;
    cfg.alpha = 2.0f * float(c.r);
    cfg.dropout = c.dropout;
    cfg.init = LoraInit::NonZero;
    cfg.seed = 1234 + std::uint64_t(c.M);

    // LoraLinear<NF4, Dynamic, Cpu>, exact fp32 activations in its 4-bit product
    auto cpu = cpuref::LoraLayer::nf4(base.q, cfg);
    GpuLayer gpu(dev, base, cfg);
    {  // same init, bit for bit
      const auto a = gpu.A().to_host(dev.stream()), b = gpu.B().to_host(dev.stream());
      const auto ca = cpu.A(), cb = cpu.B();
      REQUIRE(std::memcmp(a.data(), ca.data(), a.size() * 4) == 0);
      REQUIRE(std::memcmp(b.data(), cb.data(), b.size() * 4) == 0);
    }

    GpuLayer::Context gctx;
    for (int step = 0; step < 2; ++step) {
      const GradMode mode = step == 0 ? GradMode::Overwrite : GradMode::Accumulate;
      std::printf(" step %d (%s)\n", step, step == 0 ? "overwrite" : "accumulate");
      const auto xb = cudatest::to_bf16(cudatest::gaussian(std::size_t(c.M) * c.in, 100 + step, 1.0f));
      const auto dyb = cudatest::to_bf16(cudatest::gaussian(std::size_t(c.M) * c.out, 200 + step, 1.0f));
      const auto x = as_float(xb), dy = as_float(dyb);

      std::vector<float> y(std::size_t(c.M) * c.out), dx(std::size_t(c.M) * c.in);
      cpu.forward(x.data(), c.M, y.data());
      cpu.backward(dy.data(), dx.data(), mode);
      const auto ckeep = cpu.keep();

      auto dxb = cudatest::upload_bf16(xb), ddy = cudatest::upload_bf16(dyb);
      cuda::DeviceBuffer<__nv_bfloat16> gy(y.size()), gdx(dx.size());
      gpu.forward(dev, dxb.data(), c.M, gy.data(), gctx);
      gpu.backward(dev, gctx, ddy.data(), gdx.data(), mode);
      dev.synchronize();
      CHECK(gpu.dropout_calls() == cpu.dropout_calls());

      if (c.dropout > 0) {
        const auto keep = gctx.keep.to_host(dev.stream());
        REQUIRE(ckeep.size() == (std::size_t(c.M) * c.in + 63) / 64);
        std::size_t bad = 0, kept = 0;
        for (std::size_t w = 0; w < ckeep.size(); ++w) {
          bad += keep[w] != ckeep[w];
          kept += std::size_t(__builtin_popcountll(ckeep[w]));
        }
        std::printf("  mask: %zu words, %zu differ; kept %.4f (expected %.4f)\n", ckeep.size(), bad,
                    double(kept) / double(std::size_t(c.M) * c.in), 1.0 - c.dropout);
        CHECK(bad == 0);
      } else {
        CHECK(ckeep.empty());
      }
      check_close("y", as_float(cudatest::download_bf16(gy)), y);
      check_close("dx", as_float(cudatest::download_bf16(gdx)), dx);
      check_close("dA", gpu.dA().to_host(dev.stream()), cpu.dA());
      check_close("dB", gpu.dB().to_host(dev.stream()), cpu.dB());
    }
    // Inference forward: no dropout, nothing kept; equals the training forward without dropout.
    if (c.dropout == 0.0f) {
      const auto xb = cudatest::to_bf16(cudatest::gaussian(std::size_t(c.M) * c.in, 100, 1.0f));
      auto dxb = cudatest::upload_bf16(xb);
      cuda::DeviceBuffer<__nv_bfloat16> y1(std::size_t(c.M) * c.out), y2(y1.size());
      gpu.forward(dev, dxb.data(), c.M, y1.data());
      gpu.forward(dev, dxb.data(), c.M, y2.data(), gctx);
      dev.synchronize();
      const auto a = cudatest::download_bf16(y1), b = cudatest::download_bf16(y2);
      std::size_t bad = 0;
      for (std::size_t i = 0; i < a.size(); ++i) bad += a[i].bits != b[i].bits;
      std::printf("  inference forward vs training forward: %zu of %zu outputs differ\n", bad, a.size());
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("cuda LoraLinear: backward without dx, and the F32 / BF16 bases", "[cuda][lora]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& dev = cudatest::context();
  const int out = 256, in = 384, r = 8, M = 70;
  const auto wf = cudatest::gaussian(std::size_t(out) * in, 77, 0.02f);
  LoraConfig cfg;
  cfg.r = r;
  cfg.alpha = 16.0f;
  cfg.init = LoraInit::NonZero;
  cfg.seed = 5;
  const auto xb = cudatest::to_bf16(cudatest::gaussian(std::size_t(M) * in, 1, 1.0f));
  const auto dyb = cudatest::to_bf16(cudatest::gaussian(std::size_t(M) * out, 2, 1.0f));
  const auto x = as_float(xb), dy = as_float(dyb);

  // The reference: an fp32 base on the CPU.
  auto cpu = cpuref::LoraLayer::f32(wf, out, in, cfg);
  std::vector<float> y(std::size_t(M) * out), dx(std::size_t(M) * in);
  cpu.forward(x.data(), M, y.data());
  cpu.backward(dy.data(), dx.data(), GradMode::Overwrite);
  const std::vector<float> cdA = cpu.dA(), cdB = cpu.dB();

  auto run = [&](auto& gpu, const char* name) {
    std::printf("LoraLinear<%s, Cuda> out=%d in=%d r=%d M=%d\n", name, out, in, r, M);
    typename std::remove_reference_t<decltype(gpu)>::Context gctx;
    auto dxb = cudatest::upload_bf16(xb), ddy = cudatest::upload_bf16(dyb);
    cuda::DeviceBuffer<__nv_bfloat16> gy(y.size()), gdx(dx.size());
    gpu.forward(dev, dxb.data(), M, gy.data(), gctx);
    gpu.backward(dev, gctx, ddy.data(), nullptr, GradMode::Overwrite);  // parameter gradients only
    const auto dA1 = gpu.dA().to_host(dev.stream());
    gpu.backward(dev, gctx, ddy.data(), gdx.data(), GradMode::Overwrite);
    dev.synchronize();
    CHECK(dA1 == gpu.dA().to_host(dev.stream()));  // dx = null changes nothing else
    check_close("y", as_float(cudatest::download_bf16(gy)), y);
    check_close("dx", as_float(cudatest::download_bf16(gdx)), dx);
    check_close("dA", gpu.dA().to_host(dev.stream()), cdA);
    check_close("dB", gpu.dB().to_host(dev.stream()), cdB);
  };
  LoraLinear<format::F32, Dynamic, Cuda> g32(dev, BaseWeight<format::F32>(wf, out, in), cfg);
  run(g32, "F32");
  LoraLinear<format::BF16, 8, Cuda> g16(dev, BaseWeight<format::BF16>(cudatest::to_bf16(wf), out, in), cfg);
  run(g16, "BF16, r=8");
}

TEST_CASE("cuda AdamW kernel equals optim::AdamW step by step", "[cuda][adamw]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& dev = cudatest::context();
  // Two parameters, one spanning several norm chunks (kNormChunk = 16384) with a partial last one.
  const std::vector<std::size_t> sizes = {1000, 3 * optim::kNormChunk + 77};
  const std::vector<optim::ParamGroup> groups = {optim::ParamGroup::LoraA, optim::ParamGroup::LoraB};
  struct Setting {
    const char* name;
    double max_grad_norm, weight_decay;
    std::int64_t accum;
  };
  for (const Setting& st : {Setting{"clipped, wd 0.01, accum 2", 0.5, 0.01, 2},
                            Setting{"no clipping, wd 0, accum 1", 0.0, 0.0, 1},
                            Setting{"clip above the norm, wd 0.1, accum 3", 1e6, 0.1, 3}}) {
    INFO(st.name);
    optim::AdamWConfig cfg;
    cfg.lr = 1e-3;
    cfg.weight_decay = st.weight_decay;
    cfg.loraplus_lr_ratio = 4.0;
    cfg.max_grad_norm = st.max_grad_norm;
    cfg.grad_accum_steps = st.accum;
    cfg.schedule.kind = optim::ScheduleKind::Linear;
    cfg.schedule.warmup_steps = 2;
    cfg.schedule.total_steps = 10;

    std::vector<std::vector<float>> hp, hg(sizes.size());
    std::vector<cuda::DeviceBuffer<float>> dp, dg;
    std::vector<optim::Param> cp, gp;
    for (std::size_t k = 0; k < sizes.size(); ++k)
      hp.push_back(cudatest::gaussian(sizes[k], 10 + unsigned(k), 0.05f));
    for (std::size_t k = 0; k < sizes.size(); ++k) {
      hg[k].assign(sizes[k], 0.0f);
      dp.push_back(cuda::DeviceBuffer<float>::from_host(hp[k], dev.stream()));
      dg.emplace_back(sizes[k]);
    }
    for (std::size_t k = 0; k < sizes.size(); ++k) {
      const std::string name = "p" + std::to_string(k);
      cp.push_back({name, hp[k].data(), hg[k].data(), sizes[k], groups[k]});
      gp.push_back({name, dp[k].data(), dg[k].data(), sizes[k], groups[k]});
    }
    optim::AdamW cpu(cp, cfg);
    cuda::AdamW gpu(dev, gp, cfg);
    for (int step = 0; step < 5; ++step) {
      for (std::size_t k = 0; k < sizes.size(); ++k) {
        // into the existing storage: the CPU optimizer holds hg[k].data()
        const auto g = cudatest::gaussian(sizes[k], 1000 + unsigned(step * 10 + k), 0.01f * float(step + 1));
        std::copy(g.begin(), g.end(), hg[k].begin());
        dg[k].upload(hg[k].data(), sizes[k], dev.stream());
      }
      dev.synchronize();
      const double n_cpu = cpu.step();
      const double n_gpu = gpu.step(dev);
      dev.synchronize();
      std::uint32_t max_ulp = 0;
      for (std::size_t k = 0; k < sizes.size(); ++k) {
        const auto p = dp[k].to_host(dev.stream()), g = dg[k].to_host(dev.stream());
        const auto m = gpu.exp_avg(dev, k), v = gpu.exp_avg_sq(dev, k);
        for (std::size_t i = 0; i < sizes[k]; ++i) {
          max_ulp =
              std::max({max_ulp, ulp_distance(p[i], hp[k][i]), ulp_distance(g[i], hg[k][i]),
                        ulp_distance(m[i], cpu.exp_avg(k)[i]), ulp_distance(v[i], cpu.exp_avg_sq(k)[i])});
        }
      }
      std::printf("AdamW %s, step %d: norm cpu %.17g gpu %.17g (rel %.2g); max ulp distance %u (bound 4)\n",
                  st.name, step + 1, n_cpu, n_gpu, std::fabs(n_gpu - n_cpu) / n_cpu, max_ulp);
      CHECK(std::fabs(n_gpu - n_cpu) <= 1e-12 * n_cpu);
      CHECK(max_ulp <= 4);
      CHECK(gpu.step_count() == cpu.step_count());
    }
  }
}

TEST_CASE("cuda AdamW refuses a non-finite gradient before changing anything", "[cuda][adamw]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& dev = cudatest::context();
  std::vector<float> p(100, 1.0f), g(100, 0.5f);
  g[37] = NAN;
  auto dp = cuda::DeviceBuffer<float>::from_host(p, dev.stream());
  auto dg = cuda::DeviceBuffer<float>::from_host(g, dev.stream());
  cuda::AdamW opt(dev, {{"w", dp.data(), dg.data(), p.size(), optim::ParamGroup::LoraA}},
                  optim::AdamWConfig{});
  REQUIRE_THROWS_WITH(opt.step(dev), Catch::Contains("'w' has grad[37] = nan"));
  REQUIRE(opt.step_count() == 0);
  REQUIRE(dp.to_host(dev.stream()) == p);
}
