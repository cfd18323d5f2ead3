#pragma once
// CUDA runtime and cuBLAS status codes turned into qlora::Error.
//
// Every call into the CUDA runtime or cuBLAS goes through QLORA_CUDA_CHECK / QLORA_CUBLAS_CHECK: a
// failure throws with the call as written, the library's own error name and string, and the place,
// e.g. "CUDA: cudaMalloc(&p, bytes) failed: cudaErrorMemoryAllocation (out of memory) at
// cuda/qlora/cuda/buffer.cuh:41". Kernel launches are followed by QLORA_CUDA_CHECK_LAUNCH(), which
// reads the launch error (a bad configuration); errors raised while a kernel runs surface at the
// next synchronizing call, which is checked too.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "qlora/core/error.hpp"

namespace qlora {
namespace cuda {

inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "unknown cuBLAS status";
  }
}

namespace detail {
[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  throw_error("CUDA: ", call, " failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ") at ", file, ":",
              line);
}
[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  throw_error("cuBLAS: ", call, " failed: ", cublas_status_name(s), " (", cublasGetStatusString(s), ") at ",
              file, ":", line);
}
}  // namespace detail

}  // namespace cuda
}  // namespace qlora

#define QLORA_CUDA_CHECK(call)                                                              \
  do {                                                                                      \
    const cudaError_t qlora_e_ = (call);                                                    \
    if (qlora_e_ != cudaSuccess) ::qlora::cuda::detail::throw_cuda(qlora_e_, #call, __FILE__, __LINE__); \
  } while (0)

#define QLORA_CUBLAS_CHECK(call)                                                                  \
  do {                                                                                            \
    const cublasStatus_t qlora_s_ = (call);                                                       \
    if (qlora_s_ != CUBLAS_STATUS_SUCCESS)                                                        \
      ::qlora::cuda::detail::throw_cublas(qlora_s_, #call, __FILE__, __LINE__);                   \
  } while (0)

// After a <<<...>>> launch: a bad launch configuration is reported here, naming the kernel.
#define QLORA_CUDA_CHECK_LAUNCH(kernel_name)                                                      \
  do {                                                                                            \
    const cudaError_t qlora_e_ = cudaGetLastError();                                              \
    if (qlora_e_ != cudaSuccess)                                                                  \
      ::qlora::cuda::detail::throw_cuda(qlora_e_, "launch of " kernel_name, __FILE__, __LINE__);  \
  } while (0)
