// qlora_train_step: what one LoRA / QLoRA training step of LlamaModel costs, with and without
// gradient checkpointing: the bytes a training forward keeps (activation_bytes), the wall time of
// forward_backward (fastest and median of --reps), and the time split by phase (set_profiling).
//
//   qlora_train_step MODEL_DIR [--quant nf4|f32] [--batch 8] [--seq 128] [--r 8] [--dropout 0.05]
//                    [--checkpointing off|on|both] [--reps 5] [--full]
//
// --full: full-parameter training of an fp32 model (what qlora pretrain does) instead of LoRA on
// all-linear targets. Token ids are a fixed pseudo-random sequence (the cost does not depend on them).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "qlora/model/llama.hpp"

namespace {

struct Options {
  std::string model, quant = "nf4";
  std::int64_t batch = 8, seq = 128;
  int r = 8, reps = 5;
  float dropout = 0.05f;
  std::string checkpointing = "both";  // off, on or both (in that order)
  bool full = false;
};

template <class Model>
void run(Model& m, const Options& o) {
  const std::int64_t B = o.batch, T = o.seq, V = m.config().vocab_size;
  std::vector<std::int64_t> ids(std::size_t(B * T));
  for (std::size_t i = 0; i < ids.size(); ++i)
    ids[i] = std::int64_t((i * 2654435761u + 7) % std::uint64_t(V));
  std::printf("B=%lld T=%lld, %d threads, %s\n", (long long)B, (long long)T, qlora::num_threads(),
              o.full ? "full-parameter training (fp32)" : "LoRA all-linear");
  if (!o.full) std::printf("%s base, r=%d, dropout %g\n", o.quant.c_str(), o.r, double(o.dropout));
  std::printf("%-14s %14s %10s %10s   %s\n", "checkpointing", "activations", "min s", "median s",
              "phases of the median-time profile (base matmul / LoRA / attention / lm_head / rest)");
  for (bool ckpt : {false, true}) {
    if (o.checkpointing != "both" && (o.checkpointing == "on") != ckpt) continue;
    m.set_gradient_checkpointing(ckpt);
    typename Model::Activations a;
    std::vector<float> z(std::size_t(B * T * V));
    m.forward(ids.data(), B, T, z.data(), &a);
    const std::size_t bytes = activation_bytes(a);
    a = {};
    m.forward_backward(ids.data(), ids.data(), B, T, qlora::GradMode::Overwrite);  // warm-up
    std::vector<double> secs;
    std::vector<typename Model::PhaseTimes> prof;
    for (int i = 0; i < o.reps; ++i) {
      m.set_profiling(true);
      m.reset_phase_times();
      const auto t0 = std::chrono::steady_clock::now();
      m.forward_backward(ids.data(), ids.data(), B, T, qlora::GradMode::Overwrite);
      secs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      prof.push_back(m.phase_times());
    }
    m.set_profiling(false);
    std::vector<std::size_t> order(secs.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) { return secs[x] < secs[y]; });
    const auto& p = prof[order[order.size() / 2]];
    const double tot = p.total();
    std::printf(
        "%-14s %10.1f MiB %10.3f %10.3f   %.1f%% / %.1f%% / %.1f%% / %.1f%% / %.1f%%  (%.0f tok/s; profiled "
        "%.3f s)\n",
        ckpt ? "on" : "off", double(bytes) / (1024.0 * 1024.0), secs[order.front()],
        secs[order[order.size() / 2]], 100 * p.base_matmul / tot, 100 * p.lora / tot, 100 * p.attention / tot,
        100 * p.lm_head / tot, 100 * p.rest / tot, double(B * T) / secs[order[order.size() / 2]], tot);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--quant")
      o.quant = next();
    else if (a == "--batch")
      o.batch = std::atoll(next());
    else if (a == "--seq")
      o.seq = std::atoll(next());
    else if (a == "--r")
      o.r = std::atoi(next());
    else if (a == "--dropout")
      o.dropout = float(std::atof(next()));
    else if (a == "--checkpointing")
      o.checkpointing = next();
    else if (a == "--reps")
      o.reps = std::max(1, std::atoi(next()));
    else if (a == "--full")
      o.full = true;
    else if (o.model.empty() && a.compare(0, 2, "--") != 0)
      o.model = a;
    else {
      std::fprintf(stderr,
                   "usage: qlora_train_step MODEL_DIR [--quant nf4|f32] [--batch 8] [--seq 128] [--r 8] "
                   "[--dropout 0.05] [--checkpointing off|on|both] [--reps 5] [--full]\n");
      return 2;
    }
  }
  if (o.model.empty()) {
    std::fprintf(stderr, "qlora_train_step: MODEL_DIR is needed\n");
    return 2;
  }
  try {
    qlora::LlamaLoraOptions lo;
    lo.lora.r = o.r;
    lo.lora.alpha = float(2 * o.r);
    lo.lora.dropout = o.dropout;
    if (!o.full) lo.target_modules = {"all-linear"};
    if (o.full || o.quant == "f32") {
      auto m = qlora::LlamaModel<qlora::format::F32>::load(o.model, lo);
      if (o.full) m.enable_full_training();
      run(m, o);
    } else if (o.quant == "nf4") {
      auto m = qlora::LlamaModel<qlora::format::NF4>::load(o.model, lo);
      run(m, o);
    } else {
      std::fprintf(stderr, "qlora_train_step: --quant must be nf4 or f32, got '%s'\n", o.quant.c_str());
      return 2;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qlora_train_step: %s\n", e.what());
    return 1;
  }
  return 0;
}
