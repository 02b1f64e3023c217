//! Configuration files: a model's `config.json` and `tokenizer_config.json`, merge configs
//! (our TOML, mergekit's YAML).

use candle_core::{DType, Device};
use merge_core::params::{layer_position, ConfigParams};
use merge_core::MergeConfig;

use crate::fixtures::with_model_file;

/// A model's `config.json` (decoder or T5, chosen by its `model_type`), loaded as `eval` loads
/// a model: the config interpreted, the tokenizer set up from it, the weights checked against
/// its shapes, RoPE tables and generation settings derived.
pub fn config_json(data: &[u8]) {
    with_model_file("config.json", data, |dir| {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
            let _ = eval_harness::models::DecoderConfig::from_json(&v);
            let _ = eval_harness::models::T5Config::from_json(&v);
            let _ = eval_harness::hf::GenerationConfig::from_json(v);
        }
        if let Ok(model) = eval_harness::load(dir, None, DType::F32, &Device::Cpu) {
            let _ = model.tokenizer().encode_input("Question: which is larger?");
        }
    });
}

/// `tokenizer_config.json` beside a real `tokenizer.json`: special tokens by text or as
/// AddedToken objects, the add_bos/add_eos flags, `model_max_length`, for both model kinds;
/// and its `chat_template` (Jinja, from the Hub like the rest) compiled and rendered for a
/// short conversation, as prompting with the model's chat template does.
pub fn tokenizer_config(data: &[u8]) {
    use eval_harness::hf::tokenizer::{Tokenizer, TokenizerKind};
    with_model_file("tokenizer_config.json", data, |dir| {
        for kind in [
            TokenizerKind::Decoder { eos: Some(1) },
            TokenizerKind::Decoder { eos: None },
            TokenizerKind::EncoderDecoder { eos: 1, pad: 0 },
        ] {
            if let Ok(tok) = Tokenizer::from_dir(dir, kind) {
                let text = "Question: Which is larger, 3 or 9?\nAnswer:";
                if let Ok(ids) = tok.encode_input(text) {
                    let _ = tok.decode(&ids);
                }
                let _ = tok.encode_target(" 9");
            }
        }
        if let Ok(Some(template)) = prompt::ChatTemplate::from_model_dir(dir) {
            use prompt::Message;
            let conversation = [
                Message::new("system", "Answer briefly."),
                Message::new("user", "Which is larger, 3 or 9?"),
                Message::new("assistant", "9"),
                Message::new("user", "And 2 or 8?"),
            ];
            let _ = template.render(&conversation, true);
            let _ = template.render(&conversation[1..2], false);
        }
    });
}

/// A merge config read, checked against the registry, and its parameters resolved for the
/// tensors of a 4-layer model, as planning a merge does.
fn resolve(cfg: &MergeConfig) {
    let Some(method) = merge_core::registry::lookup(&cfg.method) else {
        return;
    };
    let Ok(params) = ConfigParams::new(
        cfg,
        &cfg.method,
        method.parameters(),
        method.model_parameters(),
    ) else {
        return;
    };
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        let t = layer_position(name, 4);
        let _ = params.globals(name, t);
        for i in 0..cfg.models.len() {
            let _ = params.model(i, name, t);
        }
    }
}

/// A merge config in our TOML; a config that reads must also survive a round trip through
/// `to_toml` unchanged (what `convert` prints and model cards record).
pub fn merge_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = MergeConfig::from_toml_str(text, "fuzzed.toml") {
        resolve(&cfg);
        let again = MergeConfig::from_toml_str(&cfg.to_toml(), "round trip")
            .expect("a config that reads is written back readable");
        assert_eq!(again, cfg, "a config changes in a round trip through TOML");
    }
}

/// A mergekit YAML config, read into ours, checked and resolved; its TOML translation (what
/// `convert` prints) must read back as the same config.
pub fn mergekit_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = merge_core::config::mergekit::parse(text, "fuzzed.yml") {
        if cfg.validate("fuzzed.yml").is_ok() {
            resolve(&cfg);
        }
        let again = MergeConfig::from_toml_str(&cfg.to_toml(), "converted");
        if cfg.validate("fuzzed.yml").is_ok() {
            assert_eq!(again.expect("converted TOML reads"), cfg);
        }
    }
}
