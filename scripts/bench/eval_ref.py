#!/usr/bin/env python3
"""Helper of scripts/bench-eval: builds the benchmark model and data, runs the transformers
reference (the starter kit's algorithm: batch 1, f32, the input run once with a KV cache that
the choices reuse, greedy `generate` per row) and compares predictions with ours.

  eval_ref.py prepare --tokenizer DIR --data DIR --out WORK [--layers 4] [--mc 50] [--gen 20]
  eval_ref.py run --work WORK            # reference predictions + timings
  eval_ref.py compare --work WORK --ours-log LOG --ours-wall SECONDS
"""

import argparse
import csv
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "goldens"))
from eval_goldens import KitTokenizer  # noqa: E402

# TinyLlama-1.1B widths (config of TinyLlama/TinyLlama_v1.1), fewer layers.
TINYLLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000,
                 hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2, torch_dtype="float32")


def prepare(a):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    import shutil

    model_dir = os.path.join(a.out, "model")
    os.makedirs(model_dir, exist_ok=True)
    cfg = dict(TINYLLAMA, num_hidden_layers=a.layers)
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, os.path.join(model_dir, "model.safetensors"))
        json.dump(cfg, open(os.path.join(model_dir, "config.json"), "w"), indent=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(a.tokenizer, f), os.path.join(model_dir, f))
    data_dir = os.path.join(a.out, "data")
    os.makedirs(data_dir, exist_ok=True)
    for name, n in (("cosmos_qa", a.mc), ("xsum", a.gen)):
        with open(os.path.join(a.data, "validation", f"{name}.csv"), newline="") as f:
            rows = list(csv.reader(f))
        with open(os.path.join(data_dir, f"{name}.csv"), "w", newline="") as f:
            csv.writer(f).writerows(rows[: n + 1])


@torch.no_grad()
def run(a):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    model_dir = os.path.join(a.work, "model")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kt = KitTokenizer(model_dir)
    load = time.time() - t0
    preds, timings = {}, {"load": load}
    for name in ("cosmos_qa", "xsum"):
        with open(os.path.join(a.work, "data", f"{name}.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        t = time.time()
        out = []
        for r in rows:
            ids = torch.tensor([kt.input(r["input"])])
            if r["eval_type"] == "multiple_choice":
                import ast
                choices = ast.literal_eval(r["answer_choices"])
                res = model(ids, use_cache=True)
                cids = [kt.target(c) for c in choices]
                L = max(map(len, cids))
                x = torch.tensor([c + [kt.eos] * (L - len(c)) for c in cids])
                mask = torch.tensor([[1] * len(c) + [0] * (L - len(c)) for c in cids])
                past = res.past_key_values
                past.batch_repeat_interleave(len(choices))
                am = torch.cat([torch.ones(len(choices), ids.shape[1], dtype=torch.long), mask], 1)
                lo = model(x, attention_mask=am, past_key_values=past).logits
                lp = torch.log_softmax(lo[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0]
                scores = (lp * mask[:, 1:]).sum(-1)
                out.append(str(int(torch.argmax(scores))))
            else:
                g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_gen_len,
                                   do_sample=False, eos_token_id=kt.eos, pad_token_id=kt.eos,
                                   top_k=None, top_p=None, temperature=None)
                out.append(kt.decode(g[0, ids.shape[1]:].tolist()))
        timings[name] = time.time() - t
        preds[name] = out
    timings["total"] = time.time() - t0
    json.dump(dict(predictions=preds, timings=timings), open(os.path.join(a.work, "ref.json"), "w"))


def compare(a):
    import re
    ref = json.load(open(os.path.join(a.work, "ref.json")))
    ours_t = {}
    for line in open(a.ours_log):
        m = re.match(r"^(\w+): (\d+) rows in ([\d.]+)s", line)
        if m:
            ours_t[m.group(1)] = float(m.group(3))
    ours_t["total"] = float(a.ours_wall)
    rows = []
    ok = True
    for name in ("cosmos_qa", "xsum"):
        with open(os.path.join(a.work, "ours", "predictions", f"{name}.csv"), newline="") as f:
            ours = [r["prediction"] for r in csv.DictReader(f)]
        same = sum(x == y for x, y in zip(ours, ref["predictions"][name]))
        n = len(ref["predictions"][name])
        ok &= same == n and len(ours) == n
        rows.append((name, same, n))
    print("| phase | reference (s) | ours (s) | speed-up |")
    print("|---|---:|---:|---:|")
    for label, key in (("multiple choice (cosmos_qa)", "cosmos_qa"), ("generation (xsum)", "xsum"),
                       ("total incl. load", "total")):
        r, o = ref["timings"][key], ours_t.get(key, float("nan"))
        ratio = f"{r / o:.2f}x" if o > 0 else "-"
        print(f"| {label} | {r:.1f} | {o:.1f} | {ratio} |")
    for name, same, n in rows:
        print(f"predictions agreeing on {name}: {same}/{n}")
    sys.exit(0 if ok else 1)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--mc", type=int, default=50)
    p.add_argument("--gen", type=int, default=20)
    r = sub.add_parser("run")
    r.add_argument("--work", required=True)
    r.add_argument("--max-gen-len", type=int, default=64)
    c = sub.add_parser("compare")
    c.add_argument("--work", required=True)
    c.add_argument("--ours-log", required=True)
    c.add_argument("--ours-wall", required=True)
    a = ap.parse_args()
    {"prepare": prepare, "run": run, "compare": compare}[a.cmd](a)


if __name__ == "__main__":
    main()
