"""Turns two bench_quant JSON runs (2 threads, 1 thread) into the Markdown table of
docs/performance.md. Standard library only.

    QLORA_NUM_THREADS=2 build/bench/bench_quant --benchmark_min_time=0.1 --benchmark_repetitions=5 \
        --benchmark_report_aggregates_only=true --benchmark_format=json > bq_2.json
    QLORA_NUM_THREADS=1 build/bench/bench_quant ... > bq_1.json
    python3 bench/quant_table.py bq_2.json bq_1.json
"""
import json
import re
import sys


def load(path):
    rows = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("aggregate_name") != "min":
            continue
        name = re.sub(r"/(real_time|min_time:[^/]*|repeats:\d+)", "", b["run_name"])
        unit = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
        rows[name] = (b["real_time"] * unit, b.get("bytes_per_second", 0) / 1e9)
    return rows


two, one = load(sys.argv[1]), load(sys.argv[2])


def baseline(rows, name, mt):
    shape = re.search(r"(\d+x\d+)", name).group(1)
    return rows.get(f"baseline/{'memcpy_mt' if mt else 'memcpy'}/{shape}")


print("| benchmark | 2 thr: ms | 2 thr: GB/s | 2 thr: % of memcpy_mt | 1 thr: ms | 1 thr: GB/s | 1 thr: % of memcpy |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name in two:
    cells = []
    for rows, mt in ((two, True), (one, False)):
        ms, gbs = rows.get(name, (float("nan"), float("nan")))
        base = baseline(rows, name, mt)
        pct = "—" if name.startswith("baseline/") or not base else f"{100 * gbs / base[1]:.0f}%"
        cells += [f"{ms:.2f}", f"{gbs:.1f}", pct]
    print(f"| `{name}` | " + " | ".join(cells) + " |")
