"""Makes the Llama reference data in tests/data/llama/ (run with torch, transformers and PEFT installed):

    python3 tests/data/llama/make_reference.py OUT_DIR [--source-dump FILE]

OUT_DIR defaults to this folder. --source-dump writes the source of the transformers functions a C++
port follows (RMSNorm, RoPE, eager attention, MLP, loss) to FILE, for reading; it is not kept here.

Writes (README.md describes each file):
- tiny_untied/, tiny_tied/: two tiny random Llama checkpoints (config.json + model.safetensors) saved
  by transformers' save_pretrained. tiny_untied/config.json is rewritten to the legacy RoPE form
  (top-level "rope_theta", "rope_scaling": null) and tiny_tied/config.json to the "rope_parameters"
  form, and both are reloaded by transformers to check that it reads them as meant.
- ids.safetensors (int64 "ids" [2, 24]) and ids_int32.safetensors (the same ids as int32).
- <name>_expected.safetensors: logits, loss and hidden states of the reloaded checkpoint (float32,
  eager attention, CPU), and for tiny_untied the gradient of the loss for every parameter.
- tiny_untied_adapter/: a PEFT LoRA adapter on tiny_untied (r=4, alpha=8, all seven projections,
  A and B random), and tiny_untied_adapter_expected.safetensors: logits, loss, hidden states and the
  gradient of the loss for every lora_A / lora_B weight of the reloaded PeftModel.
- info.json: versions, config forms, the checks below and their numbers.

Every expected output is checked against an independent float64 re-implementation of the Llama
forward in this file (manual_forward), written from the facts in README.md, not from transformers'
code; the differences are printed and kept in info.json as a guide to tolerances.

Everything comes from fixed seeds and runs on the CPU.
"""
import argparse
import inspect
import json
import math
import os
import platform
import shutil
import sys
import traceback

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import peft
import safetensors
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))

BATCH, SEQ, VOCAB, HIDDEN = 2, 24, 256, 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 4, 8

INFO = {}


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# checkpoints

def make_config(tied, n_kv, theta):
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=128,
              rms_norm_eps=1e-5, tie_word_embeddings=tied, attention_bias=False, mlp_bias=False,
              hidden_act="silu", attention_dropout=0.0, initializer_range=0.02,
              bos_token_id=1, eos_token_id=2, pad_token_id=None)
    params = inspect.signature(LlamaConfig.__init__).parameters
    if "rope_parameters" in params:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        kw["rope_theta"] = theta
        kw["rope_scaling"] = None
    return LlamaConfig(**kw)


def reinit(model, seed):
    """All weights std 0.1 normal, RMSNorm weights 1 + 0.1 * normal, in named_parameters order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.1
            p.copy_(r + 1.0 if "norm" in name else r)


def rope_form(cfg_json):
    if "rope_parameters" in cfg_json and cfg_json["rope_parameters"] is not None:
        return "rope_parameters" + ("+rope_theta" if "rope_theta" in cfg_json else "")
    if "rope_theta" in cfg_json:
        return "rope_theta (legacy)"
    return "none"


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def force_rope_form(folder, form, theta):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        text = f.read()
    cfg = json.loads(text)
    written = rope_form(cfg)
    if form == "legacy":
        cfg.pop("rope_parameters", None)
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = None
    else:
        cfg.pop("rope_theta", None)
        cfg.pop("rope_scaling", None)
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    write_json(path, cfg)
    return text, written


def load(folder):
    try:
        m = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    except TypeError:
        m = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager", torch_dtype=torch.float32)
    m.eval()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert m.config._attn_implementation == "eager", m.config._attn_implementation
    return m


def config_theta(cfg):
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return rp["rope_theta"], rp.get("rope_type")
    rs = getattr(cfg, "rope_scaling", None)
    return getattr(cfg, "rope_theta", None), (rs or {}).get("rope_type", "default")


def make_checkpoint(out, name, tied, n_kv, theta, seed, form):
    folder = os.path.join(out, name)
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(tied, n_kv, theta)).float().eval()
    reinit(model, seed + 1)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"
    model.save_pretrained(folder, safe_serialization=True)
    gen = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    original_text, written = force_rope_form(folder, form, theta)
    log(f"== {name}: config.json as transformers wrote it (rope form: {written}):\n{original_text}")
    keys = sorted(load_file(os.path.join(folder, "model.safetensors")).keys())
    log(f"{name}/model.safetensors keys: {keys}")

    sd0 = model.state_dict()

    def verify():
        m = load(folder)
        th, rt = config_theta(m.config)
        ok = th is not None and float(th) == float(theta) and rt in (None, "default")
        eq = all(k in sd0 and torch.equal(v, sd0[k]) for k, v in m.state_dict().items())
        return m, th, rt, ok, eq

    forced = True
    try:
        reloaded, th, rt, ok_theta, same = verify()
    except Exception as e:  # noqa: BLE001
        log(f"{name}: transformers failed to load the rewritten config.json: {e!r}")
        ok_theta = same = False
    if not (ok_theta and same):
        log(f"{name}: rewritten config.json not read as meant; restoring transformers' own")
        forced = False
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write(original_text)
        reloaded, th, rt, ok_theta, same = verify()
    inv = reloaded.model.rotary_emb.inv_freq
    hd = HIDDEN // 4
    inv_ref = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    inv_diff = (inv - inv_ref).abs().max().item()
    log(f"{name}: reloaded theta={th} rope_type={rt} ok={ok_theta}; state_dict equal={same}; "
        f"inv_freq vs 1/theta^(arange(0,d,2)/d) in f32: max diff {inv_diff:g}")
    if not (ok_theta and same):
        raise SystemExit(f"{name}: transformers does not read its own config.json back as meant")
    with open(os.path.join(folder, "config.json")) as f:
        final = json.load(f)
    INFO[name] = {"config_rope_form_written_by_transformers": written,
                  "config_rope_form_in_folder": rope_form(final),
                  "config_json_as_written_by_transformers": json.loads(original_text),
                  "config_rewritten_to": form if forced else None,
                  "model_safetensors_keys": keys,
                  "reloaded_theta": th, "inv_freq_max_diff_vs_f32_formula": inv_diff,
                  "tied_lm_head_is_embed": reloaded.lm_head.weight.data_ptr()
                  == reloaded.model.embed_tokens.weight.data_ptr()}
    return reloaded


# ----------------------------------------------------------------------------------------------
# an independent float64 Llama forward, from the facts in README.md

def manual_forward(sd, cfg, ids, theta, lora=None, scale=0.0):
    """sd: name -> float64 tensor (HF names). lora: module prefix -> (A [r, in], B [out, r])."""
    H, nh, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd, L, eps = H // nh, cfg.num_hidden_layers, cfg.rms_norm_eps
    B, T = ids.shape

    def lin(x, prefix):
        y = x @ sd[prefix + ".weight"].T
        if lora is not None and prefix in lora:
            a, b = lora[prefix]
            y = y + scale * ((x @ a.T) @ b.T)
        return y

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rot(t):  # first half / second half
        return torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], dim=-1)

    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)

    x = sd["model.embed_tokens.weight"][ids]
    hidden = [x]
    for l in range(L):
        p = f"model.layers.{l}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj").view(B, T, nh, hd).transpose(1, 2)
        k = lin(h, p + "self_attn.k_proj").view(B, T, nkv, hd).transpose(1, 2)
        v = lin(h, p + "self_attn.v_proj").view(B, T, nkv, hd).transpose(1, 2)
        q = q * cos + rot(q) * sin
        k = k * cos + rot(k) * sin
        k = k.repeat_interleave(nh // nkv, dim=1)  # query head i uses kv head i // (nh / nkv)
        v = v.repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hd)
        x = x + lin(o, p + "self_attn.o_proj")
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        hidden.append(x)
    prenorm = x
    x = rms(x, sd["model.norm.weight"])
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    logits = x @ head.T
    return logits, hidden, prenorm, x, cos, sin


def shifted_ce(logits, labels):
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def maxrel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------

def capture_prenorm(model):
    box = {}
    last = model.model.layers[-1]

    def hook(_m, _inp, out):
        box["x"] = (out[0] if isinstance(out, (tuple, list)) else out).detach().clone()
    return box, last.register_forward_hook(hook)


def expected_base(out, name, model, ids, labels_masked, theta, grads):
    L = model.config.num_hidden_layers
    box, handle = capture_prenorm(model)
    model.zero_grad(set_to_none=True)
    res = model(input_ids=ids, labels=ids, output_hidden_states=True, use_cache=False)
    handle.remove()
    logits, loss, hs = res.logits, res.loss, res.hidden_states
    assert logits.dtype == torch.float32 and tuple(logits.shape) == (BATCH, SEQ, VOCAB)
    if len(hs) != L + 1:
        log(f"NOTE: {len(hs)} hidden states, not L + 1 = {L + 1}")
    tensors = {"logits": logits.detach().clone(), "loss": loss.detach().reshape(1).clone()}
    for i, h in enumerate(hs):
        tensors[f"hidden_{i}"] = h.detach().clone()
    tensors[f"hidden_{L}_prenorm"] = box["x"]
    if grads:
        loss.backward()
        for n, p in model.named_parameters():
            tensors["grad." + n] = p.grad.detach().clone()
    with torch.no_grad():
        lm = model(input_ids=ids, labels=labels_masked, use_cache=False).loss
        tensors["loss_masked"] = lm.reshape(1).clone()
        tensors["labels_masked"] = labels_masked.clone()
        loss_check_f32 = shifted_ce(logits.detach(), ids).item()

    # float64 re-implementation
    sd = {k: v.detach().double().clone().requires_grad_(grads) for k, v in model.state_dict().items()
          if "rotary" not in k}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    m_logits, m_hidden, m_prenorm, m_final, cos, sin = manual_forward(sd, model.config, ids, theta)
    m_loss = shifted_ce(m_logits, ids)
    checks = {
        "logits_maxabs_vs_f64": maxdiff(logits, m_logits),
        "logits_maxabs": logits.abs().max().item(),
        "loss": loss.item(), "loss_f64": m_loss.item(),
        "loss_absdiff_vs_f64": abs(loss.item() - m_loss.item()),
        "loss_masked": tensors["loss_masked"].item(),
        "loss_masked_f64": shifted_ce(m_logits, labels_masked).item(),
        "loss_f32_recomputed_from_logits_absdiff": abs(loss_check_f32 - loss.item()),
        "uniform_loss_ln_vocab": math.log(VOCAB),
    }
    n = len(hs) - 1
    for i in range(n):
        checks[f"hidden_{i}_vs_f64_input_of_layer_{i}"] = maxdiff(hs[i], m_hidden[i])
    checks[f"hidden_{n}_vs_f64_final_norm_output"] = maxdiff(hs[n], m_final)
    checks[f"hidden_{n}_vs_f64_last_layer_output_prenorm"] = maxdiff(hs[n], m_prenorm)
    checks[f"hidden_{L}_prenorm_vs_f64"] = maxdiff(box["x"], m_prenorm)
    with torch.no_grad():
        re = model.model.rotary_emb(hs[0], torch.arange(SEQ)[None])
    checks["rope_cos_f32_vs_f64"] = maxdiff(re[0][0], cos)
    checks["rope_sin_f32_vs_f64"] = maxdiff(re[1][0], sin)
    tensors["rope_cos"] = re[0][0].detach().float().contiguous()
    tensors["rope_sin"] = re[1][0].detach().float().contiguous()
    if grads:
        m_loss.backward()
        worst = max((maxrel(model.get_parameter(n).grad, sd[n].grad), n) for n in sd)
        checks["grad_worst_maxrel_vs_f64"] = worst[0]
        checks["grad_worst_param"] = worst[1]
    log(f"{name} checks: {json.dumps(checks, indent=1)}")
    INFO[name]["checks"] = checks
    save(out, f"{name}_expected.safetensors", tensors, name)
    return tensors


def save(out, fname, tensors, what):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"what": what, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "made_by": "tests/data/llama/make_reference.py"}
    save_file(tensors, os.path.join(out, fname), metadata=meta)


def adapter(out, ids, labels_masked, theta):
    base_dir = os.path.join(out, "tiny_untied")
    folder = os.path.join(out, "tiny_untied_adapter")
    shutil.rmtree(folder, ignore_errors=True)
    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                     bias="none", init_lora_weights=False, task_type="CAUSAL_LM")
    pm = get_peft_model(load(base_dir), cfg)
    g = torch.Generator().manual_seed(4242)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.1)
    pm.save_pretrained(folder, safe_serialization=True)
    for extra in ("README.md",):
        if os.path.exists(os.path.join(folder, extra)):
            os.remove(os.path.join(folder, extra))
    acfg_path = os.path.join(folder, "adapter_config.json")
    with open(acfg_path) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = "tiny_untied"
    write_json(acfg_path, acfg)
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    log(f"adapter_config.json: {json.dumps(acfg, sort_keys=True)}")
    log(f"adapter_model.safetensors keys ({len(saved)}): {sorted(saved)}")

    # reload from disk, as a user would
    pm = PeftModel.from_pretrained(load(base_dir), folder, is_trainable=True).eval()
    lora_params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    names = {n: n.replace(".default.", ".") for n in lora_params}
    assert set(names.values()) == set(saved), (sorted(names.values())[:3], sorted(saved)[:3])
    for n, p in lora_params.items():
        assert torch.equal(p.detach(), saved[names[n]]), n
    scale = LORA_ALPHA / LORA_R
    scalings = {m.scaling["default"] for m in pm.modules()
                if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    log(f"PEFT scaling(s): {scalings}")
    assert scalings == {scale}

    L = pm.config.num_hidden_layers
    inner = pm.get_base_model()
    box, handle = capture_prenorm(inner)
    res = pm(input_ids=ids, labels=ids, output_hidden_states=True, use_cache=False)
    handle.remove()
    tensors = {"logits": res.logits.detach().clone(), "loss": res.loss.detach().reshape(1).clone()}
    for i, h in enumerate(res.hidden_states):
        tensors[f"hidden_{i}"] = h.detach().clone()
    tensors[f"hidden_{L}_prenorm"] = box["x"]
    res.loss.backward()
    for n, p in lora_params.items():
        tensors["grad." + names[n]] = p.grad.detach().clone()
    with torch.no_grad():
        tensors["loss_masked"] = pm(input_ids=ids, labels=labels_masked, use_cache=False).loss.reshape(1)
        base_logits = load(base_dir)(input_ids=ids, use_cache=False).logits

    # float64 re-implementation with LoRA: y = x W^T + (alpha/r) * (x A^T) B^T
    sd = {}
    for k, v in inner.state_dict().items():
        if "lora_" in k or "rotary" in k:
            continue
        sd[k.replace(".base_layer.", ".")] = v.detach().double()
    lora64 = {}
    for n in lora_params:
        key = names[n]  # base_model.model.<module>.lora_A.weight
        mod = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
        lora64.setdefault(mod, [None, None])
        lora64[mod][0 if ".lora_A." in key else 1] = saved[key].double().requires_grad_(True)
    m_logits, m_hidden, m_prenorm, m_final, _, _ = manual_forward(sd, pm.config, ids, theta, lora64, scale)
    m_loss = shifted_ce(m_logits, ids)
    m_loss.backward()
    worst = (0.0, "")
    for n in lora_params:
        key = names[n]
        mod = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
        t = lora64[mod][0 if ".lora_A." in key else 1]
        worst = max(worst, (maxrel(tensors["grad." + key], t.grad), key))
    checks = {"logits_maxabs_vs_f64": maxdiff(res.logits, m_logits),
              "logits_maxabs_change_vs_base": maxdiff(res.logits, base_logits),
              "loss": res.loss.item(), "loss_f64": m_loss.item(),
              "loss_absdiff_vs_f64": abs(res.loss.item() - m_loss.item()),
              "loss_masked": tensors["loss_masked"].item(),
              "loss_masked_f64": shifted_ce(m_logits.detach(), labels_masked).item(),
              f"hidden_{L}_vs_f64_final_norm_output": maxdiff(res.hidden_states[L], m_final),
              "grad_worst_maxrel_vs_f64": worst[0], "grad_worst_param": worst[1],
              "lora_scaling": scale, "n_lora_tensors": len(lora_params)}
    log(f"tiny_untied_adapter checks: {json.dumps(checks, indent=1)}")
    INFO["tiny_untied_adapter"] = {"adapter_config": acfg, "adapter_keys": sorted(saved),
                                   "grad_key_rule": "named_parameters name with '.default.' -> '.'",
                                   "checks": checks}
    save(out, "tiny_untied_adapter_expected.safetensors", tensors, "tiny_untied_adapter")


# ----------------------------------------------------------------------------------------------

def dump_sources(path):
    from transformers.models.llama import modeling_llama as ml
    items = [("LlamaRMSNorm.forward", lambda: ml.LlamaRMSNorm.forward),
             ("rotate_half", lambda: ml.rotate_half),
             ("apply_rotary_pos_emb", lambda: ml.apply_rotary_pos_emb),
             ("LlamaRotaryEmbedding", lambda: ml.LlamaRotaryEmbedding),
             ("modeling_rope_utils._compute_default_rope_parameters",
              lambda: __import__("transformers.modeling_rope_utils", fromlist=["x"])._compute_default_rope_parameters),
             ("repeat_kv", lambda: ml.repeat_kv),
             ("eager_attention_forward", lambda: ml.eager_attention_forward),
             ("LlamaAttention.__init__", lambda: ml.LlamaAttention.__init__),
             ("LlamaAttention.forward", lambda: ml.LlamaAttention.forward),
             ("LlamaMLP", lambda: ml.LlamaMLP),
             ("LlamaDecoderLayer.forward", lambda: ml.LlamaDecoderLayer.forward),
             ("LlamaModel.forward", lambda: ml.LlamaModel.forward),
             ("LlamaForCausalLM.forward", lambda: ml.LlamaForCausalLM.forward),
             ("ACT2FN['silu']", lambda: type(__import__("transformers.activations", fromlist=["x"]).ACT2FN["silu"])),
             ("loss_utils.ForCausalLMLoss", lambda: __import__("transformers.loss.loss_utils", fromlist=["x"]).ForCausalLMLoss),
             ("loss_utils.fixed_cross_entropy", lambda: __import__("transformers.loss.loss_utils", fromlist=["x"]).fixed_cross_entropy),
             ("create_causal_mask", lambda: ml.create_causal_mask),
             ("peft lora Linear.forward", lambda: __import__("peft.tuners.lora.layer", fromlist=["x"]).Linear.forward)]
    with open(path, "w") as f:
        for title, get in items:
            f.write(f"\n######## {title}\n")
            try:
                obj = get()
                f.write(f"# {inspect.getsourcefile(obj)}\n")
                f.write(inspect.getsource(obj))
            except Exception as e:  # noqa: BLE001 - a missing name is information too
                f.write(f"# unavailable: {type(e).__name__}: {e}\n")
        try:
            m = LlamaForCausalLM(make_config(False, 2, 10000.0))
            f.write(f"\n######## model.loss_function\n# {m.loss_function}\n")
            f.write(inspect.getsource(m.loss_function))
        except Exception as e:  # noqa: BLE001
            f.write(f"# model.loss_function unavailable: {e}\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=HERE)
    ap.add_argument("--source-dump")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    torch.set_grad_enabled(True)

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "safetensors": safetensors.__version__}
    log("versions:", versions)
    INFO["versions"] = versions
    if args.source_dump:
        dump_sources(args.source_dump)

    g = torch.Generator().manual_seed(2024)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g, dtype=torch.int64)
    save_file({"ids": ids}, os.path.join(out, "ids.safetensors"))
    save_file({"ids": ids.to(torch.int32)}, os.path.join(out, "ids_int32.safetensors"))
    labels_masked = ids.clone()
    labels_masked[1, 3:9] = -100
    labels_masked[0, -1] = -100
    log("ids:", ids.tolist())

    failed = []

    def stage(title, fn):
        try:
            return fn()
        except BaseException:  # noqa: BLE001 - report every stage, then fail
            traceback.print_exc()
            failed.append(title)
            return None

    untied = stage("tiny_untied", lambda: make_checkpoint(out, "tiny_untied", tied=False, n_kv=2,
                                                          theta=10000.0, seed=1, form="legacy"))
    if untied is not None:
        stage("tiny_untied expected", lambda: expected_base(out, "tiny_untied", untied, ids, labels_masked,
                                                            10000.0, grads=True))
        stage("adapter", lambda: adapter(out, ids, labels_masked, 10000.0))
    tied = stage("tiny_tied", lambda: make_checkpoint(out, "tiny_tied", tied=True, n_kv=4, theta=500000.0,
                                                      seed=2, form="rope_parameters"))
    if tied is not None:
        stage("tiny_tied expected", lambda: expected_base(out, "tiny_tied", tied, ids, labels_masked,
                                                          500000.0, grads=False))
    write_json(os.path.join(out, "info.json"), INFO)
    total = 0
    for root, _dirs, files in os.walk(out):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            total += os.path.getsize(p)
            log(f"{os.path.getsize(p):9d}  {os.path.relpath(p, out)}")
    log(f"total {total} bytes")
    if failed:
        log(f"FAILED stages: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
