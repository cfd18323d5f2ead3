// LoraLinear on the CPU against the double-precision reference (lora/reference.hpp), and the
// reference's own backward against finite differences.
#include <catch2/catch.hpp>
#include <cmath>
#include <optional>
#include <random>
#include <vector>

#include "qlora/backend/cpu/lora_linear.hpp"
#include "qlora/lora/reference.hpp"
#include "test_util.hpp"

using namespace qlora;

namespace {
std::vector<double> to_double(const float* p, std::size_t n) { return std::vector<double>(p, p + n); }

double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// Row-major values of any Eigen matrix, whatever its storage order.
template <class Mat>
std::vector<float> flatten(const Mat& m) {
  std::vector<float> v;
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) v.push_back(m(i, j));
  return v;
}

template <class Layer>
lora::ref::Params ref_params(const Layer& L) {
  lora::ref::Params p;
  p.in = L.in_features();
  p.out = L.out_features();
  p.r = L.rank();
  std::vector<float> w(std::size_t(p.out * p.in));
  L.base().dequantize(w.data());
  p.W0 = to_double(w.data(), w.size());
  p.bias = to_double(L.bias().data(), L.bias().size());
  const auto A = flatten(L.A()), B = flatten(L.B());
  p.A = to_double(A.data(), A.size());
  p.B = to_double(B.data(), B.size());
  p.scaling = L.scaling();
  return p;
}

// The dropout multipliers the layer used in training call `call`.
std::vector<double> mask_of(const LoraConfig& c, std::uint64_t call, std::int64_t M, std::int64_t in) {
  if (c.dropout <= 0) return {};
  std::vector<double> m(std::size_t(M * in));
  for (std::int64_t i = 0; i < M * in; ++i)
    m[i] =
        rng::dropout_keep(c.seed, call, std::uint64_t(i), c.dropout) ? 1.0 / (1.0 - double(c.dropout)) : 0.0;
  return m;
}

// One training step of the layer against the reference; returns the worst relative error.
template <class Quant, int Rank>
void check_against_reference(BaseWeight<Quant> base, LoraConfig cfg, std::int64_t M, double tol,
                             BiasMode bias_mode = BiasMode::Trainable,
                             std::optional<cpu::ActQuant> act = std::nullopt) {
  const std::int64_t out = base.out, in = base.in;
  cfg.init = LoraInit::NonZero;
  LoraLinear<Quant, Rank, Cpu> L(std::move(base), cfg, testutil::gaussian(std::size_t(out), 77, 0.1f),
                                 bias_mode);
  if (act) L.set_act_quant(*act);
  const auto x = testutil::gaussian(std::size_t(M * in), 5, 1.0f);
  const auto dy = testutil::gaussian(std::size_t(M * out), 6, 1.0f);
  std::vector<float> y(std::size_t(M * out)), dx(std::size_t(M * in));
  typename LoraLinear<Quant, Rank, Cpu>::Context ctx;
  L.forward(x.data(), M, y.data(), ctx);
  L.backward(ctx, dy.data(), dx.data(), GradMode::Overwrite);

  const auto p = ref_params(L);
  const auto mask = mask_of(cfg, 0, M, in);
  std::vector<double> y_ref;
  lora::ref::forward(p, to_double(x.data(), x.size()), M, mask, y_ref);
  const auto g =
      lora::ref::backward(p, to_double(x.data(), x.size()), M, mask, to_double(dy.data(), dy.size()));
  INFO(Quant::name << " rank " << cfg.r << " M " << M);
  CHECK(rel_err(y, y_ref) < tol);
  CHECK(rel_err(dx, g.dx) < 1e-5);
  CHECK(rel_err(flatten(L.dA()), g.dA) < 1e-5);
  CHECK(rel_err(flatten(L.dB()), g.dB) < 1e-5);
  if (bias_mode == BiasMode::Trainable) CHECK(rel_err(L.dbias(), g.dbias) < 1e-5);
}
}  // namespace

TEST_CASE("reference backward equals finite differences (double)", "[lora]") {
  lora::ref::Params p;
  p.in = 7;
  p.out = 5;
  p.r = 3;
  p.scaling = 1.7;
  std::mt19937 rng(1);
  std::normal_distribution<double> d(0, 1);
  auto fill = [&](std::vector<double>& v, std::size_t n) {
    v.resize(n);
    for (auto& e : v) e = d(rng);
  };
  fill(p.W0, 35);
  fill(p.bias, 5);
  fill(p.A, 21);
  fill(p.B, 15);
  const std::int64_t M = 4;
  std::vector<double> x, dy, mask(std::size_t(M * p.in));
  fill(x, std::size_t(M * p.in));
  fill(dy, std::size_t(M * p.out));
  for (std::size_t i = 0; i < mask.size(); ++i) mask[i] = (i % 3 == 0) ? 0.0 : 1.0 / 0.7;
  // L = <dy, y>: its gradient with respect to anything is what backward returns for upstream dy
  auto loss = [&](const lora::ref::Params& q, const std::vector<double>& xx) {
    std::vector<double> y;
    lora::ref::forward(q, xx, M, mask, y);
    double l = 0;
    for (std::size_t i = 0; i < y.size(); ++i) l += y[i] * dy[i];
    return l;
  };
  const auto g = lora::ref::backward(p, x, M, mask, dy);
  const double h = 1e-6;
  auto check = [&](std::vector<double>& v, const std::vector<double>& grad, const char* what) {
    for (std::size_t i = 0; i < v.size(); ++i) {
      const double keep = v[i];
      v[i] = keep + h;
      const double up = loss(p, x);
      v[i] = keep - h;
      const double down = loss(p, x);
      v[i] = keep;
      INFO(what << "[" << i << "]");
      REQUIRE(std::fabs((up - down) / (2 * h) - grad[i]) < 1e-6 * std::max(1.0, std::fabs(grad[i])));
    }
  };
  check(p.A, g.dA, "dA");
  check(p.B, g.dB, "dB");
  check(p.bias, g.dbias, "dbias");
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double up = loss(p, x);
    x[i] = keep - h;
    const double down = loss(p, x);
    x[i] = keep;
    REQUIRE(std::fabs((up - down) / (2 * h) - g.dx[i]) < 1e-6 * std::max(1.0, std::fabs(g.dx[i])));
  }
}

TEST_CASE("LoraLinear<Cpu> forward/backward equal the reference for every base format", "[lora]") {
  const std::int64_t out = 40, in = 96;
  const auto w = testutil::gaussian(std::size_t(out * in), 3, 0.05f);
  std::vector<bf16> wb(w.size());
  convert(w.data(), wb.data(), w.size());
  for (float p : {0.0f, 0.3f}) {
    LoraConfig cfg;
    cfg.r = 4;
    cfg.alpha = 8;
    cfg.dropout = p;
    cfg.seed = 42;
    for (std::int64_t M : {1, 5, 33}) {
      // 4-bit bases multiply up to 48 tokens with int16 activations (the layer's default,
      // cpu::ActQuant::Int16, measured 2e-5 .. 6e-5): a looser bound there
      const double tol_q = M <= 48 ? 2e-4 : 1e-5;
      check_against_reference<format::F32, Dynamic>(BaseWeight<format::F32>(w, out, in), cfg, M, 1e-5);
      check_against_reference<format::NF4, Dynamic>(BaseWeight<format::NF4>::quantize(w.data(), out, in), cfg,
                                                    M, 1e-5, BiasMode::Trainable, cpu::ActQuant::None);
      check_against_reference<format::F32, 4>(BaseWeight<format::F32>(w, out, in), cfg, M, 1e-5);
      check_against_reference<format::BF16, Dynamic>(BaseWeight<format::BF16>(wb, out, in), cfg, M, 1e-5);
      check_against_reference<format::NF4, Dynamic>(BaseWeight<format::NF4>::quantize(w.data(), out, in), cfg,
                                                    M, tol_q);
      check_against_reference<format::FP4, 4>(BaseWeight<format::FP4>::quantize(w.data(), out, in, 32, false),
                                              cfg, M, tol_q);
      check_against_reference<format::Int8, Dynamic>(BaseWeight<format::Int8>::quantize(w.data(), out, in),
                                                     cfg, M, tol_q);
    }
  }
  LoraConfig rs;
  rs.r = 8;
  rs.alpha = 16;
  rs.rslora = true;
  check_against_reference<format::F32, 8>(BaseWeight<format::F32>(w, out, in), rs, 7, 1e-5, BiasMode::Frozen);
}

TEST_CASE("LoraLinear: gradient modes, rank forms, dropout determinism", "[lora]") {
  const std::int64_t out = 24, in = 32, M = 9;
  const auto w = testutil::gaussian(std::size_t(out * in), 8, 0.05f);
  LoraConfig cfg;
  cfg.r = 4;
  cfg.init = LoraInit::NonZero;
  cfg.dropout = 0.25f;
  cfg.seed = 7;
  LoraLinear<format::F32, Dynamic, Cpu> a(BaseWeight<format::F32>(w, out, in), cfg);
  LoraLinear<format::F32, 4, Cpu> b(BaseWeight<format::F32>(w, out, in), cfg);
  REQUIRE(a.A().isApprox(b.A(), 0.0f));
  const auto x = testutil::gaussian(std::size_t(M * in), 1, 1.0f);
  const auto dy = testutil::gaussian(std::size_t(M * out), 2, 1.0f);
  std::vector<float> ya(std::size_t(M * out)), yb(ya.size());
  decltype(a)::Context ca, ca2;
  decltype(b)::Context cb;
  a.forward(x.data(), M, ya.data(), ca);
  b.forward(x.data(), M, yb.data(), cb);
  REQUIRE(ya == yb);  // fixed and dynamic rank: same numbers
  a.backward(ca, dy.data(), nullptr, GradMode::Overwrite);
  const auto dA1 = a.dA();
  // the second training call draws a different mask; accumulating adds its gradient
  std::vector<float> y2(ya.size());
  a.forward(x.data(), M, y2.data(), ca2);
  REQUIRE(y2 != ya);
  REQUIRE(a.dropout_calls() == 2);
  a.backward(ca2, dy.data(), nullptr, GradMode::Accumulate);
  const auto dA_sum = a.dA();
  a.backward(ca2, dy.data(), nullptr, GradMode::Overwrite);
  REQUIRE((dA_sum - dA1 - a.dA()).norm() <= 1e-5f * dA_sum.norm());
  // about p of the inputs are dropped
  std::int64_t dropped = 0;
  for (std::int64_t i = 0; i < 100000; ++i) dropped += !rng::dropout_keep(7, 3, std::uint64_t(i), 0.25f);
  REQUIRE(std::abs(dropped - 25000) < 600);
  // inference: no dropout, same as a training forward with p = 0
  std::vector<float> yi(ya.size());
  a.forward(x.data(), M, yi.data());
  LoraConfig nodrop = cfg;
  nodrop.dropout = 0;
  LoraLinear<format::F32, Dynamic, Cpu> c(BaseWeight<format::F32>(w, out, in), nodrop);
  std::vector<float> yc(ya.size());
  decltype(c)::Context cc;
  c.forward(x.data(), M, yc.data(), cc);
  REQUIRE(yi == yc);
  REQUIRE(cc.bytes() == std::size_t(M * (in + 4)) * sizeof(float));
}

TEST_CASE("LoraLinear: init as PEFT", "[lora]") {
  const std::int64_t out = 64, in = 400;
  const auto w = testutil::gaussian(std::size_t(out * in), 8, 0.05f);
  LoraConfig cfg;
  cfg.r = 16;
  LoraLinear<format::F32, Dynamic, Cpu> d(BaseWeight<format::F32>(w, out, in), cfg);
  REQUIRE(d.B().isZero(0));
  REQUIRE(d.A().cwiseAbs().maxCoeff() <= 1.0f / std::sqrt(400.0f));
  REQUIRE(d.A().cwiseAbs().maxCoeff() > 0.9f / std::sqrt(400.0f));
  // U(-b, b) has std b / sqrt(3)
  const double sd = std::sqrt(double(d.A().squaredNorm()) / double(d.A().size()));
  REQUIRE(std::fabs(sd - 1.0 / std::sqrt(400.0) / std::sqrt(3.0)) < 0.03 * sd);
  cfg.init = LoraInit::Gaussian;
  LoraLinear<format::F32, Dynamic, Cpu> g(BaseWeight<format::F32>(w, out, in), cfg);
  const double sg = std::sqrt(double(g.A().squaredNorm()) / double(g.A().size()));
  REQUIRE(std::fabs(sg - 1.0 / 16) < 0.03 / 16);
  REQUIRE(g.B().isZero(0));
}

TEST_CASE("LoraLinear: merge and unmerge", "[lora]") {
  const std::int64_t out = 48, in = 64, M = 20;
  const auto w = testutil::gaussian(std::size_t(out * in), 4, 0.05f);
  const auto x = testutil::gaussian(std::size_t(M * in), 9, 1.0f);
  LoraConfig cfg;
  cfg.r = 8;
  cfg.init = LoraInit::NonZero;
  {
    LoraLinear<format::F32, Dynamic, Cpu> L(BaseWeight<format::F32>(w, out, in), cfg);
    std::vector<float> y0(std::size_t(M * out)), y1(y0.size());
    L.forward(x.data(), M, y0.data());
    const auto merged = L.merged_weight();
    REQUIRE(L.merge().requantization_rmse == 0.0);
    REQUIRE(L.merged());
    L.forward(x.data(), M, y1.data());
    REQUIRE(rel_err(y1, to_double(y0.data(), y0.size())) < 1e-6);
    REQUIRE(L.merged_weight() == merged);
    REQUIRE_THROWS_WITH(L.merge(), Catch::Contains("already merged"));
    L.unmerge();
    std::vector<float> back(w.size());
    L.base().dequantize(back.data());
    REQUIRE(rel_err(back, to_double(w.data(), w.size())) < 1e-6);
  }
  {  // into NF4: dequantize, add, requantize; the report is the error requantization adds
    LoraLinear<format::NF4, Dynamic, Cpu> L(BaseWeight<format::NF4>::quantize(w.data(), out, in), cfg);
    const auto exact = L.merged_weight();
    const MergeReport rep = L.merge();
    std::vector<float> now(exact.size());
    L.base().dequantize(now.data());
    double se = 0;
    for (std::size_t i = 0; i < now.size(); ++i) se += double(now[i] - exact[i]) * double(now[i] - exact[i]);
    REQUIRE(rep.requantization_rmse == Approx(std::sqrt(se / double(now.size()))).epsilon(1e-9));
    REQUIRE(rep.requantization_rmse > 0.0);
    double ms = 0;
    for (float v : exact) ms += double(v) * double(v);
    // NF4's relative RMSE on Gaussian-like weights is about 0.09 (docs/performance.md)
    REQUIRE(rep.requantization_rmse < 0.12 * std::sqrt(ms / double(exact.size())));
    decltype(L)::Context ctx;
    std::vector<float> y(std::size_t(M * out));
    REQUIRE_THROWS_WITH(L.forward(x.data(), M, y.data(), ctx), Catch::Contains("unmerge first"));
  }
}

TEST_CASE("LoraLinear: bad input gives clear errors", "[lora]") {
  const auto w = testutil::gaussian(6 * 8, 4, 0.05f);
  LoraConfig cfg;
  cfg.r = 4;
  REQUIRE_THROWS_WITH((LoraLinear<format::F32, 8, Cpu>(BaseWeight<format::F32>(w, 6, 8), cfg)),
                      Catch::Contains("config rank r = 4, expected 8"));
  REQUIRE_THROWS_WITH((LoraLinear<format::F32, Dynamic, Cpu>(BaseWeight<format::F32>(w, 6, 8), cfg, {1, 2})),
                      Catch::Contains("bias has 2 values, expected 6"));
  REQUIRE_THROWS_WITH(BaseWeight<format::F32>(w, 7, 8),
                      Catch::Contains("48 values for shape (7, 8), expected 56"));
  cfg.dropout = 1.0f;
  REQUIRE_THROWS_WITH((LoraLinear<format::F32, Dynamic, Cpu>(BaseWeight<format::F32>(w, 6, 8), cfg)),
                      Catch::Contains("dropout must be in [0, 1), got 1"));
  cfg.dropout = 0;
  cfg.r = 0;
  REQUIRE_THROWS_WITH((LoraLinear<format::F32, Dynamic, Cpu>(BaseWeight<format::F32>(w, 6, 8), cfg)),
                      Catch::Contains("rank r must be positive, got 0"));
  auto q = quant::quantize_4bit(w.data(), {6, 8}, {quant::Quant4Type::FP4, 32, false});
  REQUIRE_THROWS_WITH(BaseWeight<format::NF4>(q),
                      Catch::Contains("a fp4 tensor given where nf4 was expected"));
}

TEST_CASE("LoraLinear: parameters for the optimizer", "[lora]") {
  const auto w = testutil::gaussian(6 * 8, 4, 0.05f);
  LoraConfig cfg;
  cfg.r = 2;
  LoraLinear<format::F32, Dynamic, Cpu> L(BaseWeight<format::F32>(w, 6, 8), cfg, std::vector<float>(6, 0.5f),
                                          BiasMode::Trainable);
  const auto p = L.params("model.layers.0.mlp.up_proj");
  REQUIRE(p.size() == 3);
  REQUIRE(p[0].name == "model.layers.0.mlp.up_proj.lora_A.weight");
  REQUIRE(p[0].size == 16);
  REQUIRE(p[0].value == L.A().data());
  REQUIRE(p[1].group == optim::ParamGroup::LoraB);
  REQUIRE(p[1].grad == L.dB().data());
  REQUIRE(p[2].name == "model.layers.0.mlp.up_proj.bias");
  LoraLinear<format::F32, Dynamic, Cpu> F(BaseWeight<format::F32>(w, 6, 8), cfg, std::vector<float>(6, 0.5f));
  REQUIRE(F.params("m").size() == 2);  // a frozen bias is not a parameter
}
