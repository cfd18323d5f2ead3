#pragma once
// LoraLinear<Quant, Rank, Backend>: a frozen base weight W0 plus a trainable low-rank update,
//   y = W0·x + bias + s·B·A·dropout(x)          (the math and its backward: lora/reference.hpp)
//
//   Quant    the base weight's format: format::F32, BF16, NF4, FP4, Int8 (lora/base_weight.hpp)
//   Rank     the rank r as a compile-time constant (A and B get fixed-size rows), or Dynamic
//   Backend  Cpu (backend/cpu/lora_linear.hpp) or Cuda (cuda/qlora/cuda/lora_linear.cuh, nvcc only:
//            the tag is declared here so both backends name it alike; without the CUDA header the
//            primary template below refuses it)
//
// The primary template only refuses: each backend is one specialization, selected by type.
#include "qlora/lora/base_weight.hpp"
#include "qlora/lora/config.hpp"

namespace qlora {

// Backend policies.
struct Cpu {};
struct Cuda {};

template <class Quant, int Rank, class Backend>
class LoraLinear {
  static_assert(sizeof(Backend) == 0,
                "LoraLinear: no specialization for this Backend (include its header, "
                "e.g. qlora/backend/cpu/lora_linear.hpp for Cpu)");
};

// What merging into a quantized (or bf16) base cost: the RMS of the difference between the
// requantized weight and the exact merged one (0 for an fp32 base).
struct MergeReport {
  double requantization_rmse = 0;  // || Q(W0 + s·B·A) - (W0 + s·B·A) ||_rms
};

}  // namespace qlora
