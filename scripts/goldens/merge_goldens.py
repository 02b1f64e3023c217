#!/usr/bin/env python3
"""Make the merge parity fixtures and goldens that merge-core's tests compare against.

Run from the repository root with a Python that has torch, transformers, peft, mergekit and
safetensors (CPU wheels from PyPI are enough):

    python -m venv .venv-ref && .venv-ref/bin/pip install torch transformers peft mergekit safetensors
    .venv-ref/bin/python scripts/goldens/merge_goldens.py [--check-ours target/debug/llm-merging]

Cases: `linear` on every checkpoint layout and on PEFT adapters, and the methods with a base
(task_arithmetic, ties, breadcrumbs, breadcrumbs_ties, slerp, model_stock) with two and three
experts, normalize on and off, lambda != 1, gradients and name filters (METHOD_CASES).

It writes crates/merge-core/tests/fixtures/merge/:
  models/base, models/expert_a, models/expert_b  tiny random Llama checkpoints (f32 safetensors)
  models/expert_a_sharded                        expert_a as sharded safetensors + index
  models/expert_b_bin, models/expert_b_bin_sharded  expert_b as pytorch_model.bin (single, sharded)
  models/lora_a, models/lora_a_bin               a PEFT LoRA adapter over base (q_proj, v_proj),
                                                 as safetensors and as legacy adapter_model.bin
  models/lora_rs                                 an rsLoRA adapter with a rank_pattern override
  goldens/<case>/model.safetensors               mergekit's (or peft's) output for each case
  cases.json                                     each case: the merge config and the golden path

With --check-ours BINARY it also runs our binary on every case, loads our output with
transformers' AutoModelForCausalLM (proving it loads as is) and compares it with the golden.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.join("crates", "merge-core", "tests", "fixtures", "merge")
MODELS = os.path.join(ROOT, "models")
GOLDENS = os.path.join(ROOT, "goldens")


def tiny_config():
    return LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def make_models():
    torch.manual_seed(1234)
    base = LlamaForCausalLM(tiny_config()).eval()
    # Random init leaves norms at 1: give every tensor some spread so merges are not trivial.
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    base.save_pretrained(os.path.join(MODELS, "base"), safe_serialization=True)
    experts = {}
    for name, scale in [("expert_a", 0.1), ("expert_b", 0.2), ("expert_c", 0.3)]:
        m = LlamaForCausalLM(tiny_config()).eval()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * scale)
        m.save_pretrained(os.path.join(MODELS, name), safe_serialization=True)
        experts[name] = m
    experts["expert_a"].save_pretrained(
        os.path.join(MODELS, "expert_a_sharded"), safe_serialization=True, max_shard_size="8KB"
    )
    save_bin(experts["expert_b"], os.path.join(MODELS, "expert_b_bin"), shards=1)
    save_bin(experts["expert_b"], os.path.join(MODELS, "expert_b_bin_sharded"), shards=4)
    return base


def save_bin(model, path, shards):
    """PyTorch's zip-pickle checkpoint layout as older transformers wrote it (transformers 5
    only writes safetensors): pytorch_model.bin, or shards with pytorch_model.bin.index.json."""
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
        return
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        chunk = {k: state[k] for k in names[i * per : (i + 1) * per]}
        torch.save(chunk, os.path.join(path, file))
        weight_map.update({k: file for k in chunk})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def make_adapters(base):
    from peft import LoraConfig, get_peft_model

    out = {}
    for name, cfg in [
        ("lora_a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)),
        (
            "lora_rs",
            LoraConfig(
                r=4,
                lora_alpha=6,
                use_rslora=True,
                target_modules=["q_proj", "k_proj", "down_proj"],
                rank_pattern={"down_proj": 2},
                alpha_pattern={"down_proj": 3},
                lora_dropout=0.0,
            ),
        ),
    ]:
        torch.manual_seed(len(name) * 7)
        fresh = LlamaForCausalLM(tiny_config()).eval()
        fresh.load_state_dict(base.state_dict())
        peft_model = get_peft_model(fresh, cfg)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.3)
        path = os.path.join(MODELS, name)
        peft_model.save_pretrained(path)
        # base_model_name_or_path must be entry-relative, not this machine's path.
        with open(os.path.join(path, "adapter_config.json")) as f:
            ac = json.load(f)
        ac["base_model_name_or_path"] = "../base"
        # peft writes target_modules from a set: sort it so reruns give the same file.
        if isinstance(ac.get("target_modules"), list):
            ac["target_modules"] = sorted(ac["target_modules"])
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(ac, f, indent=2, sort_keys=True)
        if name == "lora_a":
            # The same adapter in PEFT's legacy .bin layout.
            bin_path = os.path.join(MODELS, "lora_a_bin")
            os.makedirs(bin_path, exist_ok=True)
            shutil.copy(os.path.join(path, "adapter_config.json"), bin_path)
            state = load_file(os.path.join(path, "adapter_model.safetensors"))
            torch.save(state, os.path.join(bin_path, "adapter_model.bin"))
        merged = peft_model.merge_and_unload()
        out[name] = merged
    return out


def mergekit_merge(config, out_dir):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config)))
    run_merge(cfg, out_dir, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, safe_serialization=True))


def golden_case(name, mergekit_config, our_config, cases, tmp):
    out = os.path.join(tmp, name)
    mergekit_merge(mergekit_config, out)
    tensors = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out, f)))
    dest = os.path.join(GOLDENS, name)
    os.makedirs(dest, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dest, "model.safetensors"))
    cases.append({"name": name, "config": our_config, "golden": f"goldens/{name}/model.safetensors"})


def m(path):
    return os.path.join(MODELS, path)


def toml_models(entries):
    return [{"model": f"models/{p}", "parameters": params} for p, params in entries]


# Methods with a base model: (case, method, [(expert, per-model parameters)], global
# parameters, whether the base is also listed among the models). Two and three experts, with
# and without normalize, lambda != 1, gradients and name filters.
SLERP_T_GRADIENT = [
    {"filter": "self_attn", "value": [0.1, 0.9, 0.3, 0.6]},
    {"filter": "mlp", "value": [0.8, 0.2]},
    {"value": 0.35},
]
METHOD_CASES = [
    ("task_arithmetic_two", "task_arithmetic",
     [("expert_a", {"weight": 0.7}), ("expert_b", {"weight": 0.5})], {"lambda": 0.8}, False),
    ("task_arithmetic_three_normalized", "task_arithmetic",
     [("expert_a", {"weight": 1.0}), ("expert_b", {"weight": 0.5}), ("expert_c", {"weight": 0.25})],
     {"normalize": True, "lambda": 1.3}, True),
    ("task_arithmetic_gradient", "task_arithmetic",
     [("expert_a", {"weight": [0.2, 1.0]}), ("expert_b", {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.4}]})],
     {}, False),
    ("ties_two", "ties",
     [("expert_a", {"weight": 0.6, "density": 0.5}), ("expert_b", {"weight": 0.4, "density": 0.5})], {}, False),
    ("ties_three_unnormalized", "ties",
     [("expert_a", {"weight": 1.0, "density": 0.3}), ("expert_b", {"weight": -0.5, "density": 0.7}),
      ("expert_c", {"weight": 0.8})],
     {"normalize": False, "lambda": 0.7, "density": 0.6}, True),
    ("ties_rescaled", "ties",
     [("expert_a", {"weight": 0.5}), ("expert_b", {"weight": 0.5}), ("expert_c", {"weight": 0.5})],
     {"density": 0.4, "rescale": True, "lambda": 1.2}, False),
    ("breadcrumbs_two", "breadcrumbs",
     [("expert_a", {"weight": 0.5, "density": 0.6, "gamma": 0.1}), ("expert_b", {"weight": 0.5, "density": 0.8})],
     {}, False),
    ("breadcrumbs_three_normalized", "breadcrumbs",
     [("expert_a", {"weight": 1.0}), ("expert_b", {"weight": 0.5}), ("expert_c", {"weight": 0.3})],
     {"density": 0.7, "gamma": 0.05, "normalize": True, "lambda": 0.9}, True),
    ("breadcrumbs_ties_two", "breadcrumbs_ties",
     [("expert_a", {"weight": 0.6, "density": 0.5, "gamma": 0.02}), ("expert_b", {"weight": 0.4, "density": 0.9, "gamma": 0.2})],
     {"normalize": True}, False),
    ("breadcrumbs_ties_three", "breadcrumbs_ties",
     [("expert_a", {"weight": 0.6}), ("expert_b", {"weight": 0.4}), ("expert_c", {"weight": 0.9})],
     {"density": 0.6, "gamma": 0.1, "lambda": 1.5}, False),
    ("slerp_scalar", "slerp", [("expert_a", {})], {"t": 0.3}, True),
    ("slerp_gradient", "slerp", [("expert_c", {})], {"t": SLERP_T_GRADIENT}, False),
    ("model_stock_two", "model_stock", [("expert_a", {}), ("expert_b", {})], {}, False),
    ("model_stock_three_filter_wise", "model_stock",
     [("expert_a", {}), ("expert_b", {}), ("expert_c", {})], {"filter_wise": True}, True),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-ours", help="our llm-merging binary: merge every case and compare")
    args = ap.parse_args()
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(MODELS)
    os.makedirs(GOLDENS)
    base = make_models()
    merged_adapters = make_adapters(base)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        # The PEFT-merged models stand in for the adapters on mergekit's side.
        for name, model in merged_adapters.items():
            model.save_pretrained(os.path.join(tmp, f"{name}_merged"), safe_serialization=True)
            dest = os.path.join(GOLDENS, f"peft_{name}")
            os.makedirs(dest, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()},
                os.path.join(dest, "model.safetensors"),
            )
        specs = [
            ("linear_two", [("expert_a", 0.8), ("expert_b", 0.2)], True),
            ("linear_two_unnormalized", [("expert_a", 0.8), ("expert_b", 0.5)], False),
            ("linear_three", [("expert_a", 1.0), ("expert_b", 2.0), ("expert_c", 0.5)], True),
            ("linear_sharded_and_bin", [("expert_a_sharded", 0.6), ("expert_b_bin", 0.4)], True),
            ("linear_bin_sharded", [("expert_b_bin_sharded", 0.3), ("expert_c", 0.7)], True),
        ]
        for name, models, normalize in specs:
            mk = {
                "merge_method": "linear",
                "dtype": "float32",
                "parameters": {"normalize": normalize},
                "models": [{"model": m(p), "parameters": {"weight": w}} for p, w in models],
            }
            ours = {
                "method": "linear",
                "dtype": "float32",
                "parameters": {"normalize": normalize},
                "models": toml_models([(p, {"weight": w}) for p, w in models]),
            }
            golden_case(name, mk, ours, cases, tmp)
        for adapter in ["lora_a", "lora_rs"]:
            mk = {
                "merge_method": "linear",
                "dtype": "float32",
                "models": [
                    {"model": os.path.join(tmp, f"{adapter}_merged"), "parameters": {"weight": 0.7}},
                    {"model": m("expert_b"), "parameters": {"weight": 0.3}},
                ],
            }
            ours = {
                "method": "linear",
                "dtype": "float32",
                "base_model": "models/base",
                "models": toml_models([(adapter, {"weight": 0.7}), ("expert_b", {"weight": 0.3})]),
            }
            golden_case(f"linear_{adapter}", mk, ours, cases, tmp)
        for name, method, models, params, base_listed in METHOD_CASES:
            mk_models = [{"model": m(p), "parameters": pp} for p, pp in models]
            ours_models = toml_models(models)
            if base_listed:
                # mergekit configs often list the base among the models; it stays the base.
                mk_models.insert(0, {"model": m("base")})
                ours_models.insert(0, {"model": "models/base"})
            mk = {
                "merge_method": method,
                "base_model": m("base"),
                "dtype": "float32",
                "parameters": params,
                "models": mk_models,
            }
            ours = {
                "method": method,
                "base_model": "models/base",
                "dtype": "float32",
                "parameters": params,
                "models": ours_models,
            }
            golden_case(name, mk, ours, cases, tmp)
    with open(os.path.join(ROOT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=2)
    # Keep the fixtures small: drop files the tests never read.
    for dirpath, _, files in os.walk(MODELS):
        for f in files:
            if f in ("generation_config.json", "README.md"):
                os.remove(os.path.join(dirpath, f))
    if args.check_ours:
        check_ours(args.check_ours, cases)


def check_ours(binary, cases):
    """Run our binary on every case, load the result in transformers, compare to the golden."""
    import toml  # noqa: F401  (only to fail early with a clear message if missing)

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            cfg_path = os.path.join(ROOT, f"_{case['name']}.toml")
            with open(cfg_path, "w") as f:
                f.write(toml_dump({"merge": case["config"]}))
            out = os.path.join(tmp, case["name"])
            subprocess.run([binary, "merge", cfg_path, "--out", out], check=True)
            os.remove(cfg_path)
            model = LlamaForCausalLM.from_pretrained(out)  # must load as is
            ours = model.state_dict()
            golden = load_file(os.path.join(ROOT, case["golden"]))
            worst = max((ours[k] - v).abs().max().item() for k, v in golden.items())
            status = "ok" if worst <= 1e-5 else "FAIL"
            failures += status != "ok"
            print(f"{case['name']}: loads in transformers, max |diff| vs golden {worst:.3g} {status}")
    sys.exit(1 if failures else 0)


def toml_dump(obj):
    import toml

    return toml.dumps(obj)


if __name__ == "__main__":
    main()
