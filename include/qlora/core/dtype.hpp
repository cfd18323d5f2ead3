#pragma once
// Element types that cross file boundaries (safetensors dtypes) and their sizes.
#include <cstddef>
#include <cstdint>
#include <string>

#include "qlora/core/error.hpp"

namespace qlora {

enum class DType : std::uint8_t { F32, F16, BF16, U8, I8, I32, I64, F64, BOOL, I16, U16, U32, U64 };

inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64:
    case DType::I64:
    case DType::U64: return 8;
    case DType::F32:
    case DType::I32:
    case DType::U32: return 4;
    case DType::F16:
    case DType::BF16:
    case DType::I16:
    case DType::U16: return 2;
    case DType::U8:
    case DType::I8:
    case DType::BOOL: return 1;
  }
  return 0;
}

// The safetensors spelling ("F32", "BF16", ...).
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::U8: return "U8";
    case DType::I8: return "I8";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::F64: return "F64";
    case DType::BOOL: return "BOOL";
    case DType::I16: return "I16";
    case DType::U16: return "U16";
    case DType::U32: return "U32";
    case DType::U64: return "U64";
  }
  return "?";
}

inline bool dtype_from_name(const std::string& s, DType& out) {
  static const DType all[] = {DType::F32, DType::F16, DType::BF16, DType::U8,   DType::I8,
                              DType::I32, DType::I64, DType::F64,  DType::BOOL, DType::I16,
                              DType::U16, DType::U32, DType::U64};
  for (DType t : all)
    if (s == dtype_name(t)) {
      out = t;
      return true;
    }
  return false;
}

inline bool dtype_is_float(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64;
}

}  // namespace qlora
