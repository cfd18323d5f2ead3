#!/usr/bin/env bash
# One device call of the thirteenth session (about 6-8 minutes of an H100): the chained large-M
# product (chain_lab.sh at M = 4096, side SM counts 4 and 8), then the grouped GEMV's lab options
# (early weight loads and L2 prefetches before the PDL wait, capped grids) at M = 1 and 16 with
# their bit-equality tests. Everything is packed into OUT/all.tgz (the device returns 8 files).
# Usage: bash bench/cuda/session_lab.sh OUTDIR. Needs .deps/ as device_run.sh does.
set -uo pipefail
OUT=$1
SH=14336x4096,4096x4096 KS=4,8 timeout 400 bash bench/cuda/chain_lab.sh "$OUT" > "$OUT/chain.txt" 2>&1
echo "chain_lab rc=$?"
cut -c1-220 "$OUT/chain.txt"
timeout 60 ./build-cuda/test_cuda_matmul "cuda gemv_4bit: the aligned*","cuda gemv_4bit: PDL*" \
  > "$OUT/gemv_tests.log" 2>&1
echo "gemv tests rc=$?"
grep -E "passed|failed" "$OUT/gemv_tests.log"
grep -B5 -A15 FAILED "$OUT/gemv_tests.log" | head -40
QLORA_BENCH_SHAPES=14336x4096,4096x4096 QLORA_BENCH_MS=1,16 timeout 150 ./build-cuda/bench_cuda_matmul \
  "$OUT/gemv_bench.csv" > "$OUT/gemv_bench.txt" 2>&1
echo "gemv bench rc=$?"
grep -E "^(read|gemm)/|^matmul/|grouped" "$OUT/gemv_bench.txt" | cut -c1-170
cd "$OUT" && tar czf all.tgz --remove-files ./*.txt ./*.log ./*.csv 2>/dev/null; ls
