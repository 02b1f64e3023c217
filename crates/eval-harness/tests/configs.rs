//! What a model directory's JSON files and the dtype option parse to: decoder and T5
//! `config.json` (family defaults, variants, errors that name the value), `generation_config.json`
//! lengths, and dtype names.

use candle_core::{DType, Device};
use eval_harness::hf::GenerationConfig;
use eval_harness::models::decoder::{Activation, RopeScaling};
use eval_harness::models::t5::T5Activation;
use eval_harness::models::{DecoderConfig, T5Config};
use eval_harness::resolve_dtype;

#[test]
fn decoder_config_family_defaults_and_errors() {
    let base = serde_json::json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2});
    let with = |extra: serde_json::Value| {
        let mut v = base.clone();
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        DecoderConfig::from_json(&v)
    };
    let g = with(serde_json::json!({"model_type": "gemma"})).unwrap();
    assert!(g.tie_word_embeddings && g.activation == Activation::GeluTanh);
    assert_eq!((g.num_kv_heads, g.head_dim, g.rms_norm_eps), (2, 4, 1e-6));
    let q = with(serde_json::json!({"model_type": "qwen2", "sliding_window": 4})).unwrap();
    assert!(q.qkv_bias && !q.o_bias && q.sliding_window.is_none());
    let m = with(
        serde_json::json!({"model_type": "mistral", "sliding_window": 4,
        "rope_scaling": {"type": "linear", "factor": 2.0}}),
    )
    .unwrap();
    assert_eq!(m.sliding_window, Some(4));
    assert_eq!(m.rope_scaling, RopeScaling::Linear(2.0));
    let e = with(serde_json::json!({"model_type": "gpt2"})).unwrap_err();
    assert!(e.contains("`gpt2` is not supported"), "{e}");
    let e = with(serde_json::json!({"model_type": "llama", "num_key_value_heads": 3})).unwrap_err();
    assert!(e.contains("multiple of num_key_value_heads 3"), "{e}");
    let e = with(serde_json::json!({"model_type": "llama", "hidden_act": "tanhish"})).unwrap_err();
    assert!(e.contains("`tanhish`"), "{e}");
}

#[test]
fn t5_config_defaults_and_variants() {
    let v1 = T5Config::from_json(&serde_json::json!({
        "model_type": "t5", "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false
    }))
    .unwrap();
    assert!(v1.gated && !v1.tie_word_embeddings && !v1.scale_decoder_outputs);
    assert_eq!(v1.activation, T5Activation::GeluNew);
    let orig = T5Config::from_json(&serde_json::json!({"model_type": "t5"})).unwrap();
    assert!(!orig.gated && orig.tie_word_embeddings && orig.scale_decoder_outputs);
    assert_eq!(orig.activation, T5Activation::Relu);
    assert_eq!(orig.num_decoder_layers, orig.num_layers);
    // transformers 5 says whether to rescale; without the key the tied rule applies.
    let t5 = T5Config::from_json(&serde_json::json!({
        "model_type": "t5", "tie_word_embeddings": true, "scale_decoder_outputs": false
    }))
    .unwrap();
    assert!(t5.tie_word_embeddings && !t5.scale_decoder_outputs);
    let e = T5Config::from_json(&serde_json::json!({"model_type": "llama"})).unwrap_err();
    assert!(e.contains("llama"), "{e}");
    let e = T5Config::from_json(&serde_json::json!({
        "model_type": "t5", "feed_forward_proj": "gated-tanhish"
    }))
    .unwrap_err();
    assert!(e.contains("tanhish"), "{e}");
}

#[test]
fn generation_length_falls_back_to_the_defaults() {
    let g = GenerationConfig::from_json(
        serde_json::json!({"decoder_start_token_id": 0, "eos_token_id": 1}),
    )
    .unwrap();
    // max_length 20 counts the decoder start token.
    assert_eq!(g.new_tokens(), 19);
    assert_eq!(g.eos_token_ids, Some(vec![1]));
    let g = GenerationConfig::from_json(
        serde_json::json!({"max_new_tokens": 7, "max_length": 100, "eos_token_id": [1, 5]}),
    )
    .unwrap();
    assert_eq!(g.new_tokens(), 7);
    assert_eq!(g.eos_token_ids, Some(vec![1, 5]));
    assert!(GenerationConfig::from_json(serde_json::json!({"max_length": "x"})).is_err());
}

#[test]
fn auto_dtype_is_f32_on_the_cpu_and_names_are_checked() {
    assert_eq!(resolve_dtype("auto", &Device::Cpu).unwrap(), DType::F32);
    assert_eq!(resolve_dtype("bf16", &Device::Cpu).unwrap(), DType::BF16);
    assert_eq!(resolve_dtype("float16", &Device::Cpu).unwrap(), DType::F16);
    let e = resolve_dtype("fp8", &Device::Cpu).unwrap_err();
    assert!(e.contains("`fp8`") && e.contains("auto"), "{e}");
}
