//! T5 / Flan-T5 parity with transformers and peft on goldens written by
//! scripts/goldens/t5_goldens.py: a tiny T5 v1.1 (gated-gelu, untied head) and a tiny original
//! T5 (relu, tied head) with synthetic weights and a committed T5-style Unigram tokenizer;
//! the flan-t5 baseline's adapter layout (two rank-16 q/v LoRA adapters averaged 0.5/0.5)
//! through the runner; relative position buckets.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use eval_harness::choices::score_choices;
use eval_harness::hf::tokenizer::{Tokenizer, TokenizerKind};
use eval_harness::hf::GenerationConfig;
use eval_harness::models::t5::relative_position_bucket;
use eval_harness::models::{T5Config, T5};
use eval_harness::{evaluate, load, Scoring};
use serde_json::Value;
use testkit::goldens::{self, entry, golden, ids, options as opts};
use testkit::models::write_peft_adapter;
use testkit::synthetic::{t5_averaged_lora_factors, t5_weights};

type Fixture = goldens::Fixture<T5>;

fn tokenizer(cfg: &T5Config) -> Tokenizer {
    let kind = TokenizerKind::EncoderDecoder {
        eos: cfg.eos_token_id,
        pad: cfg.pad_token_id,
    };
    Tokenizer::from_dir(&goldens::t5_tokenizer(), kind).unwrap()
}

/// A T5 from `config` with weights `w`, no generation config.
fn t5(config: &Value, w: HashMap<String, Tensor>) -> eval_harness::Result<T5> {
    let cfg = T5Config::from_json(config).unwrap();
    let generation = GenerationConfig::from_json(serde_json::json!({})).unwrap();
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    T5::new(cfg.clone(), tokenizer(&cfg), &generation, vb)
}

fn fixture(name: &str) -> Fixture {
    Fixture::new(name, |g| {
        t5(&g["config"], t5_weights(&g["config"], 1)).unwrap()
    })
}

/// Logits of the golden's decoder inputs (positions × vocabulary) after encoding `input`:
/// half the decoder inputs in one pass, the rest one at a time (the KV cache path).
fn logits(model: &T5, input: &[u32], dec: &[u32]) -> Tensor {
    let enc = model
        .encode(&[input.to_vec()], &[vec![true; input.len()]])
        .unwrap();
    let mut cache = model.new_cache(&enc).unwrap();
    let split = dec.len() / 2;
    let mut hs = vec![model.decode(&[dec[..split].to_vec()], &mut cache).unwrap()];
    for &t in &dec[split..] {
        hs.push(model.decode(&[vec![t]], &mut cache).unwrap());
    }
    let h = Tensor::cat(&hs, 1).unwrap();
    model.logits(&h.i(0).unwrap()).unwrap()
}

/// The golden's logits, its choice scores, and its greedy generations (at the kit's flan-t5
/// length: max_length 20 including the decoder start token).
fn check_model(name: &str) {
    let f = fixture(name);
    let dec = ids(&f.g["decoder_ids"]);
    f.check_logits(|m, input| logits(m, input, &dec));
    check_choices(&f);
    f.check_greedy(19);
}

fn check_choices(f: &Fixture) {
    for m in f.g["mc"].as_array().unwrap() {
        let e = f.example(m["id"].as_str().unwrap());
        assert_eq!(
            f.tok().encode_input(&e.input).unwrap(),
            ids(&m["input_ids"])
        );
        for (c, want) in e
            .answer_choices
            .iter()
            .zip(m["choice_ids"].as_array().unwrap())
        {
            assert_eq!(
                f.tok().encode_target(c).unwrap(),
                ids(want),
                "choice ids of {c:?}"
            );
        }
        let input = f.tok().encode_input(&e.input).unwrap();
        let r = score_choices(&f.model, &input, &e.answer_choices, Scoring::StarterKit).unwrap();
        for (a, b) in r.scores.iter().zip(m["scores"].as_array().unwrap()) {
            let d = (a - b.as_f64().unwrap()).abs();
            assert!(d <= 1e-3, "{} {}: score {a} vs {b}", f.g["model"], e.id);
        }
        assert_eq!(
            r.prediction as u64,
            m["prediction"].as_u64().unwrap(),
            "{} {}",
            f.g["model"],
            e.id
        );
    }
}

#[test]
fn t5_v11_matches_transformers() {
    check_model("t5_v11");
}

#[test]
fn t5_original_tied_head_matches_transformers() {
    check_model("t5_orig");
}

#[test]
fn buckets_follow_the_t5_rule() {
    // Bidirectional, 32 buckets, max distance 128: 16 per direction, 8 exact.
    let b = |rp| relative_position_bucket(rp, true, 32, 128);
    assert_eq!(b(0), 0);
    assert_eq!(b(-7), 7);
    assert_eq!(b(7), 16 + 7);
    assert_eq!(b(-8), 8);
    assert_eq!(b(-1000), 15);
    assert_eq!(b(1000), 31);
    // Causal: future keys are bucket 0, past distances use all 32 buckets.
    let c = |rp| relative_position_bucket(rp, false, 32, 128);
    assert_eq!(c(5), 0);
    assert_eq!(c(-15), 15);
    assert_eq!(c(-16), 16);
    assert_eq!(c(-10_000), 31);
}

#[test]
fn relative_position_buckets_match_transformers() {
    let g = golden("t5_buckets");
    let rps: Vec<i64> = g["relative_positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    for c in g["cases"].as_array().unwrap() {
        let (bi, nb, md) = (
            c["bidirectional"].as_bool().unwrap(),
            c["num_buckets"].as_u64().unwrap() as usize,
            c["max_distance"].as_u64().unwrap() as usize,
        );
        for (rp, want) in rps.iter().zip(c["buckets"].as_array().unwrap()) {
            assert_eq!(
                relative_position_bucket(*rp, bi, nb, md) as u64,
                want.as_u64().unwrap(),
                "bucket of {rp} (bidirectional {bi}, {nb} buckets, max distance {md})"
            );
        }
    }
}

#[test]
fn t5_tokenizer_truncates_appends_eos_and_cleans_up() {
    let cfg = T5Config::from_json(&serde_json::json!({"model_type": "t5"})).unwrap();
    let tok = tokenizer(&cfg);
    assert_eq!(
        (tok.eos_id(), tok.pad_id(), tok.max_length()),
        (1, 0, Some(64))
    );
    let short = tok.encode_input("The report was not ready.").unwrap();
    assert_eq!(short.last(), Some(&1));
    let long = tok
        .encode_input(&"the report was not ready ".repeat(40))
        .unwrap();
    assert_eq!(long.len(), 64);
    assert_eq!(long[63], 1, "EOS survives truncation");
    // No clean_up_tokenization_spaces key: transformers 4.39 cleans up.
    let ids = tok.encode_input("yes , it is n't").unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "yes, it isn't");
}

#[test]
fn runner_picks_t5_from_config_and_is_batch_size_invariant() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = goldens::rows();
    for name in ["t5_v11", "t5_orig"] {
        let dir = tmp.path().join(name);
        let g = goldens::write_model(name, &dir);
        let m = load(&dir, None, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.kind().as_str(), "encoder-decoder");
        // No generation_config.json and no max_gen_len: transformers' default of 20 tokens.
        assert_eq!(m.generation().max_new_tokens, 19);
        let r1 = evaluate(&*m, &ds, &opts(1, None)).unwrap();
        let r8 = evaluate(&*m, &ds, &opts(8, None)).unwrap();
        let p1: Vec<&str> = r1.examples.iter().map(|e| e.prediction.as_str()).collect();
        let p8: Vec<&str> = r8.examples.iter().map(|e| e.prediction.as_str()).collect();
        assert_eq!(p1, p8, "{name}: batch 1 vs batch 8");
        goldens::check_predictions(&r1, &g, name);
        for e in &r1.examples {
            if let Some(x) = entry(&g["gen"], &e.id) {
                assert_eq!(
                    e.output_tokens,
                    [x["generated_ids"].as_array().unwrap().len()]
                );
            }
        }
        for k in ["accuracy", "rouge1", "rouge2", "rougeL", "rougeLsum"] {
            assert!(r1.scores.contains_key(k), "{name}: {k} missing");
            assert_eq!(r1.scores[k], r8.scores[k]);
        }
        // An explicit max_gen_len wins over the generation config: greedy outputs are prefixes.
        let r2 = evaluate(&*m, &ds, &opts(4, Some(2))).unwrap();
        for e in r2.examples.iter().filter(|e| e.eval_type == "generation") {
            let want = ids(&entry(&g["gen"], &e.id).unwrap()["generated_ids"]);
            let want = &want[..want.len().min(2)];
            let text = m.tokenizer().decode(want).unwrap();
            assert_eq!(e.prediction, text, "{name} {}", e.id);
        }
    }
}

#[test]
fn generation_config_file_sets_the_length() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    goldens::write_model("t5_orig", &dir);
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "max_length": 4}"#,
    )
    .unwrap();
    let m = load(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let ds = goldens::rows();
    let r = evaluate(&*m, &ds, &opts(8, None)).unwrap();
    for e in r.examples.iter().filter(|e| e.eval_type == "generation") {
        assert!(e.output_tokens[0] <= 3, "{}: {:?}", e.id, e.output_tokens);
    }
    // gen-1 runs to the length limit in the goldens, so the limit is what stopped it.
    let gen1 = r.examples.iter().find(|e| e.id == "gen-1").unwrap();
    assert_eq!(gen1.output_tokens, [3]);
}

#[test]
fn flant5_avg_standin_evaluates_end_to_end() {
    let g = golden("t5_lora");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("base");
    let base = goldens::write_model("t5_v11", &dir);
    let ac = &g["adapter_config"];
    let rank = ac["r"].as_u64().unwrap() as usize;
    assert_eq!(rank, 16);
    // The kit's flant5_avg: LoRA factors averaged 0.5/0.5, the first adapter's config.
    let adapter = tmp.path().join("flant5_avg");
    write_peft_adapter(
        &adapter,
        ac,
        t5_averaged_lora_factors(&base["config"], rank),
    );

    let ds = goldens::rows();
    let m = load(&dir, Some(&adapter), DType::F32, &Device::Cpu).unwrap();
    let plain = load(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let r = evaluate(&*m, &ds, &opts(8, None)).unwrap();
    let r1 = evaluate(&*m, &ds, &opts(1, None)).unwrap();
    let p = evaluate(&*plain, &ds, &opts(8, None)).unwrap();
    let mut moved = 0f64;
    goldens::check_predictions(&r, &g, "t5_lora");
    for ((e, e1), ep) in r.examples.iter().zip(&r1.examples).zip(&p.examples) {
        assert_eq!(e.prediction, e1.prediction, "{}: batch 8 vs 1", e.id);
        if let Some(mc) = entry(&g["mc"], &e.id) {
            let got = e.choice_scores.as_ref().unwrap();
            for (a, b) in got.iter().zip(mc["scores"].as_array().unwrap()) {
                assert!(
                    (a - b.as_f64().unwrap()).abs() <= 1e-3,
                    "{}: {a} vs {b}",
                    e.id
                );
            }
            for (a, b) in got.iter().zip(ep.choice_scores.as_ref().unwrap()) {
                moved = moved.max((a - b).abs());
            }
        }
    }
    assert!(moved > 0.1, "the averaged adapter had no effect ({moved})");
}

#[test]
fn half_precision_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    goldens::write_model("t5_v11", &dir);
    let ds = goldens::rows();
    for dtype in [DType::BF16, DType::F16] {
        let m = load(&dir, None, dtype, &Device::Cpu).unwrap();
        let r = evaluate(&*m, &ds, &opts(8, Some(3))).unwrap();
        assert_eq!(r.examples.len(), ds.examples.len());
        let scores: Vec<f64> = r
            .examples
            .iter()
            .flat_map(|e| e.choice_scores.iter().flatten().copied())
            .collect();
        assert!(
            !scores.is_empty() && scores.iter().all(|s| s.is_finite()),
            "{dtype:?}: {scores:?}"
        );
    }
}

#[test]
fn embedding_may_be_stored_under_a_stack_name() {
    // Deduplicating safetensors converters may keep `encoder.embed_tokens.weight` (or the
    // decoder's) instead of `shared.weight`: same model.
    let f = fixture("t5_orig");
    let config = &f.g["config"];
    let mut w = t5_weights(config, 1);
    let shared = w.remove("shared.weight").unwrap();
    w.insert("decoder.embed_tokens.weight".into(), shared);
    let m = t5(config, w).unwrap();
    let input = f.tok().encode_input("Hello").unwrap();
    let enc = |m: &T5| {
        m.encode(std::slice::from_ref(&input), &[vec![true; input.len()]])
            .unwrap()
            .hidden
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(enc(&m), enc(&f.model));
    let mut w = t5_weights(config, 1);
    w.remove("shared.weight");
    let err = t5(config, w).err().unwrap();
    assert!(err.to_string().contains("shared.weight"), "{err}");
}

#[test]
fn scale_decoder_outputs_is_honoured_when_present() {
    // transformers 5 writes `scale_decoder_outputs`; without it the head is rescaled by
    // d_model^-0.5 exactly when it is tied (transformers 4.39, the kit's).
    let logits = |name: &str, scale: Option<bool>| -> (Vec<f32>, f64) {
        let mut config = golden(name)["config"].clone();
        if let Some(s) = scale {
            config["scale_decoder_outputs"] = s.into();
        }
        let m = t5(&config, t5_weights(&golden(name)["config"], 1)).unwrap();
        let enc = m.encode(&[vec![5, 9, 1]], &[vec![true; 3]]).unwrap();
        let mut cache = m.new_cache(&enc).unwrap();
        let h = m.decode(&[vec![0, 7]], &mut cache).unwrap();
        let l = m
            .logits(&h)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (l, (m.config().d_model as f64).powf(-0.5))
    };
    for (name, rescaled_by_default) in [("t5_orig", true), ("t5_v11", false)] {
        let (default, s) = logits(name, None);
        let (scaled, _) = logits(name, Some(true));
        let (unscaled, _) = logits(name, Some(false));
        assert_eq!(
            default,
            if rescaled_by_default {
                &scaled
            } else {
                &unscaled
            }[..]
        );
        for (a, b) in scaled.iter().zip(&unscaled) {
            let want = *b as f64 * s;
            assert!(
                (*a as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{name}: {a} vs {want}"
            );
        }
    }
}
