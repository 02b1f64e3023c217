//! End-to-end tests of `llm-merging run`, `package` and `check` on a tiny entry: tiny models
//! made by the test, served by id and revision from a local hub server on 127.0.0.1.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::cli::{entry, ok, one_error_line, text, workspace};
use testkit::hub::{HubServer, Repo};
use testkit::synthetic::tiny_llama_config;

const SHA_A: &str = "1111111111111111111111111111111111111111";
const SHA_B: &str = "2222222222222222222222222222222222222222";
const TOKEN: &str = "hf_e2e_secret_token_value";

/// A tiny model directory; `scale` makes the second expert differ from the first.
fn write_model(dir: &Path, scale: f64) {
    let tokenizer = testkit::tokenizers::dir("llama2");
    testkit::synthetic::write_scaled_decoder_dir(dir, &tiny_llama_config(), &tokenizer, scale);
}

const VALIDATION_MC: &str = "id,input,target,answer_choices,eval_type
v1,\"Question: Which is larger, 3 or 9?\nAnswer:\",1,\"['3', '9']\",multiple_choice
v2,\"Question: Pick the fruit.\nAnswer:\",0,\"['apple', 'chair', \"\"it's a door\"\"]\",multiple_choice
";
const VALIDATION_GEN: &str = "id,input,target,answer_choices,eval_type
g1,Summarize: the cat sat on the mat all day long.,a cat sat on a mat,,generation
";
const TEST: &str = "id,input,answer_choices,eval_type
t1,\"Question: Which is smaller, 2 or 8?\nAnswer:\",\"['2', '8']\",multiple_choice
t2,Summarize: it rained in the city.,,generation
t3,\"Question: Pick a colour.\nAnswer:\",\"['red', 'table', 'seven']\",multiple_choice
";

struct Setup {
    _tmp: tempfile::TempDir,
    ws: PathBuf,
    hub: HubServer,
    hf_home: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    workspace(&ws);
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("src/lib.rs"), "// participant code\n").unwrap();
    std::fs::write(ws.join(".env"), format!("HF_TOKEN={TOKEN}\n")).unwrap();
    std::fs::create_dir_all(ws.join("target")).unwrap();
    std::fs::write(ws.join("target/junk"), "build output").unwrap();
    std::fs::create_dir_all(ws.join("data/validation")).unwrap();
    std::fs::write(ws.join("data/validation/mc.csv"), VALIDATION_MC).unwrap();
    std::fs::write(ws.join("data/validation/gen.csv"), VALIDATION_GEN).unwrap();
    std::fs::write(ws.join("data/test.csv"), TEST).unwrap();
    entry(
        &ws,
        "tiny",
        &format!(
            r#"[merge]
method = "linear"
dtype = "float32"
[[merge.models]]
model = "org/expert-a"
revision = "{SHA_A}"
parameters = {{ weight = 0.8 }}
[[merge.models]]
model = "org/expert-b"
revision = "{SHA_B}"
parameters = {{ weight = 0.2 }}

[eval]
datasets = ["${{DATA_DIR}}/validation/mc.csv", "${{DATA_DIR}}/validation/gen.csv"]
max_gen_len = 8
batch_size = 2
device = "cpu"

[predict]
test_file = "${{DATA_DIR}}/test.csv"
"#
        ),
    );
    let models = tmp.path().join("models");
    write_model(&models.join("a"), 1.0);
    write_model(&models.join("b"), 0.5);
    let mut repo_a = Repo::single(SHA_A, Repo::files_from_dir(&models.join("a")));
    repo_a.gated_token = Some(TOKEN.into());
    let hub = HubServer::start(BTreeMap::from([
        ("org/expert-a".to_string(), repo_a),
        (
            "org/expert-b".to_string(),
            Repo::single(SHA_B, Repo::files_from_dir(&models.join("b"))),
        ),
    ]));
    Setup {
        hf_home: tmp.path().join("hf"),
        ws,
        hub,
        _tmp: tmp,
    }
}

impl Setup {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_llm-merging"))
            .current_dir(&self.ws)
            .env("HF_ENDPOINT", &self.hub.endpoint)
            .env("HF_HOME", &self.hf_home)
            .env("HF_TOKEN", TOKEN)
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("LLM_MERGING_DATA")
            .args(args)
            .output()
            .unwrap()
    }
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn run_merges_evaluates_predicts_packages_and_reuses() {
    let s = setup();
    let first = s.run(&["run", "--entry", "submissions/tiny"]);
    let log1 = ok(&first);
    let dist = s.ws.join("dist/tiny");
    for f in ["submission.csv", "scores.json", "manifest.json", "tiny.tar"] {
        assert!(dist.join(f).is_file(), "{f} missing\n{log1}");
    }
    // submission.csv: header, every test id once, valid choice indices.
    let sub = std::fs::read_to_string(dist.join("submission.csv")).unwrap();
    let mut lines = sub.lines();
    assert_eq!(lines.next(), Some("id,prediction,dummy_field"));
    let ids: Vec<&str> = lines.map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(ids, ["t1", "t2", "t3"]);
    let scores: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dist.join("scores.json")).unwrap()).unwrap();
    assert!(scores["mc"]["accuracy"].is_number(), "{scores}");
    assert!(scores["gen"]["rouge1"].is_number(), "{scores}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dist.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["entry"], "tiny");
    let models = manifest["models"].as_array().unwrap();
    assert_eq!(models[0]["id"], "org/expert-a");
    assert_eq!(models[0]["revision"], SHA_A);
    assert_eq!(
        models[0]["files"]["model.safetensors"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    assert!(manifest["merged_weights"]["model.safetensors"].is_string());
    for stage in ["merge", "eval", "predict", "package"] {
        assert!(log1.contains(stage), "{log1}");
    }

    // The tar holds the source only.
    let mut names = Vec::new();
    for e in tar::Archive::new(std::fs::File::open(dist.join("tiny.tar")).unwrap())
        .entries()
        .unwrap()
    {
        names.push(e.unwrap().path().unwrap().display().to_string());
    }
    assert!(
        names.contains(&"LLM-Merging/src/lib.rs".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"LLM-Merging/submissions/tiny/entry.toml".to_string()));
    assert!(names.contains(&"LLM-Merging/data/test.csv".to_string()));
    for n in &names {
        assert!(n.starts_with("LLM-Merging/"), "{n}");
        assert!(
            !n.contains("/dist/") && !n.contains("/target/") && !n.ends_with(".env"),
            "{n}"
        );
        assert!(!n.ends_with(".safetensors"), "{n}");
    }

    // The token is in no written file and no log.
    assert!(!log1.contains(TOKEN));
    let mut files = Vec::new();
    all_files(&dist, &mut files);
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
            "token in {}",
            f.display()
        );
    }

    // A second package gives the same tar; a second run reuses every stage.
    let tar1 = std::fs::read(dist.join("tiny.tar")).unwrap();
    let log2 = ok(&s.run(&["package", "--entry", "submissions/tiny"]));
    assert_eq!(tar1, std::fs::read(dist.join("tiny.tar")).unwrap());
    for stage in ["merge", "eval", "predict"] {
        let line = log2
            .lines()
            .find(|l| l.starts_with(stage))
            .unwrap_or_else(|| panic!("no {stage} line in {log2}"));
        assert!(line.ends_with("reused"), "{line}");
    }
    // --force redoes them.
    let forced = s.run(&["run", "--entry", "submissions/tiny", "--force"]);
    let log3 = text(&forced);
    assert!(
        log3.lines()
            .any(|l| l.starts_with("merge") && l.ends_with("ran")),
        "{log3}"
    );
}

#[test]
fn bad_entries_fail_with_one_clear_line() {
    let s = setup();
    one_error_line(
        &s.run(&["run", "--entry", "submissions/none"]),
        &["submissions/none", "no such directory"],
    );

    let entry = s.ws.join("submissions/tiny/entry.toml");
    let good = std::fs::read_to_string(&entry).unwrap();
    std::fs::write(&entry, good.replace("batch_size = 2", "batch_size = ")).unwrap();
    one_error_line(
        &s.run(&["run", "--entry", "submissions/tiny"]),
        &["entry.toml:16:"],
    );
    std::fs::write(&entry, &good).unwrap();

    std::fs::remove_file(s.ws.join("data/test.csv")).unwrap();
    one_error_line(
        &s.run(&["run", "--entry", "submissions/tiny"]),
        &["data/test.csv", "fetch-data"],
    );
    assert!(!s.ws.join("dist/tiny/submission.csv").exists());
}

#[test]
fn check_flags_large_new_and_unpinned_models() {
    let s = setup();
    {
        let mut repos = s.hub.repos();
        let a = repos.get_mut("org/expert-a").unwrap();
        a.parameters = Some(1_100_000_000);
        a.license = Some("apache-2.0".into());
        let b = repos.get_mut("org/expert-b").unwrap();
        b.parameters = Some(8_030_000_000);
        b.commits.get_mut(SHA_B).unwrap().last_modified = "2024-07-02T10:00:00.000Z".into();
    }
    let out = s.run(&["check", "--entry", "submissions/tiny"]);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("8.03B parameters, over the 8B limit"), "{log}");
    assert!(log.contains("dated 2024-07-02, after 2024-05-31"), "{log}");
    assert!(log.contains("apache-2.0"), "{log}");
    assert!(!log.contains(TOKEN));

    // Unpinned: a branch instead of a sha.
    let entry = s.ws.join("submissions/tiny/entry.toml");
    let good = std::fs::read_to_string(&entry).unwrap();
    std::fs::write(
        &entry,
        good.replace(&format!("revision = \"{SHA_A}\""), "revision = \"main\""),
    )
    .unwrap();
    {
        let mut repos = s.hub.repos();
        let b = repos.get_mut("org/expert-b").unwrap();
        b.parameters = Some(1_000_000);
        b.commits.get_mut(SHA_B).unwrap().last_modified = "2024-05-01T00:00:00.000Z".into();
    }
    let out = s.run(&["check", "--entry", "submissions/tiny"]);
    let log = text(&out);
    assert!(!out.status.success());
    assert!(log.contains("not a full commit sha"), "{log}");

    // All pinned, small and old: passes.
    std::fs::write(&entry, &good).unwrap();
    let out = s.run(&["check", "--entry", "submissions/tiny"]);
    assert!(ok(&out).contains("every rule holds"));
}

#[test]
fn check_counts_parameters_from_safetensors_headers() {
    // No parameter count in model info: the header of model.safetensors is read with range
    // requests (and the weights are not downloaded).
    let s = setup();
    let out = s.run(&["check", "--entry", "submissions/tiny"]);
    let log = ok(&out);
    // embed + head 2·32000·16, per layer q 256 + k 128 + v 128 + o 256 + 3·512 + norms 32,
    // two layers, final norm 16: 1,028,688 parameters.
    assert!(log.contains("1.03M"), "{log}");
    let header_reads = s
        .hub
        .requests()
        .iter()
        .filter(|r| r.ends_with("/model.safetensors"))
        .count();
    assert!(header_reads >= 4, "two range reads per model expected");
    assert!(
        !s.hf_home.join("hub").exists(),
        "check downloaded into the cache"
    );
}

#[test]
fn adapter_entry_merges_adapters_and_evaluates_base_plus_adapter() {
    let s = setup();
    let models = s.ws.join("models");
    write_model(&models.join("base"), 1.0);
    let shapes = testkit::models::TinyLlama {
        vocab: 32000,
        hidden: 16,
        intermediate: 32,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        tied: false,
        dtype: candle_core::DType::F32,
    };
    testkit::models::write_lora(
        &models.join("lora_a"),
        &shapes,
        &["q_proj", "v_proj"],
        4,
        8.0,
        1,
    );
    testkit::models::write_lora(
        &models.join("lora_b"),
        &shapes,
        &["q_proj", "v_proj"],
        2,
        4.0,
        2,
    );
    entry(
        &s.ws,
        "adapters",
        r#"[merge]
method = "lora_avg"
base_model = "../../models/base"
[[merge.models]]
model = "../../models/lora_a"
parameters = { weight = 0.8 }
[[merge.models]]
model = "../../models/lora_b"
parameters = { weight = 0.2 }

[eval]
datasets = ["${DATA_DIR}/validation/mc.csv", "${DATA_DIR}/validation/gen.csv"]
max_gen_len = 4
device = "cpu"
"#,
    );
    let out = s.run(&["run", "--entry", "submissions/adapters"]);
    let log = ok(&out);
    let work = s.ws.join("dist/adapters/work/merged");
    assert!(work.join("adapter_config.json").is_file(), "{log}");
    assert!(work.join("adapter_model.safetensors").is_file());
    assert!(s.ws.join("dist/adapters/submission.csv").is_file());
    // Model weights never go into the tar, even inside the workspace.
    let tar = std::fs::File::open(s.ws.join("dist/adapters/adapters.tar")).unwrap();
    for e in tar::Archive::new(tar).entries().unwrap() {
        let p = e.unwrap().path().unwrap().display().to_string();
        assert!(!p.ends_with(".safetensors"), "{p}");
    }
}
