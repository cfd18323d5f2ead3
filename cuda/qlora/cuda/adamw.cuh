#pragma once
// cuda::AdamW: optim::AdamW (include/qlora/optim/adamw.hpp) for parameters that live on the device,
// with the same config, the same step order and the same float arithmetic:
//   1. norm      one kernel: the sum of squares of float(g · 1/accum) in double, per tile of
//                optim::kNormChunk elements (the CPU's chunks), read back and added per parameter
//                and across parameters in the CPU's order. Not finite: an Error naming the first bad
//                element, thrown before anything changed.
//   2. update    ONE fused kernel over all parameters: per element the averaging and clipping of the
//                gradient (written back, as torch leaves it), the decoupled weight decay, both
//                moments and the parameter, each operation one IEEE rounding in torch's order
//                (__fmul_rn / __fadd_rn / __fdiv_rn / __fsqrt_rn / __fmaf_rn: nvcc may not contract
//                them, so the FMAs are exactly the CPU's std::fma and nothing else is fused).
// The scalars (lr · schedule factor, 1 - lr·wd, step size, sqrt of bias correction 2) are computed on
// the host in double, as the CPU optimizer computes them, and reach the kernel rounded to float.
// So the parameters and moments equal the CPU's bit for bit as long as the clip coefficient rounds
// to the same float (the norm's double sum is added in another order inside a chunk: a difference
// of a few double ulps, which changes float(coef) only in a tie-breaking accident).
//
// Each step reads the norm back to the host (it is step()'s return value and decides the clipping):
// one synchronization per optimizer step, not per layer.
//
// State files (save_state / load_state) are optim::AdamW's (optim/adamw_state.hpp: the moments per
// parameter, the step count and every setting), so a state saved on either device loads on the
// other; with the same parameters and moments the next step is the one the saved optimizer would
// have taken, on this device's arithmetic.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/optim/adamw_config.hpp"
#include "qlora/optim/adamw_state.hpp"
#include "qlora/optim/clip.hpp"
#include "qlora/optim/param.hpp"

namespace qlora {
namespace cuda {
namespace detail {

struct AdamWTile {
  int param;               // index into the parameter table
  std::size_t begin, end;  // element range inside that parameter
};

struct AdamWParamArgs {
  float* p;
  float* g;
  float* m;
  float* v;
  float decay, w1, b2, c2, eps, neg_step, bc2_sqrt;
};

// Block reduction of a double over 256 threads (8 warps).
__device__ __forceinline__ double block_sum_256(double x) {
  __shared__ double s_warp[8];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x / 32] = x;
  __syncthreads();
  double t = 0;
  if (threadIdx.x < 32) {
    t = threadIdx.x < 8 ? s_warp[threadIdx.x] : 0.0;
    for (int o = 4; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
  }
  __syncthreads();
  return t;
}

__global__ void __launch_bounds__(256) adamw_sumsq_kernel(const AdamWTile* __restrict__ tiles, int n_tiles,
                                                          const AdamWParamArgs* __restrict__ params,
                                                          float inv_accum, double* __restrict__ partial) {
  for (int t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    const AdamWTile tile = tiles[t];
    const float* g = params[tile.param].g;
    double s = 0.0;
    for (std::size_t i = tile.begin + threadIdx.x; i < tile.end; i += 256) {
      const double x = double(__fmul_rn(g[i], inv_accum));
      s = __fma_rn(x, x, s);  // exact products of floats in double; the sum's order differs from the CPU's
    }
    s = block_sum_256(s);
    if (threadIdx.x == 0) partial[t] = s;
  }
}

__global__ void __launch_bounds__(256) adamw_update_kernel(const AdamWTile* __restrict__ tiles, int n_tiles,
                                                           const AdamWParamArgs* __restrict__ params,
                                                           float inv_accum, bool clip, float clip_coef) {
  for (int t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    const AdamWTile tile = tiles[t];
    const AdamWParamArgs a = params[tile.param];
    for (std::size_t i = tile.begin + threadIdx.x; i < tile.end; i += 256) {
      float gi = __fmul_rn(a.g[i], inv_accum);  // the averaged gradient first,
      if (clip) gi = __fmul_rn(gi, clip_coef);  // then clip_grad_norm_'s scaling: two roundings
      a.g[i] = gi;
      const float p = __fmul_rn(a.p[i], a.decay);  // param.mul_(1 - lr * wd)
      const float mi = __fmaf_rn(a.w1, __fsub_rn(gi, a.m[i]), a.m[i]);
      const float vi = __fmaf_rn(__fmul_rn(a.c2, gi), gi, __fmul_rn(a.v[i], a.b2));
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), a.bc2_sqrt), a.eps);
      a.m[i] = mi;
      a.v[i] = vi;
      a.p[i] = __fadd_rn(p, __fdiv_rn(__fmul_rn(a.neg_step, mi), denom));
    }
  }
}

}  // namespace detail

class AdamW {
 public:
  // params: value and grad are DEVICE pointers (e.g. LoraLinear<..., Cuda>::params), owned by the
  // layers; they must outlive the optimizer and not move.
  AdamW(const Context& ctx, std::vector<optim::Param> params, optim::AdamWConfig config)
      : params_(std::move(params)), config_(config) {
    config_.validate();
    std::size_t total = 0;
    for (std::size_t k = 0; k < params_.size(); ++k) {
      const optim::Param& p = params_[k];
      QLORA_CHECK(!p.name.empty(), "cuda::AdamW: a parameter has an empty name");
      for (std::size_t j = 0; j < k; ++j)
        QLORA_CHECK(params_[j].name != p.name, "cuda::AdamW: parameter '", p.name, "' is listed twice");
      QLORA_CHECK(p.size > 0, "cuda::AdamW: parameter '", p.name,
                  "' has size 0, expected at least 1 element");
      QLORA_CHECK(p.value && p.grad, "cuda::AdamW: parameter '", p.name, "' has a null ",
                  p.value ? "grad" : "value", " pointer");
      offset_.push_back(total);
      for (std::size_t b = 0; b < p.size; b += optim::kNormChunk)
        tiles_host_.push_back({int(k), b, std::min(p.size, b + optim::kNormChunk)});
      total += p.size;
    }
    QLORA_CHECK(!tiles_host_.empty(), "cuda::AdamW: no parameters");
    moments_ = DeviceBuffer<float>(2 * total);
    QLORA_CUDA_CHECK(cudaMemsetAsync(moments_.data(), 0, moments_.bytes(), ctx.stream()));
    tiles_ = DeviceBuffer<detail::AdamWTile>(tiles_host_.size());
    tiles_.upload(tiles_host_.data(), tiles_host_.size(), ctx.stream());
    args_ = DeviceBuffer<detail::AdamWParamArgs>(params_.size());
    args_host_.resize(params_.size());
    partial_ = DeviceBuffer<double>(tiles_host_.size());
    partial_host_.resize(tiles_host_.size());
    total_ = total;
    ctx.synchronize();
  }

  // One optimizer step on ctx's stream; returns the gradient norm before clipping (synchronizes).
  double step(const Context& ctx) {
    const std::int64_t t = step_ + 1;
    const float inv_accum = float(1.0 / double(config_.grad_accum_steps));
    const double factor = config_.schedule.factor(step_);
    for (std::size_t k = 0; k < params_.size(); ++k) args_host_[k] = scalars(k, t, factor);
    ctx.activate();
    args_.upload(args_host_.data(), args_host_.size(), ctx.stream());
    const int n_tiles = int(tiles_host_.size());
    const int grid = std::min(n_tiles, ctx.sm_count() * 8);
    detail::adamw_sumsq_kernel<<<grid, 256, 0, ctx.stream()>>>(tiles_.data(), n_tiles, args_.data(),
                                                               inv_accum, partial_.data());
    QLORA_CUDA_CHECK_LAUNCH("adamw_sumsq_kernel");
    partial_.download(partial_host_.data(), partial_host_.size(), ctx.stream());
    ctx.synchronize();
    // As optim::global_grad_norm: chunk sums added in order within a parameter, then across them.
    double s = 0.0, s_param = 0.0;
    for (std::size_t i = 0; i < tiles_host_.size(); ++i) {
      s_param += partial_host_[i];
      if (i + 1 == tiles_host_.size() || tiles_host_[i + 1].param != tiles_host_[i].param) {
        s += s_param;
        s_param = 0.0;
      }
    }
    const double norm = std::sqrt(s);
    if (!std::isfinite(norm)) throw_bad_grad(ctx, inv_accum, t, norm);
    const double coef = optim::clip_coefficient(norm, config_.max_grad_norm);
    detail::adamw_update_kernel<<<grid, 256, 0, ctx.stream()>>>(tiles_.data(), n_tiles, args_.data(),
                                                                inv_accum, coef < 1.0, float(coef));
    QLORA_CUDA_CHECK_LAUNCH("adamw_update_kernel");
    step_ = t;
    return norm;
  }

  void zero_grad(const Context& ctx) {
    for (const optim::Param& p : params_)
      QLORA_CUDA_CHECK(cudaMemsetAsync(p.grad, 0, p.size * sizeof(float), ctx.stream()));
  }

  std::int64_t step_count() const { return step_; }
  double lr(optim::ParamGroup g) const { return base_lr(g) * config_.schedule.factor(step_); }
  const optim::AdamWConfig& config() const { return config_; }
  const std::vector<optim::Param>& params() const { return params_; }
  // Copies of the moments of parameter k (blocking).
  std::vector<float> exp_avg(const Context& ctx, std::size_t k) const { return moment(ctx, k, 0); }
  std::vector<float> exp_avg_sq(const Context& ctx, std::size_t k) const { return moment(ctx, k, total_); }

  // Writes the moments, step count and config atomically in optim::AdamW's format (a crash leaves
  // the old file or none). Blocking: the moments are downloaded after the work queued on ctx's
  // stream (the last step's update). Parameter values are not included: they belong to the
  // layers' own checkpoint.
  void save_state(const Context& ctx, const std::string& path) const {
    std::vector<float> h(moments_.size());  // (2 · total) as moments_
    ctx.activate();
    moments_.download(h.data(), h.size(), ctx.stream());
    ctx.synchronize();
    std::vector<const float*> m, v;
    for (std::size_t k = 0; k < params_.size(); ++k) {
      m.push_back(h.data() + offset_[k]);
      v.push_back(h.data() + total_ + offset_[k]);
    }
    optim::adamw_state::write(path, config_, params_, step_, m, v);
  }

  // Restores the moments and step count saved by save_state (or by optim::AdamW::save_state): the
  // same checks and mismatch policy as optim::AdamW::load_state, all of them before anything on the
  // device changes, so a refused file leaves the optimizer as it was. Blocking.
  void load_state(const Context& ctx, const std::string& path,
                  optim::ConfigMismatch on_mismatch = optim::ConfigMismatch::Error) {
    const optim::adamw_state::Moments st =
        optim::adamw_state::read(path, config_, params_, on_mismatch, "cuda::AdamW");
    std::vector<float> h(moments_.size());  // (2 · total) as moments_
    for (std::size_t k = 0; k < params_.size(); ++k) {
      std::copy(st.exp_avg[k].begin(), st.exp_avg[k].end(), h.begin() + std::ptrdiff_t(offset_[k]));
      std::copy(st.exp_avg_sq[k].begin(), st.exp_avg_sq[k].end(),
                h.begin() + std::ptrdiff_t(total_ + offset_[k]));
    }
    ctx.activate();
    moments_.upload(h.data(), h.size(), ctx.stream());
    ctx.synchronize();  // h is pageable host memory that dies here
    step_ = st.step;
  }

 private:
  double base_lr(optim::ParamGroup g) const {
    return g == optim::ParamGroup::LoraB ? config_.lr * config_.loraplus_lr_ratio : config_.lr;
  }
  double weight_decay(optim::ParamGroup g) const {
    return g == optim::ParamGroup::Bias ? 0.0 : config_.weight_decay;
  }

  // The scalars of optim::AdamW::update, computed the same way.
  detail::AdamWParamArgs scalars(std::size_t k, std::int64_t t, double factor) {
    const optim::Param& prm = params_[k];
    const double lr = base_lr(prm.group) * factor;
    const double wd = weight_decay(prm.group);
    const double b1 = config_.beta1, b2 = config_.beta2;
    detail::AdamWParamArgs a{};
    a.p = prm.value;
    a.g = prm.grad;
    a.m = moments_.data() + offset_[k];
    a.v = moments_.data() + total_ + offset_[k];
    a.decay = float(1.0 - optim::detail::rounded(lr * wd));
    const double bias_correction1 = 1.0 - std::pow(b1, double(t));
    const double bias_correction2 = 1.0 - std::pow(b2, double(t));
    a.neg_step = float(-(lr / bias_correction1));
    a.bc2_sqrt = float(std::sqrt(bias_correction2));
    a.w1 = float(1.0 - b1);
    a.b2 = float(b2);
    a.c2 = float(1.0 - b2);
    a.eps = float(config_.eps);
    return a;
  }

  [[noreturn]] void throw_bad_grad(const Context& ctx, float inv_accum, std::int64_t t, double norm) const {
    for (const optim::Param& p : params_) {
      std::vector<float> g(p.size);
      QLORA_CUDA_CHECK(
          cudaMemcpyAsync(g.data(), p.grad, p.size * sizeof(float), cudaMemcpyDeviceToHost, ctx.stream()));
      ctx.synchronize();
      for (std::size_t i = 0; i < p.size; ++i)
        QLORA_CHECK(std::isfinite(g[i] * inv_accum), "cuda::AdamW step ", t, ": gradient norm is ", norm,
                    ": parameter '", p.name, "' has grad[", i, "] = ", g[i] * inv_accum,
                    ", expected a finite number");
    }
    throw_error("cuda::AdamW step ", t, ": gradient norm is ", norm, ", expected a finite number");
  }

  std::vector<float> moment(const Context& ctx, std::size_t k, std::size_t base) const {
    QLORA_CHECK(k < params_.size(), "cuda::AdamW: parameter ", k, " of ", params_.size());
    std::vector<float> h(params_[k].size);
    QLORA_CUDA_CHECK(cudaMemcpyAsync(h.data(), moments_.data() + base + offset_[k], h.size() * sizeof(float),
                                     cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
    return h;
  }

  std::vector<optim::Param> params_;
  optim::AdamWConfig config_;
  std::vector<std::size_t> offset_;  // (params) start of each parameter's moments
  std::size_t total_ = 0;            // elements over all parameters
  std::vector<detail::AdamWTile> tiles_host_;
  DeviceBuffer<detail::AdamWTile> tiles_;
  std::vector<detail::AdamWParamArgs> args_host_;  // kept alive for the asynchronous upload
  DeviceBuffer<detail::AdamWParamArgs> args_;
  DeviceBuffer<float> moments_;   // (2 · total): exp_avg of every parameter, then exp_avg_sq
  DeviceBuffer<double> partial_;  // (tiles) sums of squares
  std::vector<double> partial_host_;
  std::int64_t step_ = 0;
};

}  // namespace cuda
}  // namespace qlora
