#pragma once
// AdamW's state file, one format for optim::AdamW (adamw.hpp, moments in host memory) and
// cuda::AdamW (cuda/qlora/cuda/adamw.cuh, moments on the device): a checkpoint's
// optimizer.safetensors written on one device is read by the other.
//
// The file is safetensors:
//   "<param>.exp_avg", "<param>.exp_avg_sq"   F32, shape [size], per parameter (in the order given)
//   __metadata__                              format ("qlora.optim.adamw"), format_version ("1"),
//                                             step, every AdamWConfig setting, the schedule, and
//                                             "group.<param>" (the parameter's ParamGroup)
// Doubles are written as the shortest decimal that reads back to the same bits (std::to_chars), so
// nothing is lost in text and "the same setting" is a string comparison.
//
// Loading (read) checks everything before it returns anything: the format, the step, the settings
// (ConfigMismatch::Error: any difference is an Error listing each; KeepCurrent: none is compared),
// that the tensors are exactly the parameters' (names, F32, [size]) and that every moment is finite
// (exp_avg_sq also >= 0). The optimizer changes its state only with what read returned, so a failed
// load leaves it as it was. Errors are qlora::Error under "<who> state '<path>': ".
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <system_error>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/optim/adamw_config.hpp"
#include "qlora/optim/param.hpp"
#include "qlora/optim/schedule.hpp"

namespace qlora {
namespace optim {
namespace adamw_state {

inline constexpr const char* kFormat = "qlora.optim.adamw";
inline constexpr const char* kFormatVersion = "1";

// What read() returns: the moments per parameter, in the order of the parameters given.
struct Moments {
  std::vector<std::vector<float>> exp_avg;     // (size) per parameter
  std::vector<std::vector<float>> exp_avg_sq;  // (size) per parameter
  std::int64_t step = 0;                       // optimizer steps taken
};

// Shortest decimal that reads back to the same double (locale-independent).
inline std::string num(double x) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, x);
  return std::string(buf, r.ptr);
}

// Everything a resumed run must agree on, as metadata strings.
inline std::map<std::string, std::string> describe(const AdamWConfig& c, const std::vector<Param>& params,
                                                   std::int64_t step) {
  std::map<std::string, std::string> md{
      {"format", kFormat},
      {"format_version", kFormatVersion},
      {"step", std::to_string(step)},
      {"lr", num(c.lr)},
      {"beta1", num(c.beta1)},
      {"beta2", num(c.beta2)},
      {"eps", num(c.eps)},
      {"weight_decay", num(c.weight_decay)},
      {"loraplus_lr_ratio", num(c.loraplus_lr_ratio)},
      {"max_grad_norm", num(c.max_grad_norm)},
      {"grad_accum_steps", std::to_string(c.grad_accum_steps)},
      {"schedule", schedule_name(c.schedule.kind)},
      {"warmup_steps", std::to_string(c.schedule.warmup_steps)},
      {"total_steps", std::to_string(c.schedule.total_steps)},
      {"min_lr_ratio", num(c.schedule.min_lr_ratio)},
  };
  for (const Param& p : params) md["group." + p.name] = group_name(p.group);
  return md;
}

// Writes the state atomically (a crash leaves the old file or none). exp_avg[k], exp_avg_sq[k]:
// params[k].size floats in host memory, read during the call.
inline void write(const std::string& path, const AdamWConfig& c, const std::vector<Param>& params,
                  std::int64_t step, const std::vector<const float*>& exp_avg,
                  const std::vector<const float*>& exp_avg_sq) {
  QLORA_CHECK(exp_avg.size() == params.size() && exp_avg_sq.size() == params.size(), "AdamW state '", path,
              "': ", exp_avg.size(), " and ", exp_avg_sq.size(), " moments given, expected ", params.size(),
              " (one per parameter)");
  safetensors::Writer w;
  for (std::size_t k = 0; k < params.size(); ++k) {
    const Param& p = params[k];
    const std::vector<std::int64_t> shape{std::int64_t(p.size)};
    w.add(p.name + ".exp_avg", DType::F32, shape, exp_avg[k], p.size * sizeof(float));
    w.add(p.name + ".exp_avg_sq", DType::F32, shape, exp_avg_sq[k], p.size * sizeof(float));
  }
  for (const auto& [key, value] : describe(c, params, step)) w.set_metadata(key, value);
  w.write(path);
}

namespace detail {

inline std::vector<float> read_moment(const safetensors::File& f, const Param& p, const std::string& name) {
  QLORA_CHECK(f.contains(name), "parameter '", p.name, "' (", p.size, " elements) has no tensor '", name,
              "'");
  const safetensors::TensorView t = f.get(name);
  QLORA_CHECK(t.dtype == DType::F32, "tensor '", name, "' is ", dtype_name(t.dtype), ", expected F32");
  QLORA_CHECK(t.shape.size() == 1 && std::uint64_t(t.shape[0]) == p.size, "tensor '", name, "' has shape ",
              safetensors::detail::shape_str(t.shape), ", expected [", p.size, "] (the size of parameter '",
              p.name, "')");
  std::vector<float> x = t.copy_as<float>();
  for (std::size_t i = 0; i < x.size(); ++i)
    QLORA_CHECK(std::isfinite(x[i]), "tensor '", name, "' element ", i, " is ", x[i],
                ", expected a finite number");
  // exp_avg_sq is a running mean of squares: a negative value would make sqrt() NaN next step.
  if (name.size() > 3 && name.compare(name.size() - 3, 3, "_sq") == 0)
    for (std::size_t i = 0; i < x.size(); ++i)
      QLORA_CHECK(x[i] >= 0.0f, "tensor '", name, "' element ", i, " is ", x[i], ", expected >= 0");
  return x;
}

inline Moments read_impl(const std::string& path, const AdamWConfig& config, const std::vector<Param>& params,
                         ConfigMismatch on_mismatch) {
  const safetensors::File f = safetensors::File::open(path);
  const auto& md = f.metadata();
  auto get = [&](const std::string& key) -> const std::string& {
    auto it = md.find(key);
    if (it == md.end()) throw_error("__metadata__ has no '", key, "', expected an AdamW state file");
    return it->second;
  };
  QLORA_CHECK(get("format") == kFormat, "__metadata__ format is '", get("format"), "', expected '", kFormat,
              "'");
  QLORA_CHECK(get("format_version") == kFormatVersion, "format_version is '", get("format_version"),
              "', expected '", kFormatVersion, "'");
  Moments out;
  {
    const std::string& s = get("step");
    const auto r = std::from_chars(s.data(), s.data() + s.size(), out.step);
    QLORA_CHECK(r.ec == std::errc() && r.ptr == s.data() + s.size() && out.step >= 0,
                "__metadata__ step is '", s, "', expected an integer >= 0");
  }

  if (on_mismatch == ConfigMismatch::Error) {
    std::string diffs;
    for (const auto& [key, value] : describe(config, params, 0)) {
      if (key == "step") continue;
      auto it = md.find(key);
      if (key.compare(0, 6, "group.") == 0 && it == md.end()) continue;  // reported as a missing tensor
      const std::string saved = it == md.end() ? std::string("(absent)") : it->second;
      if (saved != value)
        diffs += (diffs.empty() ? "" : ", ") + key + " = " + saved + " (this optimizer: " + value + ")";
    }
    QLORA_CHECK(diffs.empty(), "saved with other settings: ", diffs,
                "; pass ConfigMismatch::KeepCurrent to resume under the new ones");
  }

  std::set<std::string> expected;
  out.exp_avg.resize(params.size());
  out.exp_avg_sq.resize(params.size());
  for (std::size_t k = 0; k < params.size(); ++k) {
    const Param& p = params[k];
    out.exp_avg[k] = read_moment(f, p, p.name + ".exp_avg");
    out.exp_avg_sq[k] = read_moment(f, p, p.name + ".exp_avg_sq");
    expected.insert(p.name + ".exp_avg");
    expected.insert(p.name + ".exp_avg_sq");
  }
  for (const std::string& name : f.names())
    QLORA_CHECK(expected.count(name), "has tensor '", name,
                "', which belongs to no parameter of this optimizer (", params.size(), " parameters)");
  return out;
}

}  // namespace detail

// Reads and checks a state file written by write() for these parameters and settings (see the top
// of this file). who names the optimizer in errors ("AdamW", "cuda::AdamW").
inline Moments read(const std::string& path, const AdamWConfig& config, const std::vector<Param>& params,
                    ConfigMismatch on_mismatch, const std::string& who = "AdamW") {
  return with_context(who + " state '" + path + "'",
                      [&] { return detail::read_impl(path, config, params, on_mismatch); });
}

}  // namespace adamw_state
}  // namespace optim
}  // namespace qlora
