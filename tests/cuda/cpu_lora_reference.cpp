// The host-compiled half of the [cuda] LoRA tests: see cpu_lora_reference.hpp.
#include "cpu_lora_reference.hpp"

#include <type_traits>
#include <utility>

#include "qlora/backend/cpu/lora_linear.hpp"

namespace cpuref {

struct LoraLayer::Impl {
  virtual ~Impl() = default;
  virtual std::vector<float> A() const = 0;
  virtual std::vector<float> B() const = 0;
  virtual std::vector<float> dA() const = 0;
  virtual std::vector<float> dB() const = 0;
  virtual std::vector<float> bias() const = 0;
  virtual std::vector<float> dbias() const = 0;
  virtual void forward(const float* x, std::int64_t M, float* y) = 0;
  virtual void infer(const float* x, std::int64_t M, float* y) const = 0;
  virtual void backward(const float* dy, float* dx, qlora::GradMode mode) = 0;
  virtual std::vector<std::uint64_t> keep() const = 0;
  virtual std::uint64_t dropout_calls() const = 0;
  virtual std::vector<float> merged_weight() const = 0;
  virtual qlora::MergeReport merge() = 0;
  virtual qlora::MergeReport unmerge() = 0;
  virtual std::vector<float> base_dequantized() const = 0;
  virtual qlora::quant::Quantized4bit base_4bit() const = 0;
  virtual qlora::quant::RowwiseInt8 base_int8() const = 0;
  virtual std::vector<qlora::bf16> base_bf16() const = 0;
};

namespace {

template <class Quant>
struct Layer final : LoraLayer::Impl {
  using L = qlora::LoraLinear<Quant, qlora::Dynamic, qlora::Cpu>;
  L layer;
  typename L::Context ctx;

  template <class... Args>
  explicit Layer(Args&&... args) : layer(std::forward<Args>(args)...) {}

  template <class M>
  static std::vector<float> copy(const M& m) {
    return std::vector<float>(m.data(), m.data() + m.size());
  }
  std::vector<float> A() const override { return copy(layer.A()); }
  std::vector<float> B() const override { return copy(layer.B()); }
  std::vector<float> dA() const override { return copy(layer.dA()); }
  std::vector<float> dB() const override { return copy(layer.dB()); }
  std::vector<float> bias() const override { return layer.bias(); }
  std::vector<float> dbias() const override { return const_cast<L&>(layer).dbias(); }
  void forward(const float* x, std::int64_t M, float* y) override { layer.forward(x, M, y, ctx); }
  void infer(const float* x, std::int64_t M, float* y) const override { layer.forward(x, M, y); }
  void backward(const float* dy, float* dx, qlora::GradMode mode) override {
    layer.backward(ctx, dy, dx, mode);
  }
  std::vector<std::uint64_t> keep() const override { return ctx.keep; }
  std::uint64_t dropout_calls() const override { return layer.dropout_calls(); }
  std::vector<float> merged_weight() const override { return layer.merged_weight(); }
  qlora::MergeReport merge() override { return layer.merge(); }
  qlora::MergeReport unmerge() override { return layer.unmerge(); }
  std::vector<float> base_dequantized() const override {
    std::vector<float> w(std::size_t(layer.out_features() * layer.in_features()));
    layer.base().dequantize(w.data());
    return w;
  }
  qlora::quant::Quantized4bit base_4bit() const override {
    if constexpr (std::is_same<Quant, qlora::format::NF4>::value ||
                  std::is_same<Quant, qlora::format::FP4>::value)
      return layer.base().q;
    qlora::throw_error("cpuref::LoraLayer::base_4bit: the base is ", Quant::name, ", expected nf4 or fp4");
  }
  qlora::quant::RowwiseInt8 base_int8() const override {
    if constexpr (std::is_same<Quant, qlora::format::Int8>::value) return layer.base().q;
    qlora::throw_error("cpuref::LoraLayer::base_int8: the base is ", Quant::name, ", expected int8");
  }
  std::vector<qlora::bf16> base_bf16() const override {
    if constexpr (std::is_same<Quant, qlora::format::BF16>::value) return layer.base().w;
    qlora::throw_error("cpuref::LoraLayer::base_bf16: the base is ", Quant::name, ", expected bf16");
  }
};

}  // namespace

LoraLayer::LoraLayer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LoraLayer::~LoraLayer() = default;
LoraLayer::LoraLayer(LoraLayer&&) noexcept = default;

LoraLayer LoraLayer::nf4(const qlora::quant::Quantized4bit& w, const qlora::LoraConfig& cfg,
                         const std::vector<float>& bias, qlora::BiasMode mode) {
  if (w.type == qlora::quant::Quant4Type::FP4) {
    auto impl = std::make_unique<Layer<qlora::format::FP4>>(qlora::BaseWeight<qlora::format::FP4>(w), cfg,
                                                            bias, mode);
    impl->layer.set_act_quant(qlora::cpu::ActQuant::None);
    return LoraLayer(std::move(impl));
  }
  auto impl =
      std::make_unique<Layer<qlora::format::NF4>>(qlora::BaseWeight<qlora::format::NF4>(w), cfg, bias, mode);
  impl->layer.set_act_quant(qlora::cpu::ActQuant::None);
  return LoraLayer(std::move(impl));
}

LoraLayer LoraLayer::f32(const std::vector<float>& w, std::int64_t out, std::int64_t in,
                         const qlora::LoraConfig& cfg, const std::vector<float>& bias, qlora::BiasMode mode) {
  return LoraLayer(std::make_unique<Layer<qlora::format::F32>>(
      qlora::BaseWeight<qlora::format::F32>(w, out, in), cfg, bias, mode));
}

LoraLayer LoraLayer::bf16(const std::vector<qlora::bf16>& w, std::int64_t out, std::int64_t in,
                          const qlora::LoraConfig& cfg, const std::vector<float>& bias,
                          qlora::BiasMode mode) {
  return LoraLayer(std::make_unique<Layer<qlora::format::BF16>>(
      qlora::BaseWeight<qlora::format::BF16>(w, out, in), cfg, bias, mode));
}

LoraLayer LoraLayer::int8(const qlora::quant::RowwiseInt8& w, const qlora::LoraConfig& cfg,
                          const std::vector<float>& bias, qlora::BiasMode mode) {
  return LoraLayer(std::make_unique<Layer<qlora::format::Int8>>(qlora::BaseWeight<qlora::format::Int8>(w),
                                                                cfg, bias, mode));
}

std::vector<float> LoraLayer::A() const { return impl_->A(); }
std::vector<float> LoraLayer::B() const { return impl_->B(); }
std::vector<float> LoraLayer::dA() const { return impl_->dA(); }
std::vector<float> LoraLayer::dB() const { return impl_->dB(); }
std::vector<float> LoraLayer::bias() const { return impl_->bias(); }
std::vector<float> LoraLayer::dbias() const { return impl_->dbias(); }
void LoraLayer::forward(const float* x, std::int64_t M, float* y) { impl_->forward(x, M, y); }
void LoraLayer::infer(const float* x, std::int64_t M, float* y) const { impl_->infer(x, M, y); }
void LoraLayer::backward(const float* dy, float* dx, qlora::GradMode mode) { impl_->backward(dy, dx, mode); }
std::vector<std::uint64_t> LoraLayer::keep() const { return impl_->keep(); }
std::uint64_t LoraLayer::dropout_calls() const { return impl_->dropout_calls(); }
std::vector<float> LoraLayer::merged_weight() const { return impl_->merged_weight(); }
qlora::MergeReport LoraLayer::merge() { return impl_->merge(); }
qlora::MergeReport LoraLayer::unmerge() { return impl_->unmerge(); }
std::vector<float> LoraLayer::base_dequantized() const { return impl_->base_dequantized(); }
qlora::quant::Quantized4bit LoraLayer::base_4bit() const { return impl_->base_4bit(); }
qlora::quant::RowwiseInt8 LoraLayer::base_int8() const { return impl_->base_int8(); }
std::vector<qlora::bf16> LoraLayer::base_bf16() const { return impl_->base_bf16(); }

}  // namespace cpuref
