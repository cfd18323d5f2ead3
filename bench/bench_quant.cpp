// Throughput of the CPU quantizers and dequantizers (fast paths, plus the scalar reference for the
// speedup ratio), against a memcpy of the same fp32 tensor as the memory-bandwidth baseline.
//
// Bytes per iteration (what the GB/s column means): the bytes a kernel must read from its input plus
// the bytes it writes to its output, each counted once:
//   quantize:   numel * 4 (fp32 in) + packed codes + absmax storage (fp32, or the nested 8-bit
//               codes + absmax2 with double quant) written;
//   dequantize: packed codes + absmax storage read + numel * sizeof(out type) written;
//   memcpy:     numel * 4 read + numel * 4 written.
// Extra passes a kernel makes over its input (the NaN/inf check, the per-block absmax) are not
// counted, so a kernel that needs them shows a lower rate than a single-pass one would.
//
// Threads: the quantizers use parallel_for, so the thread count is QLORA_NUM_THREADS (else every
// core); run with QLORA_NUM_THREADS=1 for single-thread numbers. Times are wall clock (UseRealTime),
// since CPU time would add up the threads. The ref/ benchmarks are single-threaded by construction.
//
// Run: ./build/bench/bench_quant --benchmark_min_time=0.2 --benchmark_repetitions=5 [--benchmark_filter=...]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "bench_util.hpp"
#include "qlora/core/half.hpp"
#include "qlora/core/parallel.hpp"
#include "qlora/quant/blockwise4bit.hpp"
#include "qlora/quant/blockwise8bit.hpp"
#include "qlora/quant/rowwise_int8.hpp"

namespace {

using qlora::bf16;
using qlora::fp16;
namespace quant = qlora::quant;

struct Shape {
  std::int64_t rows, cols;
  std::size_t numel() const { return std::size_t(rows) * std::size_t(cols); }
  std::string name() const { return std::to_string(rows) + "x" + std::to_string(cols); }
};

// N(0, 0.02) weights, generated once per shape (the 11008x4096 one is 180 MB).
const std::vector<float>& weights(const Shape& s) {
  static std::map<std::size_t, std::vector<float>> cache;
  auto& w = cache[s.numel()];
  if (w.empty()) w = benchutil::gaussian(std::size_t(s.numel()), 42, 0.02f);
  return w;
}

std::size_t absmax_bytes(const quant::Quantized4bit& q) {
  if (!q.double_quant) return q.absmax.size() * sizeof(float);
  return q.nested.codes.size() + q.nested.absmax.size() * sizeof(float) + sizeof(float);  // + offset
}
std::size_t stored_bytes(const quant::Quantized4bit& q) { return q.packed.size() + absmax_bytes(q); }
std::size_t stored_bytes(const quant::Blockwise8& q) {
  return q.codes.size() + q.absmax.size() * sizeof(float);
}
std::size_t stored_bytes(const quant::RowwiseInt8& q) { return q.q.size() + q.scb.size() * sizeof(float); }

template <class Out>
const char* out_name();
template <>
const char* out_name<float>() {
  return "f32";
}
template <>
const char* out_name<bf16>() {
  return "bf16";
}
template <>
const char* out_name<fp16>() {
  return "f16";
}

using benchutil::reg;

// --- quantize / dequantize pairs ------------------------------------------------------------------
// Registers quantize/<tail> and dequantize/<tail>/{f32,bf16,f16} for one format; quantize(w) makes the
// quantized object from the fp32 weights, and data_of(q) names a buffer the optimizer must keep.
template <class Quantize, class DataOf>
void register_pair(const std::string& tail, const Shape& s, Quantize quantize, DataOf data_of) {
  reg("quantize/" + tail, [=](benchmark::State& st) {
    const auto& w = weights(s);
    std::size_t out_bytes = 0;
    for (auto _ : st) {
      auto q = quantize(w);
      out_bytes = stored_bytes(q);
      benchmark::DoNotOptimize(data_of(q));
    }
    st.SetBytesProcessed(std::int64_t(st.iterations()) * std::int64_t(s.numel() * 4 + out_bytes));
  });
  auto deq = [=](auto tag) {
    using Out = decltype(tag);
    reg("dequantize/" + tail + "/" + out_name<Out>(), [=](benchmark::State& st) {
      const auto q = quantize(weights(s));
      std::vector<Out> out(s.numel());  // allocated (and faulted in) once, outside the timed loop
      for (auto _ : st) {
        quant::dequantize(q, out.data());
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
      }
      st.SetBytesProcessed(std::int64_t(st.iterations()) *
                           std::int64_t(stored_bytes(q) + s.numel() * sizeof(Out)));
    });
  };
  deq(float{});
  deq(bf16{});
  deq(fp16{});
}

void register_4bit(quant::Quant4Type type, bool dq, int bs, const Shape& s) {
  const std::string fmt = std::string(quant::quant4_name(type)) + (dq ? "_dq" : "");
  const quant::Quant4Config cfg{type, bs, dq};
  register_pair(
      fmt + "/bs" + std::to_string(bs) + "/" + s.name(), s,
      [=](const std::vector<float>& w) {
        return quant::quantize_4bit(w.data(), {s.rows, s.cols}, cfg);
      },
      [](const quant::Quantized4bit& q) { return q.packed.data(); });
}

void register_8bit(int bs, const Shape& s) {
  register_pair(
      "blockwise8/bs" + std::to_string(bs) + "/" + s.name(), s,
      [=](const std::vector<float>& w) { return quant::quantize_blockwise8(w.data(), w.size(), bs); },
      [](const quant::Blockwise8& q) { return q.codes.data(); });
}

void register_rowwise(const Shape& s) {
  register_pair(
      "rowwise_int8/" + s.name(), s,
      [=](const std::vector<float>& w) { return quant::quantize_rowwise_int8(w.data(), s.rows, s.cols); },
      [](const quant::RowwiseInt8& q) { return q.q.data(); });
}

// The scalar reference (single thread), for the fast path's speedup.
void register_4bit_ref(quant::Quant4Type type, int bs, const Shape& s) {
  const std::string tail =
      std::string(quant::quant4_name(type)) + "/bs" + std::to_string(bs) + "/" + s.name();
  reg("ref/quantize/" + tail, [=](benchmark::State& st) {
    const auto& w = weights(s);
    const std::size_t n = s.numel(), blocks = quant::num_blocks(n, bs);
    std::vector<std::uint8_t> packed((n + 1) / 2);
    std::vector<float> absmax(blocks);
    for (auto _ : st) {
      quant::ref::quantize_4bit(w.data(), n, type, bs, packed.data(), absmax.data());
      benchmark::DoNotOptimize(packed.data());
      benchmark::ClobberMemory();
    }
    st.SetBytesProcessed(std::int64_t(st.iterations()) * std::int64_t(n * 4 + packed.size() + blocks * 4));
  });
  reg("ref/dequantize/" + tail + "/f32", [=](benchmark::State& st) {
    const std::size_t n = s.numel();
    const auto q = quant::quantize_4bit(weights(s).data(), {s.rows, s.cols}, {type, bs, false});
    const auto table = quant::decode_table(q);
    std::vector<float> out(n);
    for (auto _ : st) {
      quant::ref::dequantize_4bit(q.packed.data(), q.absmax.data(), n, table, bs, out.data());
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
    st.SetBytesProcessed(std::int64_t(st.iterations()) * std::int64_t(stored_bytes(q) + n * 4));
  });
}

// --- bandwidth baseline ----------------------------------------------------------------------------
// memcpy: one thread, as glibc does it. memcpy_mt: the same copy split with parallel_for, so it uses
// as many threads as the kernels do and is the fair ceiling for them.
void register_baseline(const Shape& s) {
  auto copy = [=](bool mt) {
    return [=](benchmark::State& st) {
      const auto& w = weights(s);
      std::vector<float> out(s.numel());
      for (auto _ : st) {
        if (mt)
          qlora::parallel_for(w.size(), 1024, 1 << 16, [&](std::size_t b, std::size_t e) {
            std::memcpy(out.data() + b, w.data() + b, (e - b) * sizeof(float));
          });
        else
          std::memcpy(out.data(), w.data(), w.size() * sizeof(float));
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
      }
      st.SetBytesProcessed(std::int64_t(st.iterations()) * std::int64_t(2 * s.numel() * sizeof(float)));
    };
  };
  reg("baseline/memcpy/" + s.name(), copy(false));
  reg("baseline/memcpy_mt/" + s.name(), copy(true));
}

}  // namespace

int main(int argc, char** argv) {
  const Shape sq{4096, 4096}, mlp{11008, 4096};
  using T = quant::Quant4Type;

  register_baseline(sq);
  register_baseline(mlp);
  for (bool dq : {true, false}) {
    register_4bit(T::NF4, dq, 64, sq);
    register_4bit(T::FP4, dq, 64, sq);
  }
  register_4bit(T::NF4, true, 64, mlp);
  register_4bit(T::NF4, false, 64, mlp);
  register_4bit_ref(T::NF4, 64, sq);
  register_4bit_ref(T::FP4, 64, sq);
  register_8bit(256, sq);
  register_8bit(4096, sq);
  register_rowwise(sq);

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
