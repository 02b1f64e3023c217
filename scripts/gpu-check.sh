#!/usr/bin/env bash
# One prepared check for a GPU machine (a few minutes on one A100/H100): merge and evaluate on
# the GPU, compare with the CPU, and print the numbers the README's GPU section quotes.
#
# Build here first (no GPU needed), then take the bundle to the GPU machine:
#   scripts/gpu-check.sh --bundle      # builds everything below into .gpu/bundle.tar.xz
#   ...on the GPU machine, in the repository:  scripts/gpu-check.sh
# The bundle holds the CUDA binary (scripts/build-cuda.sh), the synth_checkpoint and
# write_fixtures examples (release, CPU) and the tokenizers of scripts/fetch-tokenizers.sh;
# the GPU machine needs no Rust, no network and no CUDA toolkit, only a driver and the CUDA
# libraries (a system CUDA or PyTorch's pip wheels).
#
# It
# 1. evaluates every parity fixture (the tiny Llama, Llama 3, Mistral, Qwen2, Gemma, T5 v1.1
#    and T5 models of the transformers goldens) in f32 on the GPU and on the CPU and requires
#    identical predictions;
# 2. writes synthetic TinyLlama-1.1B-shaped bf16 checkpoints (base + 2 experts);
# 3. merges them with `linear`, `ties` and `geometric_median` on the GPU and on the CPU (time,
#    peak GPU memory) and requires the outputs to agree to one bf16 step;
# 4. evaluates the linear merge on 100 validation-schema rows (50 multiple choice, 50
#    generation) in bf16 and in f32 on the GPU (rows/s, peak GPU memory);
# 5. with DATA_DIR, evaluates the competition's validation files and predicts its test file;
# 6. projects the full validation (700 rows) + test (807 rows) run for a 7B model in bf16;
# 7. times 3 search trials (TIES, merged and evaluated in memory on the device) against the
#    same trial as `merge` then `eval` on the device.
# Every step runs even when an earlier one failed (a merge failure falls back to the CPU merge
# for the later steps); the exit status is non-zero when any step failed.
#
# Environment: GPU_CHECK_DIR (work dir, default /tmp/llm-merging-gpu-check), BIN_DIR (default
# .gpu), TOKENIZERS_DIR (default .cache/tokenizers), LAYERS (default 22), ROWS (100),
# DATA_DIR (optional: the competition files, see below), DEVICE (cuda; `cpu` runs the same
# flow without a GPU, for trying the script), STEP_LIMIT
# (seconds any one merge or eval may take, default 240).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin_dir="${BIN_DIR:-$root/.gpu}"

if [[ "${1:-}" == "--bundle" ]]; then
  set -e
  scripts/fetch-tokenizers.sh >/dev/null
  [[ -x target/cuda/release/llm-merging ]] || scripts/build-cuda.sh
  cargo build --release --locked -q -p merge-core --example synth_checkpoint
  cargo build --release --locked -q -p eval-harness --example write_fixtures
  target="${CARGO_TARGET_DIR:-$root/target}"
  stage="$(mktemp -d)"
  mkdir -p "$stage/bin" "$stage/tokenizers"
  cp target/cuda/release/llm-merging "$target/release/examples/synth_checkpoint" \
    "$target/release/examples/write_fixtures" "$stage/bin/"
  strip "$stage/bin/synth_checkpoint" "$stage/bin/write_fixtures"
  cp -r .cache/tokenizers/llama2 .cache/tokenizers/llama3 "$stage/tokenizers/"
  mkdir -p "$bin_dir"
  XZ_OPT="${XZ_OPT:--T0}" tar -C "$stage" -cJf "$bin_dir/bundle.tar.xz" bin tokenizers
  rm -rf "$stage"
  ls -l "$bin_dir/bundle.tar.xz"
  exit 0
fi

work="${GPU_CHECK_DIR:-/tmp/llm-merging-gpu-check}"
layers="${LAYERS:-22}"
rows="${ROWS:-100}"
device="${DEVICE:-cuda}"
step_limit="${STEP_LIMIT:-240}"
mkdir -p "$work"
if [[ -f "$bin_dir/bundle.tar.xz" ]]; then
  tar -C "$work" -xJf "$bin_dir/bundle.tar.xz"
  bins="$work/bin"
  tok="${TOKENIZERS_DIR:-$work/tokenizers}"
else
  bins="$bin_dir"
  tok="${TOKENIZERS_DIR:-$root/.cache/tokenizers}"
fi
llm="$bins/llm-merging"
for f in "$llm" "$bins/synth_checkpoint" "$bins/write_fixtures" "$tok/llama2/tokenizer.json"; do
  [[ -e "$f" ]] || { echo "gpu-check: missing $f (see the header of $0)" >&2; exit 1; }
done

failed=()
fail() { failed+=("$1"); echo "gpu-check: FAILED: $1" >&2; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# The binary loads libcuda, libcublas and libcurand at run time. Point it at this machine's
# CUDA libraries (system CUDA or PyTorch's pip wheels); where only versioned names exist
# (libcublas.so.13, which the loader does not try), link the plain names to them.
if [[ "$device" == "cuda" ]]; then
  shim="$work/cuda-libs"
  mkdir -p "$shim"
  dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64
    /usr/lib/x86_64-linux-gnu)
  while read -r d; do dirs+=("$d"); done < <(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for lib in sorted(glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)):
        print(lib)
PY
)
  for name in cublas cublasLt curand cudart nvrtc; do
    for d in "${dirs[@]}"; do
      [[ -e "$d/lib$name.so" ]] && break
      found="$(ls "$d"/lib"$name".so.* 2>/dev/null | sort -V | tail -1)"
      if [[ -n "$found" ]]; then ln -sf "$found" "$shim/lib$name.so"; break; fi
    done
  done
  path="$shim"
  for d in "${dirs[@]}"; do [[ -d "$d" ]] && path="$path:$d"; done
  export LD_LIBRARY_PATH="$path:${LD_LIBRARY_PATH:-}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "CUDA libraries: $(ls "$shim" | tr '\n' ' ')"
fi

# Run a command and record its peak GPU memory (nvidia-smi every
# 100 ms) into $peak; the command's status is returned.
peak="n/a"
with_peak_mem() {
  local log="$work/mem.log" status
  : >"$log"
  if [[ "$device" == "cuda" ]]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$log" &
    local smi=$!
    "$@"
    status=$?
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    peak="$(sort -n "$log" | tail -1) MiB"
  else
    "$@"
    status=$?
    peak="n/a"
  fi
  return $status
}

echo "== [${SECONDS}s] parity fixtures: f32 on $device and on the cpu"
if "$bins/write_fixtures" "$work/fixtures" "$root/crates/eval-harness/tests/goldens" "$tok" >/dev/null; then
  while read -r name max_gen_len; do
    gen=()
    [[ "$max_gen_len" != "-" ]] && gen=(--max-gen-len "$max_gen_len")
    ok=1
    for dev in "$device" cpu; do
      timeout "$step_limit" "$llm" eval --model "$work/fixtures/$name" --data "$work/fixtures/rows.csv" --out "$work/fx_${name}_$dev" --dtype f32 --device "$dev" "${gen[@]}" >"$work/fx_${name}_$dev.log" 2>&1 ||
        { tail -3 "$work/fx_${name}_$dev.log" >&2; fail "fixture $name on $dev"; ok=0; }
    done
    [[ $ok == 1 ]] || continue
    if cmp -s "$work/fx_${name}_$device/predictions/rows.csv" "$work/fx_${name}_cpu/predictions/rows.csv"; then
      echo "fixture $name: f32 predictions identical on $device and cpu ($(($(wc -l <"$work/fx_${name}_cpu/predictions/rows.csv") - 1)) rows)"
    else
      diff "$work/fx_${name}_$device/predictions/rows.csv" "$work/fx_${name}_cpu/predictions/rows.csv" | head -6 >&2
      fail "fixture $name: f32 predictions differ between $device and cpu"
    fi
  done <"$work/fixtures/fixtures.txt"
else
  fail "write_fixtures"
fi

echo "== [${SECONDS}s] synthetic checkpoints ($layers layers)"
for m in base expert_a expert_b; do
  if [[ ! -f "$work/$m/config.json" ]]; then
    case $m in
      base) args=() ;;
      expert_a) args=(--expert 1) ;;
      expert_b) args=(--expert 2) ;;
    esac
    "$bins/synth_checkpoint" "$work/$m" "${args[@]}" --layers "$layers" >/dev/null &&
      cp "$tok/llama2/tokenizer.json" "$tok/llama2/tokenizer_config.json" "$work/$m/" ||
      { fail "synthetic checkpoint $m"; }
  fi
done

write_merge_config() { # method file
  local models='[[merge.models]]\nmodel = "expert_a"\nparameters = { weight = 0.5%s }\n[[merge.models]]\nmodel = "expert_b"\nparameters = { weight = 0.5%s }\n'
  case $1 in
    linear) printf "[merge]\nmethod = \"linear\"\ndtype = \"bfloat16\"\n$models" "" "" ;;
    ties) printf "[merge]\nmethod = \"ties\"\nbase_model = \"base\"\ndtype = \"bfloat16\"\n$models" ", density = 0.5" ", density = 0.5" ;;
    geometric_median) printf "[merge]\nmethod = \"geometric_median\"\nbase_model = \"base\"\ndtype = \"bfloat16\"\n$models" "" "" ;;
  esac >"$2"
}
merge_devices=("$device")
[[ "$device" != cpu ]] && merge_devices+=(cpu)
echo "== [${SECONDS}s] merges on ${merge_devices[*]}"
for method in linear ties geometric_median; do
  cfg="$work/$method.toml"
  write_merge_config "$method" "$cfg"
  for dev in "${merge_devices[@]}"; do
    out="$work/merged_${method}_$dev"
    t0=$(now)
    if with_peak_mem timeout "$step_limit" "$llm" merge "$cfg" --out "$out" --force --device "$dev" >"$out.log" 2>&1; then
      printf 'merge %-16s on %-4s %7s s   peak GPU memory %s\n' "$method" "$dev" "$(secs "$t0" "$(now)")" "$peak"
    else
      tail -5 "$out.log" >&2
      fail "merge $method on $dev"
    fi
  done
  [[ "$device" != cpu && -d "$work/merged_${method}_$device" && -d "$work/merged_${method}_cpu" ]] || continue
  python3 - "$work/merged_${method}_$device" "$work/merged_${method}_cpu" "$method" <<'PY' || fail "$method merge: $device and cpu differ"
import glob, os, sys
from safetensors.torch import load_file
a, b, method = sys.argv[1:4]
worst, n, bad = 0.0, 0, []
for f in sorted(glob.glob(os.path.join(a, "*.safetensors"))):
    ta, tb = load_file(f), load_file(os.path.join(b, os.path.basename(f)))
    for k, v in ta.items():
        x, y = v.float(), tb[k].float()
        d = (x - y).abs().max().item()
        # Both compute in f32 and round to bf16 (8 significant bits): a different summation
        # order may move a value by one bf16 step, no more.
        if d > y.abs().max().item() * 2.0**-7 + 1e-12:
            bad.append(k)
        worst, n = max(worst, d), n + 1
print(f"{method}: {n} tensors, max |gpu - cpu| = {worst:.3g}" + (f"; over one bf16 step: {bad[:3]}" if bad else ""))
sys.exit(1 if bad else 0)
PY
done
if [[ -d "$work/merged_linear_$device" ]]; then
  ln -sfn "merged_linear_$device" "$work/merged_linear"
elif [[ -d "$work/merged_linear_cpu" ]]; then
  ln -sfn "merged_linear_cpu" "$work/merged_linear"
fi

echo "== [${SECONDS}s] validation-schema rows"
python3 - "$work" "$rows" <<'PY'
import csv, random, sys
work, rows = sys.argv[1], int(sys.argv[2])
random.seed(0)
words = "the a cat dog river city council report market team season game storm bridge school".split()
def text(n):
    return " ".join(random.choice(words) for _ in range(n))
with open(f"{work}/rows.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
    for i in range(rows // 2):
        ctx = text(120)
        w.writerow([f"mc{i}", f"{ctx}\nQuestion: what happened?\nA: {text(5)}\nB: {text(5)}\nC: {text(5)}\nD: {text(5)}\nAnswer:", str(i % 4), "['A', 'B', 'C', 'D']", "multiple_choice"])
    for i in range(rows - rows // 2):
        w.writerow([f"gen{i}", f"Summarize: {text(400)}", text(20), "", "generation"])
PY

echo "== [${SECONDS}s] eval on $device"
bf16_secs=""
for dtype in bf16 f32; do
  t0=$(now)
  if with_peak_mem timeout "$step_limit" "$llm" eval --model "$work/merged_linear" --data "$work/rows.csv" --out "$work/eval_$dtype" --dtype "$dtype" --device "$device" --batch-size 16 --max-gen-len 64 >"$work/eval_$dtype.log" 2>&1; then
    s=$(secs "$t0" "$(now)")
    printf 'eval %-4s %d rows %8s s  %6s rows/s  peak GPU memory %s\n' "$dtype" "$rows" "$s" "$(awk -v r="$rows" -v s="$s" 'BEGIN { printf "%.2f", r / s }')" "$peak"
    [[ $dtype == bf16 ]] && bf16_secs=$s
  else
    tail -5 "$work/eval_$dtype.log" >&2
    fail "eval $dtype on $device"
  fi
done

# With the competition's files at hand (DATA_DIR holding validation/cosmos_qa.csv,
# validation/xsum.csv and test.csv, as `llm-merging fetch-data` writes them), time the real
# thing on this model: validation eval and test prediction in bf16.
real_secs=""
if [[ -n "${DATA_DIR:-}" && -f "$DATA_DIR/test.csv" ]]; then
  echo "== [${SECONDS}s] competition files on $device (bf16)"
  t0=$(now)
  if with_peak_mem timeout "$step_limit" "$llm" eval --model "$work/merged_linear" --data "$DATA_DIR"/validation/*.csv --out "$work/eval_validation" --dtype bf16 --device "$device" --batch-size 16 >"$work/eval_validation.log" 2>&1; then
    v=$(secs "$t0" "$(now)")
    printf 'eval validation (%s rows) %8s s  peak GPU memory %s\n' "$(cat "$DATA_DIR"/validation/*.csv | python3 -c 'import csv,sys; print(sum(1 for r in csv.reader(sys.stdin) if r and r[0] != "id"))')" "$v" "$peak"
    t0=$(now)
    if timeout "$step_limit" "$llm" predict --model "$work/merged_linear" --data "$DATA_DIR/test.csv" --out "$work/submission.csv" --dtype bf16 --device "$device" --batch-size 16 >"$work/predict.log" 2>&1; then
      p=$(secs "$t0" "$(now)")
      printf 'predict test (%s rows)     %8s s\n' "$(python3 -c 'import csv,sys; print(sum(1 for _ in csv.DictReader(open(sys.argv[1]))))' "$work/submission.csv")" "$p"
      real_secs=$(awk -v a="$v" -v b="$p" 'BEGIN { print a + b }')
    else
      tail -5 "$work/predict.log" >&2
      fail "predict test.csv on $device"
    fi
  else
    tail -5 "$work/eval_validation.log" >&2
    fail "eval validation on $device"
  fi
fi

if [[ -n "$bf16_secs" ]]; then
  echo "== [${SECONDS}s] projection for a 7B model (validation 700 rows + test 807 rows, bf16)"
  python3 - "$bf16_secs" "$rows" "$layers" "$real_secs" <<'PY'
import sys
secs, rows, layers = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
real = float(sys.argv[4]) if sys.argv[4] else None
params_here = 32000 * 2048 * 2 + layers * (2048 * 2048 * 2 + 2048 * 256 * 2 + 3 * 2048 * 5632)
scale = 6.74e9 / params_here  # decoding is weight-bandwidth bound: time scales with parameters
if real is not None:
    print(f"about {real * scale / 60:.1f} min ({scale:.1f}x the {real:.0f} s measured on the competition files); budget 60 min")
else:
    total = secs / rows * 1507 * scale
    print(f"about {total / 60:.1f} min for 1507 rows ({scale:.1f}x the parameters of this model, from the synthetic rows); budget 60 min")
PY
fi

# Search trials in memory on the device against the same trial through the disk (as
# scripts/bench-search does on the CPU): 3 TIES trials over 12 multiple-choice and 4
# generation rows of the synthetic files, evaluated in bf16.
echo "== [${SECONDS}s] search trials on $device"
ws="$work/search-ws"
rm -rf "$ws"
mkdir -p "$ws/submissions/trials" "$ws/data"
echo '[workspace]' >"$ws/Cargo.toml"
for m in base expert_a expert_b; do ln -sfn "$work/$m" "$ws/$m"; done
python3 - "$work/rows.csv" "$ws/data" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
for name, kind, n in (("mc", "multiple_choice", 12), ("gen", "generation", 4)):
    with open(f"{sys.argv[2]}/{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows([r for r in rows if r["eval_type"] == kind][:n])
PY
cat >"$ws/submissions/trials/entry.toml" <<EOF
[merge]
method = "ties"
base_model = "../../base"
dtype = "bfloat16"
[merge.parameters]
density = 0.5
[[merge.models]]
model = "../../expert_a"
parameters = { weight = 0.6 }
[[merge.models]]
model = "../../expert_b"
parameters = { weight = 0.4 }

[eval]
datasets = ["../../data/mc.csv", "../../data/gen.csv"]
max_gen_len = 16
dtype = "bfloat16"
device = "$device"

[predict]
test_file = "../../data/mc.csv"

[search]
optimizer = "random"
seed = 1
trials = 3
[[search.space]]
parameter = "weight"
model = "*"
range = [0.2, 1.0]
[[search.space]]
parameter = "density"
range = [0.2, 0.9]
[search.rows]
held_out = 0.25
first_look = 100000
EOF
t0=$(now)
searched=false
# In the workspace (entries name their models by relative path); the binary by absolute path.
llm_path="$(realpath "$llm")"
pushd "$ws" >/dev/null || exit 1
with_peak_mem timeout "$((2 * step_limit))" "$llm_path" search --entry submissions/trials \
  >"$work/search.log" 2>&1 && searched=true
popd >/dev/null || exit 1
if $searched; then
  printf 'search: 3 trials in %s s  peak GPU memory %s\n' "$(secs "$t0" "$(now)")" "$peak"
  # The disk trial: the best recipe merged to disk on the device, then evaluated by a new
  # process on the same 9 + 3 tuning rows.
  best="$ws/search/trials/best"
  awk '/^\[eval\]/ {exit} {print}' "$best/entry.toml" >"$best/merge.toml"
  mkdir -p "$work/search-disk"
  for f in mc gen; do
    python3 -c 'import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); w=csv.DictWriter(open(sys.argv[2],"w",newline=""),fieldnames=list(r[0].keys())); w.writeheader(); w.writerows(r[:len(r)-round(len(r)*0.25)])' "$ws/data/$f.csv" "$work/search-disk/$f.csv"
  done
  t0=$(now)
  if timeout "$step_limit" "$llm" merge "$best/merge.toml" --out "$work/search-disk/merged" --force --device "$device" >"$work/search-disk/merge.log" 2>&1; then
    t1=$(now)
    if timeout "$step_limit" "$llm" eval --model "$work/search-disk/merged" --data "$work/search-disk/mc.csv" "$work/search-disk/gen.csv" --out "$work/search-disk/eval" --dtype bf16 --device "$device" --max-gen-len 16 >"$work/search-disk/eval.log" 2>&1; then
      python3 - "$ws/search/trials/trials.csv" "$(secs "$t0" "$t1")" "$(secs "$t1" "$(now)")" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
merge_w, eval_w = float(sys.argv[2]), float(sys.argv[3])
for r in rows:
    print(f"trial {r['trial']}: merge {float(r['merge_seconds']):.2f} s, evaluation {float(r['eval_seconds']):.2f} s")
m = sum(float(r["merge_seconds"]) for r in rows) / len(rows)
e = sum(float(r["eval_seconds"]) for r in rows) / len(rows)
print(f"in memory, mean: merge {m:.2f} s + evaluation {e:.2f} s = {m + e:.2f} s; "
      f"disk: merge {merge_w:.1f} s + eval {eval_w:.1f} s = {merge_w + eval_w:.1f} s; "
      f"{(merge_w + eval_w) / (m + e):.1f}x")
PY
    else
      tail -5 "$work/search-disk/eval.log" >&2
      fail "search: disk eval on $device"
    fi
  else
    tail -5 "$work/search-disk/merge.log" >&2
    fail "search: disk merge on $device"
  fi
  rm -rf "$work/search-disk/merged"
else
  tail -5 "$work/search.log" >&2
  fail "search on $device"
fi

if ((${#failed[@]})); then
  echo "gpu-check: ${#failed[@]} step(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "gpu-check: all steps passed"
