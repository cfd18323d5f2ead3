#pragma once
// cli::Model: a LlamaModel of any base format behind one interface. The commands work on a Model,
// and model.cpp compiles LlamaModel<Quant> for the five formats once, in one translation unit:
// instantiated in every command for every format, the model was most of a Release build's time
// (the model code that does not depend on the format, such as the CPU kernels, checkpoint reading
// and safetensors, is shared by the five in one unit). A virtual call per forward or training
// step costs nothing beside the model's own work. The methods are LlamaModel's and mean what
// model/llama.hpp says.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qlora/core/dtype.hpp"
#include "qlora/io/peft_adapter.hpp"
#include "qlora/lora/config.hpp"
#include "qlora/model/llama.hpp"
#include "qlora/optim/adamw.hpp"
#include "qlora/optim/param.hpp"
#include "train_loop.hpp"

namespace cli {

// What to load: a checkpoint folder, with a PEFT adapter attached (LlamaModel::load_with_adapter)
// or with fresh LoRA paths (LlamaModel::load).
struct ModelSpec {
  std::string dir;
  std::optional<std::string> adapter;  // the adapter folder
  std::uint64_t seed = 0;              // with an adapter: the seed of its dropout masks
  qlora::LlamaLoraOptions lora;        // without: the targets (none: a frozen model) and hyper-parameters;
                                       // its keep_frozen_bases applies with an adapter too
};

// `qlora finetune --device cuda`'s run (finetune_cuda.hpp): what it needs besides the model.
struct CudaRun {
  TrainOptions options;
  qlora::optim::AdamWConfig adam;
  const std::vector<std::int64_t>* train = nullptr;  // training tokens
  std::vector<EvalSet> evals;
  std::string model_dir;  // base_model_name_or_path of the adapter
  bool resume = false;    // continue from options.out's checkpoint (the model holds its weights)
};

class Model {
 public:
  virtual ~Model() = default;

  virtual const qlora::LlamaConfig& config() const = 0;
  virtual std::vector<float> logits(const std::int64_t* ids, std::int64_t B, std::int64_t T) = 0;
  virtual float loss(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B, std::int64_t T) = 0;
  virtual float forward_backward(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B,
                                 std::int64_t T, qlora::GradMode mode) = 0;

  virtual std::vector<qlora::optim::Param> params() = 0;
  virtual void enable_full_training() = 0;
  virtual void set_gradient_checkpointing(bool on) = 0;
  virtual void set_profiling(bool on) = 0;
  virtual qlora::LlamaPhaseTimes phase_times() const = 0;
  virtual std::vector<std::uint64_t> dropout_calls() const = 0;
  virtual void set_dropout_calls(const std::vector<std::uint64_t>& calls) = 0;

  virtual qlora::peft::Adapter adapter(const std::string& base_model_name_or_path) const = 0;
  virtual void save(const std::string& dir, qlora::DType dtype) const = 0;
  // Trains this model's LoRA paths on the GPU (cli::finetune_cuda) and writes their adapter into
  // run.options.out through this model; returns the exit code. Throws for a base with no GPU form
  // (int8) and in a tool built without CUDA.
  virtual int finetune_cuda(const CudaRun& run) = 0;
};

// The model spec describes, its projections in the --quant format quant: "none" (fp32), "nf4",
// "fp4", "int8" or "bf16".
std::unique_ptr<Model> open_model(const std::string& quant, const ModelSpec& spec);
// The error open_model gives for a quant it does not know, before anything is loaded.
void check_quant(const std::string& quant);

}  // namespace cli
