#pragma once
// Hopper's asynchronous copies into shared memory and the mbarriers that track them, as thin PTX
// wrappers (sm_90; the callers guard with __CUDA_ARCH__ >= 900).
//
// A transaction barrier (mbarrier) in shared memory completes a phase when its pending arrivals
// reach zero AND the bytes it was told to expect (expect_tx) have all landed. A producer thread
// arrives with expect_tx(bytes) and starts bulk copies (the copy engine, one instruction per
// contiguous range, no registers held while the bytes travel) that signal the same barrier;
// consumers wait on the phase's parity. Plain cp.async copies (4/8/16 bytes) can join the same
// phase through cp_async_arrive, which adds a pending arrival that fires when the thread's earlier
// cp.async copies have landed. Also the L2 prefetch hints (a line, or a bulk range on the copy
// engine).
#include <cstdint>

namespace qlora {
namespace cuda {
namespace detail {

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(std::uint64_t* bar, std::uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Makes the barriers' initialisation visible to the copy engine (then __syncthreads for the CTA).
__device__ __forceinline__ void mbar_fence_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// Spins until the phase of parity `parity` has completed. A fresh barrier is in phase 0, so
// waiting for parity 1 returns at once: the convention that lets a producer treat every slot of a
// ring as free before its first use.
__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, std::uint32_t parity) {
  std::uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, "
        "p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// Whether the phase of the given parity has completed, without waiting (a thread that has other work
// to do while it waits polls this).
__device__ __forceinline__ bool mbar_test(std::uint64_t* bar, std::uint32_t parity) {
  std::uint32_t done = 0;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, "
      "p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// mbar_wait for a warp that runs far ahead of the phase it waits for (a producer of a deep ring): it
// sleeps between tries, so that its spinning does not take issue slots from the warps it shares a
// scheduler with.
__device__ __forceinline__ void mbar_wait_sleep(std::uint64_t* bar, std::uint32_t parity) {
  while (!mbar_test(bar, parity)) __nanosleep(100);
}

__device__ __forceinline__ void mbar_arrive(std::uint64_t* bar) {
  asm volatile(
      "{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(smem_addr(bar))
      : "memory");
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_arrive_expect_tx(std::uint64_t* bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared memory on
// the copy engine; completion is counted on `bar`.
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, std::uint32_t bytes,
                                              std::uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
#endif

// A hint that the 128-byte line at p be brought into L2 (no fault, no result; may be dropped).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// bytes (a multiple of 16) at the 16-byte aligned p brought into L2 by the copy engine (sm_90).
__device__ __forceinline__ void bulk_prefetch_l2(const void* p, std::uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
  for (std::uint32_t o = 0; o < bytes; o += 128) prefetch_l2(static_cast<const char*>(p) + o);
#endif
}

// A 4-byte cp.async (both addresses 4-byte aligned).
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}

// One more pending arrival on `bar`, triggered when this thread's earlier cp.async copies land.
__device__ __forceinline__ void cp_async_arrive(std::uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Synchronizes the `threads` threads (a multiple of 32) that use named barrier `id` (1..15; 0 is
// __syncthreads'), so a subset of warps can meet without the others.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace detail
}  // namespace cuda
}  // namespace qlora
