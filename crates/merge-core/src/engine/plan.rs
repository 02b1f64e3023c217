//! Planning a tensor-level merge: check that every tensor of the reference model exists with
//! the same shape in every input, resolve each parameter for each tensor, and lay out the
//! output. Nothing is computed or written before the plan is complete, so bad input fails
//! early and leaves no output.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::inputs::{InputModel, Inputs};
use super::MergeOptions;
use crate::checkpoint::{Checkpoint, OutputTensor};
use crate::config::{MergeConfig, OutDType};
use crate::error::{Error, Result};
use crate::input_stats::InputStats;
use crate::methods::{MergeMethod, Params};
use crate::params::{layer_position, layers_in, natural_key, num_layers, ConfigParams};
use crate::registry::{self, Method};

/// One output tensor with everything resolved.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Name, shape and output dtype.
    pub out: OutputTensor,
    /// Layer position in [0, 1] for gradients.
    pub t: f64,
    /// Global parameters.
    pub params: Params,
    /// Per-model parameters.
    pub model_params: Vec<Params>,
    /// Copied from the reference unchanged (non-float tensors).
    pub copy: bool,
    /// Merged with every model's input statistics (see [`MergePlan::stats`]).
    pub grams: bool,
}

/// What a merge will do.
pub struct MergePlan {
    /// The method.
    pub method: &'static dyn MergeMethod,
    /// The tensors to produce.
    pub tensors: Vec<PlannedTensor>,
    /// Output dtype.
    pub dtype: OutDType,
    /// Seed.
    pub seed: u64,
    /// Bytes read from all inputs (storage dtype).
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Inputs described for the plan and the model card: (role, label, weight files).
    pub inputs: Vec<(String, String, Vec<PathBuf>)>,
    /// Per input model, its input statistics, for methods that use them (else empty).
    pub stats: Vec<Arc<InputStats>>,
}

/// Open every model's input statistics (`stats = "DIR"` of its `[[merge.models]]` entry),
/// checked against the model's architecture.
fn open_statistics(
    cfg: &MergeConfig,
    inputs: &Inputs,
    method: &str,
) -> Result<Vec<Arc<InputStats>>> {
    let mut stats = Vec::new();
    for (m, &entry) in inputs.models.iter().zip(&inputs.model_entries) {
        let label = m.label();
        let Some(dir) = &cfg.models[entry].stats else {
            if registry::get(method, "method")?.merges_layer_by_layer() {
                return Err(Error::method(
                    method,
                    format!(
                        "model {label} has no statistics: `{method}` computes them layer by \
                         layer from each model's `calibration` rows, through `llm-merging \
                         merge` or `run` (the layer-wise driver); the engine alone cannot"
                    ),
                ));
            }
            return Err(Error::method(
                method,
                format!(
                    "model {label} has no input statistics: set `stats = \"DIR\"` in its \
                     [[merge.models]] entry (`llm-merging stats --model {} --data CSV --out \
                     DIR` computes them)",
                    cfg.models[entry].model
                ),
            ));
        };
        let dir = Path::new(dir);
        let dir = match &inputs.base_dir {
            Some(base) if dir.is_relative() && base.join(dir).is_dir() => base.join(dir),
            _ => dir.to_path_buf(),
        };
        let s = InputStats::open(&dir, &label)?;
        s.check_architecture(&label, m.checkpoint().config())?;
        stats.push(Arc::new(s));
    }
    Ok(stats)
}

/// Whether tensor `name` (shape `shape`) has input statistics in every model's `stats`: an
/// error when only some have them, or a matrix does not match the weight's input dimension.
fn has_grams(
    name: &str,
    shape: &[usize],
    stats: &[Arc<InputStats>],
    inputs: &Inputs,
) -> Result<bool> {
    let with: Vec<bool> = stats.iter().map(|s| s.shape(name).is_some()).collect();
    if !with.iter().any(|&w| w) {
        return Ok(false);
    }
    for ((s, m), w) in stats.iter().zip(&inputs.models).zip(&with) {
        if !w {
            return Err(Error::statistics(
                m.label(),
                &s.dir,
                format!("no Gram matrix for `{name}`, which other models' statistics have"),
            ));
        }
        let gram = s.shape(name).expect("checked");
        let fits = shape.len() == 2 && gram == [shape[1], shape[1]];
        if !fits {
            return Err(Error::statistics(
                m.label(),
                &s.dir,
                format!(
                    "the Gram matrix of `{name}` is {gram:?} but the weight is {shape:?} (it \
                     needs [{in_dim}, {in_dim}]): statistics of another architecture?",
                    in_dim = shape.get(1).copied().unwrap_or(0)
                ),
            ));
        }
    }
    Ok(true)
}

/// The error for a model count outside the method's bounds, if it is.
fn check_model_count(method: Method, n: usize) -> Result<()> {
    let (min, max) = method.model_count();
    if n >= min && max.is_none_or(|max| n <= max) {
        return Ok(());
    }
    let expected = match max {
        Some(max) if max == min => format!("exactly {max}"),
        Some(max) => format!("{min} to {max}"),
        None => format!("at least {min}"),
    };
    let counted = if method.base_is_input() {
        "input model(s), a named base model included"
    } else if method.separates_base() {
        "model(s) besides the base (an entry naming the base model is the base)"
    } else {
        "model(s) besides the base"
    };
    Err(Error::method(
        method.name(),
        format!("takes {expected} {counted}, got {n}"),
    ))
}

/// The output dtype: the config's, else the reference's `torch_dtype`, else its storage dtype.
pub(crate) fn output_dtype(cfg: &MergeConfig, reference: &Checkpoint) -> OutDType {
    cfg.dtype.unwrap_or_else(|| {
        reference
            .config()
            .and_then(|c| c.get("torch_dtype"))
            .and_then(|v| serde_json::from_value::<OutDType>(v.clone()).ok())
            .or_else(|| OutDType::from_candle(reference.storage_dtype()))
            .unwrap_or(OutDType::Float32)
    })
}

/// Plan a tensor-level merge: check shapes and names, resolve parameters, lay out the output.
pub fn plan(cfg: &MergeConfig, inputs: &Inputs) -> Result<MergePlan> {
    let method = registry::get(&cfg.method, "method")?;
    let Method::Tensor(tensor_method) = method else {
        return Err(Error::method(
            cfg.method.clone(),
            "merges adapters into an adapter; it has no tensor plan",
        ));
    };
    if method.requires_base() && inputs.base.is_none() {
        return Err(Error::method(method.name(), "needs a base_model"));
    }
    let params = ConfigParams::new(
        cfg,
        method.name(),
        method.parameters(),
        method.model_parameters(),
    )?;
    let n_models = inputs.models.len();
    let base_input = usize::from(method.base_is_input() && inputs.base.is_some());
    check_model_count(method, n_models + base_input)?;
    let reference = &inputs.reference;
    let dtype = output_dtype(cfg, reference);
    let n_layers = num_layers(reference.config()).unwrap_or_else(|| layers_in(reference.names()));
    let stats = if tensor_method.uses_input_statistics() {
        open_statistics(cfg, inputs, method.name())?
    } else {
        Vec::new()
    };

    let mut names: Vec<&str> = reference.names().collect();
    names.sort_by_cached_key(|n| natural_key(n));
    let all_inputs: Vec<&InputModel> = inputs.base.iter().chain(&inputs.models).collect();
    let mut tensors = Vec::new();
    let mut bytes_read = 0u64;
    for name in names {
        let info = reference.info(name).expect("listed");
        for m in &all_inputs {
            match m.info(name) {
                None => {
                    return Err(Error::MissingTensor {
                        tensor: name.into(),
                        model: m.label(),
                    })
                }
                Some(other) if other.shape != info.shape => {
                    return Err(Error::ShapeMismatch {
                        tensor: name.into(),
                        model_a: reference.label.clone(),
                        shape_a: info.shape.clone(),
                        model_b: m.label(),
                        shape_b: other.shape.clone(),
                    })
                }
                Some(other) => bytes_read += other.bytes() as u64,
            }
        }
        let copy = !info.dtype.is_float();
        let t = layer_position(name, n_layers);
        let (mut globals, mut model_params) = (Params::new(), vec![Params::new(); n_models]);
        let grams = !copy && !stats.is_empty() && has_grams(name, &info.shape, &stats, inputs)?;
        if !copy {
            globals = params.globals(name, t)?;
            for (p, &entry) in model_params.iter_mut().zip(&inputs.model_entries) {
                *p = params.model(entry, name, t)?;
            }
            tensor_method
                .check_params(&globals, &model_params)
                .map_err(|message| {
                    Error::method(method.name(), format!("tensor `{name}`: {message}"))
                })?;
        }
        tensors.push(PlannedTensor {
            out: OutputTensor {
                name: name.to_string(),
                shape: info.shape.clone(),
                dtype: if copy { info.dtype } else { dtype.candle() },
            },
            t,
            params: globals,
            model_params,
            copy,
            grams,
        });
    }
    let bytes_written = tensors.iter().map(|t| t.out.bytes()).sum();
    let paths = |c: &Checkpoint| {
        c.weight_files()
            .into_iter()
            .map(Path::to_path_buf)
            .collect()
    };
    let mut described = Vec::new();
    if let Some(b) = &inputs.base {
        described.push(("base".to_string(), b.label(), paths(b.checkpoint())));
    }
    for (i, m) in inputs.models.iter().enumerate() {
        described.push((format!("model {}", i + 1), m.label(), paths(m.checkpoint())));
    }
    Ok(MergePlan {
        method: tensor_method,
        tensors,
        dtype,
        seed: cfg.seed,
        bytes_read,
        bytes_written,
        inputs: described,
        stats,
    })
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

impl MergePlan {
    /// A human-readable plan (`--dry-run`).
    pub fn describe(&self, opts: &MergeOptions) -> String {
        let mut s = format!("merge method: {}\n", self.method.name());
        for (role, label, files) in &self.inputs {
            s.push_str(&format!("{role}: {label}\n"));
            for f in files {
                s.push_str(&format!("    {}\n", f.display()));
            }
        }
        let (mut shards, mut cur) = (1, 0);
        for t in &self.tensors {
            if cur > 0 && cur + t.out.bytes() > opts.shard_size {
                shards += 1;
                cur = 0;
            }
            cur += t.out.bytes();
        }
        s.push_str(&format!(
            "tensors: {} ({} copied unchanged)\nread: {}\nwrite: {} as {} in {} shard(s) to {}\n",
            self.tensors.len(),
            self.tensors.iter().filter(|t| t.copy).count(),
            human_bytes(self.bytes_read),
            human_bytes(self.bytes_written),
            self.dtype.torch_name(),
            shards,
            opts.out.display()
        ));
        s
    }
}
