// cli::Model for each base format: the one translation unit that compiles LlamaModel (model.hpp
// says why), and the one place a --quant string becomes a format:: type.
#include "model.hpp"

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "finetune_cuda.hpp"
#include "qlora/core/error.hpp"
#include "qlora/io/peft_adapter.hpp"

namespace cli {
namespace {

// Calls f(tag) with the format tag named by quant; returns what f returns.
template <class F>
auto with_quant(const std::string& quant, F&& f) {
  namespace fmt = qlora::format;
  if (quant == "none") return f(fmt::F32{});
  if (quant == "nf4") return f(fmt::NF4{});
  if (quant == "fp4") return f(fmt::FP4{});
  if (quant == "int8") return f(fmt::Int8{});
  if (quant == "bf16") return f(fmt::BF16{});
  qlora::throw_error("--quant must be none, nf4, fp4, int8 or bf16, got '", quant, "'");
}

// Every method is the LlamaModel's own.
template <class Quant>
class ModelOf final : public Model {
 public:
  explicit ModelOf(qlora::LlamaModel<Quant> m) : m_(std::move(m)) {}

  const qlora::LlamaConfig& config() const override { return m_.config(); }
  std::vector<float> logits(const std::int64_t* ids, std::int64_t B, std::int64_t T) override {
    return m_.logits(ids, B, T);
  }
  float loss(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B, std::int64_t T) override {
    return m_.loss(ids, labels, B, T);
  }
  float forward_backward(const std::int64_t* ids, const std::int64_t* labels, std::int64_t B, std::int64_t T,
                         qlora::GradMode mode) override {
    return m_.forward_backward(ids, labels, B, T, mode);
  }

  std::vector<qlora::optim::Param> params() override { return m_.params(); }
  void enable_full_training() override { m_.enable_full_training(); }
  void set_gradient_checkpointing(bool on) override { m_.set_gradient_checkpointing(on); }
  void set_profiling(bool on) override { m_.set_profiling(on); }
  qlora::LlamaPhaseTimes phase_times() const override { return m_.phase_times(); }
  std::vector<std::uint64_t> dropout_calls() const override { return m_.dropout_calls(); }
  void set_dropout_calls(const std::vector<std::uint64_t>& calls) override { m_.set_dropout_calls(calls); }

  qlora::peft::Adapter adapter(const std::string& base_model_name_or_path) const override {
    return m_.adapter(base_model_name_or_path);
  }
  void save(const std::string& dir, qlora::DType dtype) const override { m_.save(dir, dtype); }
  int finetune_cuda(const CudaRun& run) override {
    if constexpr (std::is_same<Quant, qlora::format::Int8>::value) {
      (void)run;
      qlora::throw_error("--device cuda: --quant int8 has no CUDA base; use nf4, fp4, bf16 or none");
    } else {
      CudaFinetuneJob<Quant> job{m_.weights(), run.options, run.adam, run.train, run.evals, {}, run.resume};
      job.save_adapter = [&](const std::vector<qlora::LoraTensors>& t, const std::string& dir) {
        m_.set_lora(t);
        qlora::peft::save_adapter(dir, m_.adapter(run.model_dir));
      };
      return cli::finetune_cuda(job);
    }
  }

 private:
  qlora::LlamaModel<Quant> m_;
};

}  // namespace

std::unique_ptr<Model> open_model(const std::string& quant, const ModelSpec& spec) {
  return with_quant(quant, [&](auto tag) -> std::unique_ptr<Model> {
    using Llama = qlora::LlamaModel<decltype(tag)>;
    return std::make_unique<ModelOf<decltype(tag)>>(
        spec.adapter
            ? Llama::load_with_adapter(spec.dir, *spec.adapter, spec.seed, spec.lora.keep_frozen_bases)
            : Llama::load(spec.dir, spec.lora));
  });
}

void check_quant(const std::string& quant) {
  with_quant(quant, [](auto) {});
}

}  // namespace cli
