"""Makes the PEFT reference data in tests/data/peft/ (run with torch, transformers and PEFT installed):

    python3 tests/data/peft/make_reference.py [OUT_DIR]      # OUT_DIR defaults to this folder

Writes
- peft_info.json: the versions used, the keys and defaults of a LoraConfig as PEFT's to_dict() gives
  them, and PEFT's own answers about which modules a target_modules / exclude_modules setting picks
  and which r / scaling rank_pattern / alpha_pattern give each module (targets_reference).
- linear_reference.safetensors: one nn.Linear(48 -> 40, bias) under PEFT LoRA, forward and backward
  in float64. Every input (W0, bias, A, B, x, dy) is float32-representable, so a float32 layer can be
  fed the exact same numbers; the outputs (y, dx, dA, dB) are float64.
- adapter_peft/: an adapter saved by PeftModel.save_pretrained for TinyLlamaish (module names of a
  Llama layer), plus adapter_peft_io.safetensors with the base weights, an input per LoRA module and
  PEFT's output of that module, and the r and scaling PEFT resolved for it.
- adapter_peft_bf16/: the same adapter saved after .to(torch.bfloat16).
- adapter_bias_all/, adapter_bias_lora_only/: the same model trained with bias="all" / "lora_only",
  to show which bias tensors PEFT saves.
- configs/<name>/adapter_config.json: configs PEFT writes for features qlora refuses (DoRA, IA3, ...).

Everything comes from fixed seeds and runs on the CPU.
"""
import json
import os
import shutil
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file

import peft
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

HERE = os.path.dirname(os.path.abspath(__file__))


# A model whose module names are those of a Llama decoder (model.layers.N.self_attn.q_proj, ...), small
# enough to keep the files tiny. check_peft_roundtrip.py builds it too.
class Attn(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.q_proj = nn.Linear(hidden, 32, bias=True)
        self.k_proj = nn.Linear(hidden, 16, bias=False)
        self.v_proj = nn.Linear(hidden, 16, bias=False)


class Mlp(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.up_proj = nn.Linear(hidden, 40, bias=False)
        self.down_proj = nn.Linear(40, hidden, bias=False)


class Layer(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.self_attn = Attn(hidden)
        self.mlp = Mlp(hidden)


class Inner(nn.Module):
    def __init__(self, hidden, n_layers):
        super().__init__()
        self.layers = nn.ModuleList([Layer(hidden) for _ in range(n_layers)])


class TinyLlamaish(nn.Module):
    def __init__(self, hidden=24, n_layers=2, vocab=50):
        super().__init__()
        self.model = Inner(hidden, n_layers)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


def tiny_base(seed=1234):
    torch.manual_seed(seed)
    return TinyLlamaish().float()


# The config of adapter_peft/. Pattern dicts are written in sorted key order on purpose: PEFT saves
# adapter_config.json with sort_keys=True and resolves patterns first-match-wins in dict order, so a
# reloaded model sees the keys sorted; keeping them sorted here makes the live and the reloaded model
# agree (layers.1.* modules take alpha 4, layers.0.v_proj takes 32).
ADAPTER_CONFIG = dict(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["q_proj", "v_proj", "down_proj"],
    rank_pattern={"down_proj": 2, "model.layers.1.self_attn.q_proj": 6},
    alpha_pattern={"layers\\.1\\..*": 4, "v_proj": 32},
)


def lora_modules(model):
    """(name relative to the base model, LoRA layer) for every LoRA-wrapped module."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            out.append((name.removeprefix("base_model.model."), m))
    return out


def randomize_b(model, gen, std=0.1):
    """PEFT starts B at zero; a non-zero B makes the LoRA path visible in every output."""
    with torch.no_grad():
        for _, m in lora_modules(model):
            b = m.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float32).to(b.dtype) * std)


def f32_randn(shape, gen, std=1.0):
    # float32 draws (then widened where needed), so every input is exactly representable in float32
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def linear_reference(out_dir):
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(48, 40, bias=True)

        def forward(self, x):
            return self.lin(x)

    cases = {
        # PEFT's default init: B = 0, so dA = 0 (the first step of training)
        "r4": dict(r=4, lora_alpha=8, init=True, random_b=False, use_rslora=False),
        # the same with a random B, so every output depends on A and B
        "r4_b": dict(r=4, lora_alpha=8, init=True, random_b=True, use_rslora=False),
        # rsLoRA scaling alpha / sqrt(r), gaussian init of A, random B
        "rslora_r8": dict(r=8, lora_alpha=16, init="gaussian", random_b=True, use_rslora=True),
    }
    tensors, meta = {}, {}
    for i, (name, c) in enumerate(cases.items()):
        torch.manual_seed(100 + i)
        base = One()
        cfg = LoraConfig(r=c["r"], lora_alpha=c["lora_alpha"], lora_dropout=0.0, target_modules=["lin"],
                         init_lora_weights=c["init"], use_rslora=c["use_rslora"])
        model = get_peft_model(base, cfg)
        gen = torch.Generator().manual_seed(200 + i)
        if c["random_b"]:
            randomize_b(model, gen)
        model = model.double()
        lin = model.base_model.model.lin
        x = f32_randn((6, 48), gen).double().requires_grad_(True)
        dy = f32_randn((6, 40), gen).double()
        y = model(x)
        y.backward(dy)
        A, B = lin.lora_A["default"].weight, lin.lora_B["default"].weight
        t = {
            "W0": lin.base_layer.weight, "bias": lin.base_layer.bias, "A": A, "B": B, "x": x, "dy": dy, "y": y,
            "dx": x.grad, "dA": A.grad, "dB": B.grad,
            "scaling": torch.tensor([lin.scaling["default"]], dtype=torch.float64),
        }
        for k, v in t.items():
            assert v.dtype == torch.float64, (name, k, v.dtype)
            tensors[f"{name}.{k}"] = v.detach().contiguous().clone()
        meta[name] = json.dumps({"r": c["r"], "lora_alpha": c["lora_alpha"], "use_rslora": c["use_rslora"],
                                 "init_lora_weights": c["init"], "random_b": c["random_b"],
                                 "scaling": lin.scaling["default"]})
    meta["cases"] = ",".join(cases)
    meta["peft_version"] = peft.__version__
    meta["torch_version"] = torch.__version__
    save_file(tensors, os.path.join(out_dir, "linear_reference.safetensors"), metadata=meta)
    return {k: json.loads(v) for k, v in meta.items() if k in cases}


def save_io(model, base_sd, gen, path, extra_meta=None):
    """Base weights, one input per LoRA module, PEFT's output of that module, and its r / scaling."""
    tensors = {f"base.{k}": v.detach().float().contiguous().clone() for k, v in base_sd.items()}
    resolved = {}
    with torch.no_grad():
        for name, m in lora_modules(model):
            x = f32_randn((5, m.in_features), gen)
            y = m(x)
            tensors[f"io.{name}.x"] = x
            tensors[f"io.{name}.y"] = y.float().contiguous()
            resolved[name] = {"r": m.r["default"], "scaling": m.scaling["default"]}
            tensors[f"peft.{name}.r"] = torch.tensor([m.r["default"]], dtype=torch.int64)
            tensors[f"peft.{name}.scaling"] = torch.tensor([m.scaling["default"]], dtype=torch.float64)
    meta = {"peft_version": peft.__version__, "torch_version": torch.__version__}
    meta.update(extra_meta or {})
    save_file(tensors, path, metadata=meta)
    return resolved


def adapter_peft(out_dir):
    base = tiny_base()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(**ADAPTER_CONFIG))
    randomize_b(model, torch.Generator().manual_seed(7))
    model.eval()
    for sub in ("adapter_peft", "adapter_peft_bf16"):
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    model.save_pretrained(os.path.join(out_dir, "adapter_peft"))
    resolved = save_io(model, base_sd, torch.Generator().manual_seed(8),
                       os.path.join(out_dir, "adapter_peft_io.safetensors"))

    # The reloaded model must agree with the live one (see ADAPTER_CONFIG on pattern order).
    again = PeftModel.from_pretrained(tiny_base(), os.path.join(out_dir, "adapter_peft"))
    for (n1, m1), (n2, m2) in zip(lora_modules(model), lora_modules(again)):
        assert n1 == n2 and m1.r == m2.r and m1.scaling == m2.scaling, (n1, m1.r, m2.r, m1.scaling, m2.scaling)
        x = torch.randn(3, m1.in_features)
        assert torch.equal(m1(x), m2(x)), n1

    model.to(torch.bfloat16).save_pretrained(os.path.join(out_dir, "adapter_peft_bf16"))
    return resolved


def adapter_bias(out_dir):
    saved = {}
    for bias in ("all", "lora_only"):
        base = tiny_base()
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], bias=bias))
        with torch.no_grad():  # training would move the trainable biases; make the change visible
            for n, p in model.named_parameters():
                if p.requires_grad and n.endswith("bias"):
                    p.add_(1.0)
        d = os.path.join(out_dir, f"adapter_bias_{bias}")
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d)
        from safetensors import safe_open

        with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
            saved[bias] = sorted(f.keys())
        os.remove(os.path.join(d, "README.md"))
    return saved


def configs(out_dir):
    """Configs of features qlora refuses, as PEFT itself writes them."""
    from peft import IA3Config

    variants = {
        "dora": LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
        "ia3": IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
        "rslora_regex": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=r".*\.(q|v)_proj",
                                   task_type="CAUSAL_LM", base_model_name_or_path="tiny/llamaish"),
    }
    for name, cfg in variants.items():
        d = os.path.join(out_dir, "configs", name)
        shutil.rmtree(d, ignore_errors=True)
        cfg.save_pretrained(d)
    return sorted(variants)


def targets_reference():
    """Which modules PEFT wraps, and with which r / scaling, for several settings on a tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))

    linear = [n for n, m in llama().named_modules() if isinstance(m, nn.Linear)]
    settings = {
        "list": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
        "list_dotted": dict(target_modules=["self_attn.q_proj", "layers.1.mlp.up_proj"]),
        "list_full_name": dict(target_modules=["model.layers.0.self_attn.o_proj", "lm_head"]),
        "regex": dict(target_modules=r".*\.(q|k)_proj"),
        "regex_layer1": dict(target_modules=r"model\.layers\.1\..*proj"),
        "regex_partial": dict(target_modules=r"q_proj"),  # fullmatch: matches nothing
        "all_linear": dict(target_modules="all-linear"),
        "exclude_list": dict(target_modules=["q_proj", "k_proj"], exclude_modules=["layers.0.self_attn.q_proj"]),
        "exclude_regex": dict(target_modules="all-linear", exclude_modules=r".*mlp.*"),
        # sorted keys (see ADAPTER_CONFIG): layers.0 k_proj takes 3 (the model\.layers\.0 key comes
        # before self_attn.k_proj), "proj" alone matches nothing ((.*\.)? needs a dot before it)
        "patterns": dict(target_modules="all-linear", use_rslora=True,
                         rank_pattern={"down_proj": 2, "layers\\.1\\.self_attn\\.q_proj": 6,
                                       "model\\.layers\\.0\\..*_proj": 3, "proj": 5, "self_attn.k_proj": 7},
                         alpha_pattern={"mlp\\.(up|gate)_proj": 12, "o_proj": 20}),
    }
    out = {"linear_modules": linear, "settings": {}}
    for name, s in settings.items():
        entry = {"config": s}
        try:
            model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, **s))
            mods = lora_modules(model)
            entry["targeted"] = sorted(n for n, _ in mods)
            entry["resolved"] = {n: {"r": m.r["default"], "scaling": m.scaling["default"]} for n, m in mods}
        except ValueError as e:  # PEFT refuses a setting that targets nothing
            entry["targeted"] = []
            entry["error"] = str(e).splitlines()[0]
        out["settings"][name] = entry
    return out


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else HERE
    os.makedirs(out_dir, exist_ok=True)
    info = {
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "lora_config_to_dict": json.loads(json.dumps(
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]).to_dict(), default=str)),
    }
    info["linear_reference"] = linear_reference(out_dir)
    info["adapter_peft_resolved"] = adapter_peft(out_dir)
    info["adapter_bias_keys"] = adapter_bias(out_dir)
    info["configs"] = configs(out_dir)
    info["targets_reference"] = targets_reference()
    with open(os.path.join(out_dir, "peft_info.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps({k: info[k] for k in ("peft_version", "torch_version", "transformers_version")}))
    print(json.dumps(info["adapter_bias_keys"], indent=1))


if __name__ == "__main__":
    main()
