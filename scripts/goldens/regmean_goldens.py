#!/usr/bin/env python3
"""Make the RegMean fixtures and goldens that merge-core's and the CLI's tests compare against.

Run from the repository root with the reference venv (torch, transformers, tokenizers, safetensors):

    /work/venvs/ref/bin/python scripts/goldens/regmean_goldens.py

It READS the tiny Llama fixtures of scripts/goldens/merge_goldens.py
(crates/merge-core/tests/fixtures/merge/models/expert_{a,b,c}; never changed here) and writes
crates/merge-core/tests/fixtures/regmean/:

  tokenizer/tokenizer.json, tokenizer_config.json
      a word-level tokenizer over the fixtures' 64-token vocabulary (`w0` .. `w63`), so the
      CLI test can run `llm-merging stats` on text: copy a fixture model and these two files
      into one directory.
  calib.csv
      calibration rows in the competition schema (id,input,answer_choices,eval_type).
  stats/<expert>/stats.json, grams.safetensors
      each expert's input statistics in our format, computed with transformers: forward
      pre-hooks on every nn.Linear of the decoder layers sum x^T x over every token of every
      row (one row at a time: no padding). Keys: q/k/v share q_proj's matrix, gate/up share
      gate_proj's (the same input), as `llm-merging stats` writes them.
  goldens/<case>/model.safetensors
      RegMean of the experts by the paper's formulas (Jin et al., ICLR 2023), in float64:
      per linear weight W (out x in), with G_i the mean Gram (sum / tokens) of model i,
      G~_i = alpha * G_i + (1 - alpha) * diag(G_i),
      W* = ((sum_i G~_i)^-1 sum_i G~_i W_i^T)^T; every other tensor the plain mean.
  cases.json
      each case: the models, alpha, the golden path.
"""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM

MERGE_MODELS = os.path.join("crates", "merge-core", "tests", "fixtures", "merge", "models")
ROOT = os.path.join("crates", "merge-core", "tests", "fixtures", "regmean")
EXPERTS = ["expert_a", "expert_b", "expert_c"]
FORMAT = "llm-merging input statistics 1"
FINGERPRINT_KEYS = [
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
]
CASES = [
    ("regmean_two", ["expert_a", "expert_b"], None),
    ("regmean_three_alpha", ["expert_a", "expert_b", "expert_c"], 0.5),
    ("regmean_two_alpha_one", ["expert_a", "expert_b"], 1.0),
]
DEFAULT_ALPHA = 0.9
SHARES_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def write_tokenizer():
    vocab = {f"w{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = os.path.join(ROOT, "tokenizer")
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "w2", "bos_token": "w1", "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    return tok


def write_calibration():
    g = torch.Generator().manual_seed(7)
    rows = []
    for i in range(9):
        n = int(torch.randint(3, 14, (1,), generator=g))
        ids = torch.randint(3, 64, (n,), generator=g).tolist()
        rows.append((f"calib-{i}", " ".join(f"w{t}" for t in ids)))
    with open(os.path.join(ROOT, "calib.csv"), "w") as f:
        f.write("id,input,answer_choices,eval_type\n")
        for rid, text in rows:
            f.write(f'{rid},"{text}",[],generation\n')
    return rows


def grams_of(name, rows, tok):
    """Per Linear module of the decoder layers: sum of x^T x over every token (float64)."""
    model = LlamaForCausalLM.from_pretrained(os.path.join(MERGE_MODELS, name), dtype=torch.float32).eval()
    sums = {}
    hooks = []
    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in mname:
            def hook(mod, args, mname=mname):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[mname] = sums.get(mname, 0) + x.T @ x
            hooks.append(module.register_forward_pre_hook(hook))
    tokens = 0
    with torch.no_grad():
        for _, text in rows:
            ids = tok.encode(text).ids
            tokens += len(ids)
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return model, sums, tokens


def write_stats(name, model, sums, tokens, rows):
    out = os.path.join(ROOT, "stats", name)
    os.makedirs(out, exist_ok=True)
    tensors, grams = {}, {}
    for mname, g in sums.items():
        short = mname.rsplit(".", 1)[1]
        first = mname.rsplit(".", 1)[0] + "." + SHARES_INPUT.get(short, short)
        # The matrices every module sharing an input sees are the same: check, store once.
        key = first + ".weight"
        if key in tensors:
            assert torch.allclose(tensors[key].double(), g.float().double(), atol=1e-4), mname
        tensors[key] = g.float().contiguous()
        grams[mname + ".weight"] = key
    save_file(tensors, os.path.join(out, "grams.safetensors"))
    config = model.config.to_dict()
    meta = {
        "format": FORMAT,
        "model": f"fixtures/merge/models/{name}",
        "fingerprint": {k: config[k] for k in FINGERPRINT_KEYS if config.get(k) is not None},
        "tokens": tokens,
        "data": "calib.csv",
        "rows": [r for r, _ in rows],
        "grams": dict(sorted(grams.items())),
        "skipped": {"lm_head.weight": "transformers reference: only decoder-layer Linear modules"},
    }
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return {k: g / tokens for k, g in sums.items()}


def regmean(weights, means, alpha):
    """The paper's closed form over float64 weights and mean Grams of one linear layer."""
    a = 0
    b = 0
    for w, g in zip(weights, means):
        scaled = alpha * g + (1 - alpha) * torch.diag(torch.diag(g))
        a = a + scaled
        b = b + scaled @ w.T
    return torch.linalg.solve(a, b).T


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    tok = write_tokenizer()
    rows = write_calibration()
    state, means = {}, {}
    for name in EXPERTS:
        model, sums, tokens = grams_of(name, rows, tok)
        means[name] = write_stats(name, model, sums, tokens, rows)
        state[name] = load_file(os.path.join(MERGE_MODELS, name, "model.safetensors"))
    cases = []
    for case, names, alpha in CASES:
        a = DEFAULT_ALPHA if alpha is None else alpha
        out = {}
        for key in state[names[0]]:
            ws = [state[n][key].double() for n in names]
            module = key[: -len(".weight")]
            if key.endswith(".weight") and module in means[names[0]]:
                out[key] = regmean(ws, [means[n][module] for n in names], a).float()
            else:
                out[key] = (sum(ws) / len(ws)).float()
        d = os.path.join(ROOT, "goldens", case)
        os.makedirs(d, exist_ok=True)
        save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "model.safetensors"))
        cases.append({"case": case, "models": names, "alpha": alpha, "golden": f"goldens/{case}/model.safetensors"})
    with open(os.path.join(ROOT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=2)
    print(f"wrote {len(cases)} cases and {len(EXPERTS)} statistics into {ROOT}")


if __name__ == "__main__":
    main()
