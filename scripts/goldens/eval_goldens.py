#!/usr/bin/env python3
"""Golden files for eval-harness parity tests, computed with transformers / rouge_score.

Builds tiny random-weight Llama (Llama-2 tokenizer), Llama with llama3 rope scaling (Llama-3
tokenizer), Mistral (sliding window), Qwen2 (qkv bias) and Gemma (tied head, GeGLU) models
whose weights come from the same counter-based generator as
`tests/synthetic.rs` (testkit; so no weights are committed), writes competition-schema
rows, and records per model: token ids, sampled logits, multiple-choice scores (the starter
kit's algorithm and the full log-likelihood) and greedy generations. Also records rouge_score
values for a varied set of pairs.

Run (not in CI): scripts/fetch-tokenizers.sh && \
  /work/venvs/ref/bin/python scripts/goldens/eval_goldens.py
"""

import argparse
import copy
import csv
import json
import os
import sys
import tempfile

import numpy as np
import torch
from rouge_score import rouge_scorer, scoring  # noqa: F401
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDENS = os.path.join(ROOT, "crates", "eval-harness", "tests", "goldens")
FLAG_CLASSES = {
    "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
    "GemmaTokenizer", "GemmaTokenizerFast",
}
MAX_GEN = 12
VOCAB_SAMPLE = 24

# ---------------------------------------------------------------- synthetic weights


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def values(name, n, scale, offset):
    """Mirror of testkit::synthetic::values: f32 `unit * scale + offset`."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(fnv1a64(name)) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    k = (z >> np.uint64(40)).astype(np.float32)
    u = k * np.float32(1.0 / 8388608.0) - np.float32(1.0)
    return u * np.float32(scale) + np.float32(offset)


def weights(cfg, family, eos):
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", h // nh)
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    tied = cfg["tie_word_embeddings"]
    qkv_bias = family == "qwen2"
    norm_off = 0.0 if family == "gemma" else 1.0
    out = {}

    def put(name, shape, scale, offset=0.0):
        out[name] = torch.from_numpy(values(name, int(np.prod(shape)), scale, offset).reshape(shape))

    def boost(t):
        t = t.clone()
        t[eos] *= 4.0
        return t

    put("model.embed_tokens.weight", (vocab, h), 1.0)
    if tied:
        out["model.embed_tokens.weight"] = boost(out["model.embed_tokens.weight"])
    else:
        put("lm_head.weight", (vocab, h), 0.125)
        out["lm_head.weight"] = boost(out["lm_head.weight"])
    put("model.norm.weight", (h,), 0.25, norm_off)
    for l in range(L):
        p = f"model.layers.{l}"
        put(f"{p}.input_layernorm.weight", (h,), 0.25, norm_off)
        put(f"{p}.post_attention_layernorm.weight", (h,), 0.25, norm_off)
        for n, o in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            put(f"{p}.self_attn.{n}_proj.weight", (o, h), 0.125)
            if qkv_bias:
                put(f"{p}.self_attn.{n}_proj.bias", (o,), 0.125)
        put(f"{p}.self_attn.o_proj.weight", (h, nh * hd), 0.125)
        put(f"{p}.mlp.gate_proj.weight", (inter, h), 0.125)
        put(f"{p}.mlp.up_proj.weight", (inter, h), 0.125)
        put(f"{p}.mlp.down_proj.weight", (h, inter), 0.125)
    return out


# ---------------------------------------------------------------- models

COMMON = dict(num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-5,
              torch_dtype="float32", bos_token_id=1, eos_token_id=2)

MODELS = {
    "llama": ("llama2", dict(COMMON, model_type="llama", architectures=["LlamaForCausalLM"],
                             vocab_size=32000, hidden_size=64, intermediate_size=128,
                             num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
                             tie_word_embeddings=False, rope_theta=10000.0)),
    "llama3": ("llama3", dict(COMMON, model_type="llama", architectures=["LlamaForCausalLM"],
                              vocab_size=128256, hidden_size=32, intermediate_size=64,
                              num_attention_heads=2, num_key_value_heads=1, hidden_act="silu",
                              tie_word_embeddings=False, rope_theta=500000.0,
                              bos_token_id=128000, eos_token_id=128001,
                              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0,
                                                original_max_position_embeddings=32))),
    "mistral": ("llama2", dict(COMMON, model_type="mistral", architectures=["MistralForCausalLM"],
                               vocab_size=32000, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=1, hidden_act="silu",
                               tie_word_embeddings=False, rope_theta=10000.0, sliding_window=16)),
    "qwen2": ("llama2", dict(COMMON, model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                             vocab_size=32000, hidden_size=64, intermediate_size=128,
                             num_attention_heads=4, num_key_value_heads=4, hidden_act="silu",
                             tie_word_embeddings=False, rope_theta=1000000.0,
                             use_sliding_window=False)),
    "gemma": ("llama2", dict(COMMON, model_type="gemma", architectures=["GemmaForCausalLM"],
                             vocab_size=32000, hidden_size=64, intermediate_size=128,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                             hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                             tie_word_embeddings=True, rope_theta=10000.0)),
}

# Rows in the competition schema: short and long inputs, quoted / non-ASCII choices.
LONG = (
    "The committee met on Tuesday to discuss the new budget. After a long debate about schools, "
    "roads and the hospital, the members agreed to postpone the vote until next month, when the "
    "auditors' report will be ready. Several residents, who had waited outside for hours, said "
    "they were disappointed; one of them, Mrs. O'Neill, called it \"a waste of everybody's time\". "
    "The mayor defended the decision: the numbers simply weren't there yet, she said. Café owners "
    "near the town hall reported a busy afternoon."
)
ROWS = [
    dict(id="mc-0", input="Question: What color is the sky on a clear day?\nOptions:\nA. blue\nB. green\nC. red\nD. none",
         target="0", answer_choices=["A", "B", "C", "D"], eval_type="multiple_choice"),
    dict(id="mc-1", input=LONG + "\nQuestion: Why was the vote postponed?",
         target="2", answer_choices=["He's \"fine\", really", "Ça va, merci — très bien",
                                     "The report was not ready.", "No"],
         eval_type="multiple_choice"),
    dict(id="mc-2", input="Pick the odd one out: apple, pear, hammer, plum.",
         target="1", answer_choices=["apple", "hammer", "plum, probably", "it's the pear"],
         eval_type="multiple_choice"),
    dict(id="mc-3", input="2 + 2 =", target="1", answer_choices=["3", "4", "5"],
         eval_type="multiple_choice"),
    dict(id="gen-0", input="Summarize: The cat sat on the mat all day long.",
         target="A cat sat on a mat.", answer_choices=None, eval_type="generation"),
    dict(id="gen-1", input="Summarize the following article.\n" + LONG,
         target="The budget vote was postponed.\nResidents were upset.", answer_choices=None,
         eval_type="generation"),
    dict(id="gen-2", input="Hello", target="Hello there", answer_choices=None, eval_type="generation"),
    dict(id="gen-3", input="Translate to French: good morning, my friend!", target="bonjour, mon ami !",
         answer_choices=None, eval_type="generation"),
    dict(id="gen-4", input="List three colours:", target="red, green, blue", answer_choices=None,
         eval_type="generation"),
]


def write_rows(path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for r in ROWS:
            w.writerow([r["id"], r["input"], r["target"],
                        repr(r["answer_choices"]) if r["answer_choices"] else "None", r["eval_type"]])


class KitTokenizer:
    """The kit's input/target tokenizers, spelled out (see starter-kit-semantics.md)."""

    def __init__(self, d):
        self.tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        self.cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
        self.flag = self.cfg.get("tokenizer_class") in FLAG_CLASSES
        self.bos = self.tok.token_to_id(self.cfg["bos_token"])
        self.eos = self.tok.token_to_id(self.cfg["eos_token"])
        # transformers 4.39 (the kit's) cleans up unless the config says false.
        self.clean = self.cfg.get("clean_up_tokenization_spaces", True)

    def input(self, s):
        if not self.flag:
            return self.tok.encode(s).ids
        ids = self.tok.encode(s, add_special_tokens=False).ids
        return ([self.bos] if self.cfg.get("add_bos_token", True) else []) + ids + (
            [self.eos] if self.cfg.get("add_eos_token", False) else [])

    def target(self, s):
        if not self.flag:
            return self.tok.encode(s).ids
        return self.tok.encode(s, add_special_tokens=False).ids + [self.eos]

    def decode(self, ids):
        s = self.tok.decode(ids, skip_special_tokens=True)
        if self.clean:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                         (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                         (" 're", "'re")):
                s = s.replace(a, b)
        return s


@torch.no_grad()
def golden_for(name, tok_name, cfg, tokdir):
    kt = KitTokenizer(os.path.join(tokdir, tok_name))
    with tempfile.TemporaryDirectory() as d:
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        save_file(weights(cfg, cfg["model_type"], kt.eos), os.path.join(d, "model.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    out = dict(model=name, tokenizer=tok_name, config=cfg, max_gen_len=MAX_GEN, logits=[], mc=[], gen=[])
    vocab_ids = [int(i) for i in np.linspace(0, cfg["vocab_size"] - 1, VOCAB_SAMPLE).round()] + [kt.eos]
    out["vocab_ids"] = vocab_ids
    for r in ROWS:
        ids = kt.input(r["input"])
        x = torch.tensor([ids])
        if r["id"] in ("mc-1", "gen-2", "mc-3"):
            logits = model(x).logits[0]
            out["logits"].append(dict(id=r["id"], input_ids=ids,
                                      values=logits[:, vocab_ids].tolist(),
                                      logsumexp=torch.logsumexp(logits, -1).tolist()))
        if r["eval_type"] == "multiple_choice":
            res = model(x, use_cache=True)
            last = torch.log_softmax(res.logits[0, -1], -1)
            kit, full, cids_all, full_ids_all = [], [], [], []
            for c in r["answer_choices"]:
                cids = kt.target(c)
                cids_all.append(cids)
                # Starter kit: shift inside the choice, first token unscored.
                lo = model(torch.tensor([cids]), past_key_values=copy.deepcopy(res.past_key_values)).logits[0]
                lp = torch.log_softmax(lo, -1)
                kit.append(float(sum(lp[j, cids[j + 1]] for j in range(len(cids) - 1))))
                # Full: every token scored given the input (a leading BOS dropped).
                fids = cids[1:] if len(cids) > 1 and cids[0] == kt.bos else cids
                full_ids_all.append(fids)
                lo = model(torch.tensor([fids]), past_key_values=copy.deepcopy(res.past_key_values)).logits[0]
                lp = torch.log_softmax(lo, -1)
                full.append(float(last[fids[0]] + sum(lp[j, fids[j + 1]] for j in range(len(fids) - 1))))
            norm = [s / max(len(c), 1) for s, c in zip(full, r["answer_choices"])]
            out["mc"].append(dict(id=r["id"], input_ids=ids, choice_ids=cids_all, full_choice_ids=full_ids_all,
                                  kit_scores=kit, kit_prediction=int(np.argmax(kit)),
                                  full_scores=full, full_prediction=int(np.argmax(full)),
                                  norm_prediction=int(np.argmax(norm))))
        else:
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_GEN, do_sample=False,
                               eos_token_id=kt.eos, pad_token_id=kt.eos, num_beams=1,
                               repetition_penalty=1.0, top_k=None, top_p=None, temperature=None)
            gen = g[0, len(ids):].tolist()
            out["gen"].append(dict(id=r["id"], input_ids=ids, generated_ids=gen, text=kt.decode(gen)))
    return out


ROUGE_PAIRS = [
    ("The cat sat on the mat.", "The cat sat on the mat."),
    ("The cat sat on the mat.", "the CAT was sitting on a mat!"),
    ("Former Premier League footballer Sam Sodje has appeared in court.", "Sam Sodje, ex-footballer, in court today"),
    ("police killed the gunman", "the gunman was killed by police"),
    ("Café owners near the town hall", "cafe owners near the town-hall"),
    ("naïve résumé über straße", "naive resume uber strasse"),
    ("", "something"),
    ("something", ""),
    ("", ""),
    ("!!! ... ???", "!!!"),
    ("The budget vote was postponed.\nResidents were upset.", "Residents were upset.\nThe vote was postponed."),
    ("first line\n\nthird line after blank", "third line\nfirst line"),
    ("a a a b b c", "a b c a b c a"),
    ("2024 was the year 42 things happened", "in 2024, 42 things happened"),
    ("It's a dog's life, isn't it?", "it s a dog s life isn t it"),
    ("one two three four five six seven eight nine ten", "ten nine eight seven six five four three two one"),
    ("x\ny\nz", "x y z"),
    ("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps over the lazy fox"),
    ("Ünïcödé only ☕ 中文", "中文 only"),
    ("Tabs\tand\r\nwindows newlines", "tabs and windows\nnewlines"),
]


def rouge_goldens():
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    out = []
    for t, p in ROUGE_PAIRS:
        s = sc.score(t, p)
        out.append(dict(target=t, prediction=p, **{k: v.fmeasure for k, v in s.items()}))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizers", default=os.path.join(ROOT, ".cache", "tokenizers"))
    ap.add_argument("--out", default=GOLDENS)
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    write_rows(os.path.join(a.out, "rows.csv"))
    json.dump(rouge_goldens(), open(os.path.join(a.out, "rouge.json"), "w"), indent=1, ensure_ascii=False)
    for name, (tok, cfg) in MODELS.items():
        if a.only and name not in a.only:
            continue
        g = golden_for(name, tok, cfg, a.tokenizers)
        with open(os.path.join(a.out, f"{name}.json"), "w") as f:
            json.dump(g, f, ensure_ascii=False)
        lens = [len(x["generated_ids"]) for x in g["gen"]]
        print(f"{name}: kit predictions {[m['kit_prediction'] for m in g['mc']]}, generation lengths {lens}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
