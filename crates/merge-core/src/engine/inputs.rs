//! A merge's inputs: each model a full checkpoint or a base plus a PEFT adapter, opened
//! (memory-mapped) from what a config names; and a [`MergeSession`] that keeps them open for
//! many merges over the same models.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::adapter::Adapter;
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::config::MergeConfig;
use crate::error::{Error, Result};
use crate::registry;
use crate::source::{ModelRef, Resolver};

/// The weights one input model contributes.
#[derive(Clone)]
pub enum InputModel {
    /// A full checkpoint.
    Full(Arc<Checkpoint>),
    /// base + ΔW of an adapter: the adapter stands for the model it produces.
    Adapted {
        /// The base the adapter applies to.
        base: Arc<Checkpoint>,
        /// The adapter.
        adapter: Arc<Adapter>,
    },
}

impl std::fmt::Debug for InputModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

impl InputModel {
    /// What identifies this model among a session's (the opened checkpoint, and adapter).
    pub fn identity(&self) -> crate::methods::InputId {
        match self {
            InputModel::Full(c) => (Arc::as_ptr(c) as usize, 0),
            InputModel::Adapted { base, adapter } => {
                (Arc::as_ptr(base) as usize, Arc::as_ptr(adapter) as usize)
            }
        }
    }

    /// An adapter over `base`, checked to fit it.
    pub fn adapted(base: Arc<Checkpoint>, adapter: Arc<Adapter>) -> Result<Self> {
        adapter.check_against(&base)?;
        Ok(InputModel::Adapted { base, adapter })
    }

    /// For messages: the checkpoint, or `adapter (over base)`.
    pub fn label(&self) -> String {
        match self {
            InputModel::Full(c) => c.label.clone(),
            InputModel::Adapted { base, adapter } => {
                format!("{} (adapter over {})", adapter.label, base.label)
            }
        }
    }

    /// The checkpoint that holds the full tensors (the base for adapters).
    pub fn checkpoint(&self) -> &Arc<Checkpoint> {
        match self {
            InputModel::Full(c) => c,
            InputModel::Adapted { base, .. } => base,
        }
    }

    /// Shape and storage dtype of `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.checkpoint().info(name)
    }

    /// `name` in f32 on `device`, with the adapter applied.
    pub fn load_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        match self {
            InputModel::Full(c) => c.load_f32(name, device),
            InputModel::Adapted { base, adapter } => match adapter.apply(base, name, device)? {
                Some(t) => Ok(t),
                None => base.load_f32(name, device),
            },
        }
    }
}

/// The opened inputs of a merge.
pub struct Inputs {
    /// The base model, when the config names one.
    pub base: Option<InputModel>,
    /// The input models, in config order (without entries that name the base, for methods
    /// that take the base separately).
    pub models: Vec<InputModel>,
    /// For each of `models`, its index in the config's `[[merge.models]]`.
    pub model_entries: Vec<usize>,
    /// The model whose tensor names, config and tokenizer the output takes (the base, else
    /// the first model's checkpoint, which is an adapter's base).
    pub reference: Arc<Checkpoint>,
    /// Where relative paths in the config (`stats`) are looked up first: the config's
    /// directory, as the resolver's.
    pub base_dir: Option<PathBuf>,
}

/// A model a reference resolved to, opened.
#[derive(Clone)]
enum Opened {
    Checkpoint(Arc<Checkpoint>),
    Adapter(Arc<Adapter>),
}

/// Resolve and open `r` through `resolver`, once per reference; the config's base model
/// (`base`) must not be an adapter, which is checked before its files are opened.
fn open_with(
    resolver: &Resolver,
    cache: &mut HashMap<ModelRef, Opened>,
    r: &ModelRef,
    base: bool,
) -> Result<Opened> {
    if let Some(o) = cache.get(r) {
        return Ok(o.clone());
    }
    let files = resolver.resolve(r)?;
    let opened = match (Adapter::is_adapter(&files), base) {
        (true, true) => {
            return Err(Error::config(
                "base_model",
                format!(
                    "{} is a PEFT adapter; the base must be a full model",
                    files.describe()
                ),
            ))
        }
        (true, false) => Opened::Adapter(Arc::new(Adapter::open(&files)?)),
        (false, _) => Opened::Checkpoint(Arc::new(Checkpoint::open(&files)?)),
    };
    cache.insert(r.clone(), opened.clone());
    Ok(opened)
}

impl Inputs {
    /// Resolve and open every input `cfg` names (downloading only config, index and weight
    /// files), adapters with their bases.
    pub fn open(cfg: &MergeConfig, resolver: &Resolver) -> Result<Self> {
        let mut cache = HashMap::new();
        let mut inputs =
            Self::assemble(cfg, &mut |r, base| open_with(resolver, &mut cache, r, base))?;
        inputs.base_dir = resolver.base_dir().map(PathBuf::from);
        Ok(inputs)
    }

    /// Build the inputs from `open`, which gives the opened model of a reference (`base`:
    /// whether it is the config's base model).
    fn assemble(
        cfg: &MergeConfig,
        open: &mut dyn FnMut(&ModelRef, bool) -> Result<Opened>,
    ) -> Result<Self> {
        let checkpoint = |o: Opened, r: &ModelRef| match o {
            Opened::Checkpoint(c) => Ok(c),
            Opened::Adapter(a) => Err(Error::adapter(
                a.label.clone(),
                format!("is the base of a merge input (`{r}`) but a PEFT adapter itself"),
            )),
        };
        let base_ref = cfg.base_ref();
        let base = match &base_ref {
            Some(r) => Some(checkpoint(open(r, true)?, r)?),
            None => None,
        };
        let mut models = Vec::new();
        let mut model_entries = Vec::new();
        // Methods on task vectors see the base separately: an entry naming the base is the base
        // (mergekit's models lists usually include it).
        let base_separate = registry::lookup(&cfg.method).is_some_and(|m| m.separates_base());
        for (entry, r) in cfg.model_refs().into_iter().enumerate() {
            if base_separate && base_ref.as_ref() == Some(&r) {
                continue;
            }
            model_entries.push(entry);
            let adapter = match open(&r, false)? {
                Opened::Checkpoint(c) => {
                    models.push(InputModel::Full(c));
                    continue;
                }
                Opened::Adapter(a) => a,
            };
            let adapter_base = match &base {
                Some(b) => b.clone(),
                None => {
                    let r = adapter_base_ref(&adapter)?;
                    checkpoint(open(&r, false)?, &r)?
                }
            };
            models.push(InputModel::adapted(adapter_base, adapter)?);
        }
        let reference = match &base {
            Some(b) => b.clone(),
            None => models
                .first()
                .map(|m| m.checkpoint().clone())
                .ok_or_else(|| Error::config("merge", "no models to merge"))?,
        };
        Ok(Inputs {
            base: base.map(InputModel::Full),
            models,
            model_entries,
            reference,
            base_dir: None,
        })
    }

    /// The adapters of an adapter-level method `method`: every model must be one.
    pub(crate) fn adapters(&self, method: &str) -> Result<Vec<&Adapter>> {
        self.models
            .iter()
            .map(|m| match m {
                InputModel::Adapted { adapter, .. } => Ok(&**adapter),
                InputModel::Full(c) => Err(not_an_adapter(method, &c.files().describe())),
            })
            .collect()
    }
}

/// The error for a full model given to an adapter-level method.
pub(crate) fn not_an_adapter(method: &str, model: &str) -> Error {
    Error::method(
        method,
        format!(
            "{model} is not a PEFT adapter (no adapter_config.json); `{method}` merges LoRA \
             adapters into an adapter — use a model-level method for full models"
        ),
    )
}

/// The base an adapter names (`base_model_name_or_path`, relative to a local adapter's
/// directory when that is where it is).
fn adapter_base_ref(adapter: &Adapter) -> Result<ModelRef> {
    let name = adapter
        .config
        .base_model_name_or_path
        .clone()
        .ok_or_else(|| {
            Error::adapter(
                adapter.label.clone(),
                "names no base_model_name_or_path; set base_model in the merge config",
            )
        })?;
    let model = match adapter.files().and_then(|f| f.local_dir()) {
        Some(dir) if dir.join(&name).is_dir() => dir.join(&name).display().to_string(),
        _ => name,
    };
    Ok(ModelRef {
        model,
        revision: adapter.config.revision.clone(),
    })
}

/// Inputs opened once and merged many times: a search merges hundreds of times over the same
/// models with other parameters or methods. [`MergeSession::open`] resolves and opens
/// (memory-maps) every model a config names; [`MergeSession::inputs`] assembles the inputs of
/// another config over those models without touching the files again.
pub struct MergeSession {
    opened: HashMap<ModelRef, Opened>,
    base_dir: Option<PathBuf>,
    /// Memory budget for tensors in flight, in bytes (default: a quarter of RAM).
    pub max_memory: Option<u64>,
    /// Where methods that work on whole tensors compute (streaming methods: the CPU).
    pub device: Device,
    /// Show a progress bar per merge.
    pub progress: bool,
    /// Values the methods computed from the inputs alone, for the next merge.
    pub(crate) memo: crate::methods::StreamMemo,
}

impl MergeSession {
    /// Open every model `cfg` names (adapters with their bases).
    pub fn open(cfg: &MergeConfig, resolver: &Resolver) -> Result<Self> {
        let mut opened = HashMap::new();
        Inputs::assemble(cfg, &mut |r, base| {
            open_with(resolver, &mut opened, r, base)
        })?;
        Ok(MergeSession {
            opened,
            base_dir: resolver.base_dir().map(PathBuf::from),
            max_memory: None,
            device: Device::Cpu,
            progress: false,
            memo: Default::default(),
        })
    }

    /// Whether the merges read the opened checkpoints from their mapped pages instead of
    /// `pread` copies ([`Checkpoint::read_mapped`]): worth it for a session that merges many
    /// times (a search), at the price of the inputs' pages counting in the resident set.
    pub fn read_mapped(&self, on: bool) {
        for opened in self.opened.values() {
            if let Opened::Checkpoint(c) = opened {
                c.read_mapped(on);
            }
        }
    }

    /// The dtype a merge of `cfg` stores its tensors as — what each value of an in-memory merge
    /// is rounded to — where it is known before merging: a tensor-level merge's output dtype
    /// (the config's, else the reference model's); for an adapter-level merge only the
    /// config's (`None` without one).
    pub fn stored_dtype(&self, cfg: &MergeConfig) -> Result<Option<candle_core::DType>> {
        Ok(match registry::get(&cfg.method, "method")? {
            registry::Method::Tensor(_) => {
                let inputs = self.inputs(cfg)?;
                Some(super::plan::output_dtype(cfg, &inputs.reference).candle())
            }
            registry::Method::Adapter(_) => cfg.dtype.map(|d| d.candle()),
        })
    }

    /// The inputs of `cfg`, which must name only models this session opened.
    pub fn inputs(&self, cfg: &MergeConfig) -> Result<Inputs> {
        let mut inputs = Inputs::assemble(cfg, &mut |r, _| {
            self.opened.get(r).cloned().ok_or_else(|| {
                let mut known: Vec<String> = self.opened.keys().map(|k| k.to_string()).collect();
                known.sort();
                Error::config(
                    format!("model `{r}`"),
                    format!(
                        "not opened by this merge session (it opened: {}); open a new session \
                         for other models",
                        known.join(", ")
                    ),
                )
            })
        })?;
        inputs.base_dir = self.base_dir.clone();
        Ok(inputs)
    }
}
