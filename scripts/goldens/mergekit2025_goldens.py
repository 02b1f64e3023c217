"""Goldens for mergekit's 2025 methods (sce, nuslerp, multislerp, karcher, nearswap,
arcee_fusion, ram, ramplus_tl, passthrough) on the EXISTING tiny Llama fixtures.

Reads crates/merge-core/tests/fixtures/merge/models/ (made by merge_goldens.py; never
rewritten here) and writes, for each case, mergekit's output into
crates/merge-core/tests/fixtures/merge/goldens2025/<case>/model.safetensors and the mergekit
YAML itself into goldens2025/cases.json. The Rust test (crates/merge-core/tests/methods2025.rs)
reads that same YAML through our mergekit config reader, so the configs run unchanged.

Run from the repository root with the reference venv (mergekit 0.1.5, torch, CPU):

    /work/venvs/ref/bin/python scripts/goldens/mergekit2025_goldens.py
"""

import json
import os
import shutil
import tempfile

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "crates/merge-core/tests/fixtures/merge")
OUT = os.path.join(FIXTURES, "goldens2025")

A, B, C, BASE = "models/expert_a", "models/expert_b", "models/expert_c", "models/base"


def models(*entries):
    """`models:` entries from (path, parameters) pairs or bare paths."""
    out = []
    for e in entries:
        if isinstance(e, str):
            out.append({"model": e})
        else:
            out.append({"model": e[0], "parameters": e[1]})
    return out


def cases():
    """(name, mergekit config) for every case: two and three experts where the method allows,
    gradients and name filters in some."""
    c = []

    def add(name, method, ms, base=None, **params):
        cfg = {"merge_method": method, "dtype": "float32", "models": ms}
        if base:
            cfg["base_model"] = base
        if params:
            cfg["parameters"] = params
        c.append((name, cfg))

    # nuslerp: exactly two non-base models; flatten (default), row-wise, column-wise; with a base.
    add("nuslerp_flatten", "nuslerp", models((A, {"weight": 0.3}), (B, {"weight": 0.7})))
    add("nuslerp_row_wise_base", "nuslerp",
        models((A, {"weight": [0.2, 0.8]}), (B, {"weight": 0.5})), base=BASE,
        nuslerp_flatten=False, nuslerp_row_wise=True)
    add("nuslerp_column_wise", "nuslerp",
        models((A, {"weight": 1.0}), (B, {"weight": [{"filter": "self_attn", "value": 2.0}, {"value": 0.5}]})),
        nuslerp_flatten=False)
    # multislerp: two and three models, with and without a base, normalize_weights off.
    add("multislerp_two", "multislerp", models((A, {"weight": 0.4}), (B, {"weight": 0.6})))
    add("multislerp_three_base", "multislerp",
        models((A, {"weight": 1.0}), (B, {"weight": [0.5, 2.0]}), (C, {"weight": 1.5})), base=BASE)
    add("multislerp_unnormalized", "multislerp",
        models((A, {"weight": 0.3}), (B, {"weight": 0.3}), (C, {"weight": 0.2})),
        normalize_weights=False, eps=1e-6)
    # karcher: two and three models; the base, when named, is one more input in mergekit.
    add("karcher_two", "karcher", models(A, B))
    add("karcher_three", "karcher", models(A, B, C), max_iter=20, tol=1e-7)
    add("karcher_base", "karcher", models(A, B), base=BASE, max_iter=5)
    # sce: all kept, and top-k variance selection with a gradient.
    add("sce_two", "sce", models(A, B), base=BASE)
    add("sce_three_topk", "sce", models(BASE, A, B, C), base=BASE, select_topk=0.5)
    add("sce_gradient", "sce", models(A, B, C), base=BASE, select_topk=[0.3, 1.0])
    # nearswap: base and one model; t scalar and filtered.
    add("nearswap_scalar", "nearswap", models(A), base=BASE, t=0.05)
    add("nearswap_filtered", "nearswap", models(BASE, B), base=BASE,
        t=[{"filter": "mlp", "value": 0.01}, {"value": [0.001, 0.1]}])
    # arcee_fusion: base and one model.
    add("arcee_fusion_a", "arcee_fusion", models(A), base=BASE)
    add("arcee_fusion_c", "arcee_fusion", models(BASE, C), base=BASE)
    # ram / ramplus_tl: epsilon large enough that some entries are unique to one model.
    add("ram_two", "ram", models(A, B), base=BASE, epsilon=0.02)
    add("ram_three", "ram", models(A, B, C), base=BASE, epsilon=[0.01, 0.05])
    add("ramplus_tl_two", "ramplus_tl", models(A, B), base=BASE, epsilon=0.02)
    add("ramplus_tl_three", "ramplus_tl", models(A, B, C), base=BASE, r=0.5, alpha=0.4, epsilon=0.03)
    # passthrough: one model, as is and scaled.
    add("passthrough_plain", "passthrough", models(A))
    add("passthrough_scaled", "passthrough",
        models((B, {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]})))
    return c


def absolute(cfg):
    """The config with model paths absolute (mergekit takes a relative path for a hub id)."""
    cfg = json.loads(json.dumps(cfg))
    for m in cfg["models"]:
        m["model"] = os.path.join(FIXTURES, m["model"])
    if "base_model" in cfg:
        cfg["base_model"] = os.path.join(FIXTURES, cfg["base_model"])
    return cfg


def run_mergekit(cfg, out_dir):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    conf = MergeConfiguration.model_validate(cfg)
    run_merge(conf, out_dir, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False,
                                                  safe_serialization=True, device="cpu"))


def main():
    torch.manual_seed(0)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    listed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in cases():
            text = yaml.safe_dump(cfg, sort_keys=False)
            out = os.path.join(tmp, name)
            run_mergekit(absolute(yaml.safe_load(text)), out)
            tensors = {}
            for f in sorted(os.listdir(out)):
                if f.endswith(".safetensors"):
                    tensors.update(load_file(os.path.join(out, f)))
            dest = os.path.join(OUT, name)
            os.makedirs(dest)
            save_file({k: v.float().contiguous() for k, v in tensors.items()},
                      os.path.join(dest, "model.safetensors"))
            shutil.copy(os.path.join(out, "config.json"), os.path.join(dest, "config.json"))
            listed.append({"name": name, "method": cfg["merge_method"], "yaml": text,
                           "golden": f"goldens2025/{name}"})
            print(name, "ok")
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(listed, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
