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

#[test]
fn an_adapter_whose_lora_a_is_a_scalar_is_refused_not_indexed() {
    use candle_core::{DType, Device, Tensor};
    // The fuzzer's input (fuzz/regressions/adapter/scalar-lora-a) reduced to its point.
    let config = serde_json::json!({"r": 4, "lora_alpha": 8, "peft_type": "LORA",
        "target_modules": ["q_proj"]});
    let module = "base_model.model.model.layers.0.self_attn.q_proj";
    let tensors = vec![
        (
            format!("{module}.lora_A.weight"),
            Tensor::ones((), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            format!("{module}.lora_B.weight"),
            Tensor::ones((8, 4), DType::F32, &Device::Cpu).unwrap(),
        ),
    ];
    let err = match merge_core::adapter::Adapter::in_memory("scalar", config, tensors) {
        Ok(_) => panic!("an adapter with a scalar lora_A was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("lora_A and lora_B must be matrices, not of shapes [] and [8, 4]"),
        "{err}"
    );
}

#[test]
fn the_fuel_suffices_for_long_conversations_in_real_chat_templates() {
    // 25 demonstrations as user/assistant turns, a system message and the question: more than
    // any prompt the kit builds.
    let mut conversation = vec![prompt::Message::new("system", "Answer with the letter.")];
    for i in 0..25 {
        conversation.push(prompt::Message::new(
            "user",
            format!("Question {i}: 3 or 9?"),
        ));
        conversation.push(prompt::Message::new("assistant", "B"));
    }
    conversation.push(prompt::Message::new("user", "Question: 2 or 8?"));
    for name in ["llama3", "llama3_1", "qwen3", "gemma3"] {
        let dir = testkit::tokenizers::dir(name);
        let t = prompt::ChatTemplate::from_model_dir(&dir).unwrap().unwrap();
        let text = t
            .render(&conversation, true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains("Question 24: 3 or 9?"), "{name}: {text}");
    }
}

#[test]
fn an_adapter_whose_lora_b_is_a_scalar_is_refused_not_indexed() {
    use candle_core::{DType, Device, Tensor};
    // fuzz/regressions/adapter/scalar-lora-b reduced: A fits, B has no dimensions; reading
    // B's shape to compare B·A with the base indexed out of bounds.
    let config = serde_json::json!({"r": 4, "lora_alpha": 8, "peft_type": "LORA",
        "target_modules": ["q_proj"]});
    let module = "base_model.model.model.layers.0.self_attn.q_proj";
    let tensors = vec![
        (
            format!("{module}.lora_A.weight"),
            Tensor::ones((4, 8), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            format!("{module}.lora_B.weight"),
            Tensor::ones((), DType::F32, &Device::Cpu).unwrap(),
        ),
    ];
    let err = match merge_core::adapter::Adapter::in_memory("scalar", config, tensors) {
        Ok(_) => panic!("an adapter with a scalar lora_B was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("lora_A and lora_B must be matrices, not of shapes [4, 8] and []"),
        "{err}"
    );
}
