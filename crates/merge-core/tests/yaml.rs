//! A mergekit YAML config and the same merge written as our TOML give identical output.

use std::path::{Path, PathBuf};

use merge_core::config::mergekit;
use merge_core::engine::{self, MergeOptions};
use merge_core::source::{HubSettings, Resolver};
use merge_core::MergeConfig;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge")
}

fn resolver() -> Resolver {
    Resolver::new(HubSettings {
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        cache_dir: std::env::temp_dir().join("merge-core-yaml-no-cache"),
        offline: true,
        progress: false,
    })
    .with_base_dir(fixtures())
}

const YAML: &str = r#"
merge_method: ties
base_model: models/base
dtype: float32
parameters:
  density: [0.9, 0.5]
  normalize: true
  lambda: 1.1
models:
  - model: models/base
  - model: models/expert_a
    parameters:
      weight:
        - filter: mlp
          value: 0.7
        - value: 0.4
  - model: models/expert_b
    parameters:
      weight: 0.5
      density: 0.6
"#;

const TOML: &str = r#"
[merge]
method = "ties"
base_model = "models/base"
dtype = "float32"
[merge.parameters]
density = [0.9, 0.5]
normalize = true
lambda = 1.1
[[merge.models]]
model = "models/base"
[[merge.models]]
model = "models/expert_a"
parameters = { weight = [{ filter = "mlp", value = 0.7 }, { value = 0.4 }] }
[[merge.models]]
model = "models/expert_b"
parameters = { weight = 0.5, density = 0.6 }
"#;

#[test]
fn yaml_and_toml_give_identical_output() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml_path = tmp.path().join("ties.yml");
    std::fs::write(&yaml_path, YAML).unwrap();
    let from_yaml = MergeConfig::from_file(&yaml_path).unwrap();
    let from_toml = MergeConfig::from_toml_str(TOML, "ties.toml").unwrap();
    assert_eq!(from_yaml, from_toml);
    engine::run(
        &from_yaml,
        &resolver(),
        &MergeOptions::new(tmp.path().join("y")),
    )
    .unwrap();
    engine::run(
        &from_toml,
        &resolver(),
        &MergeOptions::new(tmp.path().join("t")),
    )
    .unwrap();
    let y = std::fs::read(tmp.path().join("y/model.safetensors")).unwrap();
    let t = std::fs::read(tmp.path().join("t/model.safetensors")).unwrap();
    assert!(y == t, "outputs differ");
    // The converted TOML reads back as the same config.
    let converted = mergekit::parse(YAML, "ties.yml").unwrap().to_toml();
    assert_eq!(
        MergeConfig::from_toml_str(&converted, "c.toml").unwrap(),
        from_toml
    );
}
