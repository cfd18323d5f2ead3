// `qlora finetune --device cuda` (see ../finetune_cuda.hpp): cuda::LlamaModel and cuda::AdamW in the
// CLI's TrainLoop.
#include <cuda_runtime.h>

#include <cstdio>

#include "../finetune_cuda.hpp"
#include "qlora/cuda/adamw.cuh"
#include "qlora/cuda/model/llama.cuh"

namespace cli {
namespace {

// cuda::AdamW with optim::AdamW's calls (on one context), as TrainLoop uses them. The state file is
// optim::AdamW's: a checkpoint written here resumes on --device cpu and the other way round.
class DeviceAdamW {
 public:
  DeviceAdamW(const qlora::cuda::Context& ctx, std::vector<qlora::optim::Param> params,
              const qlora::optim::AdamWConfig& cfg)
      : ctx_(ctx), opt_(ctx, std::move(params), cfg) {}
  void zero_grad() { opt_.zero_grad(ctx_); }
  double step() { return opt_.step(ctx_); }
  double lr(qlora::optim::ParamGroup g) const { return opt_.lr(g); }
  void save_state(const std::string& path) const { opt_.save_state(ctx_, path); }
  void load_state(const std::string& path) { opt_.load_state(ctx_, path); }

 private:
  const qlora::cuda::Context& ctx_;
  qlora::cuda::AdamW opt_;
};

double mib(std::size_t b) { return double(b) / (1024.0 * 1024.0); }

}  // namespace

template <class Quant>
int finetune_cuda(const CudaFinetuneJob<Quant>& job) {
  const TrainOptions& o = job.options;
  const int n = qlora::cuda::device_count();
  QLORA_CHECK(n > 0, "--device cuda: no CUDA device found (0 devices)");
  qlora::cuda::Context ctx(0);
  qlora::cuda::reset_device_bytes_peak();
  const std::size_t context_bytes = qlora::cuda::device_bytes_live();  // the cuBLAS workspace
  // Resuming, job.weights already hold the checkpoint's A, B (finetune.cpp loaded the CPU model
  // from checkpoint/weights); the dropout counters and the optimizer come back below.
  qlora::cuda::LlamaModel<Quant> m(ctx, job.weights);
  const std::size_t weight_bytes = qlora::cuda::device_bytes_live() - context_bytes;
  std::fprintf(stderr, "device: %s, %d SMs; model uploaded (%.1f MiB)\n", ctx.name().c_str(), ctx.sm_count(),
               mib(weight_bytes));
  TrainLoop run(o, job.evals);
  DeviceAdamW opt(ctx, m.params(), job.adam);
  if (job.resume) {  // as the CPU path (finetune.cpp): the counters, then the optimizer
    m.set_dropout_calls(run.resume(o.out));
    opt.load_state(TrainLoop::checkpoint_optimizer(o.out));
    std::fprintf(stderr, "resumed at step %lld of %lld\n", (long long)run.start_step(), (long long)o.steps);
  } else {
    for (const EvalSet& e : job.evals)
      std::printf("before: %s loss %.4f (%lld windows of %lld tokens)\n", e.name.c_str(),
                  eval_loss(m, e.windows, o.seq), (long long)(e.windows.size() / std::size_t(o.seq)),
                  (long long)o.seq);
    std::fflush(stdout);
  }
  // Checkpoints hold the adapter of the current device A, B (and their dropout counters), written
  // through the CPU model as --device cpu writes it.
  run.run(m, opt, *job.train, [&](const std::string& dir) { job.save_adapter(m.download_lora(), dir); });
  if (run.stopped()) return g_interrupted ? 130 : 0;
  for (const EvalSet& e : job.evals)
    std::printf("after: %s loss %.4f (%lld windows of %lld tokens)\n", e.name.c_str(),
                eval_loss(m, e.windows, o.seq), (long long)(e.windows.size() / std::size_t(o.seq)),
                (long long)o.seq);
  std::size_t free_b = 0, total_b = 0;
  QLORA_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  // Our buffers are grown and kept, so after training the process's use equals its peak; the
  // tracked peak is the comparable number to torch.cuda.max_memory_allocated.
  std::printf(
      "peak device memory: %.1f MiB allocated by qlora (model weights %.1f MiB, cuBLAS workspace %.1f MiB), "
      "%.1f MiB in use by the process incl. the CUDA context (cudaMemGetInfo)\n",
      mib(qlora::cuda::device_bytes_peak()), mib(weight_bytes), mib(context_bytes), mib(total_b - free_b));
  job.save_adapter(m.download_lora(), o.out);
  run.write_curve();  // the adapter folder replaced the run's folder: the curve goes back in
  std::printf("wrote the adapter to %s (loss curve: %s/loss.csv)\n", o.out.c_str(), o.out.c_str());
  return 0;
}

template int finetune_cuda(const CudaFinetuneJob<qlora::format::NF4>&);
template int finetune_cuda(const CudaFinetuneJob<qlora::format::FP4>&);
template int finetune_cuda(const CudaFinetuneJob<qlora::format::BF16>&);
template int finetune_cuda(const CudaFinetuneJob<qlora::format::F32>&);

}  // namespace cli
