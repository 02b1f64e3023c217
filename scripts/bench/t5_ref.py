#!/usr/bin/env python3
"""Helper of scripts/bench-t5: builds a random-weight T5 with flan-t5-small widths (gated-gelu,
untied head, 8+8 blocks, vocabulary 32128) and the benchmark data, runs the transformers
reference (the starter kit's encoder-decoder algorithm: batch 1, f32, the encoder once per
multiple-choice row with the choices batched on the decoder, greedy `generate` per generation
row with the flan-t5 default length) and compares predictions with ours.

  t5_ref.py prepare --tokenizer DIR --data DIR --out WORK [--mc 50] [--gen 20]
  t5_ref.py run --work WORK
  t5_ref.py compare --work WORK --ours-log LOG --ours-wall SECONDS
"""

import argparse
import ast
import csv
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "goldens"))
from t5_goldens import KIT_MAX_LENGTH, KitTokenizer  # noqa: E402

FLAN_T5_SMALL = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=32128,
                     d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False, layer_norm_epsilon=1e-6,
                     decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, is_encoder_decoder=True,
                     torch_dtype="float32")


def prepare(a):
    import shutil

    from safetensors.torch import save_file
    from transformers import T5Config, T5ForConditionalGeneration

    model_dir = os.path.join(a.out, "model")
    os.makedirs(model_dir, exist_ok=True)
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(T5Config(**{k: v for k, v in FLAN_T5_SMALL.items() if k != "model_type"}))
        sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()
              if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
        # transformers 5 ties the head at init; flan-t5's is its own matrix (init as T5's).
        sd["lm_head.weight"] = torch.randn(sd["lm_head.weight"].shape)
        save_file(sd, os.path.join(model_dir, "model.safetensors"))
        json.dump(FLAN_T5_SMALL, open(os.path.join(model_dir, "config.json"), "w"), indent=1)
    shutil.copy(os.path.join(a.tokenizer, "tokenizer.json"), os.path.join(model_dir, "tokenizer.json"))
    # flan-t5's model_max_length.
    cfg = json.load(open(os.path.join(a.tokenizer, "tokenizer_config.json")))
    cfg["model_max_length"] = 512
    json.dump(cfg, open(os.path.join(model_dir, "tokenizer_config.json"), "w"), indent=1)
    data_dir = os.path.join(a.out, "data")
    os.makedirs(data_dir, exist_ok=True)
    for name, n in (("cosmos_qa", a.mc), ("xsum", a.gen)):
        with open(os.path.join(a.data, "validation", f"{name}.csv"), newline="") as f:
            rows = list(csv.reader(f))
        with open(os.path.join(data_dir, f"{name}.csv"), "w", newline="") as f:
            csv.writer(f).writerows(rows[: n + 1])


@torch.no_grad()
def run(a):
    from transformers import T5ForConditionalGeneration

    torch.set_num_threads(os.cpu_count())
    model_dir = os.path.join(a.work, "model")
    t0 = time.time()
    model = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    kt = KitTokenizer(model_dir)
    preds, timings = {}, {"load": time.time() - t0}
    for name in ("cosmos_qa", "xsum"):
        with open(os.path.join(a.work, "data", f"{name}.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        t = time.time()
        out = []
        for r in rows:
            x = torch.tensor([kt.encode(r["input"])])
            if r["eval_type"] == "multiple_choice":
                choices = ast.literal_eval(r["answer_choices"])
                enc = model.get_encoder()(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
                cids = [kt.encode(c) for c in choices]
                width = max(map(len, cids))
                labels = torch.tensor([c + [0] * (width - len(c)) for c in cids])
                mask = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in cids])
                n = len(choices)
                lo = model(encoder_outputs=(enc.repeat(n, 1, 1),), attention_mask=torch.ones_like(x).repeat(n, 1),
                           decoder_input_ids=model._shift_right(labels)).logits
                lp = torch.log_softmax(lo, -1).gather(-1, labels[..., None])[..., 0]
                out.append(str(int(torch.argmax((lp * mask).sum(-1)))))
            else:
                g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                                   max_length=KIT_MAX_LENGTH, eos_token_id=1, pad_token_id=0,
                                   decoder_start_token_id=0, top_k=None, top_p=None, temperature=None)
                out.append(kt.decode(g[0].tolist()))
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
    ok = True
    agree = []
    for name in ("cosmos_qa", "xsum"):
        with open(os.path.join(a.work, "ours", "predictions", f"{name}.csv"), newline="") as f:
            ours = [r["prediction"] for r in csv.DictReader(f)]
        same = sum(x == y for x, y in zip(ours, ref["predictions"][name]))
        n = len(ref["predictions"][name])
        ok &= same == n and len(ours) == n
        agree.append((name, same, n))
    print("| phase | reference (s) | ours (s) | reference ex/s | ours ex/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, key, n in (("multiple choice (cosmos_qa)", "cosmos_qa", agree[0][2]),
                          ("generation (xsum)", "xsum", agree[1][2]),
                          ("total incl. load", "total", agree[0][2] + agree[1][2])):
        r, o = ref["timings"][key], ours_t.get(key, float("nan"))
        rate = lambda t: f"{n / t:.2f}" if t > 0 else "-"
        ratio = f"{r / o:.2f}x" if r > 0 and o > 0 else "-"
        print(f"| {label} | {r:.1f} | {o:.1f} | {rate(r)} | {rate(o)} | {ratio} |")
    for name, same, n in agree:
        print(f"predictions agreeing on {name}: {same}/{n}")
    sys.exit(0 if ok else 1)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mc", type=int, default=50)
    p.add_argument("--gen", type=int, default=20)
    r = sub.add_parser("run")
    r.add_argument("--work", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--work", required=True)
    c.add_argument("--ours-log", required=True)
    c.add_argument("--ours-wall", required=True)
    a = ap.parse_args()
    {"prepare": prepare, "run": run, "compare": compare}[a.cmd](a)


if __name__ == "__main__":
    main()
