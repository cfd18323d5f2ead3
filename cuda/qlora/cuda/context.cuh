#pragma once
// qlora::cuda::Context: the device, a stream, a cuBLAS handle and its workspace, owned together.
//
// There are no hidden globals: every launcher takes the Context it runs on, so a program can hold
// several (one per device or per stream). The context owns its stream (non-blocking, so it never
// serializes with the legacy default stream) and binds the cuBLAS handle and workspace to it. A
// Context is move-only; it is not thread-safe (one host thread drives one context at a time).
//
// device_count() never throws: it is what tests call to decide whether to skip.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <utility>

#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/error.cuh"

namespace qlora {
namespace cuda {

// Number of usable CUDA devices; 0 when there is no driver or no device (no exception).
inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

namespace detail {
// Reports whether the image of the device code loaded for the current device was compiled for
// sm_90a (Context's constructor asks once; the sm_90a kernels need wgmma / setmaxnreg).
template <int = 0>
__global__ void sm90a_probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}
}  // namespace detail

class Context {
 public:
  // 32 MiB: what cuBLAS recommends for Hopper's GEMM kernels.
  static constexpr std::size_t kDefaultWorkspace = std::size_t(32) << 20;

  explicit Context(int device = 0, std::size_t workspace_bytes = kDefaultWorkspace) : device_(device) {
    const int n = device_count();
    QLORA_CHECK(device >= 0 && device < n, "cuda::Context: device ", device, " requested, ", n,
                " CUDA device(s) present");
    QLORA_CUDA_CHECK(cudaSetDevice(device));
    QLORA_CUDA_CHECK(cudaGetDeviceProperties(&props_, device));
    QLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    try {
      QLORA_CUBLAS_CHECK(cublasCreate(&cublas_));
      QLORA_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
      workspace_ = DeviceBuffer<unsigned char>(workspace_bytes);
      QLORA_CUBLAS_CHECK(cublasSetWorkspace(cublas_, workspace_.data(), workspace_.bytes()));
      if (props_.major == 9 && props_.minor == 0) {  // an sm_90 GPU: is there sm_90a code for it?
        DeviceBuffer<int> flag(1);
        detail::sm90a_probe_kernel<<<1, 1, 0, stream_>>>(flag.data());
        QLORA_CUDA_CHECK_LAUNCH("sm90a_probe_kernel");
        sm90a_code_ = flag.to_host(stream_)[0] == 1;
      }
    } catch (...) {
      release();
      throw;
    }
  }
  ~Context() { release(); }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  Context(Context&& o) noexcept
      : device_(o.device_),
        props_(o.props_),
        stream_(std::exchange(o.stream_, nullptr)),
        cublas_(std::exchange(o.cublas_, nullptr)),
        workspace_(std::move(o.workspace_)),
        sm90a_code_(o.sm90a_code_) {}
  Context& operator=(Context&&) = delete;

  int device() const { return device_; }
  const cudaDeviceProp& props() const { return props_; }
  int sm_count() const { return props_.multiProcessorCount; }
  std::string name() const { return props_.name; }
  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }
  // Whether the device is sm_90 and this program carries sm_90a code for it (built with CUDA
  // architecture 90a; the Hopper-only kernels, e.g. gemm4bit_sm90.cuh, need it).
  bool sm90a_code() const { return sm90a_code_; }

  // Makes this context's device current for the calling thread (launchers call it first).
  void activate() const { QLORA_CUDA_CHECK(cudaSetDevice(device_)); }
  void synchronize() const { QLORA_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  void release() noexcept {
    if (cublas_) cublasDestroy(cublas_);
    if (stream_) cudaStreamDestroy(stream_);
    cublas_ = nullptr;
    stream_ = nullptr;
  }

  int device_ = 0;
  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  DeviceBuffer<unsigned char> workspace_;
  bool sm90a_code_ = false;
};

}  // namespace cuda
}  // namespace qlora
