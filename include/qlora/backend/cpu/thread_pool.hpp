#pragma once
// A persistent thread pool for the products, with the semantics of qlora::parallel_for.
//
// Why: parallel_for starts std::threads per call (20-50 us on an idle machine, far more on a busy
// one). A GEMV with an 11008x4096 4-bit weight takes ~1 ms, so a per-call start would cost a few
// percent of it, and a decoder layer runs seven of them back to back. The workers here are started
// once, spin briefly after a job (so back-to-back products start in about a microsecond), then
// sleep on a condition variable (so an idle process burns no CPU).
//
// pool_for(n, align, min_per_thread, f) splits [0, n) exactly as parallel_for does, over
// qlora::num_threads() threads (the caller runs one chunk). Only one product uses the pool at a
// time: a call made while the pool is busy (from another user thread, or nested inside a chunk)
// falls back to parallel_for, so it is always safe, merely slower.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "qlora/core/parallel.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QLORA_POOL_PAUSE() _mm_pause()
#else
#define QLORA_POOL_PAUSE() std::this_thread::yield()
#endif

namespace qlora {
namespace cpu {

class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool pool;
    return pool;
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  // Runs f(t) for t in [0, n): t = 0 on the calling thread, the rest on workers. Returns false
  // (running nothing) when the pool is busy with another call.
  bool try_run(int n, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(n - 1);
    errors_.assign(std::size_t(n), nullptr);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &f;
      job_threads_ = n;
      pending_.store(n - 1);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    run_one(f, 0);
    // spin a little, then yield: on a busy machine the worker may be waiting for this very core
    for (int i = 0; pending_.load(std::memory_order_acquire) != 0; ++i) {
      if (i < kSpin)
        QLORA_POOL_PAUSE();
      else
        std::this_thread::yield();
    }
    for (auto& e : errors_)
      if (e) std::rethrow_exception(e);
    return true;
  }

 private:
  static constexpr int kSpin = 2000;  // pause instructions: ~10-100 us depending on the core
  ThreadPool() = default;

  void run_one(const std::function<void(int)>& f, int t) {
    try {
      f(t);
    } catch (...) {
      errors_[std::size_t(t)] = std::current_exception();
    }
  }

  void grow(int workers) {
    while (int(workers_.size()) < workers) {
      // the worker waits for the job after the current generation (generation_ cannot move here:
      // the caller holds run_mu_)
      const int id = int(workers_.size()) + 1;
      const std::uint64_t now = generation_.load();
      workers_.emplace_back([this, id, now] { worker(id, now); });
    }
  }

  void worker(int id, std::uint64_t seen) {
    for (;;) {
      // spin ~50 us for the next job, then sleep
      for (int i = 0; i < 20000 && generation_.load(std::memory_order_relaxed) == seen; ++i)
        QLORA_POOL_PAUSE();
      const std::function<void(int)>* job;
      int threads;
      {
        // the job is read under the lock together with its generation: a worker that wakes late
        // sees the newest job, never a mix of two
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load() != seen; });
        if (stop_) return;
        seen = generation_.load();
        job = job_;
        threads = job_threads_;
      }
      if (id < threads) {
        run_one(*job, id);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex run_mu_;  // one call at a time
  std::mutex mu_;      // guards the sleep / wake-up
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int)>* job_ = nullptr;
  int job_threads_ = 0;
  bool stop_ = false;
  std::vector<std::exception_ptr> errors_;
};

// parallel_for on the pool: f(begin, end) over disjoint chunks of [0, n), boundaries multiples of
// align, at most one chunk per thread, at least min_per_thread items per chunk.
template <class F>
void pool_for(std::size_t n, std::size_t align, std::size_t min_per_thread, F&& f) {
  if (n == 0) return;
  const ChunkPlan plan = plan_chunks(n, align, min_per_thread);
  if (plan.threads <= 1) {
    f(std::size_t(0), n);
    return;
  }
  const std::function<void(int)> chunk = [&](int t) {
    const std::size_t b = plan.begin(std::size_t(t)), e = plan.end(std::size_t(t));
    if (b < e) f(b, e);
  };
  if (!ThreadPool::instance().try_run(int(plan.threads), chunk)) parallel_for(n, align, min_per_thread, f);
}

}  // namespace cpu
}  // namespace qlora
