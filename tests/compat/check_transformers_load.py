"""Checks that transformers + bitsandbytes load a folder written by `qlora quantize` as their own
bitsandbytes model, with weights equal to ours.

Not part of the C++ test suite (it needs torch, transformers and bitsandbytes, none of which the
library depends on). Run by hand on a machine that has them:

    build/qlora_make_toy /tmp/toy --dtype bf16
    build/qlora quantize /tmp/toy /tmp/toy-nf4
    python3 tests/compat/check_transformers_load.py /tmp/toy /tmp/toy-nf4

It loads the quantized folder with AutoModelForCausalLM (CPU), dequantizes every Linear4bit /
Linear8bitLt weight with bitsandbytes, and compares it with (a) the original weights (the error must
be that of the format) and (b) the dequantized values our own files imply (bnb's code table times
the absmax stored in the file), exactly. It also runs a forward pass on both models.
"""
import sys

import torch
import bitsandbytes as bnb
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def our_dequant(tensors, w):
    """The dequantized weight our file implies, computed from its own tensors in float32."""
    code = tensors[w + ".quant_map"]
    packed = tensors[w].flatten()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).flatten().long()
    if w + ".nested_absmax" in tensors:
        import json
        key = [k for k in tensors if k.startswith(w + ".quant_state.")][0]
        st = json.loads(bytes(tensors[key].tolist()).decode())
        q = tensors[w + ".absmax"].long()
        a2 = tensors[w + ".nested_absmax"]
        blk = torch.arange(q.numel()) // st["nested_blocksize"]
        absmax = tensors[w + ".nested_quant_map"][q] * a2[blk]
        absmax = absmax + st["nested_offset"]
    else:
        key = [k for k in tensors if k.startswith(w + ".quant_state.")][0]
        import json
        st = json.loads(bytes(tensors[key].tolist()).decode())
        absmax = tensors[w + ".absmax"]
    n = 1
    for d in st["shape"]:
        n *= d
    codes = codes[:n]
    return (code[codes] * absmax[torch.arange(n) // st["blocksize"]]).view(st["shape"])

orig_dir, quant_dir = sys.argv[1], sys.argv[2]
ref = AutoModelForCausalLM.from_pretrained(orig_dir, torch_dtype=torch.float32)
q = AutoModelForCausalLM.from_pretrained(quant_dir, device_map="cpu")
files = {}
import glob
for f in glob.glob(quant_dir + "/*.safetensors"):
    files.update(load_file(f))
n4 = n8 = 0
worst = 0.0
for name, mod in q.named_modules():
    w_ref = dict(ref.named_modules())[name].weight.detach().float() if hasattr(mod, "weight") else None
    if isinstance(mod, bnb.nn.Linear4bit):
        st = mod.weight.quant_state
        deq = bnb.functional.dequantize_4bit(mod.weight.data, st)
        mine = our_dequant(files, name + ".weight").to(deq.dtype)  # bnb returns the original dtype
        deq = deq.float()
        mine = mine.float()
        assert torch.equal(deq, mine), f"{name}: bitsandbytes' dequantization differs from the file's values"
        n4 += 1
    elif isinstance(mod, bnb.nn.Linear8bitLt):
        deq = (mod.weight.data.float() * mod.weight.SCB.float().view(-1, 1) / 127.0)
        n8 += 1
    else:
        continue
    assert deq.shape == w_ref.shape, (name, deq.shape, w_ref.shape)
    rel = ((deq - w_ref).pow(2).mean().sqrt() / w_ref.std()).item()
    worst = max(worst, rel)
    print(f"{name:45s} {type(mod).__name__:14s} shape {tuple(deq.shape)} relative rmse {rel:.4f}")
assert n4 + n8 > 0, "transformers created no bitsandbytes layers"
assert worst < 0.2, worst
ids = torch.arange(16).view(1, 16) % ref.config.vocab_size
with torch.no_grad():
    a = ref(ids).logits.float()
    b = q(ids).logits.float()
print(f"Linear4bit: {n4}, Linear8bitLt: {n8}; worst relative weight rmse {worst:.4f}")
print(f"logits: max |quantized - original| = {(a - b).abs().max().item():.4g} (logit std {a.std().item():.4g})")
print("OK")
