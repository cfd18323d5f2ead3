#!/usr/bin/env bash
# Lab run of gemm_4bit_sm90 (about 2-3 minutes of an H100): builds test_cuda_matmul and the benchmark
# for sm_90a, runs the [sm90] tests, then the benchmark's gemm4_lab rows beside cuBLAS bf16 for the
# kernel and for its lab probes (-DQLORA_G4_NODECODE=p, the kernel with parts of its decoding left out:
# wrong results; gemm4bit_sm90.cuh says what each keeps), then Nsight Compute on the kernel and on
# probe 1 (prof_gemv ... sm90). Usage: bash bench/cuda/gemm4_probe.sh OUTDIR; SH= and MS= pick the
# shapes and token counts (default 14336x4096, 128,256,4096), PROBES= the probes (default "1 4"),
# VARIANTS= more builds of the kernel, as name=-DA=1,-DB=2 words (e.g.
# "c=-DQLORA_G4_AMCONST=1,-DQLORA_G4_NODECODE=1": probe 1 with absmax warps that load nothing;
# "a=-DQLORA_G4_AMTMA=1": the absmax by a per-call pass and bulk copies instead of absmax warps;
# "s=-DQLORA_G4_SHARED_FEED=1": W decoded into shared memory by producer warps, SS wgmma),
# TESTED= the names of those variants whose [sm90] tests run too (their results must be right: not the
# probes), NCU=0 skips Nsight Compute (which profiles the kernel, probe 1 and each variant at
# 14336x4096, M = 4096). Needs .deps/ as device_run.sh does.
set -uo pipefail
OUT=$1
SH=${SH:-14336x4096}
MS=${MS:-128,256,4096}
PROBES=${PROBES:-1 4}
VARIANTS=${VARIANTS:-}
TESTED=${TESTED:-}
F="-std=c++17 -O3 -Iinclude -Icuda -I.deps -lineinfo -gencode=arch=compute_90a,code=sm_90a"
mkdir -p build-cuda
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv > $OUT/smi.txt 2>&1
(
  g++ -std=c++17 -O2 -I.deps -c tests/catch_main.cpp -o build-cuda/catch_main.o &
  nvcc $F -c tests/cuda/test_cuda_matmul.cu -o build-cuda/test_cuda_matmul.o &
  nvcc $F bench/cuda/bench_cuda_matmul.cu -o build-cuda/bench_p0 -lcublas &
  nvcc $F bench/cuda/prof_gemv.cu -o build-cuda/prof_p0 -lcublas &
  nvcc $F -DQLORA_G4_NODECODE=1 bench/cuda/prof_gemv.cu -o build-cuda/prof_p1 -lcublas &
  for p in $PROBES; do
    nvcc $F -DQLORA_G4_NODECODE=$p bench/cuda/bench_cuda_matmul.cu -o build-cuda/bench_p$p -lcublas &
  done
  for v in $VARIANTS; do
    nvcc $F $(echo ${v#*=} | tr , " ") bench/cuda/bench_cuda_matmul.cu -o build-cuda/bench_${v%%=*} -lcublas &
    if [ "${NCU:-1}" = 1 ]; then
      nvcc $F $(echo ${v#*=} | tr , " ") bench/cuda/prof_gemv.cu -o build-cuda/prof_${v%%=*} -lcublas &
    fi
    if [[ " $TESTED " == *" ${v%%=*} "* ]]; then
      nvcc $F $(echo ${v#*=} | tr , " ") -c tests/cuda/test_cuda_matmul.cu -o build-cuda/test_${v%%=*}.o &
    fi
  done
  wait
) > $OUT/build.log 2>&1
nvcc -gencode=arch=compute_90a,code=sm_90a build-cuda/test_cuda_matmul.o build-cuda/catch_main.o \
  -o build-cuda/test_cuda_matmul -lcublas >> $OUT/build.log 2>&1
timeout 120 ./build-cuda/test_cuda_matmul "[sm90]" > $OUT/sm90.log 2>&1
echo "[sm90] tests rc=$?"
grep -E "passed|failed" $OUT/sm90.log | tail -2
grep -B3 -A10 FAILED $OUT/sm90.log | head -40
for b in $TESTED; do
  nvcc -gencode=arch=compute_90a,code=sm_90a build-cuda/test_$b.o build-cuda/catch_main.o -o build-cuda/test_$b \
    -lcublas >> $OUT/build.log 2>&1
  timeout 120 ./build-cuda/test_$b "[sm90]" > $OUT/sm90_$b.log 2>&1
  echo "[sm90] tests of build $b rc=$?"
  grep -E "passed|failed" $OUT/sm90_$b.log | tail -2
  grep -B3 -A10 FAILED $OUT/sm90_$b.log | head -20
done
echo "builds: p0 the kernel; p1 zero mantissas, no table, no absmax; p2 random mantissas; p3 absmax,"
echo "no table; p4 table, absmax 1; $VARIANTS"
for b in p0 $(for p in $PROBES; do echo p$p; done) $(for v in $VARIANTS; do echo ${v%%=*}; done); do
  echo "== build $b"
  QLORA_BENCH_SHAPES=$SH QLORA_BENCH_MS=$MS timeout 120 ./build-cuda/bench_$b > $OUT/bench_$b.txt 2>&1
  grep -E "gemm4_lab|matmul/cuda/bf16" $OUT/bench_$b.txt | grep -v _d2 | cut -c1-110
done
if [ "${NCU:-1}" = 1 ] && command -v ncu > /dev/null; then
  for p in p0 p1 $(for v in $VARIANTS; do echo ${v%%=*}; done); do
    timeout 150 ncu --clock-control none --kernel-name regex:gemm4 --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section InstructionStats \
      ./build-cuda/prof_$p 14336 4096 4096 sm90 > $OUT/ncu_$p.txt 2>&1
    echo "== ncu $p rc=$?"
    grep -E "Duration|Throughput|Busy|Pipe|Stall|Issued|Eligible|Shared|Bank|Wavefront|Executed Ipc" \
      $OUT/ncu_$p.txt | head -40
  done
fi
