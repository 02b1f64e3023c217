#!/usr/bin/env bash
# Build a self-contained `llm-merging` with the `cuda` feature on a Debian (bookworm) machine,
# with or without a GPU. The binary loads libcuda / libcublas / libnvrtc / libcurand at run
# time from the GPU machine's own CUDA install, so it runs wherever a driver and a CUDA runtime
# are present, whatever their version.
#
#   scripts/build-cuda.sh                 # sm_80 (A100); CUDA_COMPUTE_CAP=90 for H100/H200
#   scripts/build-cuda.sh --check         # compile check only (cargo check), much faster
#
# What it does, and why:
# 1. nvcc: if missing, installs Debian's non-free `nvidia-cuda-toolkit` (CUDA 11.8; the
#    `contrib non-free` components are added to a private apt sources file). nvcc compiles
#    candle's kernels to PTX for CUDA_COMPUTE_CAP and tells cudarc which CUDA API to bind.
# 2. Runtime loading: candle-core 0.11 asks cudarc for `dynamic-linking`, which makes the
#    binary link libcublas.so.11 / libcublasLt.so.11 (~670 MB, absent on a machine with CUDA
#    12). cudarc's `dynamic-loading` instead dlopens the libraries at run time (`libcublas.so`
#    then versioned names, following LD_LIBRARY_PATH). The two features cannot be combined, so
#    this script builds against a copy of candle-core unpacked from cargo's registry cache whose
#    manifest asks for `dynamic-loading`, via a `[patch]` given on the command line. Likewise
#    candle-kernels' build script links libcudart.so.11 for its statically built kernels; the
#    patched copy links the static CUDA runtime instead. Nothing is vendored into the
#    repository; Cargo.lock is restored afterwards.
# 3. Output: target/cuda/release/llm-merging; the script prints its size and the shared
#    libraries it needs (expected: only the C runtime) and fails if CUDA libraries are linked.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
mode="build"
[[ "${1:-}" == "--check" ]] && mode="check"

if ! command -v nvcc >/dev/null 2>&1 && [[ ! -x /usr/bin/nvcc ]]; then
  echo "build-cuda: nvcc not found; installing Debian's nvidia-cuda-toolkit (non-free)" >&2
  src=/etc/apt/sources.list.d/llm-merging-nonfree.sources
  if [[ ! -f "$src" ]]; then
    cat >"$src" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: contrib non-free non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit
fi
nvcc --version | tail -2

# candle-core and candle-kernels from the registry cache, patched (see the header).
cargo fetch --locked >/dev/null
work="${CUDA_PATCH_DIR:-${TMPDIR:-/tmp}/llm-merging-cuda-patch}"
# Unpacked and patched in $work/fresh, then moved into place only when different from the last
# build's copy: an unchanged copy keeps its timestamps, so cargo does not rebuild the kernels.
rm -rf "$work/fresh"
mkdir -p "$work/fresh"
patch_args=()
crates=()
for crate in candle-core candle-kernels; do
  version="$(cargo metadata --format-version 1 --locked --features submit/cuda | python3 -c "import json,sys; print(next(p['version'] for p in json.load(sys.stdin)['packages'] if p['name']=='$crate'))")"
  crate_file="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$crate-$version".crate | head -1)"
  tar xzf "$crate_file" -C "$work/fresh"
  crates+=("$crate-$version")
  patch_args+=(--config "patch.crates-io.$crate.path=\"$work/$crate-$version\"")
done
cudart_static="$(find /usr/lib /usr/local/cuda* -name libcudart_static.a -print -quit 2>/dev/null || true)"
[[ -n "$cudart_static" ]] || { echo "build-cuda: libcudart_static.a not found" >&2; exit 1; }
python3 - "$work"/fresh/candle-core-*/Cargo.toml "$work"/fresh/candle-kernels-*/build.rs "$(dirname "$cudart_static")" <<'PY'
import sys
core, kernels, cudart_dir = sys.argv[1], sys.argv[2], sys.argv[3]
# candle-core: cudarc loads the CUDA libraries at run time instead of linking them.
text = open(core).read()
start = text.index("[dependencies.cudarc]")
end = text.index("\n[", start + 1)
block = text[start:end]
if '"dynamic-linking"' not in block:
    sys.exit("build-cuda: candle-core's cudarc features changed; update this script")
open(core, "w").write(text[:start] + block.replace('"dynamic-linking"', '"dynamic-loading"') + text[end:])
# candle-kernels: its statically built MoE/GGUF kernels need the CUDA runtime; link the
# static runtime (it finds libcuda at run time itself) instead of libcudart.so.11.
text = open(kernels).read()
old = 'println!("cargo:rustc-link-lib=dylib=cudart");'
if old not in text:
    sys.exit("build-cuda: candle-kernels' build script changed; update this script")
new = (f'println!("cargo:rustc-link-search=native={cudart_dir}"); '
       'println!("cargo:rustc-link-lib=static=cudart_static"); '
       'println!("cargo:rustc-link-lib=dylib=rt"); '
       'println!("cargo:rustc-link-lib=dylib=dl"); '
       'println!("cargo:rustc-link-lib=dylib=pthread");')
text = text.replace(old, new)
# candle-kernels: those prebuilt kernels (GGUF/MoE, never used by this kit) are most of the
# binary as uncompressed machine code; compressing their fatbinary images roughly halves the
# binary (the driver decompresses them when they are loaded).
old = "let mut moe_builder = KernelBuilder::default()"
if old not in text:
    sys.exit("build-cuda: candle-kernels' build script changed; update this script")
text = text.replace(old, old + '\n        .arg("-Xfatbin").arg("-compress-all")')
open(kernels, "w").write(text)
PY
for c in "${crates[@]}"; do
  if ! diff -rq "$work/fresh/$c" "$work/$c" >/dev/null 2>&1; then
    rm -rf "$work/$c"
    mv "$work/fresh/$c" "$work/$c"
  fi
done
rm -rf "$work/fresh"

cp Cargo.lock "$work/Cargo.lock.orig"
trap 'cp "$work/Cargo.lock.orig" Cargo.lock' EXIT
cargo "$mode" --release -p submit --features cuda --target-dir target/cuda "${patch_args[@]}"

if [[ "$mode" == "build" ]]; then
  bin=target/cuda/release/llm-merging
  strip "$bin"
  size=$(stat -c %s "$bin")
  echo "build-cuda: $bin, $((size / 1000000)) MB, sm_$CUDA_COMPUTE_CAP PTX"
  echo "build-cuda: shared libraries needed:"
  ldd "$bin" | sed 's/^/    /'
  if ldd "$bin" | grep -Eq 'libcu(blas|blasLt|da|rand|dart)|libnvrtc'; then
    echo "build-cuda: the binary links CUDA libraries; it would not run on other CUDA versions" >&2
    exit 1
  fi
  if (( size > 60000000 )); then
    echo "build-cuda: warning: binary over the 60 MB target" >&2
  fi
fi
