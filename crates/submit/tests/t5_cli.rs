//! `llm-merging eval` / `predict` on T5 model directories: the architecture comes from
//! config.json (no flag), adapters fold in with `--adapter`, and without `--max-gen-len` the
//! generation length is the model's generation config (the kit's flan-t5 default). Expected
//! values are the transformers / peft goldens of eval-harness (scripts/goldens/t5_goldens.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Tensor;
use eval_harness::models::T5Config;
use eval_harness::synthetic::{t5_qv_lora_factors, write_t5_model_dir};
use serde_json::Value;

fn goldens() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../eval-harness/tests/goldens")
}

fn golden(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(goldens().join(format!("{name}.json"))).unwrap())
        .unwrap()
}

fn run(args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_llm-merging"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "llm-merging {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `id → prediction` of a predictions CSV.
fn predictions(p: &Path) -> HashMap<String, String> {
    let mut r = csv::Reader::from_path(p).unwrap();
    assert_eq!(
        r.headers().unwrap().iter().collect::<Vec<_>>(),
        ["id", "prediction", "dummy_field"]
    );
    r.records()
        .map(|x| {
            let x = x.unwrap();
            (x[0].to_string(), x[1].to_string())
        })
        .collect()
}

/// Expected predictions of a golden: multiple-choice indices and generated texts.
fn expected(g: &Value) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for x in g["mc"].as_array().unwrap() {
        m.insert(
            x["id"].as_str().unwrap().to_string(),
            x["prediction"].to_string(),
        );
    }
    for x in g["gen"].as_array().unwrap() {
        m.insert(
            x["id"].as_str().unwrap().to_string(),
            x["text"].as_str().unwrap().to_string(),
        );
    }
    m
}

#[test]
fn eval_and_predict_pick_t5_from_config_and_fold_the_averaged_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let base = golden("t5_v11");
    let model = tmp.path().join("flan-t5-tiny");
    write_t5_model_dir(&model, &base["config"], &goldens().join("t5-tokenizer")).unwrap();

    // The flant5_avg layout: two rank-16 q/v adapters, factors averaged 0.5/0.5.
    let lora = golden("t5_lora");
    let cfg = T5Config::from_json(&base["config"]).unwrap();
    let f1 = t5_qv_lora_factors(&cfg, 1, 16).unwrap();
    let f2 = t5_qv_lora_factors(&cfg, 2, 16).unwrap();
    let avg: HashMap<String, Tensor> = f1
        .iter()
        .map(|(k, a)| {
            let m = ((a * 0.5).unwrap() + (&f2[k] * 0.5).unwrap()).unwrap();
            (k.clone(), m)
        })
        .collect();
    let adapter = tmp.path().join("flant5_avg");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        lora["adapter_config"].to_string(),
    )
    .unwrap();
    candle_core::safetensors::save(&avg, adapter.join("adapter_model.safetensors")).unwrap();

    let rows = goldens().join("rows.csv");
    let out = tmp.path().join("eval");
    run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        rows.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "3",
    ]);
    assert_eq!(
        predictions(&out.join("predictions/rows.csv")),
        expected(&lora)
    );
    let scores: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("scores.json")).unwrap()).unwrap();
    assert!(scores["rows"]["accuracy"].is_number());
    assert!(scores["rows"]["rouge1"].is_number());

    // predict on a test-schema file (no target column), base model without adapter.
    let test = tmp.path().join("test.csv");
    let ds = eval_harness::dataset::load(&rows).unwrap();
    let mut w = csv::Writer::from_path(&test).unwrap();
    w.write_record(["id", "input", "eval_type", "answer_choices"])
        .unwrap();
    for e in &ds.examples {
        let choices = if e.answer_choices.is_empty() {
            String::new()
        } else {
            format!("{:?}", e.answer_choices)
        };
        w.write_record([&e.id, &e.input, e.eval_type.as_str(), &choices])
            .unwrap();
    }
    w.flush().unwrap();
    let sub = tmp.path().join("submission.csv");
    run(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--data",
        test.to_str().unwrap(),
        "--out",
        sub.to_str().unwrap(),
    ]);
    assert_eq!(predictions(&sub), expected(&base));
}
