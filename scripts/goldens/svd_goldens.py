#!/usr/bin/env python3
"""Reference goldens for the SVD-based merges (`tsv`, `iso_c`, `iso_cts`) and `extract-lora`.

Run from the repository root with the reference venv (torch, transformers, peft, safetensors):

    /work/venvs/ref/bin/python scripts/goldens/svd_goldens.py [--check-ours target/debug/llm-merging]

It READS the tiny Llama fixtures that scripts/goldens/merge_goldens.py made
(crates/merge-core/tests/fixtures/merge/models/{base,expert_a,expert_b,expert_c}; never
rewritten here) and writes crates/merge-core/tests/fixtures/svd/:

  cases.json                       each merge case: our config (model paths relative to
                                   fixtures/merge) and the golden's path
  <case>/model.safetensors         the reference merge of that case
  extract_lora.json                each extraction case: base, model, rank, energy, the golden
  extract_<case>/model.safetensors per linear module `M.weight`: the rank-r reconstruction
                                   B·A of M − B (float32), and `M.sigma`: every singular value
                                   of M − B (float64), so tests can check the truncation error

The references are straight transcriptions of the papers' formulas in float64 torch, written
independently of the Rust code (task vectors δₜ = θₜ − θ₀; 2-D tensors only; every other
tensor gets θ₀ + α·mean(δₜ), as the papers' code does):

- Iso-C (Marczak et al., ICML 2025, arXiv:2502.04959): Σₜ δₜ = U S Vᵀ;
  θ = θ₀ + α · mean(S) · U Vᵀ.
- Iso-CTS (same paper): k = min(m, n); c = ⌊k·f⌋, then the task-specific total
  min(round((k − c)/T), ⌊k/T⌋)·T (Python's round: half to even) and c = k − that; s = (k − c)/T per task.
  Common: the top c of Σₜ δₜ = U S Vᵀ. Task t: the top s of (I − U_c U_cᵀ) δₜ. Stack the left
  and the right vectors (k columns each), orthogonalise each stack by its polar factor
  (X = P Σ Qᵀ → P Qᵀ), and θ = θ₀ + α · mean(all k kept singular values) · U⊥ V⊥ᵀ.
- TSV-M (Gargiulo et al., CVPR 2025, arXiv:2412.00081): r = ⌊k/T⌋; task t's top r triplets
  go into columns t·r..(t+1)·r of U_all (m × k), S_all, V_all (n × k), unused columns zero;
  U⊥ = polar(U_all), V⊥ = polar(V_all); θ = θ₀ + α · U⊥ diag(S_all) V⊥ᵀ.
- extract-lora: M − B = U S Vᵀ per 2-D linear weight (embeddings, lm_head and norms left out),
  rank r (or the smallest rank holding `energy` of Σσ², capped at r); golden U_r S_r V_rᵀ.

With --check-ours BINARY it also runs our binary on every case: `merge` outputs are loaded with
transformers and compared with the goldens; `extract-lora` outputs are loaded with
peft.PeftModel.from_pretrained onto the base, merged (merge_and_unload) and compared with
base + golden reconstruction.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

FIXTURES = os.path.join("crates", "merge-core", "tests", "fixtures")
MODELS = os.path.join(FIXTURES, "merge", "models")
OUT = os.path.join(FIXTURES, "svd")

# (case, method, experts, global parameters)
MERGE_CASES = [
    ("iso_c_two", "iso_c", ["expert_a", "expert_b"], {}),
    ("iso_c_three", "iso_c", ["expert_a", "expert_b", "expert_c"], {"alpha": 1.3}),
    ("tsv_two", "tsv", ["expert_a", "expert_b"], {}),
    ("tsv_three", "tsv", ["expert_a", "expert_b", "expert_c"], {"alpha": 0.7}),
    ("iso_cts_two", "iso_cts", ["expert_a", "expert_b"], {}),
    ("iso_cts_three", "iso_cts", ["expert_a", "expert_b", "expert_c"],
     {"alpha": 1.5, "common_space_fraction": 0.5}),
]

DEFAULTS = {"alpha": 1.0, "common_space_fraction": 0.8}

# (case, model, rank, energy)
EXTRACT_CASES = [
    ("rank4", "expert_a", 4, None),
    ("energy", "expert_c", 12, 0.9),
]


def load(name):
    return {k: v.to(torch.float64) for k, v in load_file(os.path.join(MODELS, name, "model.safetensors")).items()}


def svd(x):
    return torch.linalg.svd(x, full_matrices=False)


def polar(x):
    """Orthogonal polar factor P Qᵀ of X = P Σ Qᵀ (the nearest matrix with orthonormal columns)."""
    p, _, qt = svd(x)
    return p @ qt


def iso_c(deltas, p):
    u, s, vt = svd(sum(deltas))
    return p["alpha"] * s.mean() * (u @ vt)


def tsv(deltas, p):
    t = len(deltas)
    m, n = deltas[0].shape
    k = min(m, n)
    r = k // t
    u_all = torch.zeros(m, k, dtype=torch.float64)
    s_all = torch.zeros(k, dtype=torch.float64)
    v_all = torch.zeros(n, k, dtype=torch.float64)
    for i, d in enumerate(deltas):
        u, s, vt = svd(d)
        u_all[:, i * r:(i + 1) * r] = u[:, :r]
        s_all[i * r:(i + 1) * r] = s[:r]
        v_all[:, i * r:(i + 1) * r] = vt[:r].T
    return p["alpha"] * (polar(u_all) @ torch.diag(s_all) @ polar(v_all).T)


def iso_cts_sizes(k, t, fraction):
    c = int(k * fraction)
    c = k - min(round((k - c) / t), k // t) * t
    return c, (k - c) // t


def iso_cts(deltas, p):
    t = len(deltas)
    m, n = deltas[0].shape
    k = min(m, n)
    c, s_each = iso_cts_sizes(k, t, p["common_space_fraction"])
    u, s, vt = svd(sum(deltas))
    us, ss, vs = [u[:, :c]], [s[:c]], [vt[:c].T]
    for d in deltas:
        residual = d - u[:, :c] @ (u[:, :c].T @ d)
        ut, st, vtt = svd(residual)
        us.append(ut[:, :s_each])
        ss.append(st[:s_each])
        vs.append(vtt[:s_each].T)
    u_all, s_all, v_all = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    assert u_all.shape[1] == k
    return p["alpha"] * s_all.mean() * (polar(u_all) @ polar(v_all).T)


METHODS = {"iso_c": iso_c, "tsv": tsv, "iso_cts": iso_cts}


def merge(method, experts, params):
    p = {**DEFAULTS, **params}
    base = load("base")
    models = [load(e) for e in experts]
    out = {}
    for name, b in base.items():
        deltas = [m[name] - b for m in models]
        if b.dim() == 2:
            for d in deltas:
                # The references are unique only for full-rank task vectors (polar factors).
                sv = torch.linalg.svdvals(d)
                assert sv[-1] > 1e-6 * sv[0], f"{name}: rank-deficient task vector"
            out[name] = b + METHODS[method](deltas, p)
        else:
            out[name] = b + p["alpha"] * sum(deltas) / len(deltas)
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def linear_weights(state):
    """The 2-D linear weights extract-lora approximates: no embeddings, lm_head or norms."""
    skip = ("embed", "lm_head", "norm")
    return [k for k, v in state.items() if v.dim() == 2 and k.endswith(".weight") and not any(s in k for s in skip)]


def extract(model, rank, energy):
    base, tuned = load("base"), load(model)
    golden, ranks = {}, {}
    for name in linear_weights(base):
        u, s, vt = svd(tuned[name] - base[name])
        r = rank
        if energy is not None:
            mass = torch.cumsum(s**2, 0) / (s**2).sum()
            r = min(rank, int((mass < energy).sum().item()) + 1)
        golden[name] = (u[:, :r] * s[:r]) @ vt[:r]
        golden[name] = golden[name].to(torch.float32).contiguous()
        golden[name[: -len("weight")] + "sigma"] = s.contiguous()
        ranks[name[: -len(".weight")]] = r
    return golden, ranks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-ours", help="our llm-merging binary: run every case and compare")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    cases = []
    for name, method, experts, params in MERGE_CASES:
        os.makedirs(os.path.join(OUT, name), exist_ok=True)
        save_file(merge(method, experts, params), os.path.join(OUT, name, "model.safetensors"))
        cases.append({
            "name": name,
            "config": {
                "method": method,
                "base_model": "models/base",
                "dtype": "float32",
                "parameters": params,
                "models": [{"model": f"models/{e}"} for e in experts],
            },
            "golden": f"{name}/model.safetensors",
        })
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=2)
    extracts = []
    for name, model, rank, energy in EXTRACT_CASES:
        golden, ranks = extract(model, rank, energy)
        dest = os.path.join(OUT, f"extract_{name}")
        os.makedirs(dest, exist_ok=True)
        save_file(golden, os.path.join(dest, "model.safetensors"))
        extracts.append({
            "name": name,
            "base": "models/base",
            "model": f"models/{model}",
            "rank": rank,
            "energy": energy,
            "ranks": ranks,
            "golden": f"extract_{name}/model.safetensors",
        })
    with open(os.path.join(OUT, "extract_lora.json"), "w") as f:
        json.dump(extracts, f, indent=2)
    if args.check_ours:
        sys.exit(check_ours(args.check_ours, cases, extracts))


def merge_toml(cfg):
    """Our TOML for a case's config (flat parameters, models without parameters)."""
    lines = ["[merge]", f'method = "{cfg["method"]}"', f'base_model = "{cfg["base_model"]}"', f'dtype = "{cfg["dtype"]}"']
    lines += ["[merge.parameters]"] + [f"{k} = {v}" for k, v in cfg["parameters"].items()]
    for m in cfg["models"]:
        lines += ["[[merge.models]]", f'model = "{m["model"]}"']
    return "\n".join(lines) + "\n"


def check_ours(binary, cases, extracts):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    failures = 0
    merge_root = os.path.join(FIXTURES, "merge")
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            cfg = dict(case["config"])
            cfg["base_model"] = os.path.abspath(os.path.join(merge_root, cfg["base_model"]))
            cfg["models"] = [{"model": os.path.abspath(os.path.join(merge_root, m["model"]))} for m in cfg["models"]]
            cfg_path = os.path.join(tmp, f"{case['name']}.toml")
            with open(cfg_path, "w") as f:
                f.write(merge_toml(cfg))
            out = os.path.join(tmp, case["name"])
            subprocess.run([binary, "merge", cfg_path, "--out", out], check=True, stdout=subprocess.DEVNULL)
            ours = LlamaForCausalLM.from_pretrained(out).state_dict()
            golden = load_file(os.path.join(OUT, case["golden"]))
            worst = max((ours[k] - v).abs().max().item() for k, v in golden.items())
            ok = worst <= 1e-4
            failures += not ok
            print(f"{case['name']}: loads in transformers, max |diff| vs reference {worst:.3g} {'ok' if ok else 'FAIL'}")
        for case in extracts:
            out = os.path.join(tmp, f"extract_{case['name']}")
            cmd = [binary, "extract-lora", "--base", os.path.join(merge_root, case["base"]),
                   "--model", os.path.join(merge_root, case["model"]), "--rank", str(case["rank"]), "--out", out]
            if case["energy"] is not None:
                cmd += ["--energy", str(case["energy"])]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            base = LlamaForCausalLM.from_pretrained(os.path.join(merge_root, case["base"]))
            base_state = {k: v.clone() for k, v in base.state_dict().items()}
            peft_model = PeftModel.from_pretrained(base, out)
            merged = peft_model.merge_and_unload().state_dict()
            golden = load_file(os.path.join(OUT, case["golden"]))
            worst = 0.0
            for k, v in merged.items():
                expected = base_state[k] + golden[k] if k in golden else base_state[k]
                worst = max(worst, (v - expected).abs().max().item())
            ok = worst <= 1e-4
            failures += not ok
            print(f"extract-lora {case['name']}: loads in peft (PeftModel.from_pretrained), "
                  f"merged max |diff| vs base + reference {worst:.3g} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    main()
