//! Parity with transformers / rouge_score on goldens written by
//! scripts/goldens/eval_goldens.py (tiny synthetic models, the real Llama-2/3 tokenizers).
//! The tokenizers come from scripts/fetch-tokenizers.sh; tests fail if they are missing.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp};
use candle_nn::VarBuilder;
use eval_harness::choices::{score_choices, Scoring};
use eval_harness::dataset;
use eval_harness::greedy::greedy;
use eval_harness::hf::tokenizer::{Tokenizer, TokenizerKind};
use eval_harness::metrics::rouge;
use eval_harness::models::{Decoder, DecoderConfig};
use eval_harness::LanguageModel;
use serde_json::Value;
use testkit::synthetic::decoder_weights;

fn goldens() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens")
}

fn tokenizer_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("LLM_MERGING_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tokenizers"));
    let dir = base.join(name);
    assert!(
        dir.join("tokenizer.json").is_file(),
        "tokenizer `{name}` missing at {}: run scripts/fetch-tokenizers.sh first",
        dir.display()
    );
    dir
}

struct Fixture {
    g: Value,
    model: Decoder,
    rows: dataset::Dataset,
}

impl Fixture {
    fn tok(&self) -> &Tokenizer {
        self.model.tokenizer()
    }
}

fn fixture(name: &str) -> Fixture {
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(goldens().join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let dir = tokenizer_dir(g["tokenizer"].as_str().unwrap());
    let tok = Tokenizer::from_dir(&dir, TokenizerKind::Decoder { eos: None }).unwrap();
    let cfg = DecoderConfig::from_json(&g["config"]).unwrap();
    let w = decoder_weights(&g["config"], tok.eos_id());
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let model = Decoder::new(cfg, tok, vb).unwrap();
    let rows = dataset::load(&goldens().join("rows.csv")).unwrap();
    Fixture { g, model, rows }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn example<'a>(f: &'a Fixture, id: &str) -> &'a dataset::Example {
    f.rows.examples.iter().find(|e| e.id == id).unwrap()
}

fn check_logits(f: &Fixture) {
    let vocab: Vec<u32> = ids(&f.g["vocab_ids"]);
    for l in f.g["logits"].as_array().unwrap() {
        let e = example(f, l["id"].as_str().unwrap());
        let input = f.tok().encode_input(&e.input).unwrap();
        assert_eq!(input, ids(&l["input_ids"]), "input ids of {}", e.id);
        let mut cache = f.model.new_cache();
        let h = f
            .model
            .forward(
                std::slice::from_ref(&input),
                &[vec![true; input.len()]],
                &mut cache,
            )
            .unwrap();
        let logits = f.model.logits(&h.i(0).unwrap()).unwrap();
        let lse: Vec<f32> = logits.log_sum_exp(1).unwrap().to_vec1().unwrap();
        let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        let mut max = 0f64;
        for (p, row) in l["values"].as_array().unwrap().iter().enumerate() {
            for (k, v) in row.as_array().unwrap().iter().enumerate() {
                let d = (logits[p][vocab[k] as usize] as f64 - v.as_f64().unwrap()).abs();
                max = max.max(d);
            }
            let d = (lse[p] as f64 - l["logsumexp"][p].as_f64().unwrap()).abs();
            max = max.max(d);
        }
        assert!(
            max <= 1e-4,
            "{}: logits of {} differ by {max}",
            f.g["model"],
            e.id
        );
    }
}

fn check_choices(f: &Fixture) {
    for m in f.g["mc"].as_array().unwrap() {
        let e = example(f, m["id"].as_str().unwrap());
        for c in e
            .answer_choices
            .iter()
            .zip(m["choice_ids"].as_array().unwrap())
        {
            assert_eq!(
                f.tok().encode_target(c.0).unwrap(),
                ids(c.1),
                "target ids of {:?}",
                c.0
            );
        }
        for (mode, key, pred) in [
            (Scoring::StarterKit, "kit_scores", "kit_prediction"),
            (Scoring::Full, "full_scores", "full_prediction"),
        ] {
            let r = score_choices(&f.model, &e.input, &e.answer_choices, mode).unwrap();
            for (a, b) in r.scores.iter().zip(m[key].as_array().unwrap()) {
                let d = (a - b.as_f64().unwrap()).abs();
                assert!(d <= 1e-3, "{} {} {key}: {a} vs {b}", f.g["model"], e.id);
            }
            assert_eq!(
                r.prediction as u64,
                m[pred].as_u64().unwrap(),
                "{} {} {pred}",
                f.g["model"],
                e.id
            );
            if mode == Scoring::Full {
                assert_eq!(
                    r.prediction_norm.unwrap() as u64,
                    m["norm_prediction"].as_u64().unwrap()
                );
            }
        }
    }
}

fn check_generation(f: &Fixture) {
    let gens = f.g["gen"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = gens
        .iter()
        .map(|g| {
            let e = example(f, g["id"].as_str().unwrap());
            let p = f.tok().encode_input(&e.input).unwrap();
            assert_eq!(p, ids(&g["input_ids"]));
            p
        })
        .collect();
    let max_new = f.g["max_gen_len"].as_u64().unwrap() as usize;
    let eos = [f.tok().eos_id()];
    // Batch of 1, and all rows in one left-padded batch (the "batch 8" case: <= 8 rows).
    let single: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            greedy(&f.model, std::slice::from_ref(p), max_new, &eos)
                .unwrap()
                .remove(0)
        })
        .collect();
    let batched = greedy(&f.model, &prompts, max_new, &eos).unwrap();
    for ((g, s), b) in gens.iter().zip(&single).zip(&batched) {
        assert_eq!(
            s,
            &ids(&g["generated_ids"]),
            "{} {} batch 1",
            f.g["model"],
            g["id"]
        );
        assert_eq!(
            b,
            &ids(&g["generated_ids"]),
            "{} {} batched",
            f.g["model"],
            g["id"]
        );
        assert_eq!(f.tok().decode(s).unwrap(), g["text"].as_str().unwrap());
    }
}

fn check_model(name: &str) {
    let f = fixture(name);
    check_logits(&f);
    check_choices(&f);
    check_generation(&f);
}

#[test]
fn llama_matches_transformers() {
    check_model("llama");
}

#[test]
fn llama3_rope_scaling_and_tokenizer_match_transformers() {
    check_model("llama3");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check_model("mistral");
}

#[test]
fn qwen2_matches_transformers() {
    check_model("qwen2");
}

#[test]
fn gemma_matches_transformers() {
    check_model("gemma");
}

#[test]
fn rouge_matches_rouge_score() {
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(goldens().join("rouge.json")).unwrap())
            .unwrap();
    for case in g.as_array().unwrap() {
        let r = rouge(
            case["target"].as_str().unwrap(),
            case["prediction"].as_str().unwrap(),
        );
        for (name, v) in r.named() {
            let want = case[name].as_f64().unwrap();
            assert!((v - want).abs() <= 1e-9, "{name} of {case}: {v} vs {want}");
        }
    }
}

/// The KV cache grows in place while decoding; a clone must not see the other's writes.
#[test]
fn kv_cache_grows_in_place_and_clones_stay_independent() {
    let f = fixture("llama");
    let m = &f.model;
    let prompt: Vec<u32> = (1..40).map(|i| (i * 37 % 500) as u32 + 3).collect();
    let step = |cache: &mut eval_harness::models::KvCache, tok: u32| -> Vec<f32> {
        let h = m.forward(&[vec![tok]], &[vec![true]], cache).unwrap();
        m.logits(&h.i((.., 0)).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let run = |ids: &[u32], cache: &mut eval_harness::models::KvCache| {
        m.forward(&[ids.to_vec()], &[vec![true; ids.len()]], cache)
            .unwrap()
    };
    let prefilled = || {
        let mut c = m.new_cache();
        run(&prompt, &mut c);
        c
    };
    let mut a = prefilled();
    let mut b = a.clone();
    let (xa, xb) = (step(&mut a, 11), step(&mut b, 12));
    // Fresh caches for the same sequences give the same logits, bit for bit.
    for (tok, got) in [(11, &xa), (12, &xb)] {
        let mut fresh = prefilled();
        assert_eq!(&step(&mut fresh, tok), got, "continuation with {tok}");
    }
    // Many steps (past several capacity increases) match one forward over the whole sequence.
    let mut seq = prompt.clone();
    seq.push(11);
    let mut last = xa;
    for i in 0..150u32 {
        let tok = 3 + i * 7 % 400;
        seq.push(tok);
        last = step(&mut a, tok);
    }
    let h = run(&seq, &mut m.new_cache());
    let once: Vec<f32> = m
        .logits(&h.i((.., seq.len() - 1)).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let diff = last
        .iter()
        .zip(&once)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "step-by-step vs whole sequence: {diff}");
}
