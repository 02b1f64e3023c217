//! Planning and executing a merge: tensor by tensor, in parallel, within a memory budget.
//!
//! Planning opens every input (downloading only config, index and weight files), checks that
//! every tensor of the reference model (the base, else the first model) exists with the same
//! shape in every input, and resolves each parameter for each tensor. Nothing is written
//! before the plan is complete, so bad input fails early and leaves no output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

pub use candle_core::Device;
use candle_core::Tensor;
use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, CheckpointWriter, OutputTensor, DEFAULT_SHARD_SIZE};
use crate::config::{MergeConfig, OutDType, ParamValue};
use crate::error::{Error, Result};
use crate::lora::Adapter;
use crate::methods::{
    self, ChunkSink, MergeMethod, ParamSpec, Params, Source, StreamInputs, TensorInputs,
};
use crate::model::InputModel;
use crate::source::{ModelFiles, ModelRef, Resolver};

/// How to run a merge.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Output directory.
    pub out: PathBuf,
    /// Largest shard in bytes.
    pub shard_size: u64,
    /// Memory budget for tensors in flight, in bytes (default: a quarter of RAM).
    pub max_memory: Option<u64>,
    /// Where methods that work on whole tensors compute; streaming methods (see
    /// [`crate::methods::MergeMethod::merge_streaming`]) always run on the CPU.
    pub device: Device,
    /// Replace an existing output directory.
    pub overwrite: bool,
}

impl MergeOptions {
    /// Defaults for writing to `out`.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        MergeOptions {
            out: out.into(),
            shard_size: DEFAULT_SHARD_SIZE,
            max_memory: None,
            device: Device::Cpu,
            overwrite: false,
        }
    }
}

/// The opened inputs of a merge.
pub struct MergeInputs {
    /// The base model, when the config names one (or adapters imply one).
    pub base: Option<InputModel>,
    /// The input models, in config order (without entries that name the base, for methods
    /// that take the base separately).
    pub models: Vec<InputModel>,
    /// For each of `models`, its index in the config's `[[merge.models]]`.
    pub model_entries: Vec<usize>,
    /// The model whose tensor names, config and tokenizer the output takes.
    pub reference: Arc<Checkpoint>,
}

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
}

/// Open every input a config names.
pub fn open_inputs(cfg: &MergeConfig, resolver: &Resolver) -> Result<MergeInputs> {
    let mut checkpoints: HashMap<ModelRef, Arc<Checkpoint>> = HashMap::new();
    let mut open = |files: &ModelFiles| -> Result<Arc<Checkpoint>> {
        if let Some(c) = checkpoints.get(&files.reference) {
            return Ok(c.clone());
        }
        let c = Arc::new(Checkpoint::open(files)?);
        checkpoints.insert(files.reference.clone(), c.clone());
        Ok(c)
    };
    let base_files = match cfg.base_ref() {
        Some(r) => Some(resolver.resolve(&r)?),
        None => None,
    };
    let base_ckpt = match &base_files {
        Some(f) if Adapter::is_adapter(f) => {
            return Err(Error::config(
                "base_model",
                format!(
                    "{} is a PEFT adapter; the base must be a full model",
                    f.describe()
                ),
            ))
        }
        Some(f) => Some(open(f)?),
        None => None,
    };
    let mut models = Vec::new();
    let mut model_entries = Vec::new();
    // Methods on task vectors see the base separately: an entry naming the base is the base
    // (mergekit's models lists usually include it).
    let base_separate = methods::lookup(&cfg.method).is_some_and(|m| m.requires_base());
    let base_ref = cfg.base_ref();
    for (entry, r) in cfg.model_refs().into_iter().enumerate() {
        if base_separate && base_ref.as_ref() == Some(&r) {
            continue;
        }
        model_entries.push(entry);
        let files = resolver.resolve(&r)?;
        if Adapter::is_adapter(&files) {
            let adapter = Arc::new(Adapter::open(&files)?);
            let base = match &base_ckpt {
                Some(b) => b.clone(),
                None => {
                    let name = adapter
                        .config
                        .base_model_name_or_path
                        .clone()
                        .ok_or_else(|| Error::Adapter {
                            adapter: adapter.label.clone(),
                            message: "names no base_model_name_or_path; set base_model in the \
                                      merge config"
                                .into(),
                        })?;
                    // A relative base path in a local adapter is relative to the adapter.
                    let model = match files.local_dir() {
                        Some(dir) if dir.join(&name).is_dir() => {
                            dir.join(&name).display().to_string()
                        }
                        _ => name,
                    };
                    let base_ref = ModelRef {
                        model,
                        revision: adapter.config.revision.clone(),
                    };
                    open(&resolver.resolve(&base_ref)?)?
                }
            };
            models.push(InputModel::adapted(base, adapter)?);
        } else {
            models.push(InputModel::Full(open(&files)?));
        }
    }
    let reference = match &base_ckpt {
        Some(b) => b.clone(),
        None => models
            .first()
            .map(|m| m.checkpoint().clone())
            .ok_or_else(|| Error::config("merge", "no models to merge"))?,
    };
    Ok(MergeInputs {
        base: base_ckpt.map(InputModel::Full),
        models,
        model_entries,
        reference,
    })
}

/// Number of layers from `config.json`, if it says.
fn num_layers(config: Option<&serde_json::Value>) -> Option<usize> {
    let c = config?;
    ["num_hidden_layers", "n_layer", "num_layers"]
        .iter()
        .find_map(|k| c.get(*k).and_then(|v| v.as_u64()))
        .map(|n| n as usize)
}

/// The layer index in a tensor name (`model.layers.7.mlp...` → 7).
pub fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| match w[0] {
        "layers" | "h" | "block" | "blocks" | "layer" => w[1].parse().ok(),
        _ => None,
    })
}

/// mergekit's layer position: layer i of n at i/(n−1) (1 for a single layer); every tensor
/// outside the layers (embeddings, final norm, head) at 0, as mergekit plans them.
pub fn layer_position(name: &str, n_layers: usize) -> f64 {
    match layer_index(name) {
        Some(i) if n_layers > 1 => (i.min(n_layers - 1)) as f64 / (n_layers - 1) as f64,
        Some(_) => 1.0,
        None => 0.0,
    }
}

/// Sort tensor names with numbers compared as numbers (layer 2 before layer 10).
fn natural_key(name: &str) -> Vec<(String, u64)> {
    name.split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (String::new(), n),
            Err(_) => (p.to_string(), 0),
        })
        .collect()
}

/// Check a config's parameters against what the method declares.
fn check_parameter_names(cfg: &MergeConfig, method: &dyn MergeMethod) -> Result<()> {
    let global: Vec<&str> = method.parameters().iter().map(|p| p.name).collect();
    let per_model: Vec<&str> = method.model_parameters().iter().map(|p| p.name).collect();
    let known = |list: &[&str]| list.join(", ");
    for key in cfg.parameters.keys() {
        if !global.contains(&key.as_str()) && !per_model.contains(&key.as_str()) {
            return Err(Error::config(
                "[merge.parameters]",
                format!(
                    "`{key}` is not a parameter of `{}` (it takes: {})",
                    method.name(),
                    known(&[global.clone(), per_model.clone()].concat())
                ),
            ));
        }
    }
    for m in &cfg.models {
        for key in m.parameters.keys() {
            if !per_model.contains(&key.as_str()) {
                return Err(Error::config(
                    format!("[[merge.models]] {}", m.model),
                    format!(
                        "`{key}` is not a per-model parameter of `{}` (it takes: {})",
                        method.name(),
                        known(&per_model)
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn resolve_param(
    spec: &ParamSpec,
    sources: &[&std::collections::BTreeMap<String, ParamValue>],
    tensor: &str,
    t: f64,
    what: &str,
) -> Result<f64> {
    for s in sources {
        if let Some(v) = s.get(spec.name).and_then(|v| v.evaluate(tensor, t)) {
            return Ok(v);
        }
    }
    spec.default.ok_or_else(|| {
        Error::config(
            what.to_string(),
            format!(
                "missing required parameter `{}` (for tensor `{tensor}`)",
                spec.name
            ),
        )
    })
}

/// Plan a merge: check shapes and names, resolve parameters, lay out the output.
pub fn plan(cfg: &MergeConfig, inputs: &MergeInputs) -> Result<MergePlan> {
    let method = methods::lookup(&cfg.method).ok_or_else(|| {
        Error::config(
            "method",
            format!(
                "unknown merge method `{}` (known: {})",
                cfg.method,
                methods::all_names().join(", ")
            ),
        )
    })?;
    if method.requires_base() && inputs.base.is_none() {
        return Err(Error::Method {
            method: method.name().into(),
            message: "needs a base_model".into(),
        });
    }
    check_parameter_names(cfg, method)?;
    let n_models = inputs.models.len();
    let too_many = method.max_models().is_some_and(|max| n_models > max);
    if n_models < method.min_models() || too_many {
        let expected = match method.max_models() {
            Some(max) if max == method.min_models() => format!("exactly {max}"),
            Some(max) => format!("{} to {max}", method.min_models()),
            None => format!("at least {}", method.min_models()),
        };
        return Err(Error::Method {
            method: method.name().into(),
            message: format!(
                "takes {expected} model(s) besides the base, got {n_models}{}",
                if method.requires_base() {
                    " (an entry naming the base model is the base)"
                } else {
                    ""
                }
            ),
        });
    }
    let reference = &inputs.reference;
    let dtype = match cfg.dtype {
        Some(d) => d,
        None => reference
            .config()
            .and_then(|c| c.get("torch_dtype"))
            .and_then(|v| serde_json::from_value::<OutDType>(v.clone()).ok())
            .or_else(|| OutDType::from_candle(reference.storage_dtype()))
            .unwrap_or(OutDType::Float32),
    };
    let n_layers = num_layers(reference.config()).unwrap_or_else(|| {
        reference
            .names()
            .filter_map(layer_index)
            .max()
            .map_or(1, |m| m + 1)
    });

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
        let mut params = Params::new();
        let mut model_params = vec![Params::new(); n_models];
        if !copy {
            for spec in method.parameters() {
                let v = resolve_param(spec, &[&cfg.parameters], name, t, "[merge.parameters]")?;
                params.insert(spec.name, v);
            }
            for (i, &entry) in inputs.model_entries.iter().enumerate() {
                let m = &cfg.models[entry];
                for spec in method.model_parameters() {
                    let what = format!("[[merge.models]] {}", m.model);
                    let v = resolve_param(spec, &[&m.parameters, &cfg.parameters], name, t, &what)?;
                    model_params[i].insert(spec.name, v);
                }
            }
            method
                .check_params(&params, &model_params)
                .map_err(|message| Error::Method {
                    method: method.name().into(),
                    message: format!("tensor `{name}`: {message}"),
                })?;
        }
        tensors.push(PlannedTensor {
            out: OutputTensor {
                name: name.to_string(),
                shape: info.shape.clone(),
                dtype: if copy { info.dtype } else { dtype.candle() },
            },
            t,
            params,
            model_params,
            copy,
        });
    }
    let bytes_written = tensors.iter().map(|t| t.out.bytes()).sum();
    let mut described = Vec::new();
    if let Some(b) = &inputs.base {
        described.push(("base".to_string(), b.label(), paths(b.checkpoint())));
    }
    for (i, m) in inputs.models.iter().enumerate() {
        described.push((format!("model {}", i + 1), m.label(), paths(m.checkpoint())));
    }
    Ok(MergePlan {
        method,
        tensors,
        dtype,
        seed: cfg.seed,
        bytes_read,
        bytes_written,
        inputs: described,
    })
}

fn paths(c: &Checkpoint) -> Vec<PathBuf> {
    c.weight_files()
        .into_iter()
        .map(Path::to_path_buf)
        .collect()
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
        let shards = {
            let mut n = 1;
            let mut cur = 0;
            for t in &self.tensors {
                if cur > 0 && cur + t.out.bytes() > opts.shard_size {
                    n += 1;
                    cur = 0;
                }
                cur += t.out.bytes();
            }
            n
        };
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

/// A byte budget for tensors in flight, shared by worker threads.
///
/// A thread that already holds part of the budget never waits for more: while it waits
/// for parallel work inside a tensor, rayon may run another tensor's job on it, and that job
/// waiting for budget this very thread holds would never wake. It goes over budget instead
/// (by one tensor at most per nesting level).
struct MemoryBudget {
    free: Mutex<i64>,
    total: u64,
    cv: Condvar,
}

thread_local! {
    /// How many (non-empty) acquisitions this thread holds.
    static HOLDING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl MemoryBudget {
    fn new(total: u64) -> Self {
        MemoryBudget {
            free: Mutex::new(total.min(i64::MAX as u64) as i64),
            total,
            cv: Condvar::new(),
        }
    }

    /// Wait until `n` bytes are free (a request larger than the budget waits for all of it).
    fn acquire(&self, n: u64) -> u64 {
        let n = n.min(self.total);
        let need = n as i64;
        let mut free = self.free.lock().expect("not poisoned");
        if HOLDING.get() == 0 {
            while *free < need {
                free = self.cv.wait(free).expect("not poisoned");
            }
        }
        *free -= need;
        if n > 0 {
            HOLDING.set(HOLDING.get() + 1);
        }
        n
    }

    fn release(&self, n: u64) {
        if n > 0 {
            HOLDING.set(HOLDING.get() - 1);
        }
        *self.free.lock().expect("not poisoned") += n as i64;
        self.cv.notify_all();
    }
}

/// Total RAM from /proc/meminfo (Linux), for the default budget.
fn total_ram() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Seed for one tensor: the config seed mixed with the tensor name (FNV-1a), so the result
/// does not depend on the order tensors are processed in.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What a finished merge reports.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// Where the model was written.
    pub out: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes written.
    pub bytes_written: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Make glibc keep freed large blocks for reuse instead of returning them to the kernel.
///
/// Why: a merge allocates and frees several tensor-sized buffers per tensor (tens to
/// hundreds of MB each). glibc serves blocks above 32 MB with a fresh `mmap` every time, so
/// the kernel zero-fills every page again on first touch and unmaps it on free; profiles of a
/// 1.1B-parameter merge showed page faults and zeroing taking over half of the run. With
/// mmap off and trimming effectively off, the heap keeps the pages of the largest buffers in
/// flight (which the memory budget already bounds) and reuses them. Process-wide and
/// idempotent; a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator tuning parameters; it is safe to call
            // at any time, from any thread.
            unsafe {
                libc::mallopt(libc::M_MMAP_MAX, 0);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        });
    }
}

/// Execute a plan: stream every tensor through the method into a new checkpoint, then add
/// config, tokenizer files, the config copy and a model card, and move it into place.
pub fn execute(
    cfg: &MergeConfig,
    plan: &MergePlan,
    inputs: &MergeInputs,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let start = Instant::now();
    keep_freed_memory();
    let planned: Vec<OutputTensor> = plan.tensors.iter().map(|t| t.out.clone()).collect();
    let writer = CheckpointWriter::create(&opts.out, &planned, opts.shard_size, opts.overwrite)?;
    let budget = MemoryBudget::new(
        opts.max_memory
            .unwrap_or_else(|| total_ram().map_or(4 << 30, |r| r / 4)),
    );
    let n_inputs = inputs.models.len() as u64 + u64::from(inputs.base.is_some());
    let progress = indicatif::ProgressBar::new(plan.tensors.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "merging {bar:40} {pos}/{len} tensors {elapsed}<{eta}",
        )
        .expect("valid template"),
    );
    // Methods that stream always do, on the CPU, whatever the device: they are bound by reading
    // and writing checkpoints, and on a GPU machine (an H100 with 16 cores, scripts/gpu-check.sh)
    // a linear merge took 7.2 s through the GPU against 2.9 s on the CPU. The device serves the
    // methods that work on whole tensors.
    plan.tensors.par_iter().try_for_each(|p| -> Result<()> {
        let name = p.out.name.as_str();
        let numel = p.out.shape.iter().product::<usize>() as u64;
        let result = if p.copy {
            let held = budget.acquire(numel * p.out.dtype.size_in_bytes() as u64 * 2);
            let r = inputs
                .reference
                .load(name)
                .and_then(|t| writer.write(name, &t));
            budget.release(held);
            r
        } else {
            match merge_streaming(plan, p, inputs, &writer, &budget)? {
                Streamed::Written => Ok(()),
                Streamed::Declined(loaded) => {
                    // f32 copies of every input plus what the method allocates.
                    let scratch = plan.method.scratch_tensors(inputs.models.len()) as u64;
                    let held = budget.acquire(numel * 4 * (n_inputs + scratch));
                    let r = merge_whole(plan, p, inputs, loaded, &writer, &opts.device);
                    budget.release(held);
                    r
                }
            }
        };
        progress.inc(1);
        result
    })?;
    progress.finish_and_clear();

    write_side_files(cfg, plan, inputs, &writer)?;
    let out = writer.finish()?;
    Ok(MergeReport {
        out,
        tensors: plan.tensors.len(),
        bytes_written: plan.bytes_written,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The output of a streaming method: chunks converted and written in place by the writer.
struct WriterSink<'a> {
    writer: &'a CheckpointWriter,
    name: &'a str,
    /// The first write error, reported as itself rather than through the method's error.
    error: Mutex<Option<Error>>,
}

impl ChunkSink for WriterSink<'_> {
    fn write(&self, first: usize, data: &[f32]) -> candle_core::Result<()> {
        self.writer
            .write_f32_range(self.name, first, data)
            .map_err(|e| {
                let message = e.to_string();
                self.error.lock().expect("not poisoned").get_or_insert(e);
                candle_core::Error::msg(message)
            })
    }
}

fn method_error(plan: &MergePlan, name: &str, e: impl std::fmt::Display) -> Error {
    Error::Method {
        method: plan.method.name().into(),
        message: format!("tensor `{name}`: {e}"),
    }
}

/// What [`merge_streaming`] did with a tensor.
enum Streamed {
    /// The method streamed it: the tensor is written.
    Written,
    /// The method handles these parameters only whole. Per input (base first): its f32
    /// tensor on the CPU where it was already loaded for the attempt, so it is not loaded twice.
    Declined(Vec<Option<Tensor>>),
}

/// Merge one tensor with the method's streaming path, when it has one for these parameters:
/// inputs stored in safetensors files are read a chunk at a time from the memory map; the
/// others (adapters applied, `.bin` checkpoints) are loaded whole in f32 first.
fn merge_streaming(
    plan: &MergePlan,
    p: &PlannedTensor,
    inputs: &MergeInputs,
    writer: &CheckpointWriter,
    budget: &MemoryBudget,
) -> Result<Streamed> {
    let name = p.out.name.as_str();
    let numel = p.out.shape.iter().product::<usize>() as u64;
    let all: Vec<&InputModel> = inputs.base.iter().chain(&inputs.models).collect();
    let mapped: Vec<Option<crate::checkpoint::MappedTensor>> = all
        .iter()
        .map(|m| match m {
            InputModel::Full(c) => c.mapped(name),
            InputModel::Adapted { .. } => None,
        })
        .collect();
    for m in mapped.iter().flatten() {
        m.prefetch();
    }
    let n_loaded = mapped.iter().filter(|m| m.is_none()).count() as u64;
    let held = budget.acquire(numel * 4 * n_loaded);
    let result = (|| -> Result<Streamed> {
        let mut loaded = Vec::new();
        for (m, mapped) in all.iter().zip(&mapped) {
            if mapped.is_none() {
                loaded.push(m.load_f32(name, &Device::Cpu)?);
            }
        }
        let loaded_refs: Vec<&Tensor> = loaded.iter().collect();
        let sink = WriterSink {
            writer,
            name,
            error: Mutex::new(None),
        };
        let streamed = methods::with_f32_slices(&loaded_refs, |slices| {
            let mut slices = slices.iter();
            let mut sources: Vec<Source> = mapped
                .iter()
                .map(|m| match m {
                    Some(m) => Source::Mapped(*m),
                    None => Source::F32(slices.next().expect("one per unmapped input")),
                })
                .collect();
            let base = if inputs.base.is_some() {
                Some(sources.remove(0))
            } else {
                None
            };
            let x = StreamInputs {
                name,
                shape: &p.out.shape,
                base,
                models: &sources,
                params: &p.params,
                model_params: &p.model_params,
                seed: tensor_seed(plan.seed, name),
            };
            Ok(plan.method.merge_streaming(&x, &sink))
        })
        .map_err(|e| Error::tensor(name, e))?;
        match streamed {
            None => {
                let mut loaded = loaded.into_iter();
                Ok(Streamed::Declined(
                    mapped
                        .iter()
                        .map(|m| if m.is_none() { loaded.next() } else { None })
                        .collect(),
                ))
            }
            Some(Ok(())) => {
                writer.mark_written(name)?;
                Ok(Streamed::Written)
            }
            Some(Err(e)) => Err(match sink.error.into_inner().expect("not poisoned") {
                Some(io) => io,
                None => method_error(plan, name, e),
            }),
        }
    })();
    budget.release(held);
    result
}

/// Merge one tensor from whole f32 tensors with [`MergeMethod::merge`]; `loaded` holds, per
/// input (base first), the f32 tensor already on the CPU, if any.
fn merge_whole(
    plan: &MergePlan,
    p: &PlannedTensor,
    inputs: &MergeInputs,
    loaded: Vec<Option<Tensor>>,
    writer: &CheckpointWriter,
    device: &Device,
) -> Result<()> {
    let name = p.out.name.as_str();
    let mut tensors = inputs
        .base
        .iter()
        .chain(&inputs.models)
        .zip(loaded)
        .map(|(m, t)| match t {
            Some(t) => t.to_device(device).map_err(|e| Error::tensor(name, e)),
            None => m.load_f32(name, device),
        })
        .collect::<Result<Vec<Tensor>>>()?;
    let base = inputs.base.is_some().then(|| tensors.remove(0));
    let models = tensors;
    let merged = plan
        .method
        .merge(&TensorInputs {
            name,
            base: base.as_ref(),
            models: &models,
            params: &p.params,
            model_params: &p.model_params,
            seed: tensor_seed(plan.seed, name),
        })
        .map_err(|e| method_error(plan, name, e))?;
    drop((base, models));
    if merged.dims() != p.out.shape.as_slice() {
        return Err(method_error(
            plan,
            name,
            format!(
                "produced shape {:?}, expected {:?}",
                merged.dims(),
                p.out.shape
            ),
        ));
    }
    writer.write(name, &merged)
}

/// Files a loadable model needs besides weights, copied from the reference model.
pub const SIDE_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "generation_config.json",
];

fn write_side_files(
    cfg: &MergeConfig,
    plan: &MergePlan,
    inputs: &MergeInputs,
    writer: &CheckpointWriter,
) -> Result<()> {
    let reference = &inputs.reference;
    match reference.config() {
        Some(config) => {
            let mut config = config.clone();
            if let Some(obj) = config.as_object_mut() {
                obj.insert("torch_dtype".into(), plan.dtype.torch_name().into());
            }
            writer.add_file(
                "config.json",
                serde_json::to_string_pretty(&config)
                    .expect("serialisable")
                    .as_bytes(),
            )?;
        }
        None => tracing::warn!(
            "{} has no config.json; the output will not load in transformers without one",
            reference.label
        ),
    }
    for name in SIDE_FILES {
        if let Some(path) = reference.files().get(name)? {
            writer.copy_file(&path, name)?;
        }
    }
    writer.add_file("merge-config.toml", cfg.to_toml().as_bytes())?;
    writer.add_file("README.md", model_card(cfg, plan, inputs).as_bytes())?;
    Ok(())
}

fn model_card(cfg: &MergeConfig, plan: &MergePlan, inputs: &MergeInputs) -> String {
    let mut s =
        String::from("---\nlibrary_name: transformers\ntags:\n- merge\n- llm-merging-kit\n---\n");
    s.push_str(&format!(
        "# Merged model\n\nMade with llm-merging-kit {} using the `{}` method, output dtype `{}`{}.\n\n## Inputs\n\n",
        env!("CARGO_PKG_VERSION"),
        plan.method.name(),
        plan.dtype.torch_name(),
        if cfg.seed != 0 { format!(", seed {}", cfg.seed) } else { String::new() }
    ));
    if let Some(b) = &inputs.base {
        s.push_str(&format!("- base: `{}`\n", describe_input(b)));
    }
    for m in &inputs.models {
        s.push_str(&format!("- `{}`\n", describe_input(m)));
    }
    s.push_str("\n## Configuration\n\n```toml\n");
    s.push_str(&cfg.to_toml());
    s.push_str("```\n");
    s
}

fn describe_input(m: &InputModel) -> String {
    match m {
        InputModel::Full(c) => c.files().describe(),
        InputModel::Adapted { base, adapter } => format!(
            "{} (LoRA adapter over {})",
            adapter.files().describe(),
            base.files().describe()
        ),
    }
}

/// Resolve, plan and execute a merge config. Adapter-level methods (`lora_avg`, `cat`,
/// `svd`) write a PEFT adapter instead of a model (see [`crate::adapter_merge`]).
pub fn run(cfg: &MergeConfig, resolver: &Resolver, opts: &MergeOptions) -> Result<MergeReport> {
    if let Some(method) = crate::adapter_merge::lookup(&cfg.method) {
        return crate::adapter_merge::run(cfg, method, resolver, opts);
    }
    let inputs = open_inputs(cfg, resolver)?;
    let plan = plan(cfg, &inputs)?;
    execute(cfg, &plan, &inputs, opts)
}
