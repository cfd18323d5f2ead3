"""How torch rounds a float32 CUDA mean, against qlora's emulation (quant::ref::mean_absmax).

bitsandbytes' double quantization stores offset = absmax.mean() (float32, on the GPU). qlora
reproduces that sum order for small tensors; this script measures, on a GPU machine with torch, how
often the emulation gives torch's exact float32 for various block counts.
    python3 tests/compat/torch_mean_order.py
"""
import numpy as np
import torch

f = np.float32


def emulate(a):
    lane = np.zeros(32, np.float32)
    for i, v in enumerate(a):
        lane[i % 32] = f(lane[i % 32] + v)
    off = 16
    while off >= 1:
        for i in range(off):
            lane[i] = f(lane[i] + lane[i + off])
        off //= 2
    return f(lane[0] * f(f(1.0) / f(len(a))))


def exact(a):
    return f(np.sum(a.astype(np.float64)) / len(a))


rng = np.random.default_rng(0)
print("blocks  trials  emulation==torch  exact-rounded==torch")
for n in [16, 31, 32, 64, 100, 256, 1000, 4096, 16384, 65536, 262144, 917504]:
    trials = 20 if n <= 65536 else 3
    em = ex = 0
    for _ in range(trials):
        a = np.abs(rng.normal(0, 0.02, n)).astype(np.float32) * f(2.5)
        t = torch.from_numpy(a).cuda().mean().item()
        t = f(t)
        em += emulate(a) == t if n <= 65536 else 0
        ex += exact(a) == t
    print(f"{n:7d} {trials:6d} {em if n <= 65536 else '-':>17} {ex:>21}")
