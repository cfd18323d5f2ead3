#!/usr/bin/env bash
# Lab run of gemm_4bit_sm90 (about 2 minutes of an H100): gemv_lab.sh with the [sm90] tests first, and
# beside it bench builds with -DQLORA_G4_NODECODE=1..4, the kernel with parts of its decoding left out
# (wrong results; gemm4bit_sm90.cuh says what each keeps) on one shape. Usage: bash bench/cuda/gemm4_probe.sh OUTDIR.
set -uo pipefail
OUT=$1
F="-std=c++17 -O3 -Iinclude -Icuda -I.deps -lineinfo -gencode=arch=compute_90a,code=sm_90a"
mkdir -p build-cuda
nvcc $F -DQLORA_G4_NODECODE=1 bench/cuda/bench_cuda_matmul.cu -o build-cuda/bench_nodecode -lcublas > $OUT/build_nodecode.log 2>&1 &
for p in 2 3 4; do
  nvcc $F -DQLORA_G4_NODECODE=$p bench/cuda/bench_cuda_matmul.cu -o build-cuda/bench_nodecode$p -lcublas > $OUT/build_nodecode$p.log 2>&1 &
done
FIRST="[sm90]" SH=${SH:-14336x4096,4096x4096} MS=${MS:-128,512,4096} bash bench/cuda/gemv_lab.sh $OUT > $OUT/lab.txt 2>&1
wait
QLORA_BENCH_SHAPES=14336x4096 QLORA_BENCH_MS=4096 timeout 100 ./build-cuda/bench_nodecode > $OUT/nodecode.txt 2>&1
for p in 2 3 4; do
  QLORA_BENCH_SHAPES=14336x4096 QLORA_BENCH_MS=4096 timeout 100 ./build-cuda/bench_nodecode$p > $OUT/nodecode$p.txt 2>&1
done
grep -E "FAILED|passed|failed" $OUT/det.log | head -3; grep -B3 -A6 FAILED $OUT/det.log | head -20; tail -2 $OUT/tests.log
grep -E "gemm4_lab|matmul/cuda/bf16" $OUT/bench.txt | grep -v _d2 | cut -c1-110
echo "NODECODE=1 (zero mantissas; wrong results; pipeline speed)"; grep -E "gemm4_lab|matmul/cuda/bf16" $OUT/nodecode.txt | grep -v _d2 | cut -c1-110
for p in 2 3 4; do
  echo "NODECODE=$p (2: random mantissas; 3: 2 times the absmax; 4: table reads, absmax 1)"
  grep -E "gemm4_lab|matmul/cuda/bf16" $OUT/nodecode$p.txt | grep -v _d2 | cut -c1-110
done
