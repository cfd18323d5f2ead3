#!/usr/bin/env python3
"""Losses of a model folder, the same with a PEFT adapter, and a merged folder, computed by
transformers (+ PEFT) in float32, for comparison with `qlora eval --text FILE --seq T` on the same
folders (not a project dependency: run where torch, transformers and peft are installed).

    python3 tests/compat/check_finetune_outputs.py --text FILE --seq 128 \
        --model DIR [--adapter DIR] [--merged DIR]

The text is read as raw bytes (the byte-level models' tokenizer) and cut into consecutive
non-overlapping windows of --seq tokens (the last partial window dropped), as `qlora eval --text`
does for a folder without tokenizer.json; the loss is transformers' mean next-token cross-entropy
over all windows (each window the same length, so the mean of the window means).
"""
import argparse

import torch
from transformers import AutoModelForCausalLM


def windows(path, seq):
    data = open(path, "rb").read()
    n = len(data) // seq
    ids = torch.tensor(list(data[: n * seq]), dtype=torch.long).view(n, seq)
    return ids


def loss(model, ids):
    with torch.no_grad():
        total = 0.0
        for b in range(0, ids.shape[0], 8):
            x = ids[b : b + 8]
            total += model(input_ids=x, labels=x).loss.item() * x.shape[0]
    return total / ids.shape[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--merged")
    a = ap.parse_args()
    ids = windows(a.text, a.seq)
    base = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation="eager")
    print(f"windows: {ids.shape[0]} x {a.seq}")
    print(f"transformers base loss: {loss(base, ids):.6f}")
    if a.adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(base, a.adapter)
        print(f"transformers + PEFT adapter loss: {loss(m, ids):.6f}")
    if a.merged:
        merged = AutoModelForCausalLM.from_pretrained(a.merged, torch_dtype=torch.float32, attn_implementation="eager")
        print(f"transformers merged loss: {loss(merged, ids):.6f}")


if __name__ == "__main__":
    main()
