//! The merge config schema (TOML), the one users and other tools depend on.
//!
//! ```toml
//! [merge]
//! method = "linear"          # mergekit's method names
//! base_model = "org/base"    # local dir or hub id; optional for methods that need no base
//! base_revision = "sha"      # optional
//! dtype = "bfloat16"         # output dtype; default: the base's (or first model's)
//! seed = 0                   # for randomised methods
//! [merge.parameters]         # global parameters, mergekit names (lambda, normalize, t, ...)
//! [[merge.models]]
//! model = "org/expert"       # local dir, hub id, or a PEFT adapter
//! revision = "sha"
//! [merge.models.parameters]  # per-model parameters (weight, density, gamma, epsilon, ...)
//! weight = 0.5
//! ```
//!
//! A parameter value is a number or boolean, a list of numbers (a gradient interpolated across
//! layers, as in mergekit), or a list of `{ filter = "self_attn", value = ... }` overrides
//! chosen by tensor-name substring (the first match wins; an entry without `filter` matches
//! every tensor).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::source::ModelRef;

/// A whole merge config file: one `[merge]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MergeFile {
    /// The merge itself.
    pub merge: MergeConfig,
}

/// The `[merge]` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// Merge method, under mergekit's name (`linear`, `ties`, ...).
    pub method: String,
    /// Base model: a local directory or hub id. Methods on task vectors need one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// Revision of the base model (commit sha, tag or branch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_revision: Option<String>,
    /// Output dtype; default: the base's (or the first model's) storage dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<OutDType>,
    /// Seed for randomised methods (DARE, DELLA).
    #[serde(default)]
    pub seed: u64,
    /// Global parameters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, ParamValue>,
    /// The models to merge.
    #[serde(default)]
    pub models: Vec<ModelEntry>,
}

/// One input model and its per-model parameters.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Local directory, hub id, or a PEFT adapter (directory or hub id).
    pub model: String,
    /// Revision (commit sha, tag or branch) for hub ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Per-model parameters (`weight`, `density`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, ParamValue>,
}

/// Output dtypes, under the names transformers writes in `config.json` (`torch_dtype`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutDType {
    /// 32-bit float.
    #[serde(alias = "f32", alias = "fp32")]
    Float32,
    /// 16-bit IEEE float.
    #[serde(alias = "f16", alias = "fp16")]
    Float16,
    /// bfloat16.
    #[serde(alias = "bf16")]
    Bfloat16,
}

impl OutDType {
    /// The candle dtype.
    pub fn candle(self) -> candle_core::DType {
        match self {
            OutDType::Float32 => candle_core::DType::F32,
            OutDType::Float16 => candle_core::DType::F16,
            OutDType::Bfloat16 => candle_core::DType::BF16,
        }
    }

    /// From a candle dtype, where it is one we write.
    pub fn from_candle(dtype: candle_core::DType) -> Option<Self> {
        match dtype {
            candle_core::DType::F32 => Some(OutDType::Float32),
            candle_core::DType::F16 => Some(OutDType::Float16),
            candle_core::DType::BF16 => Some(OutDType::Bfloat16),
            _ => None,
        }
    }

    /// The `torch_dtype` string of `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDType::Float32 => "float32",
            OutDType::Float16 => "float16",
            OutDType::Bfloat16 => "bfloat16",
        }
    }
}

/// A parameter value as written in the config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum ParamValue {
    /// `true` / `false`.
    Bool(bool),
    /// A number.
    Number(f64),
    /// A gradient: numbers interpolated linearly across layers.
    Gradient(Vec<f64>),
    /// Overrides by tensor-name substring; the first matching entry wins.
    Filtered(Vec<FilteredValue>),
}

/// One `{ filter = "...", value = ... }` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilteredValue {
    /// Substring of the tensor name; absent or `"*"` matches every tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// The value where the filter matches: a number, boolean or gradient.
    pub value: ScalarOrGradient,
}

/// The value of a filtered entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum ScalarOrGradient {
    /// `true` / `false`.
    Bool(bool),
    /// A number.
    Number(f64),
    /// A gradient.
    Gradient(Vec<f64>),
}

impl ParamValue {
    /// The value for `tensor` at layer position `t` ∈ [0, 1] (mergekit's semantics: a gradient
    /// of n values is sampled at t·(n−1) with linear interpolation). `None` when no filter
    /// entry matches the tensor. Booleans read as 1.0 / 0.0.
    pub fn evaluate(&self, tensor: &str, t: f64) -> Option<f64> {
        match self {
            ParamValue::Bool(b) => Some(f64::from(u8::from(*b))),
            ParamValue::Number(x) => Some(*x),
            ParamValue::Gradient(values) => gradient_at(values, t),
            ParamValue::Filtered(entries) => entries
                .iter()
                .find(|e| match e.filter.as_deref() {
                    None | Some("*") => true,
                    Some(f) => tensor.contains(f),
                })
                .and_then(|e| match &e.value {
                    ScalarOrGradient::Bool(b) => Some(f64::from(u8::from(*b))),
                    ScalarOrGradient::Number(x) => Some(*x),
                    ScalarOrGradient::Gradient(values) => gradient_at(values, t),
                }),
        }
    }
}

/// Linear interpolation of a gradient at t ∈ [0, 1].
fn gradient_at(values: &[f64], t: f64) -> Option<f64> {
    match values.len() {
        0 => None,
        1 => Some(values[0]),
        n => {
            let scaled = t.clamp(0.0, 1.0) * (n - 1) as f64;
            let i0 = scaled.floor() as usize;
            let i1 = (i0 + 1).min(n - 1);
            let frac = scaled - i0 as f64;
            Some((1.0 - frac) * values[i0] + frac * values[i1])
        }
    }
}

impl MergeConfig {
    /// Read a merge config file: mergekit YAML for `.yml` / `.yaml` (see
    /// [`crate::mergekit_yaml`]), our TOML otherwise.
    pub fn from_file(path: &Path) -> Result<Self> {
        if crate::mergekit_yaml::is_yaml(path) {
            crate::mergekit_yaml::from_file(path)
        } else {
            Self::from_toml_file(path)
        }
    }

    /// Parse a merge config file (TOML with one `[merge]` table).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parse TOML text; `origin` names the text in errors (a file path).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let file: MergeFile = toml::from_str(text).map_err(|e| toml_error(origin, text, &e))?;
        file.merge.validate(origin)?;
        Ok(file.merge)
    }

    /// Checks that do not need the models: a method name, at least one model, sane values.
    pub fn validate(&self, origin: &str) -> Result<()> {
        if self.models.is_empty() {
            return Err(Error::config(
                origin,
                "[merge] lists no models ([[merge.models]])",
            ));
        }
        if crate::methods::lookup(&self.method).is_none()
            && crate::adapter_merge::lookup(&self.method).is_none()
        {
            return Err(Error::config(
                origin,
                format!(
                    "unknown merge method `{}` (known: {})",
                    self.method,
                    crate::methods::all_names().join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// The base model reference, if the config names one.
    pub fn base_ref(&self) -> Option<ModelRef> {
        self.base_model.as_ref().map(|m| ModelRef {
            model: m.clone(),
            revision: self.base_revision.clone(),
        })
    }

    /// The input model references in config order.
    pub fn model_refs(&self) -> Vec<ModelRef> {
        self.models
            .iter()
            .map(|m| ModelRef {
                model: m.model.clone(),
                revision: m.revision.clone(),
            })
            .collect()
    }

    /// Serialise back to TOML (as a `[merge]` table).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&MergeFile {
            merge: self.clone(),
        })
        .expect("a MergeConfig always serialises")
    }
}

/// One-line TOML error: `origin:line:column: message`.
pub fn toml_error(origin: &str, text: &str, err: &toml::de::Error) -> Error {
    let message = err.message().trim().replace('\n', " ");
    match err.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            Error::config(format!("{origin}:{line}:{col}"), message)
        }
        None => Error::config(origin, message),
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn parses_the_documented_schema() {
        let c = MergeConfig::from_toml_str(SAMPLE, "x.toml").unwrap();
        assert_eq!(c.method, "linear");
        assert_eq!(c.dtype, Some(OutDType::Bfloat16));
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.models[1].parameters["weight"], ParamValue::Number(1.0));
        let w = &c.models[0].parameters["weight"];
        assert_eq!(
            w.evaluate("model.layers.0.self_attn.q_proj.weight", 0.5),
            Some(0.3)
        );
        assert_eq!(
            w.evaluate("model.layers.0.mlp.up_proj.weight", 0.25),
            Some(0.25)
        );
        assert_eq!(c.parameters["normalize"].evaluate("x", 0.0), Some(1.0));
    }

    #[test]
    fn gradients_interpolate_like_mergekit() {
        let g = ParamValue::Gradient(vec![0.0, 0.5, 1.0, 0.0]);
        assert_eq!(g.evaluate("t", 0.0), Some(0.0));
        assert_eq!(g.evaluate("t", 1.0), Some(0.0));
        let v = g.evaluate("t", 0.5).unwrap();
        assert!((v - 0.75).abs() < 1e-12, "{v}");
        let no_match = ParamValue::Filtered(vec![FilteredValue {
            filter: Some("mlp".into()),
            value: ScalarOrGradient::Number(1.0),
        }]);
        assert_eq!(no_match.evaluate("self_attn", 0.0), None);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = "[merge]\nmethod = \"linear\"\nwieght = 1\n[[merge.models]]\nmodel = \"a\"\n";
        let err = MergeConfig::from_toml_str(text, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:3:1:"), "{err}");
        assert!(err.contains("wieght"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn unknown_method_is_named() {
        let text = "[merge]\nmethod = \"avg\"\n[[merge.models]]\nmodel = \"a\"\n";
        let err = MergeConfig::from_toml_str(text, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown merge method `avg`"), "{err}");
    }

    #[test]
    fn round_trips_through_toml() {
        let c = MergeConfig::from_toml_str(SAMPLE, "x.toml").unwrap();
        let again = MergeConfig::from_toml_str(&c.to_toml(), "y.toml").unwrap();
        assert_eq!(c, again);
    }
}
