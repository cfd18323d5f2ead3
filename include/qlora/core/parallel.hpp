#pragma once
// parallel_for: split [0, n) into contiguous chunks over a fixed number of threads.
//
// Threads are std::threads started per call: the quantizers and converters that use this run for
// milliseconds on real tensors, where a thread start (~20 us) is noise. The thread count comes from
// set_num_threads(), else the QLORA_NUM_THREADS environment variable, else the hardware count.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <exception>
#include <thread>
#include <vector>

namespace qlora {

namespace detail {
inline std::atomic<int>& thread_setting() {
  static std::atomic<int> n{0};
  return n;
}
}  // namespace detail

inline void set_num_threads(int n) { detail::thread_setting() = n; }

inline int num_threads() {
  int n = detail::thread_setting();
  if (n > 0) return n;
  if (const char* env = std::getenv("QLORA_NUM_THREADS")) {
    n = std::atoi(env);
    if (n > 0) return n;
  }
  n = int(std::thread::hardware_concurrency());
  return n > 0 ? n : 1;
}

// How [0, n) is cut: `threads` chunks of `per * align` items (the last shorter), chunk boundaries on
// multiples of `align`, at most num_threads() chunks and at least `min_per_thread` items per chunk.
// Shared by parallel_for and the CPU backend's thread pool, so both split work identically.
struct ChunkPlan {
  std::size_t n = 0, align = 1, threads = 1, per = 0;
  std::size_t begin(std::size_t t) const { return std::min(n, t * per * align); }
  std::size_t end(std::size_t t) const { return std::min(n, (t + 1) * per * align); }
};

inline ChunkPlan plan_chunks(std::size_t n, std::size_t align, std::size_t min_per_thread) {
  ChunkPlan p;
  p.n = n;
  p.align = std::max<std::size_t>(align, 1);
  const std::size_t units = (n + p.align - 1) / p.align;
  std::size_t threads = std::size_t(num_threads());
  threads = std::min(threads, std::max<std::size_t>(1, n / std::max<std::size_t>(min_per_thread, 1)));
  p.threads = std::max<std::size_t>(1, std::min(threads, units));
  p.per = units ? (units + p.threads - 1) / p.threads : 0;
  return p;
}

// Calls f(begin, end) on disjoint chunks covering [0, n) (see ChunkPlan). The first exception thrown
// by any chunk is rethrown in the caller after all threads joined.
template <class F>
void parallel_for(std::size_t n, std::size_t align, std::size_t min_per_thread, F&& f) {
  if (n == 0) return;
  const ChunkPlan plan = plan_chunks(n, align, min_per_thread);
  if (plan.threads <= 1) {
    f(std::size_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(plan.threads);
  for (std::size_t t = 0; t < plan.threads; ++t) {
    const std::size_t b = plan.begin(t), e = plan.end(t);
    if (b >= e) break;
    auto run = [&, t, b, e] {
      try {
        f(b, e);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    };
    if (t + 1 == plan.threads || e >= n)
      run();  // the calling thread takes the last chunk
    else
      pool.emplace_back(run);
  }
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace qlora
