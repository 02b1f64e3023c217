//! `llm-merging eval --merge CONFIG`: a merge evaluated in memory gives the same outputs as
//! `merge` then `eval --model`, byte for byte (timings aside), for a full-model and an
//! adapter-level method; bad merges fail with one error line and write nothing; a layer-wise
//! method (`regmean_plus`) is refused before anything is read.

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::cli::{offline, ok, one_error_line};
use testkit::family::{self, Family};

fn bin(home: &Path) -> Command {
    offline(Command::new(env!("CARGO_BIN_EXE_llm-merging")), home)
}

/// Every output file of an eval, the details without their timings.
fn outputs(dir: &Path) -> Vec<(String, String)> {
    let mut files = vec![
        "scores.json".to_string(),
        "predictions/rows.csv".to_string(),
        "details/rows.jsonl".to_string(),
    ];
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.join(&f)).unwrap();
            let text = if f.ends_with(".jsonl") {
                text.lines()
                    .map(|l| {
                        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                        v.as_object_mut().unwrap().remove("seconds");
                        v.to_string()
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                text
            };
            (f, text)
        })
        .collect()
}

fn eval_args(data: &Path, out: &Path) -> Vec<String> {
    [
        "--data",
        &data.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--scoring",
        "full",
        "--max-gen-len",
        "6",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn write_config(f: &Family, name: &str, toml: &str) -> PathBuf {
    let p = f.dir.join(name);
    std::fs::write(&p, f.config_text(toml)).unwrap();
    p
}

#[test]
fn eval_merge_equals_merge_then_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let f = family::write(tmp.path(), false);
    let data = testkit::goldens::rows_csv();
    let ties = write_config(
        &f,
        "ties.toml",
        "[merge]\nmethod = \"ties\"\nbase_model = \"DIR/base\"\ndtype = \"bfloat16\"\n\
         [merge.parameters]\ndensity = 0.5\n\
         [[merge.models]]\nmodel = \"DIR/expert1\"\nparameters = { weight = 0.7 }\n\
         [[merge.models]]\nmodel = \"DIR/expert2\"\nparameters = { weight = 0.5 }\n",
    );
    let lora = write_config(
        &f,
        "lora.toml",
        "[merge]\nmethod = \"lora_avg\"\nbase_model = \"DIR/base\"\n\
         [[merge.models]]\nmodel = \"DIR/adapter1\"\nparameters = { weight = 0.8 }\n\
         [[merge.models]]\nmodel = \"DIR/adapter2\"\nparameters = { weight = 0.2 }\n",
    );
    for (cfg, adapter) in [(&ties, false), (&lora, true)] {
        let merged = tmp.path().join("merged");
        let _ = std::fs::remove_dir_all(&merged);
        ok(&bin(home)
            .arg("merge")
            .arg(cfg)
            .arg("--out")
            .arg(&merged)
            .output()
            .unwrap());
        let disk = tmp.path().join("disk");
        let mut c = bin(home);
        c.arg("eval");
        if adapter {
            c.arg("--model")
                .arg(f.dir.join("base"))
                .arg("--adapter")
                .arg(&merged);
        } else {
            c.arg("--model").arg(&merged);
        }
        ok(&c.args(eval_args(&data, &disk)).output().unwrap());
        let memory = tmp.path().join("memory");
        ok(&bin(home)
            .arg("eval")
            .arg("--merge")
            .arg(cfg)
            .args(eval_args(&data, &memory))
            .output()
            .unwrap());
        assert_eq!(outputs(&memory), outputs(&disk), "{}", cfg.display());
        for d in [disk, memory] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    // Bad merges: one error line, no output directory.
    let out = tmp.path().join("never");
    let expect = |cfg: &Path, needles: &[&str]| {
        let o = bin(home)
            .arg("eval")
            .arg("--merge")
            .arg(cfg)
            .args(eval_args(&data, &out))
            .output()
            .unwrap();
        let line = one_error_line(&o, needles);
        eprintln!("{line}");
        assert!(!out.exists(), "{line}: output written");
    };
    let text = std::fs::read_to_string(&lora)
        .unwrap()
        .replace("adapter", "expert");
    let on_experts = write_config(&f, "lora_on_experts.toml", &text);
    expect(&on_experts, &["lora_avg", "expert1", "adapter"]);
    f.broken_copy("expert2", "model.layers.1.self_attn.o_proj.weight");
    let text = std::fs::read_to_string(&ties)
        .unwrap()
        .replace("expert2", "broken");
    let missing = write_config(&f, "missing.toml", &text);
    expect(
        &missing,
        &["model.layers.1.self_attn.o_proj.weight", "broken"],
    );
    // --merge and --model exclude each other.
    let o = bin(home)
        .arg("eval")
        .arg("--merge")
        .arg(&ties)
        .arg("--model")
        .arg(f.dir.join("base"))
        .args(eval_args(&data, &out))
        .output()
        .unwrap();
    assert!(!o.status.success() && !out.exists());
}

#[test]
fn eval_and_predict_merge_refuse_regmean_plus_before_reading_anything() {
    // regmean_plus merges layer by layer (forward passes through the merged lower layers):
    // --merge, one in-memory pass, cannot. The models and data named do not exist, so an error
    // naming the method (not a missing file) shows the check comes before any of them is read.
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let cfg = home.join("rmp.toml");
    std::fs::write(
        &cfg,
        "[merge]\nmethod = \"regmean_plus\"\n\
         [[merge.models]]\nmodel = \"./no-such-a\"\ncalibration = \"calib.csv\"\n\
         [[merge.models]]\nmodel = \"./no-such-b\"\ncalibration = \"calib.csv\"\n",
    )
    .unwrap();
    let (data, out) = (home.join("no-such.csv"), home.join("out"));
    let needles = [
        "rmp.toml",
        "`regmean_plus` cannot be merged by --merge",
        "merged lower layers",
        "llm-merging merge",
    ];
    let o = bin(home)
        .arg("eval")
        .arg("--merge")
        .arg(&cfg)
        .args(eval_args(&data, &out))
        .output()
        .unwrap();
    one_error_line(&o, &needles);
    assert!(!out.exists());
    let csv = home.join("submission.csv");
    let o = bin(home)
        .arg("predict")
        .arg("--merge")
        .arg(&cfg)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&csv)
        .output()
        .unwrap();
    one_error_line(&o, &needles);
    assert!(!csv.exists());
}
