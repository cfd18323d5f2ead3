#pragma once
// DeviceBuffer<T>: an owned, move-only array in device memory (cudaMalloc / cudaFree).
//
// Ownership is the only thing it adds: it never synchronizes, and its copies are explicit calls on a
// stream the caller names. Kernels take plain pointers (data()) and sizes, never the buffer.
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <utility>
#include <vector>

#include "qlora/cuda/error.cuh"

namespace qlora {
namespace cuda {

// Bytes held by all DeviceBuffers of the process, now and at most since the last reset: what
// torch.cuda.memory_allocated / max_memory_allocated report for PyTorch (the CUDA context and
// cuBLAS's own allocations are not in it; cudaMemGetInfo sees those). Process-wide on purpose:
// it is a statistic, not state any computation depends on.
namespace detail {
struct DeviceBytes {
  std::atomic<std::size_t> live{0}, peak{0};
  void add(std::size_t n) {
    const std::size_t now = live.fetch_add(n) + n;
    std::size_t p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
  }
  void sub(std::size_t n) { live.fetch_sub(n); }
};
inline DeviceBytes& device_bytes() {
  static DeviceBytes b;
  return b;
}
}  // namespace detail
inline std::size_t device_bytes_live() { return detail::device_bytes().live.load(); }
inline std::size_t device_bytes_peak() { return detail::device_bytes().peak.load(); }
inline void reset_device_bytes_peak() {
  detail::device_bytes().peak.store(detail::device_bytes().live.load());
}

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (n > 0) {
      QLORA_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)));
      detail::device_bytes().add(n * sizeof(T));
    }
  }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
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
  void release() noexcept {
    if (!p_) return;
    cudaFree(p_);  // a failing free in a destructor cannot be reported; it leaks nothing more
    detail::device_bytes().sub(n_ * sizeof(T));
    p_ = nullptr;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace cuda
}  // namespace qlora
