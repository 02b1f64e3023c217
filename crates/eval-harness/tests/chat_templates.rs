//! Chat-template parity: the real chat templates shipped with the npm tokenizer packages
//! (Llama 3, Llama 3.1, Qwen3, Gemma 3), rendered by the prompt crate (minijinja) and tokenized
//! by the kit's tokenizer as a chat prompt is (`encode_plain`), equal transformers'
//! `apply_chat_template` text and token ids exactly: with and without a system message, with
//! few-shot turns, with and without `add_generation_prompt`. Goldens: `goldens/chat/`, made by
//! `scripts/goldens/chat_goldens.py`.

use std::path::Path;

use eval_harness::hf::tokenizer::{Tokenizer, TokenizerKind};
use prompt::{ChatTemplate, Message};
use serde_json::Value;

fn golden(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/goldens/chat/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn check(name: &str) {
    let g = golden(name);
    let dir = testkit::tokenizers::dir(name);
    let template = ChatTemplate::from_model_dir(&dir)
        .unwrap()
        .unwrap_or_else(|| panic!("{name} ships a chat template"));
    assert_eq!(
        template.sha256(),
        g["chat_template_sha256"].as_str().unwrap(),
        "{name}: the golden was made from another template"
    );
    let tok = Tokenizer::from_dir(&dir, TokenizerKind::Decoder { eos: None }).unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 12, "{name}: {} cases", cases.len());
    for case in cases {
        let what = format!(
            "{name} {} add_generation_prompt={}",
            case["name"], case["add_generation_prompt"]
        );
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(&messages, gen).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{what}: text");
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode_plain(&text).unwrap(), want, "{what}: ids");
        // The template's BOS (where it writes one) is the only one.
        if let Some(bos) = tok.bos_id() {
            assert!(want.iter().filter(|&&i| i == bos).count() <= 1, "{what}");
        }
    }
}

#[test]
fn llama3() {
    check("llama3");
}

#[test]
fn llama3_1() {
    check("llama3_1");
}

#[test]
fn qwen3() {
    check("qwen3");
}

#[test]
fn gemma3() {
    check("gemma3");
}

#[test]
fn a_model_without_a_template_has_none() {
    // Llama 2's npm tokenizer_config.json has no chat_template.
    let dir = testkit::tokenizers::dir("llama2");
    assert!(ChatTemplate::from_model_dir(&dir).unwrap().is_none());
}
