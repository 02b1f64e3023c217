#!/usr/bin/env python3
"""Make the RegMean++ goldens that the CLI's regmean_plus tests compare against.

Run from the repository root with the reference venv (torch, transformers, tokenizers, safetensors),
after scripts/goldens/regmean_goldens.py (whose fixtures it reads):

    /work/venvs/ref/bin/python scripts/goldens/regmean_plus_goldens.py

It READS the tiny Llama experts (crates/merge-core/tests/fixtures/merge/models/expert_{a,b,c}),
the word-level tokenizer and calib.csv of crates/merge-core/tests/fixtures/regmean/, and writes
crates/merge-core/tests/fixtures/regmean_plus/:

  calib_b.csv
      other calibration rows (competition schema), so a case can give models different rows.
  goldens/<case>/model.safetensors
      RegMean++ (Nguyen et al. 2025) in float64, following FusionBench's
      RegMeanAlgorithmPlusPlus.run (fusion_bench/method/regmean_plusplus/regmean_plusplus.py):
        1. the embedding is the models' mean; H_i = merged embedding of model i's rows;
        2. for each decoder layer l: model i's own layer l runs on H_i with forward pre-hooks
           on its nn.Linear modules: G_i = sum of x^T x over model i's tokens / its token
           count; every linear weight of the layer is
             W* = ((sum_i G~_i)^-1 sum_i G~_i W_i^T)^T,  G~_i = alpha G_i + (1-alpha) diag(G_i);
           every other tensor of the layer is the mean; then H_i <- merged layer l (H_i);
        3. the final norm and the head are the mean (as our regmean; FusionBench's CLIP variant
           keeps the pretrained model's, there being no head to merge there).
      Rows run one at a time (no padding), positions 0..n-1, causal attention.
  cases.json
      each case: the models, each model's calibration file, alpha, the golden path.
"""
import copy
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

from regmean_goldens import regmean  # the closed form, one definition for both goldens

MERGE_MODELS = os.path.join("crates", "merge-core", "tests", "fixtures", "merge", "models")
REGMEAN = os.path.join("crates", "merge-core", "tests", "fixtures", "regmean")
ROOT = os.path.join("crates", "merge-core", "tests", "fixtures", "regmean_plus")
DEFAULT_ALPHA = 0.9
CALIB_A = "../regmean/calib.csv"
CALIB_B = "calib_b.csv"
CASES = [
    # Same models, rows and alpha as regmean's `regmean_two`: the two must differ.
    ("regmean_plus_two", [("expert_a", CALIB_A), ("expert_b", CALIB_A)], None),
    ("regmean_plus_three_alpha", [("expert_a", CALIB_A), ("expert_b", CALIB_B), ("expert_c", CALIB_A)], 0.5),
]


def write_calibration_b():
    g = torch.Generator().manual_seed(11)
    with open(os.path.join(ROOT, CALIB_B), "w") as f:
        f.write("id,input,answer_choices,eval_type\n")
        for i in range(6):
            n = int(torch.randint(2, 12, (1,), generator=g))
            ids = torch.randint(3, 64, (n,), generator=g).tolist()
            f.write(f'b-{i},"{" ".join(f"w{t}" for t in ids)}",[],generation\n')


def read_rows(path):
    import csv

    with open(path) as f:
        return [r["input"] for r in csv.DictReader(f)]


def load(name):
    m = LlamaForCausalLM.from_pretrained(os.path.join(MERGE_MODELS, name), dtype=torch.float64)
    m.config._attn_implementation = "eager"
    return m.eval()


def causal_mask(n):
    return torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)[None, None]


def run_layer(layer, rotary, h):
    n = h.shape[1]
    pos = torch.arange(n)[None]
    pe = rotary(h, pos)
    out = layer(h, attention_mask=causal_mask(n), position_ids=pos, position_embeddings=pe)
    return out[0] if isinstance(out, tuple) else out


def check_layer_calls(model, ids):
    """Our layer-by-layer calls reproduce transformers' own forward (inputs of every layer)."""
    with torch.no_grad():
        ref = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        h = model.model.embed_tokens(torch.tensor([ids]))
        for l, layer in enumerate(model.model.layers):
            assert torch.allclose(h, ref[l], atol=1e-10), l
            h = run_layer(layer, model.model.rotary_emb, h)


def regmean_plus(names, calibs, alpha, tok):
    models = [load(n) for n in names]
    merged = copy.deepcopy(models[0])
    out = {}
    with torch.no_grad():
        for key in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]:
            out[key] = sum(m.state_dict()[key] for m in models) / len(models)
        merged.model.embed_tokens.weight.copy_(out["model.embed_tokens.weight"])
        rows = [[tok.encode(t).ids for t in read_rows(c)] for c in calibs]
        states = [[merged.model.embed_tokens(torch.tensor([r])) for r in rs] for rs in rows]
        tokens = [sum(len(r) for r in rs) for rs in rows]
        for l in range(len(merged.model.layers)):
            means = []
            for m, hs, n in zip(models, states, tokens):
                layer = m.model.layers[l]
                sums, hooks = {}, []
                for mname, module in layer.named_modules():
                    if isinstance(module, torch.nn.Linear):
                        def hook(mod, args, mname=mname):
                            x = args[0].reshape(-1, args[0].shape[-1])
                            sums[mname] = sums.get(mname, 0) + x.T @ x
                        hooks.append(module.register_forward_pre_hook(hook))
                for h in hs:
                    run_layer(layer, m.model.rotary_emb, h)
                for h in hooks:
                    h.remove()
                means.append({k: v / n for k, v in sums.items()})
            merged_layer = {}
            for pname in models[0].model.layers[l].state_dict():
                ws = [m.model.layers[l].state_dict()[pname] for m in models]
                module = pname[: -len(".weight")]
                if pname.endswith(".weight") and module in means[0]:
                    merged_layer[pname] = regmean(ws, [g[module] for g in means], alpha)
                else:
                    merged_layer[pname] = sum(ws) / len(ws)
                out[f"model.layers.{l}.{pname}"] = merged_layer[pname]
            merged.model.layers[l].load_state_dict(merged_layer)
            states = [[run_layer(merged.model.layers[l], merged.model.rotary_emb, h) for h in hs] for hs in states]
    return out


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    write_calibration_b()
    tok = Tokenizer.from_file(os.path.join(REGMEAN, "tokenizer", "tokenizer.json"))
    check_layer_calls(load("expert_a"), tok.encode(read_rows(os.path.join(REGMEAN, "calib.csv"))[1]).ids)
    cases = []
    for case, pairs, alpha in CASES:
        names = [n for n, _ in pairs]
        calibs = [os.path.normpath(os.path.join(ROOT, c)) for _, c in pairs]
        out = regmean_plus(names, calibs, DEFAULT_ALPHA if alpha is None else alpha, tok)
        d = os.path.join(ROOT, "goldens", case)
        os.makedirs(d, exist_ok=True)
        save_file({k: v.float().contiguous() for k, v in out.items()}, os.path.join(d, "model.safetensors"))
        cases.append({
            "case": case,
            "models": names,
            "calibration": [c for _, c in pairs],
            "alpha": alpha,
            "golden": f"goldens/{case}/model.safetensors",
        })
    with open(os.path.join(ROOT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=2)
    print(f"wrote {len(cases)} cases into {ROOT}")


if __name__ == "__main__":
    main()
