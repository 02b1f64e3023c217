//! PEFT LoRA adapters: config, key mapping to base weights, dense deltas, adapter output;
//! the adapter-level merges ([`merge`]) and their linear algebra ([`linalg`]); LoRA extraction
//! from a fine-tune ([`extract`]).
//!
//! A PEFT file stores, for each adapted module `M` of the base model,
//! `base_model.model.M.lora_A.weight` (r × in) and `base_model.model.M.lora_B.weight`
//! (out × r); the module's base weight is `M.weight` and the adapter adds
//! ΔW = scale · B · A with scale = alpha / r (alpha / √r with `use_rslora`), transposed for
//! `fan_in_fan_out` (GPT-2's Conv1D). Embedding modules use `lora_embedding_A` (r × vocab) and
//! `lora_embedding_B` (dim × r) with ΔW = scale · (B · A)ᵀ. Keys without a LoRA part are
//! `modules_to_save`: full replacements of the base tensor.

pub mod extract;
pub mod linalg;
pub mod merge;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::checkpoint::{Checkpoint, CheckpointWriter, OutputTensor};
use crate::error::{Error, Result};
use crate::source::{ModelFiles, ModelRef};

pub use merge::{AdapterMerge, MergedAdapter};

/// The fields of `adapter_config.json` that change the weights.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub lora_alpha: f64,
    /// Scale by alpha/√r instead of alpha/r.
    #[serde(default)]
    pub use_rslora: bool,
    /// Weights stored as (in, out), as GPT-2's Conv1D.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Per-module rank overrides (key: module name pattern).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (key: module name pattern).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Modules stored in full.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Revision of the base model.
    #[serde(default)]
    pub revision: Option<String>,
    /// PEFT method; only `LORA` is supported.
    #[serde(default)]
    pub peft_type: Option<String>,
}

/// PEFT's pattern match: `key` matches module `name` when name is `key` or ends in `.key`
/// (PEFT uses the regex `(.*\.)?key$`; keys are plain names in practice).
fn pattern_matches(key: &str, name: &str) -> bool {
    name == key || name.ends_with(&format!(".{key}"))
}

/// The value of the first pattern (`rank_pattern`, `alpha_pattern`) matching `module`.
fn pattern_value<V: Copy>(patterns: &BTreeMap<String, V>, module: &str) -> Option<V> {
    patterns
        .iter()
        .find(|(k, _)| pattern_matches(k, module))
        .map(|(_, v)| *v)
}

/// One adapted module.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// Module name without the PEFT prefix (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// Key of the A factor in the adapter file.
    pub a_key: String,
    /// Key of the B factor in the adapter file.
    pub b_key: String,
    /// Rank.
    pub rank: usize,
    /// Alpha.
    pub alpha: f64,
    /// An embedding module (`lora_embedding_A/B`).
    pub embedding: bool,
}

/// A PEFT LoRA adapter: opened from its files, or a merged one held in memory.
pub struct Adapter {
    /// Where it came from, for messages.
    pub label: String,
    /// The parsed config.
    pub config: AdapterConfig,
    /// The raw `adapter_config.json`, kept to write merged adapters back.
    pub raw_config: serde_json::Value,
    weights: Factors,
    /// Base weight name (`M.weight`) → module.
    modules: BTreeMap<String, LoraModule>,
    /// Base weight name → key of a full replacement (`modules_to_save`).
    saved: BTreeMap<String, String>,
}

/// Where an adapter's tensors (factors and `modules_to_save`) are.
enum Factors {
    /// Read from the adapter's weight file (which knows the adapter's files).
    File(Box<Checkpoint>),
    /// Held in memory (an in-memory merge's result), by key.
    Memory(BTreeMap<String, Tensor>),
}

impl Factors {
    fn names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            Factors::File(weights) => Box::new(weights.names()),
            Factors::Memory(m) => Box::new(m.keys().map(String::as_str)),
        }
    }

    fn shape(&self, key: &str) -> Option<&[usize]> {
        match self {
            Factors::File(weights) => weights.info(key).map(|i| i.shape.as_slice()),
            Factors::Memory(m) => m.get(key).map(Tensor::dims),
        }
    }

    fn load(&self, key: &str) -> Result<Tensor> {
        match self {
            Factors::File(weights) => weights.load(key),
            Factors::Memory(m) => m.get(key).cloned().ok_or_else(|| Error::MissingTensor {
                tensor: key.into(),
                model: "the in-memory adapter".into(),
            }),
        }
    }

    fn load_f32(&self, key: &str, device: &Device) -> Result<Tensor> {
        match self {
            Factors::File(weights) => weights.load_f32(key, device),
            Factors::Memory(_) => self
                .load(key)?
                .to_dtype(DType::F32)
                .and_then(|t| t.to_device(device))
                .map_err(|e| Error::tensor(key, e)),
        }
    }
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Adapter({}, {} modules)", self.label, self.modules.len())
    }
}

const PREFIX: &str = "base_model.model.";

/// Split a PEFT key into (module, part, is_embedding) where part is `A` or `B`; the adapter
/// name segment some files carry (`lora_A.default.weight`) is accepted.
fn parse_lora_key(key: &str) -> Option<(String, char, bool)> {
    let rest = key.strip_prefix(PREFIX).unwrap_or(key);
    for (marker, part, embedding) in [
        (".lora_A.", 'A', false),
        (".lora_B.", 'B', false),
        (".lora_embedding_A", 'A', true),
        (".lora_embedding_B", 'B', true),
    ] {
        if let Some(pos) = rest.find(marker) {
            return Some((rest[..pos].to_string(), part, embedding));
        }
    }
    None
}

impl Adapter {
    /// Whether the model files are a PEFT adapter.
    pub fn is_adapter(files: &ModelFiles) -> bool {
        files.has("adapter_config.json")
    }

    /// Open a local adapter directory.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        Self::open(&ModelFiles::local(
            ModelRef::new(dir.display().to_string()),
            dir.to_path_buf(),
        ))
    }

    /// Open an adapter: `adapter_config.json` and `adapter_model.safetensors` (or `.bin`).
    pub fn open(files: &ModelFiles) -> Result<Self> {
        let label = files.describe();
        let config_path = files.require("adapter_config.json")?;
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let raw_config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::corrupt(config_path.clone(), format!("invalid JSON: {e}")))?;
        let config: AdapterConfig = serde_json::from_value(raw_config.clone()).map_err(|e| {
            Error::corrupt(
                config_path.clone(),
                format!("not a LoRA adapter config: {e}"),
            )
        })?;
        if let Some(t) = &config.peft_type {
            if !t.eq_ignore_ascii_case("lora") {
                return Err(Error::adapter(
                    label,
                    format!("peft_type `{t}` is not supported (only LORA)"),
                ));
            }
        }
        let weights_path = match files.get("adapter_model.safetensors")? {
            Some(p) => p,
            None => files
                .get("adapter_model.bin")?
                .ok_or_else(|| Error::MissingFile {
                    path: config_path.with_file_name("adapter_model.safetensors"),
                    hint: Some("nor adapter_model.bin".into()),
                })?,
        };
        let weights = Checkpoint::open_file(&weights_path, files)?;
        Self::from_parts(label, raw_config, config, Factors::File(Box::new(weights)))
    }

    /// An adapter held in memory: `adapter_config.json`'s content and the tensors by key.
    pub fn in_memory(
        label: impl Into<String>,
        raw_config: serde_json::Value,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let label = label.into();
        let config = serde_json::from_value(raw_config.clone()).map_err(|e| {
            Error::adapter(label.clone(), format!("not a LoRA adapter config: {e}"))
        })?;
        let factors = Factors::Memory(tensors.into_iter().collect());
        Self::from_parts(label, raw_config, config, factors)
    }

    /// Map the tensors of `weights` to base modules, checking ranks against the config.
    fn from_parts(
        label: String,
        raw_config: serde_json::Value,
        config: AdapterConfig,
        weights: Factors,
    ) -> Result<Self> {
        let mut parts: BTreeMap<String, (Option<String>, Option<String>, bool)> = BTreeMap::new();
        let mut saved = BTreeMap::new();
        for key in weights.names() {
            match parse_lora_key(key) {
                Some((module, part, embedding)) => {
                    let e = parts.entry(module).or_insert((None, None, embedding));
                    if part == 'A' {
                        e.0 = Some(key.to_string());
                    } else {
                        e.1 = Some(key.to_string());
                    }
                }
                None => {
                    let base = key.strip_prefix(PREFIX).unwrap_or(key);
                    let base = base.replace(".modules_to_save.default.", ".");
                    saved.insert(base, key.to_string());
                }
            }
        }
        let mut modules = BTreeMap::new();
        for (module, (a, b, embedding)) in parts {
            let (Some(a_key), Some(b_key)) = (a, b) else {
                return Err(Error::adapter(
                    label,
                    format!("module `{module}` has only one of lora_A / lora_B"),
                ));
            };
            let rank = pattern_value(&config.rank_pattern, &module).unwrap_or(config.r);
            let alpha = pattern_value(&config.alpha_pattern, &module).unwrap_or(config.lora_alpha);
            let (a, b) = (
                weights.shape(&a_key).expect("listed"),
                weights.shape(&b_key).expect("listed"),
            );
            if a.len() != 2 || b.len() != 2 {
                return Err(Error::adapter(label, format!(
                    "module `{module}`: lora_A and lora_B must be matrices, not of shapes {a:?} and {b:?}"
                )));
            }
            // A is r × in (r × vocab for embeddings): its first dimension is the rank.
            let stored_rank = a[0];
            if stored_rank != rank {
                return Err(Error::adapter(label, format!(
                        "module `{module}`: lora_A has rank {stored_rank} but the config says {rank}"
                    )));
            }
            modules.insert(
                format!("{module}.weight"),
                LoraModule {
                    module,
                    a_key,
                    b_key,
                    rank,
                    alpha,
                    embedding,
                },
            );
        }
        Ok(Adapter {
            label,
            config,
            raw_config,
            weights,
            modules,
            saved,
        })
    }

    /// The model files the adapter came from (`None` for an adapter held in memory).
    pub fn files(&self) -> Option<&ModelFiles> {
        match &self.weights {
            Factors::File(weights) => Some(weights.files()),
            Factors::Memory(_) => None,
        }
    }

    /// The adapted modules, keyed by base weight name.
    pub fn modules(&self) -> &BTreeMap<String, LoraModule> {
        &self.modules
    }

    /// Base weight names replaced in full (`modules_to_save`).
    pub fn saved_modules(&self) -> impl Iterator<Item = &str> {
        self.saved.keys().map(String::as_str)
    }

    /// The scale of a module: alpha/r, or alpha/√r with rslora.
    pub fn scale(&self, m: &LoraModule) -> f64 {
        if self.config.use_rslora {
            m.alpha / (m.rank as f64).sqrt()
        } else {
            m.alpha / m.rank as f64
        }
    }

    /// Every tensor key in the adapter file (factors and `modules_to_save`), in file order
    /// of the index (sorted by name).
    pub fn tensor_keys(&self) -> impl Iterator<Item = &str> {
        self.weights.names()
    }

    /// Whether the adapter file has tensor `key`.
    pub fn has_tensor(&self, key: &str) -> bool {
        self.weights.shape(key).is_some()
    }

    /// The storage dtype of the adapter's tensors.
    pub fn storage_dtype(&self) -> DType {
        match &self.weights {
            Factors::File(weights) => weights.storage_dtype(),
            Factors::Memory(m) => m.values().next().map_or(DType::F32, Tensor::dtype),
        }
    }

    /// A raw tensor of the adapter file in f32 on the CPU.
    pub fn load_factor_f32(&self, key: &str) -> Result<Tensor> {
        self.weights.load_f32(key, &Device::Cpu)
    }

    /// Read a raw factor (storage dtype, CPU).
    pub fn factor(&self, key: &str) -> Result<Tensor> {
        self.weights.load(key)
    }

    /// Base weight `name` with the adapter applied, in f32 on `device`: its `modules_to_save`
    /// replacement, or the base's tensor plus ΔW; `None` when the adapter leaves it alone.
    pub fn apply(&self, base: &Checkpoint, name: &str, device: &Device) -> Result<Option<Tensor>> {
        if let Some(full) = self.replacement(name, device)? {
            return Ok(Some(full));
        }
        let Some(d) = self.delta(name, device)? else {
            return Ok(None);
        };
        let w = base.load_f32(name, device)?;
        (&w + &d).map(Some).map_err(|e| Error::tensor(name, e))
    }

    /// Base weight names the adapter changes: adapted modules and `modules_to_save`.
    pub fn changed(&self) -> impl Iterator<Item = &str> {
        self.modules
            .keys()
            .chain(self.saved.keys())
            .map(String::as_str)
    }

    /// The dense ΔW for base weight `name` in f32 on `device`, or `None` if the adapter does
    /// not touch it.
    pub fn delta(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(m) = self.modules.get(name) else {
            return Ok(None);
        };
        let a = self.weights.load_f32(&m.a_key, device)?;
        let b = self.weights.load_f32(&m.b_key, device)?;
        let scale = self.scale(m);
        let delta = (|| {
            let ba = b.matmul(&a)?;
            let ba = if m.embedding || self.config.fan_in_fan_out {
                ba.t()?.contiguous()?
            } else {
                ba
            };
            ba.affine(scale, 0.0)
        })()
        .map_err(|e| Error::tensor(name, e))?;
        Ok(Some(delta))
    }

    /// The full replacement of base weight `name` (`modules_to_save`), in f32.
    pub fn replacement(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        match self.saved.get(name) {
            Some(key) => self.weights.load_f32(key, device).map(Some),
            None => Ok(None),
        }
    }

    /// Check that every adapted module exists in `base` with a fitting shape.
    pub fn check_against(&self, base: &Checkpoint) -> Result<()> {
        for (name, m) in &self.modules {
            let Some(info) = base.info(name) else {
                return Err(Error::adapter(self.label.clone(), format!(
                        "target module `{}` does not exist in the base model {} (no tensor `{name}`)",
                        m.module, base.label
                    )));
            };
            let a = self.weights.shape(&m.a_key).expect("listed");
            let b = self.weights.shape(&m.b_key).expect("listed");
            let expected = if m.embedding || self.config.fan_in_fan_out {
                vec![a[1], b[0]]
            } else {
                vec![b[0], a[1]]
            };
            if info.shape != expected {
                return Err(Error::adapter(
                    self.label.clone(),
                    format!(
                        "module `{}`: B·A has shape {expected:?} but `{name}` in {} is {:?}",
                        m.module, base.label, info.shape
                    ),
                ));
            }
        }
        for name in self.saved.keys() {
            if !base.contains(name) {
                return Err(Error::adapter(
                    self.label.clone(),
                    format!(
                        "saved module tensor `{name}` does not exist in the base model {}",
                        base.label
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Write a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`)
/// atomically: into a temporary directory beside `target`, then renamed.
pub fn write_adapter(
    target: &Path,
    config: &serde_json::Value,
    tensors: &[(String, Tensor)],
    dtype: DType,
    overwrite: bool,
) -> Result<()> {
    let planned: Vec<OutputTensor> = tensors
        .iter()
        .map(|(n, t)| OutputTensor {
            name: n.clone(),
            shape: t.dims().to_vec(),
            dtype,
        })
        .collect();
    let writer = CheckpointWriter::create(target, &planned, u64::MAX, overwrite)?;
    for (n, t) in tensors {
        writer.write(n, t)?;
    }
    writer.add_file(
        "adapter_config.json",
        serde_json::to_string_pretty(config)
            .expect("serialisable")
            .as_bytes(),
    )?;
    std::fs::rename(
        writer.dir().join("model.safetensors"),
        writer.dir().join("adapter_model.safetensors"),
    )
    .map_err(|e| Error::io(writer.dir(), e))?;
    // finish() checks every planned tensor was written; the shard file was renamed above but
    // the check is on the bookkeeping, not the file name.
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_keys_map_to_base_modules() {
        assert_eq!(
            parse_lora_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj".into(), 'A', false))
        );
        assert_eq!(
            parse_lora_key(
                "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_B.default.weight"
            ),
            Some(("encoder.block.0.layer.0.SelfAttention.q".into(), 'B', false))
        );
        assert_eq!(
            parse_lora_key("base_model.model.model.embed_tokens.lora_embedding_A"),
            Some(("model.embed_tokens".into(), 'A', true))
        );
        assert_eq!(parse_lora_key("base_model.model.lm_head.weight"), None);
    }

    #[test]
    fn patterns_match_module_suffixes() {
        assert!(pattern_matches("q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(pattern_matches(
            "layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.q_proj"
        ));
        assert!(!pattern_matches("proj", "model.layers.0.self_attn.q_proj"));
    }
}
