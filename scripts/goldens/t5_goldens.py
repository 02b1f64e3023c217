#!/usr/bin/env python3
"""Golden files for the T5 / Flan-T5 parity tests of eval-harness, computed with transformers
and peft.

Writes into crates/eval-harness/tests/goldens/:
- t5-tokenizer/: a T5-style SentencePiece Unigram tokenizer trained with the `tokenizers`
  package on a few sentences (T5's layout: `<pad>`=0, `</s>`=1, `<unk>`=2, NMT/NFKC
  normalizer, whitespace + Metaspace pre-tokenizer, `$A </s>` post-processor, Metaspace
  decoder, `<extra_id_N>` added tokens; tokenizer_config.json as flan-t5's, with a small
  model_max_length so truncation is exercised). The files are committed and are the
  reference: the trainer's EM runs in parallel and orders equal scores by hash, so a retrain
  (--retrain-tokenizer) may give a slightly different vocabulary, after which every golden
  must be regenerated from it (this script does both).
- t5_v11.json: a tiny random T5 v1.1 (gated-gelu, untied head), t5_orig.json: a tiny original
  T5 (relu, tied head with the d_model^-0.5 rescale). Weights come from the counter-based
  generator of `tests/synthetic.rs` (testkit: `t5_weights`), so none are committed.
  Per model: token ids, sampled logits + logsumexp, starter-kit multiple-choice scores
  (encoder once, labels padded with 0, decoder inputs shifted right from the start token,
  every label token scored) and greedy generations with the kit's flan-t5 length (max_length
  20 including the decoder start token, as transformers 4.39's default).
- t5_lora.json: the `flant5_avg` layout on the v1.1 model: two rank-16 LoRA adapters on `q`/`v`
  averaged factor-wise 0.5/0.5, loaded with peft; choice scores and generations.
- t5_buckets.json: transformers' relative position buckets for -300..300.

The rows are those of rows.csv (written by eval_goldens.py).

Run (not in CI): /work/venvs/ref/bin/python scripts/goldens/t5_goldens.py
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eval_goldens import LONG, ROWS, values  # noqa: E402  (same rows and generator)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDENS = os.path.join(ROOT, "crates", "eval-harness", "tests", "goldens")
TOKDIR = os.path.join(GOLDENS, "t5-tokenizer")
VOCAB_SAMPLE = 24
MODEL_MAX_LENGTH = 64
EXTRA_IDS = 8
# transformers 4.39 (the kit's) default generation length for flan-t5: 20 tokens including the
# decoder start. transformers 5 changed the default to 20 *new* tokens, so pass it explicitly.
KIT_MAX_LENGTH = 20
DECODER_TEXT = "The report was not ready."

# Training text: plain English plus the long row, so most row text tokenizes into pieces while
# a few characters of the rows ("Ç", "—", "è") are unknown to the vocabulary, as rare
# characters are to T5's.
CORPUS = [
    LONG,
    "Question: What color is the sky on a clear day? Options: A. blue B. green C. red D. none",
    "Pick the odd one out: apple, pear, hammer, plum. It's the pear, probably.",
    "Summarize the following article. The cat sat on the mat all day long.",
    "Translate to French: good morning, my friend! Hello there, how are you?",
    "List three colours: red, green, blue. The report was not ready. No, he is fine really.",
    "2 + 2 = 4, 3 + 2 = 5, and 1 + 2 = 3. Numbers and digits: 0 1 2 3 4 5 6 7 8 9.",
    "The budget vote was postponed and the residents were upset about the long wait.",
    "A merged model answers questions, summarises news and translates short sentences.",
    "Teams merge experts trained on different tasks into one generalist model.",
    "The quick brown fox jumps over the lazy dog while the weather stays clear and warm.",
    "Why was the vote postponed? Because the auditors' report was not ready yet.",
]


def train_tokenizer():
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence(
        [normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", shrinking_factor=0.75, max_piece_length=12,
                                      n_sub_iterations=2, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert [tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    tok.add_special_tokens([f"<extra_id_{i}>" for i in range(EXTRA_IDS - 1, -1, -1)])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    os.makedirs(TOKDIR, exist_ok=True)
    tok.save(os.path.join(TOKDIR, "tokenizer.json"))
    # As flan-t5's tokenizer_config.json: no clean_up_tokenization_spaces key (transformers 4.39
    # then cleans up), model_max_length set.
    cfg = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=EXTRA_IDS,
               additional_special_tokens=[f"<extra_id_{i}>" for i in range(EXTRA_IDS)],
               model_max_length=MODEL_MAX_LENGTH, tokenizer_class="T5Tokenizer")
    with open(os.path.join(TOKDIR, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class KitTokenizer:
    """The kit's T5 tokenizer (transformers 4.39 T5TokenizerFast over tokenizer.json): the
    post-processor appends </s>, truncation at model_max_length, decode skips special tokens
    and cleans up tokenization spaces (4.39's default when the config does not say)."""

    def __init__(self, d):
        self.tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        self.cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
        self.tok.enable_truncation(self.cfg["model_max_length"])
        self.clean = self.cfg.get("clean_up_tokenization_spaces", True)

    def encode(self, s):
        return self.tok.encode(s).ids

    def decode(self, ids):
        s = self.tok.decode(ids, skip_special_tokens=True)
        if self.clean:
            for a, b in CLEAN_UPS:
                s = s.replace(a, b)
        return s


# ---------------------------------------------------------------- models


def t5_weights(cfg, eos):
    """Mirror of testkit::synthetic::t5_weights."""
    d, inner, ff, v = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"], cfg["vocab_size"]
    tied = cfg["tie_word_embeddings"]
    gated = cfg["feed_forward_proj"].startswith("gated-")
    out = {}

    def put(name, shape, scale, offset=0.0):
        out[name] = torch.from_numpy(values(name, int(np.prod(shape)), scale, offset).reshape(shape))

    # A tied head reads the embedding back: a smaller embedding keeps random models from
    # echoing their input token.
    put("shared.weight", (v, d), 0.25 if tied else 1.0)
    if tied:
        out["shared.weight"][eos] *= 4.0
    else:
        put("lm_head.weight", (v, d), 0.125)
        out["lm_head.weight"][eos] *= 4.0
    for stack, n, dec in (("encoder", cfg["num_layers"], False), ("decoder", cfg.get("num_decoder_layers", cfg["num_layers"]), True)):
        put(f"{stack}.final_layer_norm.weight", (d,), 0.25, 1.0)
        put(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (cfg["relative_attention_num_buckets"], cfg["num_heads"]), 0.5)
        for l in range(n):
            p = f"{stack}.block.{l}.layer"
            attn = [(0, "SelfAttention")] + ([(1, "EncDecAttention")] if dec else [])
            for i, a in attn:
                put(f"{p}.{i}.layer_norm.weight", (d,), 0.25, 1.0)
                for x in ("q", "k", "v"):
                    put(f"{p}.{i}.{a}.{x}.weight", (inner, d), 0.125)
                put(f"{p}.{i}.{a}.o.weight", (d, inner), 0.125)
            f = 2 if dec else 1
            put(f"{p}.{f}.layer_norm.weight", (d,), 0.25, 1.0)
            for w in (("wi_0", "wi_1") if gated else ("wi",)):
                put(f"{p}.{f}.DenseReluDense.{w}.weight", (ff, d), 0.125)
            put(f"{p}.{f}.DenseReluDense.wo.weight", (d, ff), 0.125)
    return out


COMMON = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=448,
              decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, layer_norm_epsilon=1e-6,
              torch_dtype="float32", is_encoder_decoder=True)
MODELS = {
    # Flan-T5 / T5 v1.1 layout: gated-gelu, untied head, more decoder than encoder blocks.
    "t5_v11": dict(COMMON, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                   num_decoder_layers=3, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False),
    # Original T5: relu, tied head (d_model^-0.5 rescale); few buckets and a short max distance so
    # the logarithmic buckets and their cap are reached within the truncated inputs.
    "t5_orig": dict(COMMON, d_model=48, d_kv=12, num_heads=4, d_ff=96, num_layers=2,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20,
                    feed_forward_proj="relu", tie_word_embeddings=True),
}


def load_model(cfg, weights):
    with tempfile.TemporaryDirectory() as d:
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        save_file(weights, os.path.join(d, "model.safetensors"))
        model = T5ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    sd = model.state_dict()
    for k, w in weights.items():
        assert torch.equal(sd[k], w), f"{k} was not loaded as written"
    return model


@torch.no_grad()
def kit_choice_scores(model, kt, ids, choices):
    """The kit's multiple choice for an encoder-decoder, batched over the choices."""
    x = torch.tensor([ids])
    enc = model.get_encoder()(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
    cids = [kt.encode(c) for c in choices]
    width = max(len(c) for c in cids)
    labels = torch.tensor([c + [0] * (width - len(c)) for c in cids])
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in cids])
    dec_in = model._shift_right(labels)
    n = len(choices)
    out = model(encoder_outputs=(enc.repeat(n, 1, 1),), attention_mask=torch.ones_like(x).repeat(n, 1),
                decoder_input_ids=dec_in).logits
    lp = torch.log_softmax(out, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    scores = (lp * mask).sum(-1).tolist()
    # Cross-check: each choice alone, unpadded.
    for c, s in zip(cids, scores):
        lab = torch.tensor([c])
        o = model(input_ids=x, decoder_input_ids=model._shift_right(lab)).logits
        s1 = torch.log_softmax(o, -1).gather(-1, lab.unsqueeze(-1)).sum().item()
        assert abs(s1 - s) < 1e-4, (s1, s)
    return cids, scores


@torch.no_grad()
def kit_generate(model, kt, ids):
    x = torch.tensor([ids])
    # use_cache=False: transformers 5 sizes the decoder cache by num_layers, which breaks when
    # num_decoder_layers differs (as in t5_v11); without a cache the result is the same.
    g = model.generate(x, use_cache=False, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                       max_length=KIT_MAX_LENGTH, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0,
                       repetition_penalty=1.0, top_k=None, top_p=None, temperature=None)[0].tolist()
    assert g[0] == 0 and len(g) <= KIT_MAX_LENGTH
    return g[1:], kt.decode(g)


@torch.no_grad()
def golden_for(name, cfg, kt):
    model = load_model(cfg, t5_weights(cfg, cfg["eos_token_id"]))
    vocab_ids = [int(i) for i in np.linspace(0, cfg["vocab_size"] - 1, VOCAB_SAMPLE).round()] + [1]
    labels = kt.encode(DECODER_TEXT)
    dec_ids = [0] + labels[:-1]
    out = dict(model=name, config=cfg, vocab_ids=vocab_ids, decoder_ids=dec_ids, logits=[], mc=[], gen=[])
    for r in ROWS:
        ids = kt.encode(r["input"])
        if r["id"] in ("mc-1", "gen-2", "mc-3"):
            logits = model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([dec_ids])).logits[0]
            out["logits"].append(dict(id=r["id"], input_ids=ids, values=logits[:, vocab_ids].tolist(),
                                      logsumexp=torch.logsumexp(logits, -1).tolist()))
        if r["eval_type"] == "multiple_choice":
            cids, scores = kit_choice_scores(model, kt, ids, r["answer_choices"])
            out["mc"].append(dict(id=r["id"], input_ids=ids, choice_ids=cids, scores=scores,
                                  prediction=int(np.argmax(scores))))
        else:
            gen, text = kit_generate(model, kt, ids)
            out["gen"].append(dict(id=r["id"], input_ids=ids, generated_ids=gen, text=text))
    return out, model


LORA_RANK, LORA_ALPHA = 16, 32


def lora_factors(cfg, which):
    """Factors of adapter `which` (1 or 2) on every q/v of the model, PEFT names: mirror of
    testkit::synthetic::t5_qv_lora_factors."""
    d, inner = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"]
    mods = []
    for l in range(cfg["num_layers"]):
        mods += [f"encoder.block.{l}.layer.0.SelfAttention.{x}" for x in ("q", "v")]
    for l in range(cfg.get("num_decoder_layers", cfg["num_layers"])):
        mods += [f"decoder.block.{l}.layer.0.SelfAttention.{x}" for x in ("q", "v")]
        mods += [f"decoder.block.{l}.layer.1.EncDecAttention.{x}" for x in ("q", "v")]
    out = {}
    for m in mods:
        a = f"base_model.model.{m}.lora_A.weight"
        b = f"base_model.model.{m}.lora_B.weight"
        out[a] = values(f"adapter{which}.{a}", LORA_RANK * d, 0.125, 0.0).reshape(LORA_RANK, d)
        out[b] = values(f"adapter{which}.{b}", inner * LORA_RANK, 0.125, 0.0).reshape(inner, LORA_RANK)
    return out


@torch.no_grad()
def lora_golden(cfg, kt):
    from peft import PeftModel
    f1, f2 = lora_factors(cfg, 1), lora_factors(cfg, 2)
    # The kit's flant5_avg: factors averaged 0.5/0.5, the first adapter's config.
    avg = {k: torch.from_numpy(np.float32(0.5) * f1[k] + np.float32(0.5) * f2[k]) for k in f1}
    adapter_cfg = dict(peft_type="LORA", task_type="SEQ_2_SEQ_LM", r=LORA_RANK, lora_alpha=LORA_ALPHA,
                       lora_dropout=0.1, target_modules=["q", "v"], bias="none", inference_mode=True,
                       base_model_name_or_path="tiny-t5-v11")
    base = load_model(cfg, t5_weights(cfg, cfg["eos_token_id"]))
    with tempfile.TemporaryDirectory() as d:
        json.dump(adapter_cfg, open(os.path.join(d, "adapter_config.json"), "w"))
        save_file(avg, os.path.join(d, "adapter_model.safetensors"))
        model = PeftModel.from_pretrained(base, d).eval()
    inner = model.get_base_model()
    out = dict(model="t5_v11", adapter_config=adapter_cfg, mc=[], gen=[])
    for r in ROWS:
        ids = kt.encode(r["input"])
        if r["eval_type"] == "multiple_choice":
            cids, scores = kit_choice_scores(inner, kt, ids, r["answer_choices"])
            out["mc"].append(dict(id=r["id"], scores=scores, prediction=int(np.argmax(scores))))
        else:
            gen, text = kit_generate(inner, kt, ids)
            out["gen"].append(dict(id=r["id"], generated_ids=gen, text=text))
    return out


def bucket_goldens():
    rp = torch.arange(-300, 301)
    out = dict(relative_positions=rp.tolist(), cases=[])
    for bi in (True, False):
        for nb, md in ((32, 128), (8, 20), (16, 40)):
            b = T5Attention._relative_position_bucket(rp, bidirectional=bi, num_buckets=nb, max_distance=md)
            out["cases"].append(dict(bidirectional=bi, num_buckets=nb, max_distance=md, buckets=b.tolist()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--retrain-tokenizer", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.retrain_tokenizer or not os.path.exists(os.path.join(TOKDIR, "tokenizer.json")):
        train_tokenizer()
    kt = KitTokenizer(TOKDIR)
    print(f"tokenizer: {kt.tok.get_vocab_size()} tokens; long row -> {len(kt.encode(ROWS[1]['input']))} ids",
          file=sys.stderr)
    for name, cfg in MODELS.items():
        assert cfg["vocab_size"] >= kt.tok.get_vocab_size()
        g, _ = golden_for(name, cfg, kt)
        with open(os.path.join(GOLDENS, f"{name}.json"), "w") as f:
            json.dump(g, f, ensure_ascii=False)
        print(f"{name}: predictions {[m['prediction'] for m in g['mc']]}, "
              f"generation lengths {[len(x['generated_ids']) for x in g['gen']]}", file=sys.stderr)
    lg = lora_golden(MODELS["t5_v11"], kt)
    with open(os.path.join(GOLDENS, "t5_lora.json"), "w") as f:
        json.dump(lg, f, ensure_ascii=False)
    print(f"t5_lora: predictions {[m['prediction'] for m in lg['mc']]}, "
          f"generation lengths {[len(x['generated_ids']) for x in lg['gen']]}", file=sys.stderr)
    with open(os.path.join(GOLDENS, "t5_buckets.json"), "w") as f:
        json.dump(bucket_goldens(), f)


if __name__ == "__main__":
    main()
