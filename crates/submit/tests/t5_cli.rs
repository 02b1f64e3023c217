//! `llm-merging eval` / `predict` on T5 model directories: the architecture comes from
//! config.json (no flag), adapters fold in with `--adapter`, and without `--max-gen-len` the
//! generation length is the model's generation config (the kit's flan-t5 default). Expected
//! values are the transformers / peft goldens of eval-harness (scripts/goldens/t5_goldens.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Tensor;
use serde_json::Value;
use testkit::synthetic::{t5_qv_lora_factors, write_t5_dir};

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

/// Writes adapter `which` (1 or 2) of the flant5_avg stand-in: rank 16 on every `q`/`v`.
fn write_adapter(dir: &Path, cfg: &Value, adapter_config: &Value, which: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), adapter_config.to_string()).unwrap();
    let f = t5_qv_lora_factors(cfg, which, 16);
    candle_core::safetensors::save(&f, dir.join("adapter_model.safetensors")).unwrap();
}

/// The golden rows in the test schema (no target column).
fn write_test_csv(path: &Path) {
    let ds = eval_harness::dataset::load(&goldens().join("rows.csv")).unwrap();
    let mut w = csv::Writer::from_path(path).unwrap();
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
}

#[test]
fn eval_and_predict_pick_t5_from_config_and_fold_the_averaged_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let base = golden("t5_v11");
    let model = tmp.path().join("flan-t5-tiny");
    write_t5_dir(&model, &base["config"], &goldens().join("t5-tokenizer"));

    // The flant5_avg layout: two rank-16 q/v adapters, factors averaged 0.5/0.5.
    let lora = golden("t5_lora");
    let f1 = t5_qv_lora_factors(&base["config"], 1, 16);
    let f2 = t5_qv_lora_factors(&base["config"], 2, 16);
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
    write_test_csv(&test);
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

/// `llm-merging run` on a flant5_avg-shaped entry: `lora_avg` of two rank-16 q/v adapters on a
/// tiny T5 base, evaluated as base + merged adapter with no `max_gen_len` (the generation
/// config's length), predictions equal to peft's on the same averaged adapter.
#[test]
fn run_merges_flant5_avg_standin_and_evaluates_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
    std::fs::write(ws.join("src/lib.rs"), "// participant code\n").unwrap();
    std::fs::create_dir_all(ws.join("data/validation")).unwrap();
    std::fs::copy(
        goldens().join("rows.csv"),
        ws.join("data/validation/rows.csv"),
    )
    .unwrap();
    write_test_csv(&ws.join("data/test.csv"));
    let base = golden("t5_v11");
    let lora = golden("t5_lora");
    let cfg = &base["config"];
    let models = ws.join("models");
    write_t5_dir(
        &models.join("flan-t5-tiny"),
        &base["config"],
        &goldens().join("t5-tokenizer"),
    );
    write_adapter(&models.join("lora_a"), cfg, &lora["adapter_config"], 1);
    write_adapter(&models.join("lora_b"), cfg, &lora["adapter_config"], 2);
    let entry = ws.join("submissions/flant5_tiny");
    std::fs::create_dir_all(&entry).unwrap();
    std::fs::write(
        entry.join("entry.toml"),
        r#"[merge]
method = "lora_avg"
base_model = "../../models/flan-t5-tiny"
[[merge.models]]
model = "../../models/lora_a"
parameters = { weight = 0.5 }
[[merge.models]]
model = "../../models/lora_b"
parameters = { weight = 0.5 }

[eval]
datasets = ["${DATA_DIR}/validation/rows.csv"]
batch_size = 2
device = "cpu"
"#,
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_llm-merging"))
        .current_dir(&ws)
        .env("HF_HOME", tmp.path().join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("LLM_MERGING_DATA")
        .args(["run", "--entry", "submissions/flant5_tiny"])
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{log}");
    let dist = ws.join("dist/flant5_tiny");
    assert!(
        dist.join("work/merged/adapter_config.json").is_file(),
        "{log}"
    );
    let want = expected(&lora);
    assert_eq!(
        predictions(&dist.join("work/eval/predictions/rows.csv")),
        want
    );
    assert_eq!(predictions(&dist.join("submission.csv")), want);
}
