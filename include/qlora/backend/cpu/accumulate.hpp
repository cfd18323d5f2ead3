#pragma once
// Accumulate: whether a product overwrites its output (y = ...) or adds to it (y += ...).
//
// An enum, never a bool, so a call site says which it means: a LoRA layer writes the base product
// into y and then adds the adapter's, and its backward adds the base weight's dx to the adapter's.

namespace qlora {
namespace cpu {

enum class Accumulate : bool { No, Yes };

}  // namespace cpu
}  // namespace qlora
