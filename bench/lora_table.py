"""Table of docs/performance.md "LoRA training step (CPU)": each lora_step/cpu row (median) beside the
base weight's forward + backward products (bench_matmul, fastest) measured in the same session, and
the share the LoRA path (rank-r products, dropout-free) and layer glue add on top. Standard library.

    python3 bench/lora_table.py bench_lora.json bench_matmul_forward.json bench_matmul_backward.json
"""
import json
import re
import sys


def load(path, agg):
    rows = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("aggregate_name") != agg:
            continue
        name = re.sub(r"/(real_time|min_time:[^/]*|repeats:\d+)", "", b["run_name"])
        rows[name] = b["real_time"] * {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
    return rows


step = load(sys.argv[1], "median")
fwd, bwd = load(sys.argv[2], "median"), load(sys.argv[3], "median")
print("| type | N x K | M | r | lora_step ms | base fwd + bwd ms | LoRA path + glue |")
print("|---|---|---:|---:|---:|---:|---:|")
for name, t in step.items():
    m = re.match(r"lora_step/cpu/(\w+)/(\d+x\d+)/m(\d+)/r(\d+)", name)
    typ, shape, M, r = m.groups()
    f = fwd.get(f"matmul/cpu/{typ}/{shape}/m{M}")
    b = bwd.get(f"matmul_backward/cpu/{typ}/{shape}/m{M}")
    if f is None or b is None:  # bench_matmul times the backward for f32 and nf4 only
        print(f"| {typ} | {shape} | {M} | {r} | {t:.2f} | — | — |")
        continue
    base = f + b
    print(f"| {typ} | {shape} | {M} | {r} | {t:.2f} | {base:.2f} | {100 * (t - base) / base:+.0f}% |")
