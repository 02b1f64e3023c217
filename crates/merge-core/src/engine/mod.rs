//! The merge engine: inputs → plan → execute → output, for every method of the registry.
//!
//! - [`inputs`]: the opened models ([`Inputs`]), and a [`MergeSession`] that keeps them open;
//! - [`plan`](mod@plan): shapes checked, parameters resolved per tensor, the output laid out;
//! - `execute`: every tensor in parallel, streamed where the method can, in a memory budget;
//! - [`output`]: where tensors go, the checkpoint writer or a caller's [`TensorSink`].
//!
//! The entry points dispatch on the method's kind in one place: tensor-level methods plan and
//! execute; adapter-level ones (`lora_avg`, `cat`, `svd`) merge factors into an adapter that is
//! written ([`merge_to_disk`]) or folded onto its base ([`merge_in_memory`]).
//!
//! ```no_run
//! use merge_core::engine::{merge_in_memory, MergeSession, TensorSink};
//! use merge_core::source::Resolver;
//! use merge_core::MergeConfig;
//!
//! struct Count(std::sync::atomic::AtomicUsize);
//! impl TensorSink for Count {
//!     fn put(&self, _name: &str, _tensor: candle_core::Tensor) -> merge_core::Result<()> {
//!         self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
//!         Ok(())
//!     }
//! }
//!
//! let mut cfg = MergeConfig::from_file("ties.toml".as_ref())?;
//! let session = MergeSession::open(&cfg, &Resolver::from_env())?;
//! for density in [0.3, 0.5, 0.7] {
//!     cfg.parameters.insert("density".into(), merge_core::config::ParamValue::Number(density));
//!     let sink = Count(Default::default());
//!     let report = merge_in_memory(&session, &cfg, &sink)?;
//!     println!("{} tensors in {:.1}s", report.tensors, report.seconds);
//! }
//! # Ok::<(), merge_core::Error>(())
//! ```

mod execute;
pub mod inputs;
pub mod output;
pub mod plan;
mod transposed;

use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;

pub use candle_core::Device;
pub use execute::keep_freed_memory;
pub use inputs::{InputModel, Inputs, MergeSession};
pub use output::{SinkForm, TensorSink};
pub use plan::{plan, MergePlan, PlannedTensor};
pub use transposed::{put_rows_by_columns, ColumnTarget};

use crate::adapter::{write_adapter, Adapter, AdapterMerge, MergedAdapter};
use crate::checkpoint::{CheckpointWriter, OutputTensor, DEFAULT_SHARD_SIZE};
use crate::config::MergeConfig;
use crate::error::{Error, Result};
use crate::params::ConfigParams;
use crate::registry::{self, Method};
use crate::source::{ModelFiles, Resolver};
use execute::{execute, Exec, MemoryBudget};
use output::{as_stored, finish_model, MemoryOutput};

/// How to run a merge to disk.
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

/// What a finished merge to disk reports.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// Where the model (or adapter) was written.
    pub out: PathBuf,
    /// Whether the output is a PEFT adapter (an adapter-level method), not a model.
    pub adapter: bool,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes written.
    pub bytes_written: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// What a finished in-memory merge reports.
#[derive(Debug, Clone)]
pub struct InMemoryReport {
    /// Tensors handed to the sink.
    pub tensors: usize,
    /// Their bytes.
    pub bytes: u64,
    /// The model whose config and tokenizer the merge takes.
    pub reference: ModelFiles,
    /// For an adapter-level method: the base the merged adapter was folded onto. Only the
    /// tensors the adapter changes were put; every other tensor is this base's, unchanged.
    /// `None` for tensor-level methods, which put every tensor.
    pub folded_onto: Option<ModelFiles>,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Resolve, open and merge `cfg` to disk, opening only what the method reads: adapter-level
/// methods read the adapters, not their bases (which can be large downloads).
pub fn run(cfg: &MergeConfig, resolver: &Resolver, opts: &MergeOptions) -> Result<MergeReport> {
    match registry::get(&cfg.method, "method")? {
        Method::Tensor(_) => merge_to_disk(cfg, &Inputs::open(cfg, resolver)?, opts),
        Method::Adapter(method) => {
            let start = Instant::now();
            let params = adapter_params(cfg, method)?;
            let adapters = open_adapters(cfg, method, resolver)?;
            let refs: Vec<&Adapter> = adapters.iter().collect();
            write_merged_adapter(cfg, method, &params, &refs, opts, start)
        }
    }
}

/// The plan of `cfg` for `--dry-run`, without computing or writing anything.
pub fn describe(cfg: &MergeConfig, resolver: &Resolver, opts: &MergeOptions) -> Result<String> {
    let Method::Adapter(method) = registry::get(&cfg.method, "method")? else {
        let inputs = Inputs::open(cfg, resolver)?;
        return Ok(plan(cfg, &inputs)?.describe(opts));
    };
    let adapters = open_adapters(cfg, method, resolver)?;
    let mut s = format!(
        "adapter merge method: {} (output: a PEFT LoRA adapter)\n",
        method.name()
    );
    for (i, a) in adapters.iter().enumerate() {
        s.push_str(&format!(
            "model {}: {} (r = {}, {} modules)\n",
            i + 1,
            a.label,
            a.config.r,
            a.modules().len()
        ));
    }
    s.push_str(&format!("write: adapter to {}\n", opts.out.display()));
    Ok(s)
}

/// Merge `cfg` over opened `inputs` to disk: a model (tensor-level methods) or a PEFT adapter
/// (adapter-level methods), written atomically to `opts.out`.
pub fn merge_to_disk(
    cfg: &MergeConfig,
    inputs: &Inputs,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let start = Instant::now();
    match registry::get(&cfg.method, "method")? {
        Method::Tensor(_) => {
            let plan = plan(cfg, inputs)?;
            let planned: Vec<OutputTensor> = plan.tensors.iter().map(|t| t.out.clone()).collect();
            let writer =
                CheckpointWriter::create(&opts.out, &planned, opts.shard_size, opts.overwrite)?;
            let exec = Exec {
                max_memory: opts.max_memory,
                device: opts.device.clone(),
                progress: true,
                memo: None,
            };
            execute(&plan, inputs, &writer, &exec)?;
            Ok(MergeReport {
                out: finish_model(writer, cfg, &plan, inputs)?,
                adapter: false,
                tensors: plan.tensors.len(),
                bytes_written: plan.bytes_written,
                seconds: start.elapsed().as_secs_f64(),
            })
        }
        Method::Adapter(method) => {
            let params = adapter_params(cfg, method)?;
            let adapters = inputs.adapters(method.name())?;
            write_merged_adapter(cfg, method, &params, &adapters, opts, start)
        }
    }
}

/// Merge `cfg` over the models `session` opened, handing every merged tensor to `sink` instead
/// of writing a checkpoint; see [`TensorSink`] for what a tensor is, and [`InMemoryReport`]
/// for which tensors an adapter-level method puts. Bad input (a missing tensor, a shape
/// mismatch, an unknown method or parameter, a full model given to an adapter-level method)
/// fails before the first tensor is put. Memory: the tensors in flight, within the session's
/// budget, as on disk.
pub fn merge_in_memory(
    session: &MergeSession,
    cfg: &MergeConfig,
    sink: &dyn TensorSink,
) -> Result<InMemoryReport> {
    let start = Instant::now();
    let method = registry::get(&cfg.method, "method")?;
    let inputs = session.inputs(cfg)?;
    let exec = Exec {
        max_memory: session.max_memory,
        device: session.device.clone(),
        progress: session.progress,
        memo: Some(&session.memo),
    };
    let reference = inputs.reference.files().clone();
    let (tensors, bytes, folded_onto) = match method {
        Method::Tensor(_) => {
            let plan = plan(cfg, &inputs)?;
            execute(&plan, &inputs, &MemoryOutput::new(sink), &exec)?;
            (plan.tensors.len(), plan.bytes_written, None)
        }
        Method::Adapter(method) => {
            let (n, bytes) = fold_merged_adapter(cfg, method, &inputs, sink, &exec)?;
            (n, bytes, Some(reference.clone()))
        }
    };
    Ok(InMemoryReport {
        tensors,
        bytes,
        reference,
        folded_onto,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn adapter_params<'a>(cfg: &'a MergeConfig, m: &dyn AdapterMerge) -> Result<ConfigParams<'a>> {
    ConfigParams::new(cfg, m.name(), m.parameters(), m.model_parameters())
}

/// Open every model of `cfg` as an adapter (failing on the first that is not one).
fn open_adapters(
    cfg: &MergeConfig,
    method: &dyn AdapterMerge,
    resolver: &Resolver,
) -> Result<Vec<Adapter>> {
    cfg.model_refs()
        .iter()
        .map(|r| {
            let files = resolver.resolve(r)?;
            if !Adapter::is_adapter(&files) {
                return Err(inputs::not_an_adapter(method.name(), &files.describe()));
            }
            Adapter::open(&files)
        })
        .collect()
}

/// Merge adapters, checking there is at least one.
fn merge_adapters(
    method: &dyn AdapterMerge,
    params: &ConfigParams,
    adapters: &[&Adapter],
) -> Result<MergedAdapter> {
    if adapters.is_empty() {
        return Err(Error::config("merge", "no models to merge"));
    }
    method.merge(adapters, params)
}

/// The merged adapter's dtype: the config's, else the first adapter's storage dtype.
fn adapter_dtype(cfg: &MergeConfig, adapters: &[&Adapter]) -> candle_core::DType {
    cfg.dtype
        .map_or_else(|| adapters[0].storage_dtype(), |d| d.candle())
}

fn write_merged_adapter(
    cfg: &MergeConfig,
    method: &dyn AdapterMerge,
    params: &ConfigParams,
    adapters: &[&Adapter],
    opts: &MergeOptions,
    start: Instant,
) -> Result<MergeReport> {
    let merged = merge_adapters(method, params, adapters)?;
    let dtype = adapter_dtype(cfg, adapters);
    write_adapter(
        &opts.out,
        &merged.config,
        &merged.tensors,
        dtype,
        opts.overwrite,
    )?;
    // The config that made it, beside the adapter.
    std::fs::write(opts.out.join("merge-config.toml"), cfg.to_toml())
        .map_err(|e| Error::io(&opts.out, e))?;
    let bytes_written = merged
        .tensors
        .iter()
        .map(|(_, t)| (t.elem_count() * dtype.size_in_bytes()) as u64)
        .sum();
    Ok(MergeReport {
        out: opts.out.clone(),
        adapter: true,
        tensors: merged.tensors.len(),
        bytes_written,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// An adapter-level merge in memory: the merged adapter's factors stored as writing would
/// store them, then folded onto the base (the config's base model, else the first adapter's):
/// every tensor the adapter changes is put as "base + adapter" loads it for evaluation.
/// Returns the number of tensors put and their bytes.
fn fold_merged_adapter(
    cfg: &MergeConfig,
    method: &dyn AdapterMerge,
    inputs: &Inputs,
    sink: &dyn TensorSink,
    exec: &Exec,
) -> Result<(usize, u64)> {
    let params = adapter_params(cfg, method)?;
    let adapters = inputs.adapters(method.name())?;
    let merged = merge_adapters(method, &params, &adapters)?;
    let dtype = adapter_dtype(cfg, &adapters);
    let stored = merged
        .tensors
        .iter()
        .map(|(key, t)| {
            let planned = OutputTensor {
                name: key.clone(),
                shape: t.dims().to_vec(),
                dtype,
            };
            Ok((key.clone(), as_stored(&planned, t)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let label = format!("merged `{}` adapter (in memory)", method.name());
    let adapter = Adapter::in_memory(label, merged.config, stored)?;
    let base = &inputs.reference;
    adapter.check_against(base)?;
    let names: Vec<&str> = adapter.changed().collect();
    let budget = MemoryBudget::new(exec.max_memory);
    let bytes = names
        .par_iter()
        .map(|&name| {
            let numel = base.info(name).expect("checked against the base").numel() as u64;
            // The base tensor, ΔW and their sum, in f32.
            let held = budget.acquire(numel * 4 * 3);
            let put = (|| {
                let t = adapter.apply(base, name, &Device::Cpu)?.expect("changed");
                let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
                sink.put(name, t).map(|()| bytes)
            })();
            budget.release(held);
            put
        })
        .collect::<Result<Vec<u64>>>()?;
    Ok((names.len(), bytes.iter().sum()))
}
