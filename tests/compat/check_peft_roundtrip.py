"""Checks that PEFT loads the adapter qlora wrote (tests/data/peft/adapter_ours) and computes the outputs
qlora computed for it (tests/data/peft/adapter_ours_io.safetensors).

Not part of the C++ test suite (it needs torch and PEFT). Run from the repository root on a machine that
has them:

    python3 tests/compat/check_peft_roundtrip.py

The adapter and its outputs are written by tests/test_peft_adapter.cpp under QLORA_REGEN_PEFT_DATA=1, for
the tiny model of tests/data/peft/make_reference.py with the base weights stored in
adapter_peft_io.safetensors. PeftModel.from_pretrained must put LoRA layers on exactly the modules qlora
wrote, with the same r and scaling, and each module's output on qlora's inputs must equal qlora's (the
float64 result rounded to float32) within float32 rounding. As a control, the same is checked for the
adapter PEFT itself saved (adapter_peft). Exits non-zero on any mismatch.
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data", "peft")
sys.path.insert(0, DATA)
from make_reference import TinyLlamaish, lora_modules  # noqa: E402

import peft  # noqa: E402
from peft import PeftModel  # noqa: E402

TOL = 1e-5  # max |ours - peft| / max |peft|, per module, in float32


def base_model():
    model = TinyLlamaish()
    io = load_file(os.path.join(DATA, "adapter_peft_io.safetensors"))
    sd = {k[len("base."):]: v for k, v in io.items() if k.startswith("base.")}
    model.load_state_dict(sd, strict=True)
    return model.eval()


def check(adapter, io_file, prefix):
    io = load_file(os.path.join(DATA, io_file))
    model = PeftModel.from_pretrained(base_model(), os.path.join(DATA, adapter)).eval()
    mods = dict(lora_modules(model))
    expected = sorted({k[len("io."):-len(".x")] for k in io if k.startswith("io.") and k.endswith(".x")})
    ok = sorted(mods) == expected
    result = {"adapter": adapter, "modules": len(mods), "same_modules": ok, "per_module": {}}
    worst_abs = worst_rel = 0.0
    with torch.no_grad():
        for name in expected:
            m = mods.get(name)
            if m is None:
                ok = False
                continue
            r_file = int(io[f"{prefix}.{name}.r"][0])
            s_file = float(io[f"{prefix}.{name}.scaling"][0])
            same_r = m.r["default"] == r_file
            # qlora keeps scaling as float32; PEFT as a Python float
            same_s = abs(m.scaling["default"] - s_file) <= 1e-6 * abs(s_file)
            y = m(io[f"io.{name}.x"])
            y_ref = io[f"io.{name}.y"]
            diff = (y - y_ref).abs().max().item()
            rel = diff / y_ref.abs().max().item()
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
            result["per_module"][name] = {"r": m.r["default"], "scaling": m.scaling["default"], "same_r": same_r,
                                          "same_scaling": same_s, "max_abs_diff": diff, "rel_diff": rel}
            ok = ok and same_r and same_s and rel <= TOL
    result.update(ok=ok, max_abs_diff=worst_abs, max_rel_diff=worst_rel)
    return result


def main():
    results = {
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "ours": check("adapter_ours", "adapter_ours_io.safetensors", "ours"),
        "control_peft": check("adapter_peft", "adapter_peft_io.safetensors", "peft"),
    }
    print(json.dumps(results, indent=1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "peft_roundtrip.json"), "w") as f:
            json.dump(results, f, indent=1)
    ok = results["ours"]["ok"] and results["control_peft"]["ok"]
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
