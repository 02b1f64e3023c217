//! `llm-merging eval` / `predict` on T5 model directories: the architecture comes from
//! config.json (no flag), adapters fold in with `--adapter`, and without `--max-gen-len` the
//! generation length is the model's generation config (the kit's flan-t5 default). Expected
//! values are the transformers / peft goldens of eval-harness (scripts/goldens/t5_goldens.py).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use testkit::cli::{entry, offline, ok, workspace};
use testkit::goldens::{self, golden, predictions};
use testkit::models::write_peft_adapter;
use testkit::synthetic::{t5_averaged_lora_factors, t5_qv_lora_factors};

/// The binary, offline with `HF_HOME` under `home`, run with `args`; it must succeed.
fn run(home: &Path, args: &[&str]) -> String {
    ok(&bin(home).args(args).output().unwrap())
}

fn bin(home: &Path) -> Command {
    offline(Command::new(env!("CARGO_BIN_EXE_llm-merging")), home)
}

/// `id → prediction` of a predictions CSV.
fn predicted(p: &Path) -> HashMap<String, String> {
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

/// The golden rows in the test schema (no target column).
fn write_test_csv(path: &Path) {
    let ds = goldens::rows();
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
    let model = tmp.path().join("flan-t5-tiny");
    let base = goldens::write_model("t5_v11", &model);

    // The flant5_avg layout: two rank-16 q/v adapters, factors averaged 0.5/0.5.
    let lora = golden("t5_lora");
    let adapter = tmp.path().join("flant5_avg");
    write_peft_adapter(
        &adapter,
        &lora["adapter_config"],
        t5_averaged_lora_factors(&base["config"], 16),
    );

    let rows = goldens::rows_csv();
    let out = tmp.path().join("eval");
    run(
        tmp.path(),
        &[
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
        ],
    );
    assert_eq!(
        predicted(&out.join("predictions/rows.csv")),
        predictions(&lora)
    );
    let scores: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("scores.json")).unwrap()).unwrap();
    assert!(scores["rows"]["accuracy"].is_number());
    assert!(scores["rows"]["rouge1"].is_number());

    // predict on a test-schema file (no target column), base model without adapter.
    let test = tmp.path().join("test.csv");
    write_test_csv(&test);
    let sub = tmp.path().join("submission.csv");
    run(
        tmp.path(),
        &[
            "predict",
            "--model",
            model.to_str().unwrap(),
            "--data",
            test.to_str().unwrap(),
            "--out",
            sub.to_str().unwrap(),
        ],
    );
    assert_eq!(predicted(&sub), predictions(&base));
}

/// `llm-merging run` on a flant5_avg-shaped entry: `lora_avg` of two rank-16 q/v adapters on a
/// tiny T5 base, evaluated as base + merged adapter with no `max_gen_len` (the generation
/// config's length), predictions equal to peft's on the same averaged adapter.
#[test]
fn run_merges_flant5_avg_standin_and_evaluates_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    workspace(&ws);
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("src/lib.rs"), "// participant code\n").unwrap();
    std::fs::create_dir_all(ws.join("data/validation")).unwrap();
    std::fs::copy(goldens::rows_csv(), ws.join("data/validation/rows.csv")).unwrap();
    write_test_csv(&ws.join("data/test.csv"));
    let models = ws.join("models");
    let base = goldens::write_model("t5_v11", &models.join("flan-t5-tiny"));
    let lora = golden("t5_lora");
    // The flant5_avg stand-in's adapters: rank 16 on every `q`/`v`.
    for (name, which) in [("lora_a", 1), ("lora_b", 2)] {
        let factors = t5_qv_lora_factors(&base["config"], which, 16);
        write_peft_adapter(&models.join(name), &lora["adapter_config"], factors);
    }
    entry(
        &ws,
        "flant5_tiny",
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
    );
    let log = ok(&bin(tmp.path())
        .current_dir(&ws)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("LLM_MERGING_DATA")
        .args(["run", "--entry", "submissions/flant5_tiny"])
        .output()
        .unwrap());
    let dist = ws.join("dist/flant5_tiny");
    assert!(
        dist.join("work/merged/adapter_config.json").is_file(),
        "{log}"
    );
    let want = predictions(&lora);
    assert_eq!(
        predicted(&dist.join("work/eval/predictions/rows.csv")),
        want
    );
    assert_eq!(predicted(&dist.join("submission.csv")), want);
}
