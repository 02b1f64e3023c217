//! Parity with transformers / rouge_score on goldens written by
//! scripts/goldens/eval_goldens.py (tiny synthetic models, the real Llama-2/3 tokenizers).
//! The tokenizers come from scripts/fetch-tokenizers.sh; tests fail if they are missing.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use eval_harness::choices::{score_choices, Scoring};
use eval_harness::hf::tokenizer::{Tokenizer, TokenizerKind};
use eval_harness::metrics::rouge;
use eval_harness::models::{Decoder, DecoderConfig};
use testkit::compare::max_abs_diff_f32;
use testkit::goldens::{self, golden, ids};
use testkit::synthetic::decoder_weights;

type Fixture = goldens::Fixture<Decoder>;

fn fixture(name: &str) -> Fixture {
    Fixture::new(name, |g| {
        let dir = goldens::tokenizer(g);
        let tok = Tokenizer::from_dir(&dir, TokenizerKind::Decoder { eos: None }).unwrap();
        let cfg = DecoderConfig::from_json(&g["config"]).unwrap();
        let w = decoder_weights(&g["config"], tok.eos_id());
        let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
        Decoder::new(cfg, tok, vb).unwrap()
    })
}

/// Logits of a prompt's positions (positions × vocabulary), one forward pass.
fn logits(model: &Decoder, input: &[u32]) -> Tensor {
    let mut cache = model.new_cache();
    let h = model
        .forward(&[input.to_vec()], &[vec![true; input.len()]], &mut cache)
        .unwrap();
    model.logits(&h.i(0).unwrap()).unwrap()
}

fn check_choices(f: &Fixture) {
    for m in f.g["mc"].as_array().unwrap() {
        let e = f.example(m["id"].as_str().unwrap());
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
            let input = f.tok().encode_input(&e.input).unwrap();
            let r = score_choices(&f.model, &input, &e.answer_choices, mode).unwrap();
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

fn check_model(name: &str) {
    let f = fixture(name);
    f.check_logits(logits);
    check_choices(&f);
    f.check_greedy(f.g["max_gen_len"].as_u64().unwrap() as usize);
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
    for case in golden("rouge").as_array().unwrap() {
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
    let diff = max_abs_diff_f32(&last, &once);
    assert!(diff < 1e-4, "step-by-step vs whole sequence: {diff}");
}
