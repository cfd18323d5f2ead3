#!/usr/bin/env bash
# A short GPU lab run of the GEMV (about 90 s of device time on an H100): builds test_cuda_matmul and
# bench_cuda_matmul for sm_90a only, runs the determinism test first (a new kernel that hangs or
# races shows there in a minute), then the benchmark rows of the given shapes and token counts, then
# every [cuda] matmul test. Usage: bash bench/cuda/gemv_lab.sh OUTDIR; SH= and MS= pick
# QLORA_BENCH_SHAPES and QLORA_BENCH_MS, GRIDS= QLORA_BENCH_GRIDS (GEMV grid sizes timed beside the
# default), FIRST= the test run first (default the determinism test), BT= the bench time limit in s.
# Builds sm_90a (the wgmma kernels need it). Needs .deps/ as device_run.sh does.
set -uo pipefail
OUT=$1
mkdir -p build-cuda
F="-std=c++17 -O3 -Iinclude -Icuda -I.deps -Xcompiler -Wall,-Wextra -lineinfo -gencode=arch=compute_90a,code=sm_90a"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/build.log 2>&1
( g++ -std=c++17 -O2 -I.deps -c tests/catch_main.cpp -o build-cuda/catch_main.o &
  nvcc $F -c tests/cuda/test_cuda_matmul.cu -o build-cuda/test_cuda_matmul.o &
  nvcc $F -Xptxas -v bench/cuda/bench_cuda_matmul.cu -o build-cuda/bench_cuda_matmul -lcublas > build-cuda/ptxas.log 2>&1 &
  wait ) >> $OUT/build.log 2>&1
nvcc -gencode=arch=compute_90a,code=sm_90a build-cuda/test_cuda_matmul.o build-cuda/catch_main.o -o build-cuda/test_cuda_matmul -lcublas >> $OUT/build.log 2>&1
timeout 60 ./build-cuda/test_cuda_matmul "${FIRST:-cuda gemv_4bit is deterministic}" > $OUT/det.log 2>&1; d=$?
echo "determinism rc=$d"; tail -4 $OUT/det.log
QLORA_BENCH_GRIDS=${GRIDS:-} QLORA_BENCH_SHAPES=${SH:-14336x4096,4096x4096,2112x4096} QLORA_BENCH_MS=${MS:-1,8,16,48,64} timeout ${BT:-240} ./build-cuda/bench_cuda_matmul $OUT/bench.csv > $OUT/bench.txt 2>&1
echo "bench rc=$?"
timeout 150 ./build-cuda/test_cuda_matmul "[cuda]" > $OUT/tests.log 2>&1; echo "tests rc=$?"; tail -3 $OUT/tests.log
grep -E "read/|matmul/|matmul_paired/|grouped|halves|registers_u4|_fullgrid|_grid|gemm4_lab" $OUT/bench.txt | cut -c1-150
