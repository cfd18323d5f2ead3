#pragma once
// `qlora finetune --device cuda`: the training run on the GPU, behind a plain C++ entry so that
// finetune.cpp (host compiler, Eigen, the CPU model) never sees a CUDA header.
//
// finetune.cpp loads the CPU LlamaModel (the checkpoint, quantization, LoRA init; with --resume the
// run's checkpoint/weights adapter), the data and the optimizer settings as for --device cpu, then
// hands over a CudaFinetuneJob: the model's weights (LlamaModel::weights()), and a save callback
// that puts A, B back into the CPU model and writes its PEFT adapter. finetune_cuda() runs the same
// TrainLoop (progress line, held-out losses, loss.csv, checkpoints, --stop-after, interrupts) on
// cuda::LlamaModel and cuda::AdamW; resuming, it restores the dropout counters, the curve and the
// optimizer from the checkpoint as the CPU path does. The checkpoint files are the CPU path's, so a
// run checkpointed on one device resumes on the other.
//
// Built only with QLORA_CUDA (cuda/finetune_cuda.cu); without it, nocuda/finetune_cuda_stub.cpp
// defines finetune_cuda() as an error saying so.
#include <functional>
#include <string>
#include <vector>

#include "qlora/model/llama_weights.hpp"
#include "qlora/optim/adamw.hpp"
#include "train_loop.hpp"

namespace cli {

template <class Quant>
struct CudaFinetuneJob {
  qlora::LlamaWeights<Quant> weights;  // the CPU model's (its base pointers: it must outlive the run)
  TrainOptions options;                // as --device cpu
  qlora::optim::AdamWConfig adam;
  const std::vector<std::int64_t>* train = nullptr;  // training tokens
  std::vector<EvalSet> evals;
  // Writes the PEFT adapter of these A, B into dir (via the CPU model's adapter()).
  std::function<void(const std::vector<qlora::LoraTensors>&, const std::string& dir)> save_adapter;
  // Continue the run in options.out from its checkpoint (weights already hold its A, B).
  bool resume = false;
};

// Returns the exit code (0, or 130 after an interrupt). Defined for NF4, FP4, BF16 and F32.
template <class Quant>
int finetune_cuda(const CudaFinetuneJob<Quant>& job);

}  // namespace cli
