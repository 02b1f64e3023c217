//! The whole evaluation path on a synthetic model directory: loading from disk, both
//! schemas, batch-size invariance, an input longer than max_position_embeddings, outputs.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use eval_harness::report::write_eval_outputs;
use eval_harness::{evaluate, load, EvalOptions, Scoring};
use serde_json::Value;
use testkit::compare::max_abs_diff;
use testkit::goldens::{self, options};

/// Golden `name` written as a model directory under `tmp`: (directory, golden).
fn model_dir(name: &str, tmp: &Path) -> (PathBuf, Value) {
    let dir = tmp.join(name);
    let g = goldens::write_model(name, &dir);
    (dir, g)
}

#[test]
fn batch_size_does_not_change_predictions() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = goldens::rows();
    for name in ["llama", "mistral", "qwen2", "gemma", "llama3"] {
        let (dir, g) = model_dir(name, tmp.path());
        let m = load(&dir, None, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.kind().as_str(), "decoder");
        // The long row is longer than max_position_embeddings (64).
        let longest = ds
            .examples
            .iter()
            .map(|e| m.tokenizer().encode_input(&e.input).unwrap().len())
            .max();
        assert!(longest.unwrap() as u64 > g["config"]["max_position_embeddings"].as_u64().unwrap());
        let opts = |b: usize| options(b, Some(g["max_gen_len"].as_u64().unwrap() as usize));
        let r1 = evaluate(&*m, &ds, &opts(1)).unwrap();
        let r8 = evaluate(&*m, &ds, &opts(8)).unwrap();
        let p1: Vec<&str> = r1.examples.iter().map(|e| e.prediction.as_str()).collect();
        let p8: Vec<&str> = r8.examples.iter().map(|e| e.prediction.as_str()).collect();
        assert_eq!(p1, p8, "{name}: batch 1 vs batch 8");
        let r32 = evaluate(&*m, &ds, &opts(32)).unwrap();
        let p32: Vec<&str> = r32.examples.iter().map(|e| e.prediction.as_str()).collect();
        assert_eq!(p1, p32, "{name}: batch 1 vs batch 32");
        // And both equal the transformers goldens.
        goldens::check_predictions(&r1, &g, name);
        assert_eq!(r1.examples.len(), ds.examples.len());
        assert_eq!(r1.examples[0].id, ds.examples[0].id);
        for k in ["accuracy", "rouge1", "rouge2", "rougeL", "rougeLsum"] {
            assert!(r1.scores.contains_key(k), "{name}: {k} missing");
            assert_eq!(r1.scores[k], r8.scores[k]);
        }
    }
}

#[test]
fn writes_outputs_and_honours_limit_and_full_scoring() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = model_dir("llama", tmp.path());
    let m = load(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let ds = goldens::rows();
    let opts = EvalOptions {
        limit: Some(5),
        scoring: Scoring::Full,
        ..options(4, Some(4))
    };
    let r = evaluate(&*m, &ds, &opts).unwrap();
    assert_eq!(r.examples.len(), 5);
    assert!(r.scores.contains_key("accuracy_norm"));
    assert!(r.examples.iter().all(|e| e.seconds >= 0.0));
    let out = tmp.path().join("out");
    write_eval_outputs(&out, &[r]).unwrap();
    let csv = std::fs::read_to_string(out.join("predictions/rows.csv")).unwrap();
    assert!(csv.starts_with("id,prediction,dummy_field\nmc-0,"));
    assert_eq!(csv.lines().count(), 6);
    let scores: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("scores.json")).unwrap()).unwrap();
    assert!(scores["rows"]["accuracy"].is_number());
    let details = std::fs::read_to_string(out.join("details/rows.jsonl")).unwrap();
    let first: Value = serde_json::from_str(details.lines().next().unwrap()).unwrap();
    assert_eq!(first["id"], "mc-0");
    assert_eq!(first["choice_scores"].as_array().unwrap().len(), 4);
}

#[test]
fn bf16_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = model_dir("qwen2", tmp.path());
    let m = load(&dir, None, DType::BF16, &Device::Cpu).unwrap();
    let ds = goldens::rows();
    let r = evaluate(&*m, &ds, &options(8, Some(3))).unwrap();
    assert_eq!(r.examples.len(), ds.examples.len());
    assert!(r
        .examples
        .iter()
        .flat_map(|e| e.choice_scores.iter().flatten())
        .all(|s| s.is_finite()));
}

#[test]
fn adapter_is_folded_into_the_weights() {
    use candle_core::{IndexOp, Tensor};
    use eval_harness::hf::tokenizer::{Tokenizer, TokenizerKind};
    use eval_harness::models::{CheckpointSource, Decoder, DecoderConfig};
    use testkit::synthetic::{decoder_weights, values};

    let tmp = tempfile::tempdir().unwrap();
    let (dir, g) = model_dir("llama", tmp.path());
    // A rank-2 PEFT adapter on layer 0's q_proj and v_proj.
    let cfg = DecoderConfig::from_json(&g["config"]).unwrap();
    let (h, r, alpha) = (cfg.hidden_size, 2usize, 8.0f64);
    let mut factors = std::collections::HashMap::new();
    let mut folded = decoder_weights(&g["config"], 2);
    for (m, out) in [
        ("q_proj", cfg.num_heads * cfg.head_dim),
        ("v_proj", cfg.num_kv_heads * cfg.head_dim),
    ] {
        for l in 0..cfg.num_layers {
            let base = format!("model.layers.{l}.self_attn.{m}");
            let a = Tensor::from_vec(
                values(&format!("{base}.A"), r * h, 0.5, 0.0),
                (r, h),
                &Device::Cpu,
            )
            .unwrap();
            let b = Tensor::from_vec(
                values(&format!("{base}.B"), out * r, 0.5, 0.0),
                (out, r),
                &Device::Cpu,
            )
            .unwrap();
            let w = &folded[&format!("{base}.weight")];
            let delta = (b.matmul(&a).unwrap() * (alpha / r as f64)).unwrap();
            let w2 = (w + delta).unwrap();
            folded.insert(format!("{base}.weight"), w2);
            factors.insert(format!("base_model.model.{base}.lora_A.weight"), a);
            factors.insert(format!("base_model.model.{base}.lora_B.weight"), b);
        }
    }
    let adapter = tmp.path().join("adapter");
    let adapter_config = serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                            "target_modules": ["q_proj", "v_proj"]});
    testkit::models::write_peft_adapter(&adapter, &adapter_config, factors);

    let open = |adapter: Option<&Path>| {
        let vb = CheckpointSource::open(&dir, adapter)
            .unwrap()
            .into_var_builder(DType::F32, &Device::Cpu);
        Decoder::load(&dir, vb).unwrap()
    };
    let with = open(Some(&adapter));
    let tok = Tokenizer::from_dir(&dir, TokenizerKind::Decoder { eos: None }).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(folded, DType::F32, &Device::Cpu);
    let reference = Decoder::new(cfg, tok, vb).unwrap();
    let plain = open(None);
    let ids = eval_harness::LanguageModel::tokenizer(&with)
        .encode_input("The adapter changes the attention.")
        .unwrap();
    let logits = |m: &Decoder| {
        let mut c = m.new_cache();
        let hs = m
            .forward(std::slice::from_ref(&ids), &[vec![true; ids.len()]], &mut c)
            .unwrap();
        m.logits(&hs.i(0).unwrap()).unwrap()
    };
    let a = logits(&with);
    let diff = max_abs_diff(&a, &logits(&reference));
    assert!(diff < 1e-4, "folded adapter differs by {diff}");
    let moved = max_abs_diff(&a, &logits(&plain));
    assert!(moved > 1e-2, "the adapter had no effect");

    let err = load(
        &dir,
        Some(&tmp.path().join("missing")),
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn standard_errors_are_the_bootstrap_over_rows_and_absent_unless_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = model_dir("llama", tmp.path());
    let m = load(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let ds = goldens::rows();
    let opts = |stderr| EvalOptions {
        max_gen_len: Some(4),
        scoring: Scoring::Full,
        progress: false,
        stderr_resamples: stderr,
        ..Default::default()
    };
    let plain = evaluate(&*m, &ds, &opts(None)).unwrap();
    assert!(plain.scores.keys().all(|k| !k.ends_with("_stderr")));
    let r = evaluate(&*m, &ds, &opts(Some(1000))).unwrap();
    // The same scores, and for each metric its standard error.
    for (k, v) in &plain.scores {
        assert_eq!(r.scores[k], *v, "{k}");
        assert!(r.scores.contains_key(&format!("{k}_stderr")), "{k}");
    }
    assert_eq!(r.scores.len(), 2 * plain.scores.len());
    let per_row = |f: &dyn Fn(&eval_harness::report::ExampleOutcome) -> Option<f64>| {
        r.examples.iter().filter_map(f).collect::<Vec<f64>>()
    };
    let right = per_row(&|e| {
        (e.eval_type == "multiple_choice")
            .then(|| f64::from(u8::from(Some(&e.prediction) == e.target.as_ref())))
    });
    assert!(right.len() >= 2);
    assert_eq!(
        r.scores["accuracy_stderr"],
        stats::bootstrap_se(&right, 1000, 0)
    );
    let rouge_l = per_row(&|e| {
        let t = e.target.as_deref()?;
        (e.eval_type == "generation")
            .then(|| eval_harness::metrics::rouge(t, &e.prediction).rouge_l)
    });
    assert_eq!(
        r.scores["rougeL_stderr"],
        stats::bootstrap_se(&rouge_l, 1000, 0)
    );
    // Seeded: the same again.
    assert_eq!(
        evaluate(&*m, &ds, &opts(Some(1000))).unwrap().scores,
        r.scores
    );
}
