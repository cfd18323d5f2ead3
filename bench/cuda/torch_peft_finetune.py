#!/usr/bin/env python3
"""PyTorch + transformers + PEFT LoRA fine-tuning of a Llama folder: the baseline that
`qlora finetune --device cuda` is compared against (issue 5, section 4).

bf16 model (no bitsandbytes on the GPU machine, so bf16 LoRA, as the issue says), LoRA with the same
r / alpha / dropout / targets as the qlora command, AdamW (torch's, fused where available), the same
batch and sequence length, on byte tokens of the same text file (models/fortunes-base is byte-level:
token id = byte value, no tokenizer, as qlora's raw-byte tokenizer). Random windows of seq bytes per
step (qlora draws its batches with its own seeded sampler: the data differ, the work per step does
not). Steps after --warmup are timed with torch.cuda.synchronize; prints tokens/s and
torch.cuda.max_memory_allocated.

  python3 bench/cuda/torch_peft_finetune.py --model models/fortunes-base --data FILE \
      --steps 200 --batch 8 --seq 128 --r 8 --alpha 16 --dropout 0.05 --target all-linear
"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/fortunes-base")
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--target", default="all-linear", help="all-linear or a comma list (q_proj,v_proj)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa, eager)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here")
    a = p.parse_args()

    torch.manual_seed(a.seed)
    dev = torch.device("cuda")
    data = torch.frombuffer(bytearray(open(a.data, "rb").read()), dtype=torch.uint8).to(torch.long)
    assert data.numel() > a.seq + 1, "data file shorter than one window"
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.bfloat16, attn_implementation=a.attn)
    assert model.config.vocab_size >= 256, "byte tokens need a vocabulary of at least 256"
    targets = "all-linear" if a.target == "all-linear" else a.target.split(",")
    cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg).to(dev)
    model.train()
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr, weight_decay=0.0,
                            fused=True)
    gen = torch.Generator().manual_seed(a.seed)

    def batch():
        starts = torch.randint(0, data.numel() - a.seq, (a.batch,), generator=gen)
        return torch.stack([data[s:s + a.seq] for s in starts.tolist()]).to(dev, non_blocking=True)

    torch.cuda.reset_peak_memory_stats()
    losses = []
    t0 = None
    for step in range(a.steps + a.warmup):
        if step == a.warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids = batch()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], a.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == a.steps + a.warmup - 1:
            losses.append((step, out.loss.item()))
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tok_s = a.steps * a.batch * a.seq / secs
    res = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps_timed": a.steps,
        "batch": a.batch, "seq": a.seq, "r": a.r, "alpha": a.alpha, "dropout": a.dropout, "target": a.target,
        "attn": a.attn, "trainable_params": trainable, "seconds": secs, "tokens_per_s": tok_s,
        "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        "max_memory_reserved_mib": torch.cuda.max_memory_reserved() / 2**20, "loss_first_last": [losses[0], losses[-1]],
    }
    print(f"torch+peft: {tok_s:.0f} tok/s over {a.steps} steps of {a.batch}x{a.seq} ({secs:.2f} s); "
          f"max_memory_allocated {res['max_memory_allocated_mib']:.1f} MiB "
          f"(reserved {res['max_memory_reserved_mib']:.1f} MiB); loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
