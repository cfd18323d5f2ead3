#pragma once
// Matmul4Chain: a sequence of large-M 4-bit products (a model's layers, one weight after another),
// y = x · Wᵀ each, where the dequantization of the NEXT weight runs on a side stream on a few SMs
// while cuBLAS multiplies with the current one, told to leave those SMs free
// (cublasSetSmCountTarget).
//
// Why: above the sm90 window matmul_4bit dequantizes W into a bf16 scratch, then calls cuBLAS. On an
// H100 at 14336x4096, M = 4096, dequantizing costs 60 µs of a 673 µs product: 1.09x cuBLAS bf16 for
// an isolated product (docs/performance.md). A product cannot overlap its own dequantization (it
// needs all of W), and a cuBLAS GEMM fills every SM, so a dequantizer on a second stream found no
// room (measured: sliced products ran 1.26-1.32x). With k SMs carved out of the product, the product
// loses k / sm_count of the tensor cores and the next weight's dequantization costs nothing more, if
// k SMs write the N·K bf16 values in the product's time.
//
//   Matmul4Chain chain(ctx);                     // the side stream, two scratches, a carved handle
//   chain.matmul(w1, x1, M, y1, &w2);            // y1 = x1·W1ᵀ; W2 dequantizes meanwhile
//   chain.matmul(w2, x2, M, y2, &w3);            // uses W2's prefetched copy
//   chain.matmul(w3, x3, M, y3);                 // nothing next
//   chain.finish();                              // the side stream joins ctx's (before a graph capture
//                                                // begins or ends, and before launching its graph)
//
// Results: each product is cuBLAS on dequantize_4bit's values; the carved handle may choose another
// cuBLAS kernel than ctx's, so y can differ from matmul_4bit's in the last bf16 bit.
// Products that matmul_4bit would not take through dequantize + cuBLAS (GEMV and sm90 window) go to
// matmul_4bit and prefetch nothing: the side dequantizer would take SMs those kernels use.
// The weight named as `next` must stay alive, unchanged, until the call that uses it (or finish());
// the Context must outlive the chain.
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <utility>

#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/dequantize4bit.cuh"
#include "qlora/cuda/gemm_bf16.cuh"
#include "qlora/cuda/matmul4bit.cuh"
#include "qlora/cuda/quantized4bit.cuh"

namespace qlora {
namespace cuda {

// SMs given to the side dequantizer by default. On an H100 at M = 4096 a cuBLAS bf16 product planned
// for 128 SMs ran at its full-GPU time (1.006x at 14336x4096: 1792 tiles of 128x256 take 14 waves
// on 128 SMs as on 132; 8 SMs cost 1-12%), and the side kernel must write N·K bf16 in the product's
// time: ~55 GB/s per SM on 4 SMs at 14336x4096. The first side kernel moved 30 GB/s per SM
// (docs/performance.md, "Twelfth session").
constexpr int kChainSideSms = 4;

class Matmul4Chain {
 public:
  // side_sms: SMs for the dequantizer of the next weight (the product targets the rest); clusters:
  // dequantize_4bit_on_sms's launch (false: single blocks even for an even count, a lab comparison).
  explicit Matmul4Chain(const Context& ctx, int side_sms = kChainSideSms, bool clusters = true)
      : ctx_(&ctx), side_sms_(side_sms), clusters_(clusters) {
    QLORA_CHECK(side_sms >= 1 && side_sms < ctx.sm_count(), "cuda::Matmul4Chain: ", side_sms,
                " side SMs asked for, expected 1 to ", ctx.sm_count() - 1);
    ctx.activate();
    int lo = 0, hi = 0;
    QLORA_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    try {
      QLORA_CUDA_CHECK(cudaStreamCreateWithPriority(&side_, cudaStreamNonBlocking, hi));
      for (int i = 0; i < 2; ++i) {
        QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&free_[i], cudaEventDisableTiming));
        QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&ready_[i], cudaEventDisableTiming));
      }
      QLORA_CUBLAS_CHECK(cublasCreate(&carved_));
      QLORA_CUBLAS_CHECK(cublasSetStream(carved_, ctx.stream()));
      workspace_ = DeviceBuffer<unsigned char>(Context::kDefaultWorkspace);
      QLORA_CUBLAS_CHECK(cublasSetWorkspace(carved_, workspace_.data(), workspace_.bytes()));
      QLORA_CUBLAS_CHECK(cublasSetSmCountTarget(carved_, ctx.sm_count() - side_sms));
    } catch (...) {
      release();
      throw;
    }
  }
  ~Matmul4Chain() {
    if (side_) cudaStreamSynchronize(side_);  // a pending prefetch still writes a scratch
    release();
  }
  Matmul4Chain(const Matmul4Chain&) = delete;
  Matmul4Chain& operator=(const Matmul4Chain&) = delete;

  int side_sms() const { return side_sms_; }

  // y (M, N) = x (M, K) · Wᵀ (+ y with accumulate); then, if `next` is given (in the tiles layout) and
  // this product goes through dequantize + cuBLAS, dequantizes *next on the side while cuBLAS
  // multiplies. A `next` the side dequantizer cannot take throws before anything is enqueued.
  void matmul(const DeviceQuantized4bit& w, const __nv_bfloat16* x, int M, __nv_bfloat16* y,
              const DeviceQuantized4bit* next = nullptr, bool accumulate = false) {
    QLORA_CHECK(w.shape.size() == 2, "cuda::Matmul4Chain: weight has ", w.shape.size(),
                " dimensions, expected 2");
    const Context& ctx = *ctx_;
    ctx.activate();
    const unsigned long long capture = capture_id();
    check_capture("matmul", capture);
    if (matmul_4bit_path(ctx, w, x, M, y) != Matmul4Path::DequantCublas) {
      join_pending();
      return matmul_4bit(ctx, w, x, M, y, scratch_[slot_], accumulate);
    }
    const bool prefetch = next && next->shape.size() == 2 && next->layout == Packed4Layout::Tiles;
    if (prefetch) check_dequantize_4bit_on_sms(ctx, *next, side_sms_);
    const int N = int(w.shape[0]), K = int(w.shape[1]);
    const std::size_t need = std::max<std::size_t>(w.numel(), prefetch ? next->numel() : 0);
    if (pending_ == &w && pending_packed_ == w.packed.data()) {  // prefetched by the call before
      QLORA_CUDA_CHECK(cudaStreamWaitEvent(ctx.stream(), ready_[slot_], 0));
      pending_ = nullptr;
      ++prefetches_used_;
      reserve(need, capture, true);
    } else {
      join_pending();
      reserve(need, capture, false);
      dequantize_4bit(ctx, w, scratch_[slot_].data());
    }
    const __nv_bfloat16* wd = scratch_[slot_].data();
    if (!prefetch) return gemm_bf16(ctx, x, M, K, wd, N, y, accumulate ? 1.0f : 0.0f);
    const int nxt = 1 - slot_;
    // scratch_[nxt] was last read by a product enqueued on ctx's stream before this point
    QLORA_CUDA_CHECK(cudaEventRecord(free_[nxt], ctx.stream()));
    QLORA_CUDA_CHECK(cudaStreamWaitEvent(side_, free_[nxt], 0));
    dequantize_4bit_on_sms(ctx, *next, scratch_[nxt].data(), side_sms_, side_, clusters_);
    QLORA_CUDA_CHECK(cudaEventRecord(ready_[nxt], side_));
    // the state first: if the product below throws, the chain still knows where the prefetch went
    slot_ = nxt;
    pending_ = next;
    pending_packed_ = next->packed.data();
    pending_capture_ = capture;
    gemm_bf16_on(carved_, x, M, K, wd, N, y, accumulate ? 1.0f : 0.0f);
  }

  // ctx's stream waits for the side stream (a prefetch nobody used is dropped). Call it before
  // cudaStreamBeginCapture and cudaStreamEndCapture, before launching a graph captured from this chain
  // (the graph writes both scratches), and before the weight named as `next` is freed or changed.
  // A graph captured from the chain holds its scratches and cuBLAS workspace: replay it only while the
  // chain lives and its scratches have not grown (run the same calls once before capturing).
  void finish() {
    check_capture("finish", capture_id());
    join_pending();
  }

  // Products that used a weight dequantized on the side during the product before (host calls, a
  // capture's included).
  long long prefetches_used() const { return prefetches_used_; }

 private:
  // The id of the graph capture ctx's stream is in, 0 when it is in none.
  unsigned long long capture_id() const {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    unsigned long long id = 0;
    QLORA_CUDA_CHECK(cudaStreamGetCaptureInfo(ctx_->stream(), &st, &id));
    return st == cudaStreamCaptureStatusActive ? id : 0;
  }
  // A pending prefetch belongs to the capture (or the absence of one) it was issued in: waiting on it
  // from another is invalid in CUDA and would leave the graph without that weight's dequantization.
  void check_capture(const char* who, unsigned long long capture) const {
    QLORA_CHECK(!pending_ || pending_capture_ == capture, "cuda::Matmul4Chain::", who, ": a prefetch issued ",
                pending_capture_ ? "inside a graph capture" : "outside a graph capture",
                " is pending in a call made ", capture ? "inside a graph capture" : "outside one",
                "; call finish() before cudaStreamBeginCapture, before cudaStreamEndCapture and before "
                "launching a graph captured from this chain");
  }
  // ctx's stream waits for the last prefetch, so its scratch may be reused or dropped.
  void join_pending() {
    if (pending_) QLORA_CUDA_CHECK(cudaStreamWaitEvent(ctx_->stream(), ready_[slot_], 0));
    pending_ = nullptr;
  }
  // Both scratches hold at least n values (the same size, so that which of the two a call uses does
  // not decide whether it must grow); keep: the current one's values move to its new buffer (a
  // prefetched weight). Growing waits for both streams, since the old buffers may still be read or
  // written, so it cannot happen inside a graph capture.
  void reserve(std::size_t n, unsigned long long capture, bool keep) {
    if (scratch_[0].size() >= n && scratch_[1].size() >= n) return;
    QLORA_CHECK(capture == 0, "cuda::Matmul4Chain: its scratch must grow to ", n,
                " values inside a graph capture (it holds ", scratch_[0].size(),
                "); run the same calls once before capturing them");
    QLORA_CUDA_CHECK(cudaStreamSynchronize(side_));
    QLORA_CUDA_CHECK(cudaStreamSynchronize(ctx_->stream()));
    for (int i = 0; i < 2; ++i) {
      DeviceBuffer<__nv_bfloat16> b(n);
      if (keep && i == slot_ && scratch_[i].size()) {
        QLORA_CUDA_CHECK(cudaMemcpyAsync(b.data(), scratch_[i].data(), scratch_[i].bytes(),
                                         cudaMemcpyDeviceToDevice, ctx_->stream()));
        QLORA_CUDA_CHECK(cudaStreamSynchronize(ctx_->stream()));
      }
      scratch_[i] = std::move(b);
    }
  }
  void release() noexcept {
    if (carved_) cublasDestroy(carved_);
    for (int i = 0; i < 2; ++i) {
      if (free_[i]) cudaEventDestroy(free_[i]);
      if (ready_[i]) cudaEventDestroy(ready_[i]);
      free_[i] = ready_[i] = nullptr;
    }
    if (side_) cudaStreamDestroy(side_);
    carved_ = nullptr;
    side_ = nullptr;
  }

  const Context* ctx_;
  int side_sms_;
  bool clusters_;
  cudaStream_t side_ = nullptr;
  cublasHandle_t carved_ = nullptr;
  cudaEvent_t free_[2] = {nullptr, nullptr}, ready_[2] = {nullptr, nullptr};
  DeviceBuffer<unsigned char> workspace_;
  DeviceBuffer<__nv_bfloat16> scratch_[2];
  int slot_ = 0;  // the scratch the next product reads
  const DeviceQuantized4bit* pending_ =
      nullptr;  // the weight prefetched into scratch_[slot_], not yet joined
  const std::uint8_t* pending_packed_ = nullptr;
  unsigned long long pending_capture_ = 0;  // the capture that prefetch was issued in (0: none)
  long long prefetches_used_ = 0;
};

}  // namespace cuda
}  // namespace qlora
