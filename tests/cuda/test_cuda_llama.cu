// [cuda] cuda::LlamaModel against the CPU LlamaModel (cpu_llama_reference.cpp) on models/fortunes-base
// (hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 352, vocab 256, bf16), LoRA r = 8 on all-linear
// (and on q_proj, v_proj only: the frozen device bases), NF4 and BF16 bases, dropout 0 and 0.05.
// Both models start from the same weights and the same A, B (LoraInit::NonZero, so dA is not 0 at
// step 0) and draw the same dropout masks.
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
#include <string>
#include <vector>

#include "cpu_llama_reference.hpp"
#include "cuda_test_util.cuh"
#include "qlora/cuda/adamw.cuh"
#include "qlora/cuda/model/llama.cuh"

using namespace qlora;

namespace {

std::string model_dir() {
#ifdef QLORA_SOURCE_DIR
  return std::string(QLORA_SOURCE_DIR) + "/models/fortunes-base";
#else
  return "models/fortunes-base";  // bench/cuda/device_run.sh runs from the repository root
#endif
}

// Byte tokens (token id = byte value, the model's vocabulary) of fortune-like text, B rows of T.
void byte_batch(std::int64_t B, std::int64_t T, std::vector<std::int64_t>& ids,
                std::vector<std::int64_t>& labels) {
  static const char* const text =
      "Q: What is the difference between a duck?\nA: One leg is both the same.\n%\n"
      "A journey of a thousand miles begins with a cash advance.\n%\n"
      "He who laughs last thinks slowest.\n\t\t-- Anonymous\n%\n"
      "Space: the final frontier. These are the voyages of the starship Enterprise.\n%\n"
      "Never put off till tomorrow what you can do the day after tomorrow.\n\t\t-- Mark Twain\n%\n";
  const std::string s(text);
  ids.resize(std::size_t(B * T));
  for (std::int64_t i = 0; i < B * T; ++i)
    ids[std::size_t(i)] = (unsigned char)s[std::size_t(i * 7 / 5) % s.size()];
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
