#!/usr/bin/env bash
# One prepared check for a GPU machine (about 10 minutes on one A100/H100): merge and evaluate
# on the GPU and print the numbers the README's GPU section quotes.
#
# Build here first (no GPU needed), then carry the binaries and the tokenizer to the GPU machine:
#   scripts/build-cuda.sh                                   # target/cuda/release/llm-merging
#   cargo build --release -p merge-core --example synth_checkpoint
#   scripts/fetch-tokenizers.sh                             # .cache/tokenizers/llama2
#   mkdir -p .gpu && cp target/cuda/release/llm-merging target/release/examples/synth_checkpoint .gpu/
#   ...on the GPU machine, in the repository:  scripts/gpu-check.sh
#
# It
# 1. writes synthetic TinyLlama-1.1B-shaped bf16 checkpoints (base + 2 experts);
# 2. merges them with `linear` and `ties` on the GPU (time, peak GPU memory);
# 3. evaluates the linear merge on 100 validation-schema rows (50 multiple choice, 50
#    generation) in bf16 and in f32 on the GPU (examples/s);
# 4. evaluates 20 rows in f32 on the CPU and on the GPU and requires identical predictions;
# 5. projects the full validation (700 rows) + test (807 rows) run for a 7B model.
#
# Environment: GPU_CHECK_DIR (work dir, default /tmp/llm-merging-gpu-check), BIN_DIR (default
# .gpu), TOKENIZER_DIR (default .cache/tokenizers/llama2), LAYERS (default 22), ROWS (100),
# DEVICE (cuda; `cpu` runs the same flow without a GPU, for trying the script).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="${GPU_CHECK_DIR:-/tmp/llm-merging-gpu-check}"
bin_dir="${BIN_DIR:-$root/.gpu}"
tok="${TOKENIZER_DIR:-$root/.cache/tokenizers/llama2}"
layers="${LAYERS:-22}"
rows="${ROWS:-100}"
device="${DEVICE:-cuda}"
llm="$bin_dir/llm-merging"
synth="$bin_dir/synth_checkpoint"
for f in "$llm" "$synth" "$tok/tokenizer.json"; do
  [[ -e "$f" ]] || { echo "gpu-check: missing $f (see the header of $0)" >&2; exit 1; }
done
mkdir -p "$work"

# The binary loads libcuda/libcublas/libnvrtc/libcurand at run time: point it at the CUDA
# libraries of this machine (system CUDA, or the pip wheels PyTorch ships).
for d in /usr/local/cuda/lib64 /usr/local/nvidia/lib64 $(python3 - <<'PY' 2>/dev/null || true
import importlib, os
for m in ["nvidia.cublas", "nvidia.cuda_nvrtc", "nvidia.curand", "nvidia.cuda_runtime", "nvidia.cu13"]:
    try:
        mod = importlib.import_module(m)
        for p in getattr(mod, "__path__", []):
            lib = os.path.join(p, "lib")
            if os.path.isdir(lib):
                print(lib)
    except Exception:
        pass
PY
); do
  [[ -d "$d" ]] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
if [[ "$device" == "cuda" ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

now() { date +%s.%N; }
# Peak GPU memory of a command: nvidia-smi sampled every 100 ms.
peak_mem() {
  local log="$work/mem.log"
  : >"$log"
  if [[ "$device" == "cuda" ]]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$log" &
    local smi=$!
    "$@"
    kill "$smi" 2>/dev/null || true
    wait "$smi" 2>/dev/null || true
    sort -n "$log" | tail -1
  else
    "$@"
    echo "n/a"
  fi
}

echo "== synthetic checkpoints ($layers layers)"
for m in base expert_a expert_b; do
  if [[ ! -f "$work/$m/config.json" ]]; then
    case $m in
      base) "$synth" "$work/$m" --layers "$layers" ;;
      expert_a) "$synth" "$work/$m" --expert 1 --layers "$layers" ;;
      expert_b) "$synth" "$work/$m" --expert 2 --layers "$layers" ;;
    esac
    cp "$tok/tokenizer.json" "$tok/tokenizer_config.json" "$work/$m/"
  fi
done

echo "== merges on $device"
for method in linear ties; do
  cfg="$work/$method.toml"
  if [[ $method == linear ]]; then
    printf '[merge]\nmethod = "linear"\ndtype = "bfloat16"\n[[merge.models]]\nmodel = "expert_a"\nparameters = { weight = 0.5 }\n[[merge.models]]\nmodel = "expert_b"\nparameters = { weight = 0.5 }\n' >"$cfg"
  else
    printf '[merge]\nmethod = "ties"\nbase_model = "base"\ndtype = "bfloat16"\n[[merge.models]]\nmodel = "expert_a"\nparameters = { weight = 0.5, density = 0.5 }\n[[merge.models]]\nmodel = "expert_b"\nparameters = { weight = 0.5, density = 0.5 }\n' >"$cfg"
  fi
  t0=$(now)
  mem=$(peak_mem "$llm" merge "$cfg" --out "$work/merged_$method" --force --device "$device" | tail -1)
  t1=$(now)
  printf 'merge %-7s %8.1f s   peak GPU memory %s MiB\n' "$method" "$(echo "$t1 - $t0" | bc)" "$mem"
done

echo "== validation-schema rows"
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
with open(f"{work}/rows20.csv", "w", newline="") as f:
    src = list(csv.reader(open(f"{work}/rows.csv")))
    w = csv.writer(f)
    w.writerow(src[0])
    w.writerows(src[1:11] + src[1 + rows // 2: 11 + rows // 2])
PY

echo "== eval on $device"
for dtype in bf16 f32; do
  t0=$(now)
  mem=$(peak_mem "$llm" eval --model "$work/merged_linear" --data "$work/rows.csv" --out "$work/eval_$dtype" --dtype "$dtype" --device "$device" --batch-size 16 --max-gen-len 64 | tail -1)
  t1=$(now)
  secs=$(echo "$t1 - $t0" | bc)
  printf 'eval %-4s %d rows %8.1f s  %6.2f rows/s  peak GPU memory %s MiB\n' "$dtype" "$rows" "$secs" "$(echo "$rows / $secs" | bc -l)" "$mem"
  [[ $dtype == bf16 ]] && bf16_secs=$secs
done

echo "== f32 $device vs f32 cpu on 20 rows"
"$llm" eval --model "$work/merged_linear" --data "$work/rows20.csv" --out "$work/cmp_dev" --dtype f32 --device "$device" --max-gen-len 16 >/dev/null
"$llm" eval --model "$work/merged_linear" --data "$work/rows20.csv" --out "$work/cmp_cpu" --dtype f32 --device cpu --max-gen-len 16 >/dev/null
if cmp -s "$work/cmp_dev/predictions/rows20.csv" "$work/cmp_cpu/predictions/rows20.csv"; then
  echo "f32 predictions identical on $device and cpu"
else
  echo "gpu-check: f32 predictions differ between $device and cpu:" >&2
  diff "$work/cmp_dev/predictions/rows20.csv" "$work/cmp_cpu/predictions/rows20.csv" >&2 || true
  exit 1
fi

echo "== projection for a 7B model (validation 700 rows + test 807 rows, bf16)"
python3 - "$bf16_secs" "$rows" "$layers" <<'PY'
import sys
secs, rows, layers = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
params_here = 32000 * 2048 * 2 + layers * (2048 * 2048 * 2 + 2048 * 256 * 2 + 3 * 2048 * 5632)
scale = 6.74e9 / params_here  # decoding is weight-bandwidth bound: time scales with parameters
total = secs / rows * 1507 * scale
print(f"about {total / 60:.1f} min for 1507 rows ({scale:.1f}x the parameters of this model); budget 60 min")
PY
