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
// The bias (added in lowrank_add's pass, before the y rounding) and an int8 base (dequantized to
// bf16, one 2⁻⁹ rounding, as the 4-bit cuBLAS path's) add no rounding beyond those: same bounds.
// dbias is an fp32 column sum of the same bf16 dy on both sides: bit for bit the CPU's where the GPU
// sums in the CPU's order (M ≤ 256 rows, Overwrite), else a regrouping of M fp32 additions, whose
// error for these sums of ±1 values is ~1e-7 relative: bound 1e-5 (norm and every element).
// Merge: see the merge test case.
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

namespace {

// One training step (forward, backward) of both backends on the same bf16-rounded x and dy, compared
// with check_close; dbias (when trained) as the header says: bit for bit where the GPU's order is
// the CPU's (one chunk of column_sums, Overwrite), else within 1e-5.
template <class G>
void step_and_compare(cpuref::LoraLayer& cpu, G& gpu, typename G::Context& gctx, int M, unsigned seed,
                      GradMode mode) {
  auto& dev = cudatest::context();
  const int in = int(gpu.in_features()), out = int(gpu.out_features());
  const auto xb = cudatest::to_bf16(cudatest::gaussian(std::size_t(M) * in, seed, 1.0f));
  const auto dyb = cudatest::to_bf16(cudatest::gaussian(std::size_t(M) * out, seed + 1, 1.0f));
  const auto x = as_float(xb), dy = as_float(dyb);
  std::vector<float> y(std::size_t(M) * out), dx(std::size_t(M) * in);
  cpu.forward(x.data(), M, y.data());
  cpu.backward(dy.data(), dx.data(), mode);

  auto dxb = cudatest::upload_bf16(xb), ddy = cudatest::upload_bf16(dyb);
  cuda::DeviceBuffer<__nv_bfloat16> gy(y.size()), gdx(dx.size());
  gpu.forward(dev, dxb.data(), M, gy.data(), gctx);
  gpu.backward(dev, gctx, ddy.data(), gdx.data(), mode);
  dev.synchronize();
  CHECK(gpu.dropout_calls() == cpu.dropout_calls());
  check_close("y", as_float(cudatest::download_bf16(gy)), y);
  check_close("dx", as_float(cudatest::download_bf16(gdx)), dx);
  check_close("dA", gpu.dA().to_host(dev.stream()), cpu.dA());
  check_close("dB", gpu.dB().to_host(dev.stream()), cpu.dB());
  if (gpu.bias_mode() == BiasMode::Trainable) {
    const auto g = gpu.dbias().to_host(dev.stream()), c = cpu.dbias();
    const Diff d = diff(g, c);
    std::size_t bits = 0;
    for (std::size_t i = 0; i < c.size(); ++i) bits += float_bits(g[i]) != float_bits(c[i]);
    const bool same_order = M <= cuda::detail::kColsumRows && mode == GradMode::Overwrite;
    std::printf(
        "  db  rel norm error %.3g, max error / max|ref| %.3g (bound 1e-5); %zu of %zu differ in bits%s\n",
        d.rel_norm, d.max_rel, bits, c.size(), same_order ? " (expected 0: the CPU's order)" : "");
    CHECK(d.rel_norm < 1e-5);
    CHECK(d.max_rel < 1e-5);
    if (same_order) CHECK(bits == 0);
  } else if (gpu.bias_mode() == BiasMode::Frozen) {
    const auto g = gpu.dbias().to_host(dev.stream());
    CHECK(std::all_of(g.begin(), g.end(), [](float v) { return v == 0.0f; }));  // a frozen bias gets none
  }
}

LoraConfig test_config(int r, float dropout, std::uint64_t seed) {
  LoraConfig cfg;
  cfg.r = r;
  cfg.alpha = 2.0f * float(r);
  cfg.dropout = dropout;
  cfg.init = LoraInit::NonZero;
  cfg.seed = seed;
  return cfg;
}

}  // namespace

TEST_CASE("cuda LoraLinear bias (frozen, trainable) matches the Cpu backend", "[cuda][lora][bias]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& dev = cudatest::context();
  struct Case {
    int out, in, r, M;
    float dropout;
    BiasMode mode;
  };
  // M = 5, 64: GEMV base product, one column_sums chunk; 300 and 700: two and three chunks (dbias by
  // partial sums), dequantize + cuBLAS.
  const std::vector<Case> cases = {{384, 512, 8, 5, 0.1f, BiasMode::Trainable},
                                   {384, 512, 16, 100, 0.0f, BiasMode::Frozen},
                                   {256, 520, 20, 300, 0.0f, BiasMode::Trainable},
                                   {1024, 1024, 16, 64, 0.05f, BiasMode::Trainable},
                                   {320, 256, 8, 700, 0.1f, BiasMode::Trainable}};
  for (const Case& c : cases) {
    const char* mode_name = c.mode == BiasMode::Trainable ? "trainable" : "frozen";
    std::printf("LoraLinear<NF4, Cuda> %s bias, out=%d in=%d r=%d M=%d dropout=%.2f\n", mode_name, c.out,
                c.in, c.r, c.M, c.dropout);
    INFO("out " << c.out << " in " << c.in << " r " << c.r << " M " << c.M << " bias " << mode_name);
    const auto wf = cudatest::gaussian(std::size_t(c.out) * c.in, 3 + c.M, 0.02f);
    const auto base = BaseWeight<format::NF4>::quantize(wf.data(), c.out, c.in, 64, true);
    const auto bias = cudatest::gaussian(std::size_t(c.out), 77 + c.M, 0.5f);
    const LoraConfig cfg = test_config(c.r, c.dropout, 99 + std::uint64_t(c.M));
    auto cpu = cpuref::LoraLayer::nf4(base.q, cfg, bias, c.mode);
    GpuLayer gpu(dev, base, cfg, bias, c.mode);
    REQUIRE(gpu.bias_mode() == c.mode);
    REQUIRE(gpu.bias().to_host(dev.stream()) == bias);

    // params(): the Cpu backend's names and groups; the bias only when trained
    const auto p = gpu.params("m.q_proj");
    REQUIRE(p.size() == (c.mode == BiasMode::Trainable ? 3u : 2u));
    if (c.mode == BiasMode::Trainable) {
      CHECK(p[2].name == "m.q_proj.bias");
      CHECK(p[2].group == optim::ParamGroup::Bias);
      CHECK(p[2].size == std::size_t(c.out));
      CHECK(p[2].value == gpu.bias().data());
      CHECK(p[2].grad == gpu.dbias().data());
    }

    GpuLayer::Context gctx;
    for (int step = 0; step < 2; ++step) {
      const GradMode mode = step == 0 ? GradMode::Overwrite : GradMode::Accumulate;
      std::printf(" step %d (%s)\n", step, step == 0 ? "overwrite" : "accumulate");
      step_and_compare(cpu, gpu, gctx, c.M, 100 + unsigned(step) * 2, mode);
    }
    // zero_grad clears dbias too
    gpu.zero_grad(dev);
    if (c.mode == BiasMode::Trainable) {
      const auto g = gpu.dbias().to_host(dev.stream());
      CHECK(std::all_of(g.begin(), g.end(), [](float v) { return v == 0.0f; }));
    }
  }
}

TEST_CASE("cuda LoraLinear<Int8> forward / backward match the Cpu backend", "[cuda][lora][int8]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& dev = cudatest::context();
  struct Case {
    int out, in, r, M;
    float dropout;
  };
  // Every M goes through dequantize_rowwise_int8 + cuBLAS; in = 520 is not a multiple of 16 (the
  // CPU's AVX2 row loop has a tail), 1000 not of 8 (the GPU dequantizer's scalar path).
  const std::vector<Case> cases = {{384, 512, 8, 5, 0.0f},
                                   {384, 520, 16, 100, 0.1f},
                                   {256, 1000, 20, 300, 0.05f},
                                   {1024, 1024, 16, 64, 0.0f}};
  for (const Case& c : cases) {
    std::printf("LoraLinear<Int8, Cuda> out=%d in=%d r=%d M=%d dropout=%.2f\n", c.out, c.in, c.r, c.M,
                c.dropout);
    INFO("out " << c.out << " in " << c.in << " r " << c.r << " M " << c.M << " dropout " << c.dropout);
    const auto wf = cudatest::gaussian(std::size_t(c.out) * c.in, 5 + c.M, 0.02f);
    const auto base = BaseWeight<format::Int8>::quantize(wf.data(), c.out, c.in);
    const auto bias = cudatest::gaussian(std::size_t(c.out), 8 + c.M, 0.5f);
    const LoraConfig cfg = test_config(c.r, c.dropout, 7 + std::uint64_t(c.M));
    auto cpu = cpuref::LoraLayer::int8(base.q, cfg, bias, BiasMode::Trainable);
    LoraLinear<format::Int8, Dynamic, Cuda> gpu(dev, base, cfg, bias, BiasMode::Trainable);
    {  // the device base holds the CPU's bytes
      const auto back = gpu.base(dev);
      REQUIRE(back.q.q == base.q.q);
      REQUIRE(back.q.scb == base.q.scb);
    }
    LoraLinear<format::Int8, Dynamic, Cuda>::Context gctx;
    for (int step = 0; step < 2; ++step) {
      const GradMode mode = step == 0 ? GradMode::Overwrite : GradMode::Accumulate;
      std::printf(" step %d (%s)\n", step, step == 0 ? "overwrite" : "accumulate");
      step_and_compare(cpu, gpu, gctx, c.M, 200 + unsigned(step) * 2, mode);
    }
  }
  // A compile-time rank, and backward without dx
  const auto wf = cudatest::gaussian(std::size_t(128) * 256, 1, 0.02f);
  LoraLinear<format::Int8, 8, Cuda> g8(dev, BaseWeight<format::Int8>::quantize(wf.data(), 128, 256),
                                       test_config(8, 0.0f, 3));
  auto cpu8 = cpuref::LoraLayer::int8(BaseWeight<format::Int8>::quantize(wf.data(), 128, 256).q,
                                      test_config(8, 0.0f, 3));
  decltype(g8)::Context c8;
  std::printf("LoraLinear<Int8, 8, Cuda> out=128 in=256 M=33\n");
  step_and_compare(cpu8, g8, c8, 33, 300, GradMode::Overwrite);
}

namespace {

// How far a requantized GPU base is from the CPU's: the number of stored codes (4-bit, int8, bf16;
// for F32 the values) that differ, the number of 8-bit scale codes (double quant) that differ, the
// largest relative difference of a float scale (absmax, SCB, absmax2, offset), and the dequantized
// weights' difference.
struct BaseDiff {
  std::size_t codes = 0, n = 0, scale_codes = 0, nscale_codes = 0, scale_bits = 0, nscales = 0;
  double scale_rel = 0;
  Diff values;
};

// max |a - b| / |b| over float scales, and how many differ in bits
void scale_diff(const std::vector<float>& a, const std::vector<float>& b, BaseDiff& r) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    r.scale_bits += float_bits(a[i]) != float_bits(b[i]);
    if (b[i] != 0)
      r.scale_rel = std::max(r.scale_rel, std::fabs(double(a[i]) - double(b[i])) / std::fabs(double(b[i])));
    else if (a[i] != 0)
      r.scale_rel = INFINITY;
  }
  r.nscales += a.size();
}

std::size_t count_differ(const std::vector<std::uint8_t>& a, const std::vector<std::uint8_t>& b,
                         bool nibbles) {
  REQUIRE(a.size() == b.size());
  std::size_t d = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    d += nibbles ? std::size_t((a[i] & 0xf) != (b[i] & 0xf)) + std::size_t((a[i] >> 4) != (b[i] >> 4))
                 : std::size_t(a[i] != b[i]);
  return d;
}
std::size_t count_differ(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  std::size_t d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d += float_bits(a[i]) != float_bits(b[i]);
  return d;
}

template <class G>
BaseDiff base_diff(const G& gpu, const cpuref::LoraLayer& cpu) {
  auto& dev = cudatest::context();
  using Q = typename G::Base;
  const Q g = gpu.base(dev);
  std::vector<float> gw(std::size_t(g.out * g.in));
  g.dequantize(gw.data());
  BaseDiff r;
  r.values = diff(gw, cpu.base_dequantized());
  r.n = gw.size();
  if constexpr (std::is_same<Q, BaseWeight<format::NF4>>::value ||
                std::is_same<Q, BaseWeight<format::FP4>>::value) {
    const quant::Quantized4bit c = cpu.base_4bit();
    REQUIRE(g.q.dtype == c.dtype);
    REQUIRE(g.q.double_quant == c.double_quant);
    r.codes = count_differ(g.q.packed, c.packed, true);
    if (c.double_quant) {
      r.scale_codes = count_differ(g.q.nested.codes, c.nested.codes, false);
      r.nscale_codes = c.nested.codes.size();
      scale_diff(g.q.nested.absmax, c.nested.absmax, r);
      scale_diff({g.q.offset}, {c.offset}, r);
    } else {
      scale_diff(g.q.absmax, c.absmax, r);
    }
  } else if constexpr (std::is_same<Q, BaseWeight<format::Int8>>::value) {
    const quant::RowwiseInt8 c = cpu.base_int8();
    std::vector<std::uint8_t> gq(g.q.q.size()), cq(c.q.size());
    std::memcpy(gq.data(), g.q.q.data(), gq.size());
    std::memcpy(cq.data(), c.q.data(), cq.size());
    r.codes = count_differ(gq, cq, false);
    scale_diff(g.q.scb, c.scb, r);
  } else if constexpr (std::is_same<Q, BaseWeight<format::BF16>>::value) {
    const auto c = cpu.base_bf16();
    for (std::size_t i = 0; i < c.size(); ++i) r.codes += g.w[i].bits != c[i].bits;
  } else {
    r.codes = count_differ(g.w, cpu.base_dequantized());
  }
  return r;
}

// Merge / unmerge of one base format against the Cpu backend; see the test case's comment.
template <class Quant, class MakeCpu>
void merge_case(const char* name, const BaseWeight<Quant>& base, MakeCpu make_cpu, bool exact_format) {
  auto& dev = cudatest::context();
  const int out = int(base.out), in = int(base.in), M = 40;
  std::printf("LoraLinear<%s, Cuda> merge / unmerge, out=%d in=%d\n", name, out, in);
  INFO(name);
  const auto bias = cudatest::gaussian(std::size_t(out), 31, 0.5f);
  const LoraConfig cfg = test_config(8, 0.0f, 21);
  cpuref::LoraLayer cpu = make_cpu(cfg, bias);
  LoraLinear<Quant, Dynamic, Cuda> gpu(dev, base, cfg, bias, BiasMode::Frozen);

  // merged_weight: W0 (the same fp32 values) + s·B·A, whose r-term sums are cuBLAS's, not Eigen's
  const auto gw = gpu.merged_weight(dev), cw = cpu.merged_weight();
  const Diff dw = diff(gw, cw);
  std::printf("  merged_weight: rel norm error %.3g, max error / max|ref| %.3g (bound 1e-6)\n", dw.rel_norm,
              dw.max_rel);
  CHECK(dw.rel_norm < 1e-6);
  CHECK(dw.max_rel < 1e-6);

  const auto xb = cudatest::to_bf16(cudatest::gaussian(std::size_t(M) * in, 41, 1.0f));
  const auto x = as_float(xb);
  auto dxb = cudatest::upload_bf16(xb);
  auto compare_forward = [&](const char* what) {
    std::vector<float> y(std::size_t(M) * out);
    cpu.infer(x.data(), M, y.data());
    cuda::DeviceBuffer<__nv_bfloat16> gy(y.size());
    gpu.forward(dev, dxb.data(), M, gy.data());
    dev.synchronize();
    check_close(what, as_float(cudatest::download_bf16(gy)), y);
  };
  auto compare_base = [&](const char* what, const MergeReport& g, const MergeReport& c) {
    const BaseDiff b = base_diff(gpu, cpu);
    const double rel = c.requantization_rmse > 0
                           ? std::fabs(g.requantization_rmse - c.requantization_rmse) / c.requantization_rmse
                           : std::fabs(g.requantization_rmse);
    std::printf(
        "  %s: rmse gpu %.9g cpu %.9g (rel %.2g); codes differing %zu of %zu, scale codes %zu of %zu; "
        "float scales differing %zu of %zu, by at most %.2g relative; dequantized rel norm error %.3g\n",
        what, g.requantization_rmse, c.requantization_rmse, rel, b.codes, b.n, b.scale_codes, b.nscale_codes,
        b.scale_bits, b.nscales, b.scale_rel, b.values.rel_norm);
    if (exact_format) {  // F32: stored as merged, error 0 on both
      CHECK(g.requantization_rmse == 0.0);
      CHECK(c.requantization_rmse == 0.0);
      CHECK(b.values.max_rel < 1e-6);
    } else {
      CHECK(rel < 1e-3);
      // Codes that moved: a merged value within the two sides' ~1e-7 relative difference (summation
      // order) of a rounding boundary may land on the neighbouring code. bf16's grid (2⁻⁸ relative)
      // is far finer than the 4-bit and int8 ones, so more values sit that close: measured on an
      // H200 6 (merge) and 15 (unmerge, which also starts from the 6) of 98304; bound n / 2000.
      // The 4-bit and int8 bases moved none.
      CHECK(b.codes <= 2 + b.n / (std::is_same_v<Quant, format::BF16> ? 2000 : 10000));
      CHECK(b.scale_codes <= 2 + b.nscale_codes / 1000);
      CHECK(b.scale_rel < 1e-6);
      // A sanity bound only: one moved 4-bit code near ±1 changes the weight by ~2e-3 of its norm, so
      // the codes' count above is the real check; a merge without s·B·A would be off by ~0.8.
      CHECK(b.values.rel_norm < 1e-2);
    }
  };

  const MergeReport gm = gpu.merge(dev), cm = cpu.merge();
  REQUIRE(gpu.merged());
  compare_base("merge", gm, cm);
  compare_forward("y merged");
  // the LoRA path is off until unmerge()
  {
    typename LoraLinear<Quant, Dynamic, Cuda>::Context ctx;
    cuda::DeviceBuffer<__nv_bfloat16> gy(std::size_t(M) * out), gdy(std::size_t(M) * out);
    REQUIRE_THROWS_WITH(gpu.forward(dev, dxb.data(), M, gy.data(), ctx),
                        Catch::Contains("training forward on a merged layer: unmerge first"));
    REQUIRE_THROWS_WITH(gpu.backward(dev, ctx, gdy.data(), nullptr, GradMode::Overwrite),
                        Catch::Contains("backward on a merged layer: unmerge first"));
    REQUIRE_THROWS_WITH(gpu.merge(dev), Catch::Contains("merge: already merged"));
    // merged_weight of a merged layer is its base
    const Diff d = diff(gpu.merged_weight(dev), cpu.merged_weight());
    CHECK(d.rel_norm < 1e-2);
  }
  const MergeReport gu = gpu.unmerge(dev), cu = cpu.unmerge();
  REQUIRE(!gpu.merged());
  compare_base("unmerge", gu, cu);
  REQUIRE_THROWS_WITH(gpu.unmerge(dev), Catch::Contains("unmerge: not merged"));
  compare_forward("y unmerged");
}

}  // namespace

// Merge against the Cpu backend's merge, every base format. Both dequantize W0 to the same fp32
// values (the GPU dequantizers equal the CPU's bit for bit) and start from the same A and B; s·B·A
// is an fp32 product on both, but its r = 8 terms are summed in cuBLAS's order and not Eigen's, so
// the merged fp32 weights differ by a few ulps of the largest term: bound 1e-6 relative (the
// expected size is ~1e-8). The requantizers then give the CPU's bytes for the same input, so the
// requantized bases differ only where a merged value lies within those ulps of a rounding boundary
// (a 4-bit threshold, an int8 or bf16 rounding midpoint): a few codes at most, expected none or
// one (the bounds: 2 + 1e-4 of the codes, 2 + 1e-3 of the 8-bit scale codes). The float scales are
// maxima (absmax, SCB) or a mean (the double quant offset) of those merged values, so they may
// differ by the same ulps wherever the maximal element does: bound 1e-6 relative. The reports' RMS
// errors: within 1e-3 relative (a code moved at a boundary changes its element's error little). An F32 base
// stores the merged values as they are: error 0 on both, the weights within 1e-6. The merged forward (base +
// bias, no LoRA path) is compared with the layer bounds above.
TEST_CASE("cuda LoraLinear merge / unmerge match the Cpu backend", "[cuda][lora][merge]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  const int out = 256, in = 384;
  const auto wf = cudatest::gaussian(std::size_t(out) * in, 55, 0.02f);
  {
    const BaseWeight<format::NF4> base = BaseWeight<format::NF4>::quantize(wf.data(), out, in, 64, true);
    merge_case(
        "NF4 (double quant)", base,
        [&](const LoraConfig& cfg, const std::vector<float>& b) {
          return cpuref::LoraLayer::nf4(base.q, cfg, b);
        },
        false);
  }
  {
    const BaseWeight<format::FP4> base = BaseWeight<format::FP4>::quantize(wf.data(), out, in, 128, false);
    merge_case(
        "FP4 (blocksize 128)", base,
        [&](const LoraConfig& cfg, const std::vector<float>& b) {
          return cpuref::LoraLayer::nf4(base.q, cfg, b);
        },
        false);
  }
  {
    const auto base = BaseWeight<format::Int8>::quantize(wf.data(), out, in);
    merge_case(
        "Int8", base,
        [&](const LoraConfig& cfg, const std::vector<float>& b) {
          return cpuref::LoraLayer::int8(base.q, cfg, b);
        },
        false);
  }
  {
    const BaseWeight<format::BF16> base(cudatest::to_bf16(wf), out, in);
    merge_case(
        "BF16", base,
        [&](const LoraConfig& cfg, const std::vector<float>& b) {
          return cpuref::LoraLayer::bf16(base.w, out, in, cfg, b);
        },
        false);
  }
  {
    const BaseWeight<format::F32> base(wf, out, in);
    merge_case(
        "F32", base,
        [&](const LoraConfig& cfg, const std::vector<float>& b) {
          return cpuref::LoraLayer::f32(wf, out, in, cfg, b);
        },
        true);
  }
}

TEST_CASE("cuda LoraLinear refuses a bad bias with the expected and actual sizes", "[cuda][lora][bias]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  auto& dev = cudatest::context();
  const auto wf = cudatest::gaussian(6 * 8, 1, 0.02f);
  const BaseWeight<format::F32> base(wf, 6, 8);
  LoraConfig cfg;
  cfg.r = 2;
  using L = LoraLinear<format::F32, Dynamic, Cuda>;
  REQUIRE_THROWS_WITH(L(dev, base, cfg, std::vector<float>(5, 0.5f)),
                      Catch::Contains("bias has 5 values, expected 6 (out features)"));
  REQUIRE_THROWS_WITH(L(dev, base, cfg, {}, BiasMode::Trainable),
                      Catch::Contains("a trainable bias was asked for, but no bias values were given"));
  L none(dev, base, cfg);
  CHECK(none.bias_mode() == BiasMode::None);
  CHECK(none.params("m").size() == 2);
  REQUIRE_THROWS_WITH(none.set_bias(dev, std::vector<float>(6, 1.0f)), Catch::Contains("without a bias"));
  L with(dev, base, cfg, std::vector<float>(6, 0.5f), BiasMode::Trainable);
  REQUIRE_THROWS_WITH(with.set_bias(dev, std::vector<float>(3, 1.0f)),
                      Catch::Contains("bias has 3 values, expected 6"));
  const std::vector<float> nb = {1, 2, 3, 4, 5, 6};
  with.set_bias(dev, nb);
  CHECK(with.bias().to_host(dev.stream()) == nb);
  REQUIRE_THROWS_WITH(
      (LoraLinear<format::Int8, 4, Cuda>(dev, BaseWeight<format::Int8>::quantize(wf.data(), 6, 8), cfg)),
      Catch::Contains("config rank r = 2, expected 4"));
}
