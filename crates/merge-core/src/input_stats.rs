//! Input statistics of a model, for data-dependent merges (`regmean`): per linear layer, the
//! Gram matrix XᵀX of the layer's inputs summed over calibration tokens. `llm-merging stats`
//! writes them; merges read them. One format, defined here for both sides.
//!
//! A statistics directory holds:
//! - `grams.safetensors`: f32 `[in, in]` matrices, each under the name of the first weight that
//!   reads that input (`model.layers.0.self_attn.q_proj.weight` for q, k and v);
//! - `stats.json` ([`StatsMeta`]): the format, the model, its architecture
//!   [`fingerprint`], the token and row counts, and for every weight the key of its matrix.
//!
//! A merge config names each model's directory with `stats = "DIR"` in its `[[merge.models]]`
//! entry (a relative path is looked up next to the config first, as model paths are).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::source::{ModelFiles, ModelRef};

/// The metadata file of a statistics directory.
pub const META_FILE: &str = "stats.json";
/// The Gram matrices of a statistics directory.
pub const GRAMS_FILE: &str = "grams.safetensors";
/// The `format` written into [`META_FILE`].
pub const FORMAT: &str = "llm-merging input statistics 1";

/// `config.json` keys that must agree between the model the statistics were computed on and
/// the model they are used for (what fixes every linear layer's input and its meaning).
pub const FINGERPRINT_KEYS: [&str; 8] = [
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
];

/// The architecture fingerprint of a `config.json`: its [`FINGERPRINT_KEYS`] that are set.
pub fn fingerprint(config: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    FINGERPRINT_KEYS
        .iter()
        .filter_map(|k| Some((k.to_string(), config.get(*k)?.clone())))
        .collect()
}

/// `stats.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsMeta {
    /// [`FORMAT`].
    pub format: String,
    /// The model the statistics were computed on, as given.
    pub model: String,
    /// Its architecture [`fingerprint`].
    pub fingerprint: BTreeMap<String, serde_json::Value>,
    /// Non-padding tokens summed into every matrix.
    pub tokens: u64,
    /// The calibration file.
    pub data: String,
    /// The ids of the rows used, in order.
    pub rows: Vec<String>,
    /// Weight name → key of its Gram matrix in [`GRAMS_FILE`] (weights sharing an input share
    /// one matrix).
    pub grams: BTreeMap<String, String>,
    /// Linear weights without statistics, and why (`lm_head.weight`: ...).
    #[serde(default)]
    pub skipped: BTreeMap<String, String>,
}

/// A statistics directory, opened (the matrices memory-mapped, read on demand).
pub struct InputStats {
    /// The directory.
    pub dir: PathBuf,
    /// Its `stats.json`.
    pub meta: StatsMeta,
    grams: Checkpoint,
}

impl std::fmt::Debug for InputStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InputStats({})", self.dir.display())
    }
}

impl InputStats {
    /// Open the statistics in `dir`, computed for model `model` (named in errors).
    pub fn open(dir: &Path, model: &str) -> Result<Self> {
        let bad = |message: String| Error::statistics(model, dir, message);
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).map_err(|e| {
            bad(format!(
                "cannot read {} ({e}); compute statistics with `llm-merging stats --model \
                 {model} --data CSV --out {}`",
                meta_path.display(),
                dir.display()
            ))
        })?;
        let meta: StatsMeta = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{}: not a statistics file: {e}", META_FILE)))?;
        if meta.format != FORMAT {
            return Err(bad(format!(
                "{META_FILE} has format `{}`, expected `{FORMAT}`",
                meta.format
            )));
        }
        let files = ModelFiles::local(ModelRef::new(dir.display().to_string()), dir.into());
        let grams = Checkpoint::open_file(&dir.join(GRAMS_FILE), &files)
            .map_err(|e| bad(format!("cannot open {GRAMS_FILE}: {e}")))?;
        for (weight, key) in &meta.grams {
            if grams.info(key).is_none() {
                return Err(bad(format!(
                    "{META_FILE} maps `{weight}` to `{key}`, which {GRAMS_FILE} lacks"
                )));
            }
        }
        Ok(InputStats {
            dir: dir.to_path_buf(),
            meta,
            grams,
        })
    }

    /// Check that these statistics were computed on `model`'s architecture: its
    /// `config.json` (`config`) has the same [`fingerprint`].
    pub fn check_architecture(
        &self,
        model: &str,
        config: Option<&serde_json::Value>,
    ) -> Result<()> {
        let ours = config.map(fingerprint).unwrap_or_default();
        if ours != self.meta.fingerprint {
            let show = |f: &BTreeMap<String, serde_json::Value>| {
                serde_json::to_string(f).unwrap_or_default()
            };
            return Err(Error::statistics(
                model,
                &self.dir,
                format!(
                    "computed on another architecture ({}: {}), the model is {}",
                    self.meta.model,
                    show(&self.meta.fingerprint),
                    show(&ours)
                ),
            ));
        }
        Ok(())
    }

    /// The shape of `weight`'s Gram matrix, when there is one.
    pub fn shape(&self, weight: &str) -> Option<&[usize]> {
        let key = self.meta.grams.get(weight)?;
        self.grams.info(key).map(|i| i.shape.as_slice())
    }

    /// `weight`'s Gram matrix in f32 on `device`.
    pub fn load(&self, weight: &str, device: &Device) -> Result<Tensor> {
        let key = self.meta.grams.get(weight).ok_or_else(|| {
            Error::statistics(
                &self.meta.model,
                &self.dir,
                format!("no Gram matrix for `{weight}`"),
            )
        })?;
        self.grams.load_f32(key, device)
    }
}
