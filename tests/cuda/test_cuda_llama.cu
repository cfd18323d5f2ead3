// [cuda] cuda::LlamaModel against the CPU LlamaModel (cpu_llama_reference.cpp) on models/fortunes-base
// (hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 352, vocab 256, bf16), LoRA r = 8 on all-linear
// (and on q_proj, v_proj only: the frozen device bases), NF4 and BF16 bases, dropout 0 and 0.05.
// Both models start from the same weights and the same A, B (LoraInit::NonZero, so dA is not 0 at
// step 0) and draw the same dropout masks. Also: a checkpoint (A, B, dropout counters, cuda::AdamW's
// state) resumed on a fresh GPU model continues bit for bit (resume_bit_identical), and set_lora.
//
// Tolerances. The CPU computes in fp32 from the same base weights; the GPU rounds to bf16 (each
// rounding at most 2⁻⁹ ≈ 2e-3 relative) every product input and output: the norm outputs, q, k, v,
// the attention output, the MLP activations, the gradients entering each product, dlogits, and the
// NF4 weights dequantized to bf16 (lm_head too). About ten such roundings stand between the
// embedding and the loss, and they are independent, so the logits move by ~1e-2 relative in the
// worst element and much less on average; the loss, a mean over 2·(T - 1) positions of a smooth
// function of them, moved by ~1e-3 in trials of this kind. The bound: |loss_gpu − loss_cpu| ≤ 1e-2 ·
// loss_cpu. Measured on an H200 (2026-12-02): losses within 1.3e-3 relative, and the AdamW steps'
// losses within 8.3e-3.
//
// Gradients: the NonZero bounds below are MEASURED, not derived. Per-tensor relative Frobenius
// errors ||g_gpu − g_cpu|| / ||g_cpu|| are 2–19% (all LoRA gradients together: 2.3–15%), largest with
// NF4 and dropout; the error is orthogonal to the gradient, not a bias in scale (the projection
// <g_gpu, g_cpu> / <g_cpu, g_cpu> of all gradients is 0.987–1.012; gradient norms within 1.4%).
// Where it comes from: the perturbation, not a missing fp32 intermediate. NonZero (scaling 2, B up
// to ±0.35 against base weights of ~0.02) makes the model a different, untrained one: loss ~4.6,
// gradient norm ~18 against ~1.1 at the trained base. The same comparison at the trained base (B =
// 0, the test case "at the unperturbed base model") gives 0.9–3.7% per tensor and 1.6–1.7% all together, what
// ~20 independent bf16 roundings between the loss and a layer give once the sums over tokens cancel; the
// q_proj, v_proj-only case (a milder perturbation) is in between (2.3%). A wrong formula — a missing term, a
// head mapped to the wrong KV group, a transposed operand — gives errors of order 1, which the
// bounds still catch: ≤ 0.25 per tensor and ≤ 0.2 for all together. AdamW: 3 steps at lr 1e-3 on
// each side (clipping at 1); Adam's update is nearly sign(g)·lr wherever |g| is small, so
// parameters may differ by up to ~lr per step (measured 1.2e-2 relative after 3 steps; bound 3e-2)
// and the losses stay within the 1e-2 relative bound.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_llama_reference.hpp"
#include "cuda_test_util.cuh"
#include "qlora/cuda/adamw.cuh"
#include "qlora/cuda/model/llama.cuh"
#include "qlora/optim/adamw_config.hpp"

using namespace qlora;

namespace {

std::string model_dir() {
#ifdef QLORA_SOURCE_DIR
  return std::string(QLORA_SOURCE_DIR) + "/models/fortunes-base";
#else
  return "models/fortunes-base";  // bench/cuda/device_run.sh runs from the repository root
#endif
}

// Byte tokens (token id = byte value, the model's vocabulary) of fortune-like text, B rows of T,
// starting `shift` bytes further into the text (another batch per training step).
void byte_batch(std::int64_t B, std::int64_t T, std::vector<std::int64_t>& ids,
                std::vector<std::int64_t>& labels, std::int64_t shift = 0) {
  static const char* const text =
      "Q: What is the difference between a duck?\nA: One leg is both the same.\n%\n"
      "A journey of a thousand miles begins with a cash advance.\n%\n"
      "He who laughs last thinks slowest.\n\t\t-- Anonymous\n%\n"
      "Space: the final frontier. These are the voyages of the starship Enterprise.\n%\n"
      "Never put off till tomorrow what you can do the day after tomorrow.\n\t\t-- Mark Twain\n%\n";
  const std::string s(text);
  ids.resize(std::size_t(B * T));
  for (std::int64_t i = 0; i < B * T; ++i)
    ids[std::size_t(i)] = (unsigned char)s[std::size_t(i * 7 / 5 + shift) % s.size()];
  labels = ids;
  labels[1] = -100;  // an ignored target: the count and the masked rows
}

double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  REQUIRE(got.size() == ref.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double d = std::isfinite(got[i]) ? double(got[i]) - double(ref[i]) : INFINITY;
    num += d * d;
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

// <got, ref> / <ref, ref>: 1 when got's error is orthogonal to ref (noise), ≠ 1 for a bias in scale.
double projection(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    num += double(got[i]) * ref[i];
    den += double(ref[i]) * ref[i];
  }
  return num / den;
}

double sq_norm(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += double(x) * x;
  return s;
}

// Returns the relative error of all LoRA gradients together at step 0 (for the callers' bounds).
template <class Quant>
double compare(const std::vector<std::string>& targets, float dropout, LoraInit init = LoraInit::NonZero,
               double tensor_bound = 0.25, double all_bound = 0.2, double b_after_bound = 3e-2) {
  LoraConfig lc;
  lc.r = 8;
  lc.alpha = 16.0f;
  lc.dropout = dropout;
  lc.init = init;
  lc.seed = 11;
  cpuref::LlamaReference<Quant> cpu(model_dir(), targets, lc);
  const cuda::Context& ctx = cudatest::context();
  cuda::LlamaModel<Quant> gpu(ctx, cpu.weights());

  const std::int64_t B = 2, T = 64;
  std::vector<std::int64_t> ids, labels;
  byte_batch(B, T, ids, labels);
  std::printf("%s, targets %s%s, dropout %.2f, init %s\n", Quant::name, targets[0].c_str(),
              targets.size() > 1 ? ",..." : "", double(dropout),
              init == LoraInit::NonZero ? "NonZero" : "Default");

  // held-out style loss (no dropout, nothing kept)
  const float le_cpu = cpu.loss(ids.data(), labels.data(), B, T);
  const float le_gpu = gpu.loss(ids.data(), labels.data(), B, T);
  std::printf("  eval loss     cpu %.6f  gpu %.6f  rel %.2e\n", le_cpu, le_gpu,
              std::fabs(double(le_gpu) - le_cpu) / le_cpu);
  CHECK(std::fabs(double(le_gpu) - le_cpu) <= 1e-2 * le_cpu);

  // one training step: loss and every LoRA gradient
  const float l_cpu = cpu.forward_backward(ids.data(), labels.data(), B, T);
  const float l_gpu = gpu.forward_backward(ids.data(), labels.data(), B, T);
  std::printf("  train loss    cpu %.6f  gpu %.6f  rel %.2e\n", l_cpu, l_gpu,
              std::fabs(double(l_gpu) - l_cpu) / l_cpu);
  CHECK(std::fabs(double(l_gpu) - l_cpu) <= 1e-2 * l_cpu);
  const std::vector<LoraTensors> g_cpu = cpu.grads(), g_gpu = gpu.download_lora_grads();
  REQUIRE(g_cpu.size() == g_gpu.size());
  REQUIRE(!g_cpu.empty());
  std::vector<float> all_cpu, all_gpu;
  double worst = 0;
  std::string worst_name;
  for (std::size_t k = 0; k < g_cpu.size(); ++k) {
    REQUIRE(g_cpu[k].module == g_gpu[k].module);
    CHECK(g_cpu[k].dropout_calls == g_gpu[k].dropout_calls);
    for (int ab = 0; ab < 2; ++ab) {
      const std::vector<float>& c = ab ? g_cpu[k].B : g_cpu[k].A;
      const std::vector<float>& g = ab ? g_gpu[k].B : g_gpu[k].A;
      if (sq_norm(c) == 0.0) {  // dA with B = 0: exactly zero on both sides
        INFO(g_cpu[k].module << (ab ? ".lora_B" : ".lora_A") << " gradient is 0 on the CPU");
        CHECK(sq_norm(g) == 0.0);
        continue;
      }
      const double e = rel_err(g, c);
      INFO(g_cpu[k].module << (ab ? ".lora_B" : ".lora_A") << " gradient: relative error " << e);
      std::printf("    %s.lora_%c  rel %.3e  proj %.4f\n", g_cpu[k].module.c_str(), ab ? 'B' : 'A', e,
                  projection(g, c));
      CHECK(e <= tensor_bound);
      if (e > worst) {
        worst = e;
        worst_name = g_cpu[k].module + (ab ? ".lora_B" : ".lora_A");
      }
      all_cpu.insert(all_cpu.end(), c.begin(), c.end());
      all_gpu.insert(all_gpu.end(), g.begin(), g.end());
    }
  }
  const double e_all = rel_err(all_gpu, all_cpu);
  std::printf("  gradients     all %.2e  worst %.2e (%s); projection of gpu on cpu %.4f\n", e_all, worst,
              worst_name.c_str(), projection(all_gpu, all_cpu));
  CHECK(e_all <= all_bound);

  // a few AdamW steps on both (the gradients of the step above first)
  optim::AdamWConfig oc;
  oc.lr = 1e-3;
  cuda::AdamW opt(ctx, gpu.params(), oc);
  for (int step = 0; step < 3; ++step) {
    if (step > 0) {
      const float a = cpu.forward_backward(ids.data(), labels.data(), B, T);
      const float b = gpu.forward_backward(ids.data(), labels.data(), B, T);
      std::printf("  step %d loss   cpu %.6f  gpu %.6f  rel %.2e\n", step, a, b,
                  std::fabs(double(b) - a) / a);
      CHECK(std::fabs(double(b) - a) <= 1e-2 * a);
    }
    const double n_cpu = cpu.adamw_step(oc), n_gpu = opt.step(ctx);
    std::printf("  step %d grad norm cpu %.6f  gpu %.6f\n", step, n_cpu, n_gpu);
    // step 0: the same parameters (measured within 1.4%); later steps start from parameters that
    // Adam has moved apart by up to ~lr each (measured within 9%)
    CHECK(std::fabs(n_gpu - n_cpu) <= (step == 0 ? 3e-2 : 0.15) * n_cpu);
  }
  const float a = cpu.loss(ids.data(), labels.data(), B, T), b = gpu.loss(ids.data(), labels.data(), B, T);
  std::printf("  after 3 steps cpu %.6f  gpu %.6f  (before %.6f)\n", a, b, le_cpu);
  CHECK(std::fabs(double(b) - a) <= 2e-2 * a);  // measured within 1.4%
  CHECK(a < le_cpu);                            // training on the batch lowered its loss
  CHECK(b < le_gpu);
  // the trained A, B come back to the CPU model's layout
  const std::vector<LoraTensors> w_cpu = cpu.lora(), w_gpu = gpu.download_lora();
  REQUIRE(w_cpu.size() == w_gpu.size());
  for (std::size_t k = 0; k < w_cpu.size(); ++k) {
    CHECK(w_cpu[k].dropout_calls == w_gpu[k].dropout_calls);
    CHECK(rel_err(w_gpu[k].A, w_cpu[k].A) <= 3e-2);
    CHECK(rel_err(w_gpu[k].B, w_cpu[k].B) <= b_after_bound);
  }
  return e_all;
}

// A checkpoint and a resume on the GPU, as `qlora finetune --device cuda` makes them: after step k
// the A, B (download_lora), the dropout counters (dropout_calls) and cuda::AdamW's state file are
// saved while the run goes on to step n; a fresh model built from the untrained weights and a fresh
// optimizer get them back (set_lora, set_dropout_calls, load_state) and take steps k+1..n. Every
// loss and the final A, B, counters and moments must equal the uninterrupted run's bit for bit (the
// GPU path is deterministic: no atomics, fixed reduction orders, and cuBLAS is bitwise reproducible
// run to run on one GPU). Dropout 0.1, so the masks, which the counters decide, matter: restored
// without the counters, step k+1 has another loss.
template <class Quant>
void resume_bit_identical() {
  LoraConfig lc;
  lc.r = 8;
  lc.alpha = 16.0f;
  lc.dropout = 0.1f;
  lc.init = LoraInit::NonZero;
  lc.seed = 5;
  cpuref::LlamaReference<Quant> cpu(model_dir(), {"all-linear"}, lc);
  const cuda::Context& ctx = cudatest::context();
  optim::AdamWConfig oc;
  oc.lr = 1e-3;
  oc.weight_decay = 0.01;
  oc.grad_accum_steps = 2;
  oc.schedule.kind = optim::ScheduleKind::Cosine;
  oc.schedule.warmup_steps = 1;
  oc.schedule.total_steps = 6;
  const int k = 3, n = 6;
  const std::int64_t B = 2, T = 32;
  testutil::TempDir dir;
  const std::string state = dir / "optimizer.safetensors";

  // One optimizer step of two micro-batches, each a pure function of (step, micro), as TrainLoop's.
  auto train_step = [&](cuda::LlamaModel<Quant>& m, cuda::AdamW& opt, int step) {
    opt.zero_grad(ctx);
    float loss = 0;
    for (int micro = 0; micro < 2; ++micro) {
      std::vector<std::int64_t> ids, labels;
      byte_batch(B, T, ids, labels, 37 * (2 * step + micro));
      loss += m.forward_backward(ids.data(), labels.data(), B, T, GradMode::Accumulate);
    }
    opt.step(ctx);
    return loss;
  };

  cuda::LlamaModel<Quant> full(ctx, cpu.weights());
  cuda::AdamW opt(ctx, full.params(), oc);
  std::vector<float> losses;
  std::vector<LoraTensors> lora_k;
  std::vector<std::uint64_t> calls_k;
  for (int step = 1; step <= n; ++step) {
    losses.push_back(train_step(full, opt, step));
    if (step == k) {
      opt.save_state(ctx, state);
      lora_k = full.download_lora();
      calls_k = full.dropout_calls();
    }
  }
  REQUIRE(!calls_k.empty());
  CHECK(calls_k[0] == std::uint64_t(2 * k));  // one training forward per micro-batch

  // The checkpoint's adapter has no counters (trainer_state.json has them): restore them apart.
  std::vector<LoraTensors> adapter = lora_k;
  for (LoraTensors& t : adapter) t.dropout_calls = 0;
  cuda::LlamaModel<Quant> resumed(ctx, cpu.weights());
  resumed.set_lora(adapter);
  resumed.set_dropout_calls(calls_k);
  CHECK(resumed.dropout_calls() == calls_k);
  cuda::AdamW opt2(ctx, resumed.params(), oc);
  opt2.load_state(ctx, state);
  REQUIRE(opt2.step_count() == k);
  for (int step = k + 1; step <= n; ++step) {
    const float l = train_step(resumed, opt2, step);
    std::printf("  %s resume: step %d loss %.9g (uninterrupted %.9g)\n", Quant::name, step, double(l),
                double(losses[std::size_t(step - 1)]));
    CHECK(std::memcmp(&l, &losses[std::size_t(step - 1)], sizeof l) == 0);
  }
  const std::vector<LoraTensors> a = full.download_lora(), b = resumed.download_lora();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    INFO(a[i].module);
    CHECK(a[i].module == b[i].module);
    CHECK(a[i].dropout_calls == b[i].dropout_calls);
    CHECK(a[i].A.size() == b[i].A.size());
    CHECK(std::memcmp(a[i].A.data(), b[i].A.data(), a[i].A.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(a[i].B.data(), b[i].B.data(), a[i].B.size() * sizeof(float)) == 0);
  }
  for (std::size_t p = 0; p < opt.params().size(); ++p) {
    const std::vector<float> m1 = opt.exp_avg(ctx, p), m2 = opt2.exp_avg(ctx, p);
    const std::vector<float> v1 = opt.exp_avg_sq(ctx, p), v2 = opt2.exp_avg_sq(ctx, p);
    CHECK(std::memcmp(m1.data(), m2.data(), m1.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(v1.data(), v2.data(), v1.size() * sizeof(float)) == 0);
  }

  // Without the counters the masks of step k+1 are step 1's: another loss.
  cuda::LlamaModel<Quant> stale(ctx, cpu.weights());
  stale.set_lora(adapter);
  cuda::AdamW opt3(ctx, stale.params(), oc);
  opt3.load_state(ctx, state);
  const float l_stale = train_step(stale, opt3, k + 1);
  CHECK(l_stale != losses[std::size_t(k)]);
}

}  // namespace

TEST_CASE("cuda LlamaModel matches the CPU model (NF4, all-linear)", "[cuda]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  SECTION("dropout 0") { compare<format::NF4>({"all-linear"}, 0.0f); }
  SECTION("dropout 0.05") { compare<format::NF4>({"all-linear"}, 0.05f); }
}

TEST_CASE("cuda LlamaModel matches the CPU model (BF16, all-linear)", "[cuda]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  SECTION("dropout 0") { compare<format::BF16>({"all-linear"}, 0.0f); }
  SECTION("dropout 0.05") { compare<format::BF16>({"all-linear"}, 0.05f); }
}

TEST_CASE("cuda LlamaModel with frozen projections (NF4, q_proj and v_proj)", "[cuda]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  compare<format::NF4>({"q_proj", "v_proj"}, 0.05f);
}

// The base model as trained (Default init: B = 0, so the LoRA path adds nothing at step 0 and dA is
// 0): the activations are the pretrained model's, not NonZero's perturbed ones. Measured (H200,
// 2026-12-02): dB within 0.9–3.7% per tensor and 1.6–1.7% all together, gradient norms within 0.4%;
// bounds 6% and 3%. After 3 AdamW steps B is a few lr-sized steps away from 0, and Adam moves an
// element by ~lr·sign(g) wherever |g| is near its noise, so where the two sides' g differ in sign
// B differs by ~2·lr: measured up to 15% relative, bound 0.3.
TEST_CASE("cuda LlamaModel gradients at the unperturbed base model (B = 0)", "[cuda]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  SECTION("NF4") { compare<format::NF4>({"all-linear"}, 0.0f, LoraInit::Default, 0.06, 0.03, 0.3); }
  SECTION("BF16") { compare<format::BF16>({"all-linear"}, 0.0f, LoraInit::Default, 0.06, 0.03, 0.3); }
}

TEST_CASE("cuda LlamaModel refuses what it does not implement", "[cuda]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  LoraConfig lc;
  cpuref::LlamaReference<format::BF16> cpu(model_dir(), {"all-linear"}, lc);
  cuda::LlamaModel<format::BF16> gpu(cudatest::context(), cpu.weights());
  CHECK_THROWS_WITH(gpu.set_gradient_checkpointing(true), Catch::Contains("gradient checkpointing"));
  std::vector<std::int64_t> ids(8, 65), labels(8, -100);
  CHECK_THROWS_WITH(gpu.forward_backward(ids.data(), labels.data(), 1, 8),
                    Catch::Contains("every label is -100"));
  ids[3] = 300;
  labels[2] = 66;
  CHECK_THROWS_WITH(gpu.loss(ids.data(), labels.data(), 1, 8), Catch::Contains("outside the vocabulary"));
}

TEST_CASE("cuda LlamaModel resumes from a checkpoint bit for bit (NF4, BF16; dropout 0.1)", "[cuda]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  SECTION("NF4") { resume_bit_identical<format::NF4>(); }
  SECTION("BF16") { resume_bit_identical<format::BF16>(); }
}

TEST_CASE("cuda LlamaModel::set_lora checks every entry before changing a layer", "[cuda]") {
  QLORA_REQUIRE_CUDA_OR_SKIP();
  LoraConfig lc;
  lc.r = 4;
  cpuref::LlamaReference<format::BF16> cpu(model_dir(), {"q_proj", "v_proj"}, lc);
  cuda::LlamaModel<format::BF16> gpu(cudatest::context(), cpu.weights());
  const std::vector<LoraTensors> before = gpu.download_lora();
  std::vector<LoraTensors> t = before;
  for (float& x : t[0].A) x += 1.0f;  // a change that must not land: a later entry is bad
  t[0].dropout_calls = 7;
  SECTION("a module that is not a LoRA layer") {
    t.back().module = "model.layers.0.mlp.up_proj";
    CHECK_THROWS_WITH(gpu.set_lora(t), Catch::Contains("'model.layers.0.mlp.up_proj' is not a LoRA layer"));
  }
  SECTION("another shape") {
    t.back().B.pop_back();
    CHECK_THROWS_WITH(gpu.set_lora(t), Catch::Contains("has A, B of ") && Catch::Contains("expected"));
  }
  const std::vector<LoraTensors> after = gpu.download_lora();
  CHECK(after[0].A == before[0].A);
  CHECK(after[0].dropout_calls == before[0].dropout_calls);
}
