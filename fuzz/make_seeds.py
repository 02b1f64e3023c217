#!/usr/bin/env python3
"""Writes the committed seed corpora, fuzz/corpus/<target>/, from the tests' own fixtures.

Run from the repository root with the reference venv (it has torch, for the pickle seeds):
    /work/venvs/ref/bin/python fuzz/make_seeds.py
Every seed is small (a few KB): the fuzzer needs the structure, not the data. The outputs are
committed; rerunning gives the same files.
"""
import io
import json
import os
import shutil
import struct
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")
MODELS = os.path.join(ROOT, "crates/merge-core/tests/fixtures/merge/models")
GOLDENS = os.path.join(ROOT, "crates/eval-harness/tests/goldens")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(*parts):
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


def safetensors_file(tensors):
    """tensors: [(name, dtype, shape, bytes)] -> a safetensors file."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-(8 + len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def seeds_safetensors():
    put("safetensors", "fixture-shard", read(MODELS, "expert_a_sharded/model-00005-of-00005.safetensors"))
    put("safetensors", "mixed-dtypes", safetensors_file([
        ("a.weight", "F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
        ("b.weight", "BF16", [3], b"\x80\x3f" * 3),
        ("c.weight", "F16", [1, 2], b"\x00\x3c" * 2),
        ("d.bias", "I64", [1], struct.pack("<q", 7)),
        ("e", "F64", [], struct.pack("<d", 0.5)),
    ]))
    put("safetensors", "empty-tensor", safetensors_file([("z", "F32", [0, 4], b"")]))


def torch_seeds():
    import torch

    def pth(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    def pickle_of(blob):
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            return z.read(name)

    # Storages 0..3 hold 4, 16, 64 and 256 bytes, as the pth_pickle harness provides.
    f32 = {"a": torch.zeros(1), "b": torch.zeros(4), "c": torch.zeros(4, 4), "d": torch.zeros(8, 8)}
    put("pth_pickle", "f32-state-dict", pickle_of(pth(f32)))
    base = torch.zeros(8, 8)
    views = {"t": base.t(), "row": base[1], "narrow": base[:, 2:4]}
    put("pth_pickle", "strided-views", pickle_of(pth({"s0": torch.zeros(1), "s1": torch.zeros(4),
                                                       "s2": torch.zeros(16), **views})))
    put("pth_pickle", "bf16-and-int", pickle_of(pth({
        "h": torch.zeros(2, dtype=torch.bfloat16), "i": torch.zeros(2, dtype=torch.int64),
        "j": torch.zeros(32, dtype=torch.float16), "k": torch.zeros(256, dtype=torch.uint8)})))
    param = torch.nn.Linear(2, 2)
    put("pth_pickle", "module-state-dict", pickle_of(pth(param.state_dict())))
    put("pth", "fixture-adapter", read(MODELS, "lora_a_bin/adapter_model.bin"))
    put("pth", "small-state-dict", pth({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                        "w_t": torch.arange(6, dtype=torch.float32).reshape(2, 3).t()}))


def seeds_configs():
    cfg = json.loads(read(MODELS, "base/config.json"))
    put("config_json", "fixture-llama", json.dumps(cfg))
    for golden in ["llama", "mistral", "qwen2", "gemma", "llama3", "t5_v11", "t5_orig"]:
        g = json.loads(read(GOLDENS, f"{golden}.json"))
        put("config_json", f"golden-{golden}", json.dumps(g["config"], indent=1))
    put("config_json", "tiny-decoder", json.dumps({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "eos_token_id": 1,
        "tie_word_embeddings": False, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    put("config_json", "tiny-t5", json.dumps({
        "model_type": "t5", "vocab_size": 64, "d_model": 8, "d_kv": 4, "d_ff": 16,
        "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
        "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
        "eos_token_id": 1, "pad_token_id": 0, "decoder_start_token_id": 0}))
    put("tokenizer_config", "t5", read(GOLDENS, "t5-tokenizer/tokenizer_config.json"))
    put("tokenizer_config", "llama-style", json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"content": "<pad>", "lstrip": False}, "eos_token": "</s>",
        "pad_token": None, "clean_up_tokenization_spaces": False}))
    # Chat templates: Llama 3's (as its tokenizer_config.json has it) and one in the style of
    # Zephyr/Qwen (system handling, raise_exception, tojson, the generation prompt).
    llama3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
              "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
              "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
              "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")
    put("tokenizer_config", "chat-llama3", json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": llama3,
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}))
    zephyr = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
              "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
              "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate') }}{% endif %}"
              "{{ '<|' + message['role'] + '|>\n' + message['content'].strip() + eos_token + '\n' }}"
              "{% endfor %}{% if system %}{{ system | tojson }}{% endif %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    put("tokenizer_config", "chat-alternating", json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": [{"name": "default", "template": zephyr},
                          {"name": "tool_use", "template": "{{ messages | length }}"}]}))
    examples = os.path.join(ROOT, "submissions/examples")
    for name in sorted(os.listdir(examples)):
        put("merge_toml", name, read(examples, name))
    put("mergekit_yaml", "ties", """merge_method: ties
base_model: models/base
dtype: float32
parameters:
  density: [0.9, 0.5]
  normalize: true
  lambda: 1.1
models:
  - model: models/base
  - model: models/expert_a
    parameters:
      weight:
        - filter: mlp
          value: 0.7
        - value: 0.4
  - model: models/expert_b@main
    parameters:
      weight: 0.5
      density: 0.6
""")
    put("mergekit_yaml", "lora-over-base", """merge_method: linear
base_model: org/base@0123456789abcdef0123456789abcdef01234567
tokenizer_source: base
models:
  - model: org/base@0123456789abcdef0123456789abcdef01234567+org/lora
    parameters: {weight: 1.0}
""")
    for entry in ["demo", "llama_avg", "flant5_avg", "tiny_llama_avg"]:
        put("entry_toml", entry, read(ROOT, "submissions", entry, "entry.toml"))


def seeds_adapter():
    config = read(MODELS, "lora_a/adapter_config.json")
    names = []
    for layer in range(2):
        for m in ["self_attn.q_proj", "self_attn.v_proj"]:
            key = f"base_model.model.model.layers.{layer}.{m}"
            out = 8 if m.endswith("q_proj") else 4
            names += [f"{key}.lora_A.weight 4 8", f"{key}.lora_B.weight {out} 4"]
    names += ["base_model.model.model.embed_tokens.lora_embedding_A 4 32",
              "base_model.model.model.embed_tokens.lora_embedding_B 8 4",
              "base_model.model.lm_head.modules_to_save.default.weight 32 8"]
    put("adapter", "fixture-config", config + b"\0" + "\n".join(names).encode())
    rs = json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True, "peft_type": "LORA",
                     "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 16},
                     "fan_in_fan_out": False, "modules_to_save": ["lm_head"]})
    put("adapter", "patterns", rs.encode() + b"\0" + "\n".join(names).encode())


def seeds_data():
    put("dataset_csv", "golden-rows", read(GOLDENS, "rows.csv"))
    put("dataset_csv", "test-file", """id,input,answer_choices,eval_type
t1,"Question: Which is smaller, 2 or 8?
Answer:","['2', '8']",multiple_choice
t2,Summarize: it rained in the city.,,generation
t3,"Question: Pick a colour.","['red', ""it's"", 'seven']",multiple_choice
""")
    for i, lit in enumerate([
        "['A', 'B']", "[\"it's\", 'x']", "('a', 'b',)", "None", "",
        "[r'\\d+', u'caf\\xe9', '''tri\nple''', 'a' 'b']", "['\\u00e9\\x41\\101\\N']",
    ]):
        put("answer_choices", f"literal-{i}", lit)


def seeds_tar():
    def tar(members):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
            for name, kind, payload in members:
                info = tarfile.TarInfo(name)
                info.mtime = 0
                if kind == "file":
                    info.size = len(payload)
                    t.addfile(info, io.BytesIO(payload))
                elif kind == "dir":
                    info.type = tarfile.DIRTYPE
                    t.addfile(info)
                elif kind == "sym":
                    info.type, info.linkname = tarfile.SYMTYPE, payload
                    t.addfile(info)
                elif kind == "hard":
                    info.type, info.linkname = tarfile.LNKTYPE, payload
                    t.addfile(info)
        return buf.getvalue()

    manifest = json.dumps({"entry": "demo", "entry_path": "submissions/demo"}).encode()
    put("submission_tar", "package", tar([
        ("LLM-Merging/", "dir", None),
        ("LLM-Merging/manifest.json", "file", manifest),
        ("LLM-Merging/submissions/demo/entry.toml", "file", read(ROOT, "submissions/demo/entry.toml")),
        ("LLM-Merging/link", "sym", "submissions/demo"),
        ("LLM-Merging/copy.toml", "hard", "LLM-Merging/submissions/demo/entry.toml"),
    ]))
    put("submission_tar", "escapes", tar([("a/b", "file", b"x"), ("a/up", "sym", "../../etc")]))


if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    seeds_safetensors()
    torch_seeds()
    seeds_configs()
    seeds_adapter()
    seeds_data()
    seeds_tar()
    for t in sorted(os.listdir(OUT)):
        files = os.listdir(os.path.join(OUT, t))
        size = sum(os.path.getsize(os.path.join(OUT, t, f)) for f in files)
        print(f"{t:18} {len(files):3} seeds {size:7} bytes")
