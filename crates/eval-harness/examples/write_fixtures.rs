//! Writes the parity fixtures (the tiny models whose transformers goldens live in
//! `tests/goldens/`) as loadable model directories, plus the rows they are evaluated on, so a
//! built `llm-merging` can evaluate them anywhere — `scripts/gpu-check.sh` runs them in f32 on
//! the GPU and on the CPU and requires identical predictions.
//!
//! ```text
//! cargo run --release -p eval-harness --example write_fixtures -- OUT_DIR [GOLDENS_DIR [TOKENIZERS_DIR]]
//! ```
//!
//! GOLDENS_DIR defaults to this crate's `tests/goldens` and TOKENIZERS_DIR to
//! `.cache/tokenizers` (from `scripts/fetch-tokenizers.sh`), both as seen when it was built;
//! give them when the binary runs from another checkout. The T5 fixtures use the committed
//! T5-style tokenizer in GOLDENS_DIR. Writes `OUT_DIR/<fixture>/` for every
//! fixture, `OUT_DIR/rows.csv`, and `OUT_DIR/fixtures.txt` with one line per fixture:
//! its name and the `--max-gen-len` its goldens were made with (`-` for the model's default).

use std::path::{Path, PathBuf};

use testkit::synthetic::{write_decoder_dir, write_t5_dir};

type Result<T> = std::result::Result<T, String>;

const DECODERS: [&str; 5] = ["llama", "llama3", "mistral", "qwen2", "gemma"];
const T5S: [&str; 2] = ["t5_v11", "t5_orig"];

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(out) = args.next().map(PathBuf::from) else {
        return Err("usage: write_fixtures OUT_DIR [GOLDENS_DIR [TOKENIZERS_DIR]]".into());
    };
    let goldens = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens"));
    let tokenizers = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tokenizers"));
    std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let mut manifest = String::new();
    for name in DECODERS.iter().chain(T5S.iter()) {
        let path = goldens.join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let golden: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
        let dir = out.join(name);
        if T5S.contains(name) {
            write_t5_dir(&dir, &golden["config"], &goldens.join("t5-tokenizer"));
        } else {
            let tok = golden["tokenizer"]
                .as_str()
                .ok_or_else(|| format!("{}: no `tokenizer`", path.display()))?;
            write_decoder_dir(&dir, &golden["config"], &tokenizers.join(tok));
        }
        let max_gen_len = golden["max_gen_len"]
            .as_u64()
            .map_or_else(|| "-".to_string(), |n| n.to_string());
        manifest.push_str(&format!("{name} {max_gen_len}\n"));
    }
    std::fs::copy(goldens.join("rows.csv"), out.join("rows.csv"))
        .map_err(|e| format!("copying rows.csv into {}: {e}", out.display()))?;
    std::fs::write(out.join("fixtures.txt"), manifest)
        .map_err(|e| format!("writing {}: {e}", out.join("fixtures.txt").display()))?;
    println!("{}", out.display());
    Ok(())
}
