//! The inputs in fuzz/regressions/ outside the pickle reader's (those are in
//! crates/pth-reader/tests/hostile.rs), each read by the kit's own entry point: each must be
//! one clear error, reached without allocating what its size fields claim.

use std::path::{Path, PathBuf};

fn regression(target: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target)
        .join(name)
}

/// Opens `file` as a model directory's only `model.safetensors`.
fn open_safetensors(file: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(file, dir.path().join("model.safetensors")).unwrap();
    match merge_core::checkpoint::Checkpoint::open_dir(dir.path()) {
        Ok(_) => panic!("{} opened", file.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_safetensors_header_claiming_2_pow_60_bytes_fails_fast() {
    let err = open_safetensors(&regression("safetensors", "header-claims-2-pow-60"));
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn a_safetensors_tensor_claiming_2_pow_60_bytes_fails_fast() {
    let err = open_safetensors(&regression("safetensors", "tensor-claims-2-pow-60"));
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn a_config_with_zero_attention_heads_is_refused_not_divided_by() {
    let text = std::fs::read(regression("config_json", "zero-attention-heads")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    let err = eval_harness::models::DecoderConfig::from_json(&v).unwrap_err();
    assert!(err.contains("num_attention_heads"), "{err}");
}

/// A model directory holding `file` as its tokenizer_config.json.
fn chat_template(file: &Path) -> (tempfile::TempDir, prompt::ChatTemplate) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(file, dir.path().join("tokenizer_config.json")).unwrap();
    let t = prompt::ChatTemplate::from_model_dir(dir.path())
        .unwrap()
        .expect("a chat template");
    (dir, t)
}

#[test]
fn a_chat_template_that_loops_without_end_fails_instead_of_hanging() {
    let (_dir, t) = chat_template(&regression("tokenizer_config", "nested-range-loop"));
    let start = std::time::Instant::now();
    let err = t
        .render(&[prompt::Message::new("user", "Hi")], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fuel"), "{err}");
    assert!(err.contains("tokenizer_config.json"), "{err}");
    assert!(start.elapsed().as_secs() < 10, "took {:?}", start.elapsed());
}

#[test]
fn the_chat_template_seeds_render() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/tokenizer_config");
    for seed in ["chat-llama3", "chat-alternating"] {
        let (_dir, t) = chat_template(&corpus.join(seed));
        let text = t
            .render(
                &[
                    prompt::Message::new("system", "Be brief."),
                    prompt::Message::new("user", "Which is larger, 3 or 9?"),
                ],
                true,
            )
            .unwrap();
        assert!(text.contains("Which is larger, 3 or 9?"), "{seed}: {text}");
    }
}
