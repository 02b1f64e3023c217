#!/usr/bin/env python3
"""Make the fixtures and goldens that `crates/inspect`'s parity test compares against.

Run from the repository root with a Python that has numpy, torch and safetensors:

    /work/venvs/ref/bin/python scripts/goldens/inspect_goldens.py

It writes crates/inspect/tests/fixtures/:
  models/base, models/expert_a, models/expert_b    tiny Llama-shaped checkpoints (f32)
  models/lora                                      a PEFT LoRA adapter over base: q_proj and
                                                   v_proj (lora_A/B), the input embedding
                                                   (lora_embedding_A/B) and lm_head as a
                                                   modules_to_save replacement
  models/lora_folded                               base with that adapter applied (dense ΔW)
  models/base_bf16, models/expert_a_bf16, models/expert_b_bf16
                                                   bf16 copies (many equal magnitudes: ties at
                                                   the top-k threshold)
  cases.json                                       per case: the merge config and the golden
                                                   numbers (per tensor, per layer, whole model)

The reference computation is written from the definitions, independently of the Rust code:
task vectors in float32 (a LoRA's ΔW = scale·B@A in float64, then float32), norms, inner
products and energies in float64; kept sets are TIES' top-k of |δ| (k = max(1, floor(density·n)),
equal magnitudes ordered by position so the earliest are dropped, as merge-core's TIES does),
zeros left out; the elected sign is that of Σ wₑ·(kept δₑ) summed in float32 in expert order.
"""
import json
import os
import re

import numpy as np
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file as save_torch

ROOT = os.path.join("crates", "inspect", "tests", "fixtures")
MODELS = os.path.join(ROOT, "models")

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV = 64, 16, 32, 3, 2, 1
KV_DIM = HIDDEN // HEADS * KV


def config(dtype):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


def shapes():
    s = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
         "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        s[p + "self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        s[p + "self_attn.k_proj.weight"] = (KV_DIM, HIDDEN)
        s[p + "self_attn.v_proj.weight"] = (KV_DIM, HIDDEN)
        s[p + "self_attn.o_proj.weight"] = (HIDDEN, HIDDEN)
        s[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        s[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        s[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        s[p + "input_layernorm.weight"] = (HIDDEN,)
        s[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    return s


def write_model(name, tensors, dtype="float32"):
    d = os.path.join(MODELS, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config(dtype), f, indent=2)
    if dtype == "bfloat16":
        save_torch({k: torch.from_numpy(v).to(torch.bfloat16).contiguous() for k, v in tensors.items()},
                   os.path.join(d, "model.safetensors"))
    else:
        save_np({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                os.path.join(d, "model.safetensors"))


def make_models():
    rng = np.random.default_rng(20240531)
    s = shapes()
    base = {k: rng.normal(0, 0.5, v).astype(np.float32) for k, v in s.items()}
    shared = {k: rng.normal(0, 1, v) for k, v in s.items()}
    experts = {}
    for name in ["expert_a", "expert_b"]:
        own = {k: rng.normal(0, 1, v) for k, v in s.items()}
        # Correlated task vectors (a shared direction) so cosines and conflicts are not trivial;
        # the MLP of layer 2 of expert_b is flipped, a hotspot of sign conflicts.
        m = {}
        for k in s:
            d = 0.1 * (0.6 * shared[k] + 0.8 * own[k])
            if name == "expert_b" and k.startswith("model.layers.2.mlp"):
                d = -d
            m[k] = (base[k] + d).astype(np.float32)
        experts[name] = m
    write_model("base", base)
    for name, m in experts.items():
        write_model(name, m)
    # bf16 copies: differences of bf16 numbers repeat often, so top-k thresholds fall on ties.
    def bf16(x):
        return torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    write_model("base_bf16", {k: bf16(v) for k, v in base.items()}, "bfloat16")
    for name, m in experts.items():
        write_model(name + "_bf16", {k: bf16(v) for k, v in m.items()}, "bfloat16")
    # A LoRA adapter over base.
    r, alpha = 4, 8.0
    scale = alpha / r
    factors, folded = {}, dict(base)
    for i in range(LAYERS):
        for proj in ["q_proj", "v_proj"]:
            mod = f"model.layers.{i}.self_attn.{proj}"
            out_dim, in_dim = s[mod + ".weight"]
            a = rng.normal(0, 0.3, (r, in_dim)).astype(np.float32)
            b = rng.normal(0, 0.3, (out_dim, r)).astype(np.float32)
            factors[f"base_model.model.{mod}.lora_A.weight"] = a
            factors[f"base_model.model.{mod}.lora_B.weight"] = b
            folded[mod + ".weight"] = (base[mod + ".weight"] + lora_delta(a, b, scale, False)).astype(np.float32)
    a = rng.normal(0, 0.3, (r, VOCAB)).astype(np.float32)
    b = rng.normal(0, 0.3, (HIDDEN, r)).astype(np.float32)
    factors["base_model.model.model.embed_tokens.lora_embedding_A"] = a
    factors["base_model.model.model.embed_tokens.lora_embedding_B"] = b
    folded["model.embed_tokens.weight"] = (base["model.embed_tokens.weight"] + lora_delta(a, b, scale, True)).astype(np.float32)
    head = (base["lm_head.weight"] + rng.normal(0, 0.05, s["lm_head.weight"])).astype(np.float32)
    factors["base_model.model.lm_head.modules_to_save.default.weight"] = head
    folded["lm_head.weight"] = head
    d = os.path.join(MODELS, "lora")
    os.makedirs(d, exist_ok=True)
    save_np(factors, os.path.join(d, "adapter_model.safetensors"))
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
                   "target_modules": ["q_proj", "v_proj", "embed_tokens"],
                   "modules_to_save": ["lm_head"], "lora_dropout": 0.0,
                   "fan_in_fan_out": False, "bias": "none", "base_model_name_or_path": None}, f, indent=2)
    write_model("lora_folded", folded)


def lora_delta(a, b, scale, transposed):
    d = scale * (b.astype(np.float64) @ a.astype(np.float64))
    return (d.T if transposed else d).astype(np.float32)


def load(name):
    from safetensors.torch import load_file
    return {k: v.to(torch.float32).numpy() for k, v in load_file(os.path.join(MODELS, name, "model.safetensors")).items()}


def lora_deltas(name, base):
    from safetensors.numpy import load_file
    f = load_file(os.path.join(MODELS, name, "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(MODELS, name, "adapter_config.json")))
    scale = cfg["lora_alpha"] / cfg["r"]
    out = {k: np.zeros_like(v) for k, v in base.items()}
    for key, v in f.items():
        m = re.match(r"base_model\.model\.(.*)\.lora_(embedding_)?A(\.weight)?$", key)
        if m:
            mod, emb = m.group(1), m.group(2) is not None
            b = f[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
            out[mod + ".weight"] = lora_delta(v, b, scale, emb)
        elif ".modules_to_save.default." in key:
            mod = key[len("base_model.model."):].replace(".modules_to_save.default.", ".")
            out[mod] = (v - base[mod]).astype(np.float32)
    return out


def natural(name):
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def kind(name):
    if "norm" in name:
        return "other"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    if "self_attn" in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"


def layer(name):
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def kept_mask(d, density):
    n = d.size
    mag = np.abs(d).astype(np.float32).ravel()
    if density >= 1:
        keep = np.ones(n, bool)
    elif density <= 0:
        keep = np.zeros(n, bool)
    else:
        k = max(1, int(density * n))
        if k >= n:
            keep = np.ones(n, bool)
        else:
            # ascending by magnitude, equal magnitudes by position: the last k are kept
            order = np.lexsort((np.arange(n), mag))
            keep = np.zeros(n, bool)
            keep[order[n - k:]] = True
    return keep & (mag != 0)


def tensor_sums(b, deltas, densities, weights, consensus):
    e = len(deltas)
    flat = [d.ravel().astype(np.float32) for d in deltas]
    masks = [kept_mask(d, dens) for d, dens in zip(flat, densities)]
    s = {"base_sq": float(np.sum(b.astype(np.float64) ** 2)), "numel": int(b.size)}
    s["dot"] = [[float(np.dot(flat[i].astype(np.float64), flat[j].astype(np.float64))) for j in range(e)] for i in range(e)]
    s["energy"] = [float(np.sum(f.astype(np.float64) ** 2)) for f in flat]
    s["kept"] = [int(m.sum()) for m in masks]
    s["both_kept"] = [[int((masks[i] & masks[j]).sum()) for j in range(e)] for i in range(e)]
    s["conflicts"] = [[int((masks[i] & masks[j] & ((flat[i] > 0) != (flat[j] > 0))).sum()) for j in range(e)] for i in range(e)]
    if consensus:
        w = [np.float32(x) for x in weights]
        total = (np.where(masks[0], flat[0], np.float32(0)) * w[0]).astype(np.float32)
        for i in range(1, e):
            total = (total + np.where(masks[i], flat[i], np.float32(0)) * w[i]).astype(np.float32)
        up = total >= 0
    ke = []
    for i in range(e):
        keep = masks[i]
        if consensus:
            v = (flat[i] * np.float32(weights[i])).astype(np.float32)
            keep = keep & ((up & (v > 0)) | (~up & (v < 0)))
        ke.append(float(np.sum(flat[i][keep].astype(np.float64) ** 2)))
    s["kept_energy"] = ke
    return s


def add(a, b):
    if a is None:
        return json.loads(json.dumps(b))
    out = {}
    for k, v in a.items():
        w = b[k]
        if isinstance(v, list) and v and isinstance(v[0], list):
            out[k] = [[x + y for x, y in zip(r, q)] for r, q in zip(v, w)]
        elif isinstance(v, list):
            out[k] = [x + y for x, y in zip(v, w)]
        else:
            out[k] = v + w
    return out


def metrics(s):
    e = len(s["energy"])
    ratio = lambda a, b: a / b if b > 0 else None
    norm = [np.sqrt(max(s["dot"][i][i], 0)) for i in range(e)]
    base = np.sqrt(s["base_sq"])
    return {
        "norm": norm,
        "relative_norm": [ratio(n, base) for n in norm],
        "cosine": [[ratio(s["dot"][i][j], norm[i] * norm[j]) for j in range(e)] for i in range(e)],
        "sign_conflict": [[ratio(s["conflicts"][i][j], s["both_kept"][i][j]) for j in range(e)] for i in range(e)],
        "overlap": [[ratio(s["both_kept"][i][j], s["kept"][i] + s["kept"][j] - s["both_kept"][i][j]) for j in range(e)] for i in range(e)],
        "kept_fraction": [ratio(s["kept_energy"][i], s["energy"][i]) for i in range(e)],
        "kept": s["kept"],
    }


# (name, base, experts [(dir, is_lora, density, weight)], method, sparsifies, consensus)
CASES = [
    ("ties_full", "base", [("expert_a", False, 0.5, 1.0), ("expert_b", False, 0.5, 1.0)], "ties", True, True),
    ("ties_lora", "base", [("expert_a", False, 0.3, 1.0), ("expert_b", False, 0.5, 0.5), ("lora", True, 0.7, 0.8)], "ties", True, True),
    ("ties_lora_folded", "base", [("expert_a", False, 0.3, 1.0), ("expert_b", False, 0.5, 0.5), ("lora_folded", False, 0.7, 0.8)], "ties", True, True),
    ("ties_bf16", "base_bf16", [("expert_a_bf16", False, 0.4, 1.0), ("expert_b_bf16", False, 0.4, 1.0)], "ties", True, True),
    ("task_arithmetic", "base", [("expert_a", False, 1.0, 1.0), ("expert_b", False, 1.0, 1.0), ("lora", True, 1.0, 1.0)], "task_arithmetic", False, False),
]


def config_toml(base, experts, method):
    s = f'[merge]\nmethod = "{method}"\nbase_model = "models/{base}"\n'
    for d, _, dens, w in experts:
        params = f"weight = {w}" + (f", density = {dens}" if method == "ties" else "")
        s += f'[[merge.models]]\nmodel = "models/{d}"\nparameters = {{ {params} }}\n'
    return s


def golden(base_name, experts, consensus):
    base = load(base_name)
    deltas = []
    for d, is_lora, _, _ in experts:
        deltas.append(lora_deltas(d, base) if is_lora else {k: (v - base[k]).astype(np.float32) for k, v in load(d).items()})
    tensors, layers, model = {}, {}, None
    for name in sorted(base, key=natural):
        s = tensor_sums(base[name], [dl[name] for dl in deltas], [x[2] for x in experts], [x[3] for x in experts], consensus)
        tensors[name] = dict(metrics(s), kind=kind(name), layer=layer(name))
        model = add(model, s)
        if layer(name) is not None:
            layers[layer(name)] = add(layers.get(layer(name)), s)
    return {
        "tensors": tensors,
        "layers": {str(k): metrics(v) for k, v in sorted(layers.items())},
        "model": metrics(model),
    }


def main():
    make_models()
    cases = []
    for name, base, experts, method, _, consensus in CASES:
        cases.append({"name": name, "config": config_toml(base, experts, method), "golden": golden(base, experts, consensus)})
    with open(os.path.join(ROOT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    print(f"wrote {len(cases)} cases to {ROOT}")


if __name__ == "__main__":
    main()
