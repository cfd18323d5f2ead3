#!/usr/bin/env bash
# Build, test and benchmark the CUDA backend on a GPU machine with plain nvcc and g++ (no CMake):
#   bash bench/cuda/device_run.sh OUTDIR [steps]
# steps: any of build test memcheck bench tool (default: all); QLORA_CUDA_ARCHS, below. Catch reads a comma in a test-name
# filter as "or", so a name that contains one is matched by a wildcard. tool: the qlora command-line tool with
# --device cuda, as build-cuda/qlora (examples/qlora/*.cpp by g++, finetune_cuda.cu by nvcc). Needs Catch2 v2's single header in
# .deps/catch2/catch.hpp (copied from /usr/include/catch2 on the build machine), and for the LoRA
# test's CPU reference Eigen and nlohmann-json in .deps/Eigen, .deps/nlohmann (copied from
# /usr/include/eigen3/Eigen and /usr/include/nlohmann). Logs go to OUTDIR.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${1:?usage: device_run.sh OUTDIR [steps]}
shift
STEPS=${*:-build test memcheck bench tool}
mkdir -p "$OUT" build-cuda
# QLORA_CUDA_ARCHS="90a": build for those architectures only (a short lab run; default 80 and 90a, whose
# wgmma kernels plain 90 would leave out)
ARCH=""
for a in ${QLORA_CUDA_ARCHS:-80 90a}; do ARCH="$ARCH -gencode=arch=compute_$a,code=sm_$a"; done
# QLORA_NVCC_EXTRA="-DQLORA_G4_SHARED_FEED=1": more nvcc flags for every CUDA build (a lab switch, tested
# through the whole suite without changing the default)
FLAGS="-std=c++17 -O3 -Iinclude -Icuda -I.deps -Xcompiler -Wall,-Wextra,-march=native -lineinfo ${QLORA_NVCC_EXTRA:-}"
has() { [[ " $STEPS " == *" $1 "* ]]; }
rc=0
if has build; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee "$OUT/build.log"
  nvcc --version | tail -1 | tee -a "$OUT/build.log"
  (
    g++ -std=c++17 -O2 -I.deps -c tests/catch_main.cpp -o build-cuda/catch_main.o &
    g++ -std=c++17 -O3 -DNDEBUG -march=native -Wall -Wextra -Wno-maybe-uninitialized -Iinclude -isystem .deps -c tests/cuda/cpu_lora_reference.cpp \
      -o build-cuda/cpu_lora_reference.o &
    g++ -std=c++17 -O3 -DNDEBUG -march=native -Wall -Wextra -Wno-maybe-uninitialized -Iinclude -isystem .deps -c tests/cuda/cpu_llama_reference.cpp \
      -o build-cuda/cpu_llama_reference.o &
    nvcc $FLAGS $ARCH -c tests/cuda/test_cuda_llama.cu -o build-cuda/test_cuda_llama.o &
    nvcc $FLAGS $ARCH -c tests/cuda/test_cuda_lora.cu -o build-cuda/test_cuda_lora.o &
    nvcc $FLAGS $ARCH -c tests/cuda/test_cuda_quant.cu -o build-cuda/test_cuda_quant.o &
    nvcc $FLAGS $ARCH -c tests/cuda/test_cuda_quant8.cu -o build-cuda/test_cuda_quant8.o &
    nvcc $FLAGS $ARCH -c tests/cuda/test_cuda_matmul.cu -o build-cuda/test_cuda_matmul.o &
    nvcc $FLAGS $ARCH -c tests/cuda/test_cuda_adamw.cu -o build-cuda/test_cuda_adamw.o &
    nvcc $FLAGS $ARCH -Xptxas -v bench/cuda/bench_cuda_matmul.cu -o build-cuda/bench_cuda_matmul -lcublas \
      > build-cuda/ptxas.log 2>&1 &
    nvcc $FLAGS $ARCH bench/cuda/bench_cuda_lora.cu -o build-cuda/bench_cuda_lora -lcublas &
    nvcc -std=c++17 -Iinclude $ARCH tests/cuda/compile_check.cu -o build-cuda/cuda_compile_check &
    wait
  ) 2>&1 | tee -a "$OUT/build.log"
  for t in test_cuda_quant test_cuda_quant8 test_cuda_matmul test_cuda_adamw; do
    nvcc $ARCH build-cuda/$t.o build-cuda/catch_main.o -o build-cuda/$t -lcublas 2>&1 | tee -a "$OUT/build.log"
  done
  nvcc $ARCH build-cuda/test_cuda_lora.o build-cuda/cpu_lora_reference.o build-cuda/catch_main.o \
    -o build-cuda/test_cuda_lora -lcublas -lpthread 2>&1 | tee -a "$OUT/build.log"
  nvcc $ARCH build-cuda/test_cuda_llama.o build-cuda/cpu_llama_reference.o build-cuda/catch_main.o \
    -o build-cuda/test_cuda_llama -lcublas -lpthread 2>&1 | tee -a "$OUT/build.log"
  grep -A2 "gemv4_kernel\|gemv4_stream_kernel\|dequantize4_kernel\|quantize4_kernelILb1ELi64\|quantize8_kernel\|rowwise_int8_kernel" build-cuda/ptxas.log | grep -B1 "Used\|spill" \
    | grep "sm_90\|Used\|spill" >> "$OUT/build.log"
  ls -la build-cuda | tee -a "$OUT/build.log"
fi
if has tool; then
  mkdir -p build-cuda/qlora-objs
  (
    for f in examples/qlora/*.cpp; do
      g++ -std=c++17 -O3 -DNDEBUG -march=native -Wall -Wextra -Wno-maybe-uninitialized -Iinclude -isystem .deps \
        -c "$f" -o "build-cuda/qlora-objs/$(basename "$f" .cpp).o" &
    done
    nvcc $FLAGS $ARCH -c examples/qlora/cuda/finetune_cuda.cu -o build-cuda/qlora-objs/finetune_cuda.o &
    wait
  ) 2>&1 | tee "$OUT/tool_build.log"
  nvcc $ARCH build-cuda/qlora-objs/*.o -o build-cuda/qlora -lcublas -lpthread 2>&1 | tee -a "$OUT/tool_build.log"
  ls -la build-cuda/qlora | tee -a "$OUT/tool_build.log"
fi
if has test; then
  {
    ./build-cuda/cuda_compile_check
    timeout 120 ./build-cuda/test_cuda_quant "[cuda]" -d yes
    timeout 120 ./build-cuda/test_cuda_quant8 "[cuda]" -d yes
    timeout 120 ./build-cuda/test_cuda_matmul "[cuda]" -d yes
    timeout 120 ./build-cuda/test_cuda_lora "[cuda]" -d yes
    timeout 120 ./build-cuda/test_cuda_adamw "[cuda]" -d yes
    timeout 300 ./build-cuda/test_cuda_llama "[cuda]" -d yes
  } > "$OUT/tests.log" 2>&1 || rc=1
  tail -25 "$OUT/tests.log"
fi
if has memcheck; then
  {
    timeout 100 compute-sanitizer --tool memcheck --leak-check full ./build-cuda/test_cuda_quant \
      "cuda dequantize_4bit equals*","*refuses NaN*"
    echo "memcheck quant rc=$?"
    timeout 100 compute-sanitizer --tool memcheck --leak-check full ./build-cuda/test_cuda_quant8 \
      "cuda quantize_rowwise_int8 equals the CPU bytes","cuda dequantize_rowwise_int8 equals*","*refuses NaN*","*all-zero input*"
    echo "memcheck quant8 rc=$?"
    timeout 200 compute-sanitizer --tool memcheck ./build-cuda/test_cuda_matmul "cuda gemv_4bit is deterministic"
    echo "memcheck gemv rc=$?"
    timeout 200 compute-sanitizer --tool racecheck ./build-cuda/test_cuda_matmul "cuda gemv_4bit is deterministic"
    echo "racecheck gemv rc=$?"
    timeout 200 compute-sanitizer --tool memcheck ./build-cuda/test_cuda_matmul "cuda gemm_4bit_sm90 meets the bound"
    echo "memcheck gemm_4bit_sm90 rc=$?"
    timeout 200 compute-sanitizer --tool memcheck ./build-cuda/test_cuda_matmul "*PDL launches wait*"
    echo "memcheck gemv pdl rc=$?"
    timeout 200 compute-sanitizer --tool memcheck ./build-cuda/test_cuda_matmul "*aligned and the plain table*"
    echo "memcheck gemv tables rc=$?"
    timeout 200 compute-sanitizer --tool memcheck ./build-cuda/test_cuda_lora "[cuda]"
    echo "memcheck lora rc=$?"
    timeout 300 compute-sanitizer --tool memcheck ./build-cuda/test_cuda_llama "*CPU model (BF16*"
    echo "memcheck llama rc=$?"
    timeout 120 compute-sanitizer --tool racecheck ./build-cuda/test_cuda_llama "*frozen projections*"
    echo "racecheck llama rc=$?"
  } > "$OUT/memcheck.log" 2>&1
  grep -E "ERROR SUMMARY|rc=|passed|failed" "$OUT/memcheck.log"
fi
if has bench; then
  timeout 200 ./build-cuda/bench_cuda_matmul "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.txt" || rc=1
  timeout 120 ./build-cuda/bench_cuda_lora "$OUT/bench_lora.csv" 2>&1 | tee "$OUT/bench_lora.txt" || rc=1
fi
exit $rc
