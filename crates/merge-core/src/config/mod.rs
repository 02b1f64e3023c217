//! The merge config schema: our TOML ([`toml`]) and mergekit's YAML read into it
//! ([`mergekit`]). Schema only: which methods exist and what parameters they take is the
//! registry's and the methods' business, so reading a config *checked* against them is
//! `MergeConfig::from_file` / `from_toml_str` / `validate`, defined in [`crate::registry`].
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
//! stats = "stats/expert"    # input statistics (llm-merging stats), for regmean
//! calibration = "calib.csv" # calibration rows, for regmean_plus (merged layer by layer)
//! calibration_rows = 64     # optional: only the first N rows
//! [merge.models.parameters]  # per-model parameters (weight, density, gamma, epsilon, ...)
//! weight = 0.5
//! ```
//!
//! A parameter value is a number or boolean, a list of numbers (a gradient interpolated across
//! layers, as in mergekit), or a list of `{ filter = "self_attn", value = ... }` overrides
//! chosen by tensor-name substring (the first match wins; an entry without `filter` matches
//! every tensor). How values resolve per tensor is [`crate::params`]'.

pub mod mergekit;
pub mod toml;

pub use self::toml::toml_error;

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
    /// The model's input statistics directory (`llm-merging stats`), for methods that use
    /// them (`regmean`): a path, not a per-tensor parameter, so it sits beside `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<String>,
    /// The model's calibration rows (a competition CSV), for methods that merge layer by layer
    /// (`regmean_plus`): their statistics are computed during the merge, through the layers
    /// merged so far. A path like `stats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<String>,
    /// Only the first N rows of `calibration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_rows: Option<usize>,
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

/// Read a merge config file without checking it against the registry: mergekit YAML for
/// `.yml` / `.yaml`, our TOML otherwise.
pub fn read(path: &Path) -> Result<MergeConfig> {
    if mergekit::is_yaml(path) {
        mergekit::read(path)
    } else {
        toml::read(path)
    }
}

impl MergeConfig {
    /// The schema's own checks (the method name is the registry's): at least one model.
    pub fn check_schema(&self, origin: &str) -> Result<()> {
        if self.models.is_empty() {
            return Err(Error::config(
                origin,
                "[merge] lists no models ([[merge.models]])",
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
        ::toml::to_string_pretty(&MergeFile {
            merge: self.clone(),
        })
        .expect("a MergeConfig always serialises")
    }
}
