"""Makes the bitsandbytes-written checkpoints that tests/test_bnb_saved.cpp reads.

Needs torch, transformers and bitsandbytes (used here on the CPU; the library never needs them):
    build/qlora_make_toy /tmp/toy --dtype bf16 --intermediate 192 --seed 7
    python3 tests/data/bnb_saved/make.py /tmp/toy tests/data/bnb_saved

For nf4 (double quant) and int8 it loads the toy model with transformers' BitsAndBytesConfig,
saves it with save_pretrained (the folder a user would get), and stores bitsandbytes' own
dequantization of every quantized weight in expected.safetensors (float32 of the bf16 output).
"""
import shutil
import sys

import torch
import bitsandbytes as bnb
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

src, out = sys.argv[1], sys.argv[2]
configs = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}
for name, cfg in configs.items():
    m = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu")
    folder = f"{out}/{name}"
    shutil.rmtree(folder, ignore_errors=True)
    m.save_pretrained(folder)
    expected = {}
    for mod_name, mod in m.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            expected[mod_name + ".weight"] = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            expected[mod_name + ".weight"] = (mod.weight.data.float() * mod.weight.SCB.float().view(-1, 1) * (1.0 / 127)).contiguous()
            expected[mod_name + ".SCB"] = mod.weight.SCB.float().contiguous()
    save_file(expected, f"{folder}/expected.safetensors")
    print(folder, len(expected), "tensors")
