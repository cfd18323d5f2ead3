// libFuzzer target for the safetensors reader: any byte string must either parse into views that are
// entirely in bounds, or throw qlora::Error. Anything else (a crash, an ASan/UBSan report, another
// exception type, a leak) is a bug.
//
// Run (clang only), with a scratch corpus first so new inputs do not land in the committed seeds:
//   CXX=clang++ cmake -S . -B build-fuzz -DQLORA_FUZZ=ON -DQLORA_BUILD_TESTS=OFF \
//     -DQLORA_BUILD_EXAMPLES=OFF -DQLORA_BUILD_BENCHMARKS=OFF
//   cmake --build build-fuzz --target fuzz_safetensors
//   mkdir -p /tmp/st_corpus && ./build-fuzz/tests/fuzz/fuzz_safetensors -max_total_time=60 \
//     /tmp/st_corpus tests/data/safetensors tests/data/safetensors/broken
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace qlora;
  try {
    const auto f = safetensors::File::from_memory(std::vector<std::uint8_t>(data, data + size), "fuzz");
    volatile std::uint8_t sink = 0;
    for (const auto& name : f.names()) {
      const auto v = f.get(name);
      // Reading every byte lets ASan prove the view is inside the buffer.
      std::uint8_t acc = 0;
      for (std::size_t i = 0; i < v.nbytes; ++i) acc = std::uint8_t(acc ^ v.data[i]);
      sink = std::uint8_t(sink ^ acc);
      if (dtype_is_float(v.dtype)) {
        const auto x = v.to_f32();
        if (x.size() != std::size_t(v.numel())) __builtin_trap();
      }
      if (v.nbytes != std::size_t(v.numel()) * dtype_size(v.dtype)) __builtin_trap();
    }
    for (const auto& kv : f.metadata()) sink = std::uint8_t(sink ^ kv.second.size());
    (void)sink;

    // Whatever was accepted must survive a write and re-read unchanged (the writer's JSON must be
    // readable by the reader, including escapes and empty tensors sharing an offset).
    safetensors::Writer w;
    for (const auto& name : f.names()) {
      const auto v = f.get(name);
      w.add(name, v.dtype, v.shape, v.data, v.nbytes);
    }
    for (const auto& kv : f.metadata()) w.set_metadata(kv.first, kv.second);
    const auto g = safetensors::File::from_memory(w.to_bytes(), "rewritten");
    if (g.names() != f.names() || g.metadata() != f.metadata() || g.data_offset() % 8 != 0) __builtin_trap();
    for (const auto& name : f.names()) {
      const auto a = f.get(name), b = g.get(name);
      if (a.dtype != b.dtype || a.shape != b.shape || a.nbytes != b.nbytes ||
          (a.nbytes && std::memcmp(a.data, b.data, a.nbytes) != 0))
        __builtin_trap();
    }
  } catch (const Error&) {
  }
  return 0;
}
