#pragma once
// detail::to_f32: a float or bf16 element widened to float (exact), for kernels templated on their
// input type. One definition, so that headers which both use it (the quantizers, the model's row
// kernels, rms_error) can meet in one translation unit.
#include <cuda_bf16.h>

namespace qlora {
namespace cuda {
namespace detail {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace detail
}  // namespace cuda
}  // namespace qlora
