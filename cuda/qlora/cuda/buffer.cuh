#pragma once
// DeviceBuffer<T>: an owned, move-only array in device memory (cudaMalloc / cudaFree).
//
// Ownership is the only thing it adds: it never synchronizes, and its copies are explicit calls on a
// stream the caller names. Kernels take plain pointers (data()) and sizes, never the buffer.
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>
#include <vector>

#include "qlora/cuda/error.cuh"

namespace qlora {
namespace cuda {

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (n > 0) QLORA_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)));
  }
  ~DeviceBuffer() {
    if (p_) cudaFree(p_);  // a failing free in a destructor cannot be reported; it leaks nothing more
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (p_) cudaFree(p_);
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }

  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }
  std::size_t bytes() const { return n_ * sizeof(T); }
  bool empty() const { return n_ == 0; }

  // Asynchronous on `stream`; the host memory must stay alive until the stream reaches the copy.
  void upload(const T* host, std::size_t n, cudaStream_t stream) {
    QLORA_CHECK(n <= n_, "DeviceBuffer::upload: ", n, " elements into a buffer of ", n_);
    if (n) QLORA_CUDA_CHECK(cudaMemcpyAsync(p_, host, n * sizeof(T), cudaMemcpyHostToDevice, stream));
  }
  void download(T* host, std::size_t n, cudaStream_t stream) const {
    QLORA_CHECK(n <= n_, "DeviceBuffer::download: ", n, " elements from a buffer of ", n_);
    if (n) QLORA_CUDA_CHECK(cudaMemcpyAsync(host, p_, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
  }
  // Blocking helpers for tests and setup code.
  static DeviceBuffer from_host(const std::vector<T>& v, cudaStream_t stream) {
    DeviceBuffer b(v.size());
    b.upload(v.data(), v.size(), stream);
    QLORA_CUDA_CHECK(cudaStreamSynchronize(stream));
    return b;
  }
  std::vector<T> to_host(cudaStream_t stream) const {
    std::vector<T> v(n_);
    download(v.data(), n_, stream);
    QLORA_CUDA_CHECK(cudaStreamSynchronize(stream));
    return v;
  }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace cuda
}  // namespace qlora
