//! Files the harnesses read around the fuzzed one, made once per process: a scratch
//! directory per thread for the fuzzed file, and a tiny model directory (decoder and T5
//! weights in one safetensors file, a real tokenizer) for config.json and tokenizer_config.json.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Tensor;

thread_local! {
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// Runs `f` with `data` written to `name` in an empty scratch directory of this thread.
pub fn with_file<T>(name: &str, data: &[u8], f: impl FnOnce(&Path) -> T) -> T {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let dir = s.get_or_insert_with(|| tempfile::tempdir().expect("a scratch directory"));
        let root = dir.path().join("case");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("scratch");
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().expect("in root")).expect("scratch");
        std::fs::write(&path, data).expect("scratch file");
        f(&path)
    })
}

/// The `config.json` both tiny model configs start from.
pub fn decoder_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "eos_token_id": 1,
        "tie_word_embeddings": false
    })
}

/// The T5 `config.json` of the tiny model.
pub fn t5_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "t5", "vocab_size": 64, "d_model": 8, "d_kv": 4, "d_ff": 16,
        "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
        "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false,
        "eos_token_id": 1, "pad_token_id": 0, "decoder_start_token_id": 0
    })
}

/// A directory with `model.safetensors` (the tiny decoder's and T5's weights) and the
/// committed T5 tokenizer; harnesses copy it and add the fuzzed file.
pub fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fuzz-harness-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("model dir");
        let mut tensors: Vec<(String, Tensor)> =
            testkit::synthetic::decoder_weights(&decoder_config(), 1)
                .into_iter()
                .collect();
        tensors.extend(testkit::synthetic::t5_weights(&t5_config(), 1));
        testkit::models::save(&dir.join("model.safetensors"), &tensors);
        let tok = testkit::goldens::t5_tokenizer().join("tokenizer.json");
        std::fs::copy(tok, dir.join("tokenizer.json")).expect("tokenizer");
        dir
    })
}

/// A tiny Llama checkpoint (testkit's default shape), the base adapters are mapped onto.
pub fn tiny_llama() -> &'static merge_core::checkpoint::Checkpoint {
    static BASE: OnceLock<merge_core::checkpoint::Checkpoint> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fuzz-harness-base-{}", std::process::id()));
        testkit::models::TinyLlama::default().write(&dir, 1, 1);
        merge_core::checkpoint::Checkpoint::open_dir(&dir).expect("the tiny base opens")
    })
}

/// Runs `f` on a fresh copy of [`model_dir`] with `name` holding `data`.
pub fn with_model_file<T>(name: &str, data: &[u8], f: impl FnOnce(&Path) -> T) -> T {
    with_file(name, data, |path| {
        let dir = path.parent().expect("in scratch");
        for file in ["model.safetensors", "tokenizer.json"] {
            if !dir.join(file).exists() {
                std::fs::hard_link(model_dir().join(file), dir.join(file))
                    .or_else(|_| std::fs::copy(model_dir().join(file), dir.join(file)).map(drop))
                    .expect("model file");
            }
        }
        f(dir)
    })
}
