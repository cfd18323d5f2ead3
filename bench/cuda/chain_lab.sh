#!/usr/bin/env bash
# Lab run of the chained large-M product (Matmul4Chain, matmul4chain.cuh) on a GPU machine, about
# 3-4 minutes of an H100: builds for sm_90a, runs the side dequantizer's and the chain's [cuda] tests,
# then overlap_lab (the carve-out swept over side SM counts, each row paired with cuBLAS bf16) and
# bench_cuda_matmul's rows at M = 4096 (matmul, matmul_paired, matmul_chain beside cuBLAS bf16).
# Usage: bash bench/cuda/chain_lab.sh OUTDIR; SH= shapes (default 14336x4096,11008x4096,4096x4096),
# KS= side SM counts for overlap_lab (default 2,4,8), VARIANTS= its side dequantizers (default
# 5,L; overlap_lab.cu says what each is), MS= token counts (default 4096). Needs .deps/ as
# device_run.sh does.
set -uo pipefail
OUT=$1
SH=${SH:-14336x4096,11008x4096,4096x4096}
KS=${KS:-2,4,8}
MS=${MS:-4096}
F="-std=c++17 -O3 -Iinclude -Icuda -I.deps -lineinfo -gencode=arch=compute_90a,code=sm_90a"
mkdir -p build-cuda "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.limit --format=csv > "$OUT/smi.txt" 2>&1
(
  g++ -std=c++17 -O2 -I.deps -c tests/catch_main.cpp -o build-cuda/catch_main.o &
  nvcc $F -c tests/cuda/test_cuda_matmul.cu -o build-cuda/test_cuda_matmul.o &
  nvcc $F -c tests/cuda/test_cuda_quant.cu -o build-cuda/test_cuda_quant.o &
  nvcc $F bench/cuda/overlap_lab.cu -o build-cuda/overlap_lab -lcublas &
  nvcc $F bench/cuda/bench_cuda_matmul.cu -o build-cuda/bench_cuda_matmul -lcublas &
  wait
) > "$OUT/build.log" 2>&1
for t in test_cuda_matmul test_cuda_quant; do
  nvcc -gencode=arch=compute_90a,code=sm_90a build-cuda/$t.o build-cuda/catch_main.o -o build-cuda/$t -lcublas \
    >> "$OUT/build.log" 2>&1
done
cat "$OUT/smi.txt"
timeout 120 ./build-cuda/test_cuda_quant "cuda dequantize_4bit_on_sms*" > "$OUT/tests.log" 2>&1
echo "side dequantizer test rc=$?"
timeout 120 ./build-cuda/test_cuda_matmul "cuda Matmul4Chain*" >> "$OUT/tests.log" 2>&1
echo "chain test rc=$?"
grep -E "passed|failed" "$OUT/tests.log"
grep -B5 -A15 FAILED "$OUT/tests.log" | head -60
OV_SHAPES=$SH OV_KS=$KS OV_VARIANTS=${VARIANTS:-5,L} OV_M=${MS%%,*} timeout 330 ./build-cuda/overlap_lab "$OUT/ov.csv" > "$OUT/ov.txt" 2>&1
echo "overlap_lab rc=$?"
cat "$OUT/ov.txt"
QLORA_BENCH_SHAPES=$SH QLORA_BENCH_MS=$MS timeout 240 ./build-cuda/bench_cuda_matmul "$OUT/bench.csv" \
  > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"
grep -E "^(copy|read|gemm)/|matmul|dequantize/cuda/nf4dq" "$OUT/bench.txt" | grep -v "_rows\|gemm4_lab" | cut -c1-200
