//! Merge configs: our TOML, mergekit's YAML (a config and the same merge written as our TOML
//! give identical output), method names checked against the registry, and parameter values
//! resolved per tensor.

use std::path::{Path, PathBuf};

use merge_core::config::mergekit;
use merge_core::engine::{self, MergeOptions};
use merge_core::MergeConfig;
use testkit::resolver::offline;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge")
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
        &offline(&fixtures()),
        &MergeOptions::new(tmp.path().join("y")),
    )
    .unwrap();
    engine::run(
        &from_toml,
        &offline(&fixtures()),
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

mod our_toml {
    use merge_core::config::toml::parse;
    use merge_core::config::{OutDType, ParamValue};

    const SAMPLE: &str = r#"
[merge]
method = "linear"
base_model = "org/base"
dtype = "bfloat16"
[merge.parameters]
normalize = true
lambda = [0.0, 1.0]
[[merge.models]]
model = "org/a"
revision = "0123"
[merge.models.parameters]
weight = [{ filter = "self_attn", value = 0.3 }, { value = [0.0, 1.0] }]
[[merge.models]]
model = "org/b"
[merge.models.parameters]
weight = 1
"#;

    #[test]
    fn parses_the_documented_schema_and_round_trips() {
        let c = parse(SAMPLE, "x.toml").unwrap();
        assert_eq!(c.method, "linear");
        assert_eq!(c.dtype, Some(OutDType::Bfloat16));
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.models[1].parameters["weight"], ParamValue::Number(1.0));
        assert!(
            matches!(&c.models[0].parameters["weight"], ParamValue::Filtered(f) if f.len() == 2)
        );
        assert_eq!(c.parameters["normalize"], ParamValue::Bool(true));
        assert_eq!(parse(&c.to_toml(), "y.toml").unwrap(), c);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = "[merge]\nmethod = \"linear\"\nwieght = 1\n[[merge.models]]\nmodel = \"a\"\n";
        let err = parse(text, "c.toml").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:3:1:"), "{err}");
        assert!(err.contains("wieght"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}

mod mergekit_yaml {
    use merge_core::config::mergekit::parse;
    use merge_core::config::{FilteredValue, OutDType, ParamValue, ScalarOrGradient};

    const TIES: &str = r#"
merge_method: ties
base_model: meta-llama/Meta-Llama-3-8B@abc123
dtype: bfloat16
parameters:
  normalize: true
  density: [1.0, 0.7, 0.1]
models:
  - model: meta-llama/Meta-Llama-3-8B@abc123
  - model: org/instruct
    parameters:
      weight:
        - filter: self_attn
          value: 0.3
        - value: 0.5
  - model: meta-llama/Meta-Llama-3-8B@abc123+org/adapter
    parameters:
      weight: {value: 0.2}
"#;

    #[test]
    fn reads_the_supported_schema() {
        let c = parse(TIES, "c.yml").unwrap();
        assert_eq!(c.method, "ties");
        assert_eq!(c.base_model.as_deref(), Some("meta-llama/Meta-Llama-3-8B"));
        assert_eq!(c.base_revision.as_deref(), Some("abc123"));
        assert_eq!(c.dtype, Some(OutDType::Bfloat16));
        assert_eq!(c.models.len(), 3);
        assert_eq!(c.models[0].revision.as_deref(), Some("abc123"));
        assert_eq!(c.models[2].model, "org/adapter");
        assert_eq!(
            c.parameters["density"],
            ParamValue::Gradient(vec![1.0, 0.7, 0.1])
        );
        let filter = |f: Option<&str>, v: f64| FilteredValue {
            filter: f.map(str::to_string),
            value: ScalarOrGradient::Number(v),
        };
        assert_eq!(
            c.models[1].parameters["weight"],
            ParamValue::Filtered(vec![filter(Some("self_attn"), 0.3), filter(None, 0.5)])
        );
        // and it converts to TOML that reads back the same
        let again = merge_core::config::toml::parse(&c.to_toml(), "c.toml").unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn unsupported_parts_are_named() {
        for (text, needle) in [
            ("merge_method: linear\nslices: []\n", "`slices`"),
            (
                "merge_method: linear\nmodels: [{model: a}]\ntokenizer: {}\n",
                "`tokenizer`",
            ),
            (
                "merge_method: linear\nmodels: [{model: a, layer_range: [0, 2]}]\n",
                "`layer_range`",
            ),
            (
                "merge_method: linear\nmodels: [{model: a+b}]\n",
                "only over the base_model",
            ),
            (
                "merge_method: linear\nmodels: [{model: a, parameters: {weight: high}}]\n",
                "weight",
            ),
        ] {
            let e = parse(text, "c.yml").unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}

mod method_names {
    use merge_core::config;
    use merge_core::registry::{names, REGISTRY};
    use merge_core::MergeConfig;

    #[test]
    fn unknown_methods_are_named_with_the_known_ones() {
        let text = "[merge]\nmethod = \"avg\"\n[[merge.models]]\nmodel = \"a\"\n";
        let err = MergeConfig::from_toml_str(text, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.toml: unknown merge method `avg`"),
            "{err}"
        );
        assert!(err.contains("linear") && err.contains("lora_avg"), "{err}");
        let yaml =
            config::mergekit::parse("merge_method: franken\nmodels: [{model: a}]\n", "c.yml");
        let err = yaml.unwrap().validate("c.yml").unwrap_err().to_string();
        assert!(err.contains("unknown merge method `franken`"), "{err}");
    }

    #[test]
    fn names_are_unique() {
        let mut n = names();
        n.sort();
        n.dedup();
        assert_eq!(n.len(), REGISTRY.len());
    }
}

mod parameters {
    use merge_core::config::{FilteredValue, MergeConfig, ParamValue, ScalarOrGradient};
    use merge_core::params::{evaluate, ConfigParams, ParamSpec, Value};

    #[test]
    fn gradients_interpolate_like_mergekit_and_filters_pick_the_first_match() {
        let g = ParamValue::Gradient(vec![0.0, 0.5, 1.0, 0.0]);
        assert_eq!(evaluate(&g, "t", 0.0), Some(Value::Number(0.0)));
        assert_eq!(evaluate(&g, "t", 1.0), Some(Value::Number(0.0)));
        let Some(Value::Number(v)) = evaluate(&g, "t", 0.5) else {
            panic!("a number")
        };
        assert!((v - 0.75).abs() < 1e-12, "{v}");
        let entry = |filter: Option<&str>, value| FilteredValue {
            filter: filter.map(str::to_string),
            value,
        };
        let w = ParamValue::Filtered(vec![
            entry(Some("self_attn"), ScalarOrGradient::Number(0.3)),
            entry(None, ScalarOrGradient::Gradient(vec![0.0, 1.0])),
        ]);
        let at = |name| evaluate(&w, name, 0.25);
        assert_eq!(
            at("model.layers.0.self_attn.q_proj.weight"),
            Some(0.3.into())
        );
        assert_eq!(at("model.layers.0.mlp.up_proj.weight"), Some(0.25.into()));
        let no_match =
            ParamValue::Filtered(vec![entry(Some("mlp"), ScalarOrGradient::Number(1.0))]);
        assert_eq!(evaluate(&no_match, "self_attn", 0.0), None);
    }

    #[test]
    fn values_convert_to_the_declared_kind() {
        let cfg = MergeConfig::from_toml_str(
            "[merge]\nmethod = \"ties\"\n[merge.parameters]\nnormalize = 0\nlambda = true\n\
             [[merge.models]]\nmodel = \"a\"\nparameters = { weight = 0.5 }\n",
            "c.toml",
        )
        .unwrap();
        const G: &[ParamSpec] = &[
            ParamSpec::flag("normalize", true),
            ParamSpec::optional("lambda", 2.0),
        ];
        const M: &[ParamSpec] = &[
            ParamSpec::required("weight"),
            ParamSpec::optional("density", 1.0),
        ];
        let p = ConfigParams::new(&cfg, "ties", G, M).unwrap();
        let g = p.globals("x", 0.0).unwrap();
        assert!(!g.flag("normalize"));
        assert_eq!(g.number("lambda"), 1.0);
        let m = p.model(0, "x", 0.0).unwrap();
        assert_eq!((m.number("weight"), m.number("density")), (0.5, 1.0));
        let unknown = ConfigParams::new(&cfg, "ties", &G[..1], M).err().unwrap();
        assert!(
            unknown
                .to_string()
                .contains("`lambda` is not a parameter of `ties`"),
            "{unknown}"
        );
    }
}
