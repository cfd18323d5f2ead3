#pragma once
// qlora: LoRA / QLoRA fine-tuning in C++ (header-only). This umbrella header includes the whole
// plain-C++ library; CUDA headers live under cuda/ and are included only by nvcc translation units.
//
//   core/   errors, dtypes, bf16/fp16, threading
//   quant/  bitsandbytes-compatible quantizers: NF4/FP4 (+ double quant), 8-bit blockwise, int8 rows
//   io/     safetensors, Hugging Face folders, the bitsandbytes checkpoint layout, quantize_model
//   lora/   the LoRA layer's config, base formats, reference math (backends: backend/<name>/)
//   optim/  AdamW (+ LoRA+, clipping, schedules, state files)
//   text/   tokenizers: raw bytes, byte-level BPE from tokenizer.json
// The CPU backend (backend/cpu/) and the Llama model built on it (model/) are included separately:
//   #include "qlora/model/llama.hpp"   (brings backend/cpu/lora_linear.hpp)
#include "qlora/core/dtype.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/finite.hpp"
#include "qlora/core/half.hpp"
#include "qlora/core/parallel.hpp"
#include "qlora/io/atomic_dir.hpp"
#include "qlora/io/atomic_file.hpp"
#include "qlora/io/bnb_checkpoint.hpp"
#include "qlora/io/hf_model.hpp"
#include "qlora/io/peft_adapter.hpp"
#include "qlora/io/quantize_model.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/lora/adapter.hpp"
#include "qlora/lora/base_weight.hpp"
#include "qlora/lora/config.hpp"
#include "qlora/lora/lora_linear.hpp"
#include "qlora/lora/random.hpp"
#include "qlora/lora/reference.hpp"
#include "qlora/optim/adamw.hpp"
#include "qlora/optim/schedule.hpp"
#include "qlora/quant/blockwise4bit.hpp"
#include "qlora/quant/blockwise8bit.hpp"
#include "qlora/quant/codebooks.hpp"
#include "qlora/quant/rowwise_int8.hpp"
#include "qlora/text/tokenizer.hpp"
