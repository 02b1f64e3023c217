//! T5 / Flan-T5 parity with transformers and peft on goldens written by
//! scripts/goldens/t5_goldens.py: a tiny T5 v1.1 (gated-gelu, untied head) and a tiny original
//! T5 (relu, tied head) with synthetic weights and a committed T5-style Unigram tokenizer;
//! the flan-t5 baseline's adapter layout (two rank-16 q/v LoRA adapters averaged 0.5/0.5)
//! through the runner; relative position buckets.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use eval_harness::choices::score_choices;
use eval_harness::greedy::greedy;
use eval_harness::hf::tokenizer::{Tokenizer, TokenizerKind};
use eval_harness::hf::GenerationConfig;
use eval_harness::models::t5::relative_position_bucket;
use eval_harness::models::{T5Config, T5};
use eval_harness::{dataset, evaluate, load, EvalOptions, LanguageModel, Scoring};
use serde_json::Value;
use testkit::synthetic::{t5_qv_lora_factors, t5_weights, write_t5_dir};

fn goldens() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens")
}

fn tokenizer_dir() -> PathBuf {
    goldens().join("t5-tokenizer")
}

fn golden(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(goldens().join(format!("{name}.json"))).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

struct Fixture {
    g: Value,
    model: T5,
    rows: dataset::Dataset,
}

impl Fixture {
    fn tok(&self) -> &Tokenizer {
        self.model.tokenizer()
    }
}

fn tokenizer(cfg: &T5Config) -> Tokenizer {
    let kind = TokenizerKind::EncoderDecoder {
        eos: cfg.eos_token_id,
        pad: cfg.pad_token_id,
    };
    Tokenizer::from_dir(&tokenizer_dir(), kind).unwrap()
}

/// A T5 from `config` with weights `w`, no generation config.
fn t5(config: &Value, w: HashMap<String, Tensor>) -> eval_harness::Result<T5> {
    let cfg = T5Config::from_json(config).unwrap();
    let generation = GenerationConfig::from_json(serde_json::json!({})).unwrap();
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    T5::new(cfg.clone(), tokenizer(&cfg), &generation, vb)
}

fn fixture(name: &str) -> Fixture {
    let g = golden(name);
    let model = t5(&g["config"], t5_weights(&g["config"], 1)).unwrap();
    let rows = dataset::load(&goldens().join("rows.csv")).unwrap();
    Fixture { g, model, rows }
}

fn example<'a>(rows: &'a dataset::Dataset, id: &str) -> &'a dataset::Example {
    rows.examples.iter().find(|e| e.id == id).unwrap()
}

fn check_logits(f: &Fixture) {
    let vocab = ids(&f.g["vocab_ids"]);
    let dec = ids(&f.g["decoder_ids"]);
    for l in f.g["logits"].as_array().unwrap() {
        let e = example(&f.rows, l["id"].as_str().unwrap());
        let input = f.tok().encode_input(&e.input).unwrap();
        assert_eq!(input, ids(&l["input_ids"]), "input ids of {}", e.id);
        let enc = f
            .model
            .encode(std::slice::from_ref(&input), &[vec![true; input.len()]])
            .unwrap();
        let mut cache = f.model.new_cache(&enc).unwrap();
        // Half the decoder inputs in one pass, the rest one at a time: the KV cache path.
        let split = dec.len() / 2;
        let mut hs = vec![f
            .model
            .decode(&[dec[..split].to_vec()], &mut cache)
            .unwrap()];
        for &t in &dec[split..] {
            hs.push(f.model.decode(&[vec![t]], &mut cache).unwrap());
        }
        let h = Tensor::cat(&hs, 1).unwrap();
        let logits = f.model.logits(&h.i(0).unwrap()).unwrap();
        let lse: Vec<f32> = logits.log_sum_exp(1).unwrap().to_vec1().unwrap();
        let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        let mut max = 0f64;
        for (p, row) in l["values"].as_array().unwrap().iter().enumerate() {
            for (k, v) in row.as_array().unwrap().iter().enumerate() {
                let d = (logits[p][vocab[k] as usize] as f64 - v.as_f64().unwrap()).abs();
                max = max.max(d);
            }
            max = max.max((lse[p] as f64 - l["logsumexp"][p].as_f64().unwrap()).abs());
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
        let e = example(&f.rows, m["id"].as_str().unwrap());
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
        let r = score_choices(&f.model, &e.input, &e.answer_choices, Scoring::StarterKit).unwrap();
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

fn check_generation(f: &Fixture) {
    let gens = f.g["gen"].as_array().unwrap();
    let inputs: Vec<Vec<u32>> = gens
        .iter()
        .map(|g| {
            let e = example(&f.rows, g["id"].as_str().unwrap());
            let p = f.tok().encode_input(&e.input).unwrap();
            assert_eq!(p, ids(&g["input_ids"]));
            p
        })
        .collect();
    // The kit's flan-t5 length: max_length 20 including the decoder start token.
    let (max_new, eos) = (19, [f.tok().eos_id()]);
    let single: Vec<Vec<u32>> = inputs
        .iter()
        .map(|p| {
            greedy(&f.model, std::slice::from_ref(p), max_new, &eos)
                .unwrap()
                .remove(0)
        })
        .collect();
    let batched = greedy(&f.model, &inputs, max_new, &eos).unwrap();
    for ((g, s), b) in gens.iter().zip(&single).zip(&batched) {
        let want = ids(&g["generated_ids"]);
        assert_eq!(s, &want, "{} {} batch 1", f.g["model"], g["id"]);
        assert_eq!(b, &want, "{} {} batched", f.g["model"], g["id"]);
        assert_eq!(f.tok().decode(s).unwrap(), g["text"].as_str().unwrap());
    }
}

#[test]
fn t5_v11_matches_transformers() {
    let f = fixture("t5_v11");
    check_logits(&f);
    check_choices(&f);
    check_generation(&f);
}

#[test]
fn t5_original_tied_head_matches_transformers() {
    let f = fixture("t5_orig");
    check_logits(&f);
    check_choices(&f);
    check_generation(&f);
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

fn opts(batch_size: usize, max_gen_len: Option<usize>) -> EvalOptions {
    EvalOptions {
        batch_size,
        max_gen_len,
        limit: None,
        scoring: Scoring::StarterKit,
        progress: false,
    }
}

#[test]
fn runner_picks_t5_from_config_and_is_batch_size_invariant() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset::load(&goldens().join("rows.csv")).unwrap();
    for name in ["t5_v11", "t5_orig"] {
        let g = golden(name);
        let dir = tmp.path().join(name);
        write_t5_dir(&dir, &g["config"], &tokenizer_dir());
        let m = load(&dir, None, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.kind().as_str(), "encoder-decoder");
        // No generation_config.json and no max_gen_len: transformers' default of 20 tokens.
        assert_eq!(m.generation().max_new_tokens, 19);
        let r1 = evaluate(&*m, &ds, &opts(1, None)).unwrap();
        let r8 = evaluate(&*m, &ds, &opts(8, None)).unwrap();
        let p1: Vec<&str> = r1.examples.iter().map(|e| e.prediction.as_str()).collect();
        let p8: Vec<&str> = r8.examples.iter().map(|e| e.prediction.as_str()).collect();
        assert_eq!(p1, p8, "{name}: batch 1 vs batch 8");
        for e in &r1.examples {
            if let Some(mc) = g["mc"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["id"] == e.id.as_str())
            {
                assert_eq!(
                    e.prediction,
                    mc["prediction"].to_string(),
                    "{name} {}",
                    e.id
                );
            }
            if let Some(x) = g["gen"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["id"] == e.id.as_str())
            {
                assert_eq!(e.prediction, x["text"].as_str().unwrap(), "{name} {}", e.id);
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
            let x = g["gen"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["id"] == e.id.as_str())
                .unwrap();
            let want = ids(&x["generated_ids"]);
            let want = &want[..want.len().min(2)];
            let text = m.tokenizer().decode(want).unwrap();
            assert_eq!(e.prediction, text, "{name} {}", e.id);
        }
    }
}

#[test]
fn generation_config_file_sets_the_length() {
    let tmp = tempfile::tempdir().unwrap();
    let g = golden("t5_orig");
    let dir = tmp.path().join("m");
    write_t5_dir(&dir, &g["config"], &tokenizer_dir());
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "max_length": 4}"#,
    )
    .unwrap();
    let m = load(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let ds = dataset::load(&goldens().join("rows.csv")).unwrap();
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
    let base = golden("t5_v11");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("base");
    write_t5_dir(&dir, &base["config"], &tokenizer_dir());
    let ac = &g["adapter_config"];
    let rank = ac["r"].as_u64().unwrap() as usize;
    assert_eq!(rank, 16);
    // The kit's flant5_avg: LoRA factors averaged 0.5/0.5, the first adapter's config.
    let f1 = t5_qv_lora_factors(&base["config"], 1, rank);
    let f2 = t5_qv_lora_factors(&base["config"], 2, rank);
    let avg: HashMap<String, Tensor> = f1
        .iter()
        .map(|(k, a)| {
            let m = ((a * 0.5).unwrap() + (&f2[k] * 0.5).unwrap()).unwrap();
            (k.clone(), m)
        })
        .collect();
    let adapter = tmp.path().join("flant5_avg");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(adapter.join("adapter_config.json"), ac.to_string()).unwrap();
    candle_core::safetensors::save(&avg, adapter.join("adapter_model.safetensors")).unwrap();

    let ds = dataset::load(&goldens().join("rows.csv")).unwrap();
    let m = load(&dir, Some(&adapter), DType::F32, &Device::Cpu).unwrap();
    let plain = load(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let r = evaluate(&*m, &ds, &opts(8, None)).unwrap();
    let r1 = evaluate(&*m, &ds, &opts(1, None)).unwrap();
    let p = evaluate(&*plain, &ds, &opts(8, None)).unwrap();
    let mut moved = 0f64;
    for ((e, e1), ep) in r.examples.iter().zip(&r1.examples).zip(&p.examples) {
        assert_eq!(e.prediction, e1.prediction, "{}: batch 8 vs 1", e.id);
        if let Some(mc) = g["mc"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == e.id.as_str())
        {
            let got = e.choice_scores.as_ref().unwrap();
            for (a, b) in got.iter().zip(mc["scores"].as_array().unwrap()) {
                assert!(
                    (a - b.as_f64().unwrap()).abs() <= 1e-3,
                    "{}: {a} vs {b}",
                    e.id
                );
            }
            assert_eq!(e.prediction, mc["prediction"].to_string(), "{}", e.id);
            for (a, b) in got.iter().zip(ep.choice_scores.as_ref().unwrap()) {
                moved = moved.max((a - b).abs());
            }
        }
        if let Some(x) = g["gen"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == e.id.as_str())
        {
            assert_eq!(e.prediction, x["text"].as_str().unwrap(), "{}", e.id);
        }
    }
    assert!(moved > 0.1, "the averaged adapter had no effect ({moved})");
}

#[test]
fn half_precision_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let g = golden("t5_v11");
    let dir = tmp.path().join("m");
    write_t5_dir(&dir, &g["config"], &tokenizer_dir());
    let ds = dataset::load(&goldens().join("rows.csv")).unwrap();
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
