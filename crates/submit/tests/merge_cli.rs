//! End-to-end tests of `llm-merging merge`: the binary on tiny models the tests make.
//! Bad input must give one clear error line, a non-zero exit, and no output directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use testkit::cli::{offline, ok, one_error_line};
use testkit::compare::max_abs_diff;
use testkit::hub::{HubServer, Repo};
use testkit::models::{self, TinyLlama};

struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Self {
        let w = Workspace {
            dir: tempfile::tempdir().unwrap(),
        };
        TinyLlama::default().write(&w.path("a"), 1, 1);
        TinyLlama::default().write(&w.path("b"), 2, 2);
        w
    }

    /// The binary, cut off from any real hub, `HF_HOME` in the workspace.
    fn bin(&self) -> Command {
        offline(
            Command::new(env!("CARGO_BIN_EXE_llm-merging")),
            self.dir.path(),
        )
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn config(&self, text: &str) -> PathBuf {
        let p = self.path("merge.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn merge(&self, text: &str, extra: &[&str]) -> Output {
        let cfg = self.config(text);
        self.bin()
            .arg("merge")
            .arg(&cfg)
            .arg("--out")
            .arg(self.path("out"))
            .args(extra)
            .output()
            .unwrap()
    }

    /// Assert a failure with one error line containing every `needle`, and no output.
    fn expect_error(&self, text: &str, needles: &[&str]) {
        let line = one_error_line(&self.merge(text, &[]), needles);
        eprintln!("{line}");
        assert!(!self.path("out").exists(), "output directory left behind");
        let leftovers: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "temporary output left behind");
    }
}

const LINEAR: &str = r#"
[merge]
method = "linear"
dtype = "bfloat16"
[[merge.models]]
model = "a"
parameters = { weight = 0.75 }
[[merge.models]]
model = "b"
parameters = { weight = 0.25 }
"#;

fn load(dir: &Path) -> BTreeMap<String, Tensor> {
    let ckpt = merge_core_reader(dir);
    ckpt.into_iter().collect()
}

/// Read every tensor of a checkpoint as f32 (via candle, independent of merge-core's reader).
fn merge_core_reader(dir: &Path) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            for (n, t) in candle_core::safetensors::load(&p, &Device::Cpu).unwrap() {
                out.push((n, t.to_dtype(candle_core::DType::F32).unwrap()));
            }
        }
    }
    out
}

#[test]
fn linear_merge_writes_a_loadable_model() {
    let w = Workspace::new();
    ok(&w.merge(LINEAR, &["--shard-size", "2KB"]));
    let dir = w.path("out");
    for f in [
        "config.json",
        "merge-config.toml",
        "README.md",
        "model.safetensors.index.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    let a: BTreeMap<_, _> = TinyLlama::default().tensors(1).into_iter().collect();
    let b: BTreeMap<_, _> = TinyLlama::default().tensors(2).into_iter().collect();
    let merged = load(&dir);
    assert_eq!(merged.len(), a.len());
    for (name, t) in &merged {
        assert_eq!(t.dtype(), candle_core::DType::F32);
        let expect = ((&a[name] * 0.75).unwrap() + (&b[name] * 0.25).unwrap()).unwrap();
        let d = max_abs_diff(t, &expect);
        assert!(d < 4e-3, "{name}: {d} (bf16 rounding only)");
    }
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(card.contains("linear"));
    // A second run refuses to overwrite, --force replaces.
    let again = w.merge(LINEAR, &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let forced = w.merge(LINEAR, &["--force"]);
    assert!(forced.status.success());
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let w = Workspace::new();
    let out = w.merge(LINEAR, &["--dry-run"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "merge method: linear",
        "model 1:",
        "model 2:",
        "tensors: 21",
        "read:",
        "write:",
        "bfloat16",
    ] {
        assert!(stdout.contains(needle), "`{needle}` not in:\n{stdout}");
    }
    assert!(!w.path("out").exists());
}

#[test]
fn missing_model_directory() {
    let w = Workspace::new();
    w.expect_error(
        &LINEAR.replace("model = \"b\"", "model = \"./nowhere\""),
        &["nowhere", "not found"],
    );
}

#[test]
fn missing_weights_file() {
    let w = Workspace::new();
    std::fs::remove_file(w.path("a/model.safetensors")).unwrap();
    w.expect_error(LINEAR, &["model.safetensors", "not found"]);
}

#[test]
fn missing_shard_listed_in_index() {
    let w = Workspace::new();
    std::fs::remove_file(w.path("b/model-00002-of-00002.safetensors")).unwrap();
    w.expect_error(LINEAR, &["model-00002-of-00002.safetensors", "not found"]);
}

#[test]
fn corrupt_safetensors_header() {
    let w = Workspace::new();
    let p = w.path("a/model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8..16].copy_from_slice(b"{garbage");
    std::fs::write(&p, bytes).unwrap();
    w.expect_error(
        LINEAR,
        &["a/model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn shape_mismatch_names_tensor_and_shapes() {
    let w = Workspace::new();
    let wide = TinyLlama {
        intermediate: 24,
        ..TinyLlama::default()
    };
    std::fs::remove_dir_all(w.path("b")).unwrap();
    wide.write(&w.path("b"), 2, 1);
    w.expect_error(
        LINEAR,
        &["model.layers.0.mlp.down_proj.weight", "[8, 16]", "[8, 24]"],
    );
}

#[test]
fn tensor_missing_in_one_model() {
    let w = Workspace::new();
    let mut tensors = TinyLlama::default().tensors(2);
    tensors.retain(|(n, _)| n != "model.norm.weight");
    std::fs::remove_dir_all(w.path("b")).unwrap();
    models::write_checkpoint(&w.path("b"), &TinyLlama::default().config(), &tensors, 1);
    w.expect_error(LINEAR, &["tensor `model.norm.weight` is missing in b"]);
}

#[test]
fn adapter_targeting_a_module_the_base_lacks() {
    let w = Workspace::new();
    models::write_lora(
        &w.path("lora"),
        &TinyLlama::default(),
        &["q_proj"],
        2,
        4.0,
        3,
    );
    // Rename one module so it points at a layer the base does not have.
    let p = w.path("lora/adapter_model.safetensors");
    let renamed: Vec<(String, Tensor)> = candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n.replace("layers.1.", "layers.9."), t))
        .collect();
    models::save(&p, &renamed);
    let cfg = r#"
[merge]
method = "linear"
base_model = "a"
[[merge.models]]
model = "lora"
parameters = { weight = 0.5 }
[[merge.models]]
model = "b"
parameters = { weight = 0.5 }
"#;
    w.expect_error(
        cfg,
        &[
            "model.layers.9.self_attn.q_proj",
            "does not exist in the base",
        ],
    );
}

#[test]
fn unknown_method() {
    let w = Workspace::new();
    w.expect_error(
        &LINEAR.replace("\"linear\"", "\"average\""),
        &["unknown merge method `average`", "linear"],
    );
}

#[test]
fn unknown_config_key_names_key_and_line() {
    let w = Workspace::new();
    w.expect_error(
        &LINEAR.replace("dtype = \"bfloat16\"", "dtype = \"bfloat16\"\nsead = 3"),
        &["merge.toml:5:1", "sead"],
    );
}

#[test]
fn unknown_parameter_is_named() {
    let w = Workspace::new();
    w.expect_error(
        &LINEAR.replace("weight = 0.25", "weight = 0.25, density = 0.5"),
        &["density", "not a per-model parameter of `linear`"],
    );
}

#[test]
fn merges_hub_models_by_id_and_revision() {
    let w = Workspace::new();
    const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    let mut repo_a = Repo::single(SHA_A, Repo::files_from_dir(&w.path("a")));
    repo_a.gated_token = Some("hf_test_secret".into());
    let hub = HubServer::start(BTreeMap::from([
        ("org/a".to_string(), repo_a),
        (
            "org/b".to_string(),
            Repo::single(SHA_B, Repo::files_from_dir(&w.path("b"))),
        ),
    ]));
    let cfg = w.config(&format!(
        "[merge]\nmethod = \"linear\"\n[[merge.models]]\nmodel = \"org/a\"\nrevision = \"{SHA_A}\"\nparameters = {{ weight = 1 }}\n[[merge.models]]\nmodel = \"org/b\"\nrevision = \"main\"\nparameters = {{ weight = 1 }}\n"
    ));
    let run = |token: Option<&str>| {
        let mut c = w.bin();
        c.env("HF_ENDPOINT", &hub.endpoint);
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
        c.arg("merge")
            .arg(&cfg)
            .arg("--out")
            .arg(w.path("out"))
            .output()
            .unwrap()
    };
    let denied = run(None);
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        stderr.contains("org/a") && stderr.contains("needs a token"),
        "{stderr}"
    );
    ok(&run(Some("hf_test_secret")));
    let card = std::fs::read_to_string(w.path("out/README.md")).unwrap();
    assert!(card.contains(&format!("org/a@{SHA_A}")), "{card}");
    assert!(card.contains(&format!("org/b@{SHA_B}")), "{card}");
    // The token never lands in the output.
    for e in std::fs::read_dir(w.path("out")).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("hf_test_secret"));
    }
}
