// The host-compiled half of the [cuda] LoRA tests: see cpu_lora_reference.hpp.
#include "cpu_lora_reference.hpp"

#include <utility>

#include "qlora/backend/cpu/lora_linear.hpp"

namespace cpuref {

struct LoraLayer::Impl {
  virtual ~Impl() = default;
  virtual std::vector<float> A() const = 0;
  virtual std::vector<float> B() const = 0;
  virtual std::vector<float> dA() const = 0;
  virtual std::vector<float> dB() const = 0;
  virtual void forward(const float* x, std::int64_t M, float* y) = 0;
  virtual void backward(const float* dy, float* dx, qlora::GradMode mode) = 0;
  virtual std::vector<std::uint64_t> keep() const = 0;
  virtual std::uint64_t dropout_calls() const = 0;
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
  void forward(const float* x, std::int64_t M, float* y) override { layer.forward(x, M, y, ctx); }
  void backward(const float* dy, float* dx, qlora::GradMode mode) override {
    layer.backward(ctx, dy, dx, mode);
  }
  std::vector<std::uint64_t> keep() const override { return ctx.keep; }
  std::uint64_t dropout_calls() const override { return layer.dropout_calls(); }
};

}  // namespace

LoraLayer::LoraLayer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LoraLayer::~LoraLayer() = default;
LoraLayer::LoraLayer(LoraLayer&&) noexcept = default;

LoraLayer LoraLayer::nf4(const qlora::quant::Quantized4bit& w, const qlora::LoraConfig& cfg) {
  auto impl = std::make_unique<Layer<qlora::format::NF4>>(qlora::BaseWeight<qlora::format::NF4>(w), cfg);
  impl->layer.set_act_quant(qlora::cpu::ActQuant::None);
  return LoraLayer(std::move(impl));
}

LoraLayer LoraLayer::f32(const std::vector<float>& w, std::int64_t out, std::int64_t in,
                         const qlora::LoraConfig& cfg) {
  return LoraLayer(
      std::make_unique<Layer<qlora::format::F32>>(qlora::BaseWeight<qlora::format::F32>(w, out, in), cfg));
}

std::vector<float> LoraLayer::A() const { return impl_->A(); }
std::vector<float> LoraLayer::B() const { return impl_->B(); }
std::vector<float> LoraLayer::dA() const { return impl_->dA(); }
std::vector<float> LoraLayer::dB() const { return impl_->dB(); }
void LoraLayer::forward(const float* x, std::int64_t M, float* y) { impl_->forward(x, M, y); }
void LoraLayer::backward(const float* dy, float* dx, qlora::GradMode mode) { impl_->backward(dy, dx, mode); }
std::vector<std::uint64_t> LoraLayer::keep() const { return impl_->keep(); }
std::uint64_t LoraLayer::dropout_calls() const { return impl_->dropout_calls(); }

}  // namespace cpuref
