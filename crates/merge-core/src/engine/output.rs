//! Where merged tensors go: the engine's `Output` trait is implemented by the checkpoint writer
//! (sharded safetensors, atomic, with side files and a model card) and by `MemoryOutput`, which
//! hands each tensor to a caller's [`TensorSink`]. Both convert f32 to the planned dtype with
//! the same code ([`crate::checkpoint::with_encoded`]), so a tensor handed to a sink is bit for
//! bit what reading the written checkpoint back gives.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::inputs::{InputModel, Inputs};
use super::plan::MergePlan;
use super::transposed::{ColumnTarget, TransposedF32};
use crate::checkpoint::{encodable, tensor_bytes, with_encoded, CheckpointWriter, OutputTensor};
use crate::config::MergeConfig;
use crate::error::{Error, Result};
use crate::source::SIDE_FILES;
use crate::tensor::{with_f32_slices, CHUNK};

/// Receives a merge's tensors in memory.
///
/// `put` is called once per output tensor as soon as it is complete, possibly from several
/// threads at once. The tensor is on the CPU, in the planned output dtype (the copied tensor's
/// own dtype for non-float tensors), bit for bit what loading the disk output back gives.
pub trait TensorSink: Sync {
    /// Take tensor `name`.
    fn put(&self, name: &str, tensor: Tensor) -> Result<()>;

    /// The form `put` wants tensor `name` in. [`SinkForm::Stored`] unless overridden.
    fn form(&self, _name: &str) -> SinkForm {
        SinkForm::Stored
    }

    /// Where a streamed 2-D tensor `name` (stored as bf16, f16 or f32) is to be written in
    /// place, column by column, instead of handed to `put`: the merge threads write its
    /// rounded values straight into the target and then call [`TensorSink::written`]. `None`
    /// (the default): `put` as usual. Tensors merged whole still go to `put`.
    fn columns(&self, _name: &str) -> Option<Arc<dyn ColumnTarget>> {
        None
    }

    /// Every element of tensor `name` has been written into its [`TensorSink::columns`]
    /// target.
    fn written(&self, _name: &str) -> Result<()> {
        Ok(())
    }
}

/// The form a [`TensorSink`] takes a tensor in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkForm {
    /// As the checkpoint stores it (the planned dtype).
    Stored,
    /// For a 2-D tensor that a merge streams, stored as bf16, f16 or f32: the values loading
    /// the stored tensor and widening it to f32 gives, as the transposed view (`.t()`) of a
    /// contiguous `[cols, rows]` f32 tensor; the shape is the stored one. This is how a model
    /// keeps linear weights for `x·Wᵀ`, and assembling the chunks straight into it saves the
    /// model a conversion and a copy of the tensor. Other tensors arrive as stored.
    TransposedF32,
}

/// The output of a merge: the checkpoint writer ([`super::merge_to_disk`]) or a
/// [`MemoryOutput`] ([`super::merge_in_memory`]).
pub(crate) trait Output: Sync {
    /// Bytes the output holds per tensor in flight, for the memory budget.
    fn held_bytes(&self, _t: &OutputTensor) -> u64 {
        0
    }
    /// Store `data` as elements `first ..` of tensor `t` (f32, converted to `t.dtype`).
    /// Called from many threads at once for disjoint ranges.
    fn write_range(&self, t: &OutputTensor, first: usize, data: &[f32]) -> Result<()>;
    /// Every range of `t` has been written.
    fn finish(&self, t: &OutputTensor) -> Result<()>;
    /// Store a whole tensor: merged (f32) or copied (its own dtype).
    fn write(&self, t: &OutputTensor, tensor: &Tensor) -> Result<()>;
}

/// A merged model on disk.
impl Output for CheckpointWriter {
    fn write_range(&self, t: &OutputTensor, first: usize, data: &[f32]) -> Result<()> {
        self.write_f32_range(&t.name, first, data)
    }

    fn finish(&self, t: &OutputTensor) -> Result<()> {
        self.mark_written(&t.name)
    }

    fn write(&self, t: &OutputTensor, tensor: &Tensor) -> Result<()> {
        CheckpointWriter::write(self, &t.name, tensor)
    }
}

/// Add config (with the output `torch_dtype`), tokenizer files, the merge config and a model
/// card to a written model, then move it into place.
pub(crate) fn finish_model(
    writer: CheckpointWriter,
    cfg: &MergeConfig,
    plan: &MergePlan,
    inputs: &Inputs,
) -> Result<std::path::PathBuf> {
    let reference = &inputs.reference;
    match reference.config() {
        Some(config) => {
            let mut config = config.clone();
            if let Some(obj) = config.as_object_mut() {
                obj.insert("torch_dtype".into(), plan.dtype.torch_name().into());
            }
            let text = serde_json::to_string_pretty(&config).expect("serialisable");
            writer.add_file("config.json", text.as_bytes())?;
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
    writer.finish()
}

fn model_card(cfg: &MergeConfig, plan: &MergePlan, inputs: &Inputs) -> String {
    let mut s =
        String::from("---\nlibrary_name: transformers\ntags:\n- merge\n- llm-merging-kit\n---\n");
    s.push_str(&format!(
        "# Merged model\n\nMade with llm-merging-kit {} using the `{}` method, output dtype `{}`{}.\n\n## Inputs\n\n",
        env!("CARGO_PKG_VERSION"),
        plan.method.name(),
        plan.dtype.torch_name(),
        if cfg.seed != 0 { format!(", seed {}", cfg.seed) } else { String::new() }
    ));
    let describe = |m: &InputModel| match m {
        InputModel::Full(c) => c.files().describe(),
        InputModel::Adapted { base, adapter } => format!(
            "{} (LoRA adapter over {})",
            adapter
                .files()
                .map_or_else(|| adapter.label.clone(), |f| f.describe()),
            base.files().describe()
        ),
    };
    if let Some(b) = &inputs.base {
        s.push_str(&format!("- base: `{}`\n", describe(b)));
    }
    for m in &inputs.models {
        s.push_str(&format!("- `{}`\n", describe(m)));
    }
    s.push_str("\n## Configuration\n\n```toml\n");
    s.push_str(&cfg.to_toml());
    s.push_str("```\n");
    s
}

/// A streamed tensor in flight.
enum Assembly {
    /// (byte offset, bytes) of its encoded chunks.
    Stored(Vec<(usize, Vec<u8>)>),
    /// Its chunks scattered into the sink's [`SinkForm::TransposedF32`].
    Transposed(Arc<TransposedF32>),
}

/// Per tensor in flight, its assembly.
type Parts = std::collections::HashMap<String, Assembly>;

/// Merged tensors handed to a [`TensorSink`]. A streamed tensor's chunks are converted as
/// they arrive and kept until the last one, then joined into one tensor (or, where the sink
/// asks for [`SinkForm::TransposedF32`], scattered into it as they arrive).
pub(crate) struct MemoryOutput<'s> {
    pub sink: &'s dyn TensorSink,
    parts: Mutex<Parts>,
}

impl<'s> MemoryOutput<'s> {
    pub(crate) fn new(sink: &'s dyn TensorSink) -> Self {
        MemoryOutput {
            sink,
            parts: Mutex::default(),
        }
    }

    /// The column assembly of streamed tensor `t`, when the sink takes it in place
    /// ([`TensorSink::columns`]) or transposed ([`SinkForm::TransposedF32`]); `None`: as stored.
    fn transposed(&self, t: &OutputTensor) -> Option<TransposedF32> {
        if !TransposedF32::applies(&t.shape, t.dtype) {
            return None;
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        match self.sink.columns(&t.name) {
            Some(target) => Some(TransposedF32::into_target(target, rows, cols, t.dtype)),
            None if self.sink.form(&t.name) == SinkForm::TransposedF32 => {
                Some(TransposedF32::new(rows, cols, t.dtype))
            }
            None => None,
        }
    }
}

/// `tensor` (on any device) as it is stored as `t`: the bytes the writer would write, as a
/// CPU tensor of `t`'s dtype and shape.
pub(crate) fn as_stored(t: &OutputTensor, tensor: &Tensor) -> Result<Tensor> {
    let err = |e| Error::tensor(&t.name, e);
    let tensor = tensor.to_device(&Device::Cpu).map_err(err)?;
    let bytes = if tensor.dtype() == DType::F32 && encodable(t.dtype) {
        let size = t.dtype.size_in_bytes();
        let mut bytes = vec![0u8; tensor.elem_count() * size];
        let flat = tensor.flatten_all().map_err(err)?;
        with_f32_slices(&[&flat], |s| {
            bytes
                .par_chunks_mut(CHUNK * size)
                .zip(s[0].par_chunks(CHUNK))
                .for_each(|(out, data)| with_encoded(t.dtype, data, |b| out.copy_from_slice(b)));
            Ok(())
        })
        .map_err(err)?;
        bytes
    } else {
        tensor_bytes(&tensor, t.dtype).map_err(err)?
    };
    Tensor::from_raw_buffer(&bytes, t.dtype, &t.shape, &Device::Cpu).map_err(err)
}

impl Output for MemoryOutput<'_> {
    fn held_bytes(&self, t: &OutputTensor) -> u64 {
        // The converted tensor, and its chunks or bytes while it is assembled.
        2 * t.bytes()
    }

    fn write_range(&self, t: &OutputTensor, first: usize, data: &[f32]) -> Result<()> {
        let assembly = {
            let mut parts = self.parts.lock().expect("not poisoned");
            match parts.get(&t.name) {
                Some(Assembly::Transposed(a)) => Some(Arc::clone(a)),
                Some(Assembly::Stored(_)) => None,
                None => self.transposed(t).map(|a| {
                    let a = Arc::new(a);
                    parts.insert(t.name.clone(), Assembly::Transposed(Arc::clone(&a)));
                    a
                }),
            }
        };
        if let Some(a) = assembly {
            a.write(first, data);
            return Ok(());
        }
        let bytes = with_encoded(t.dtype, data, <[u8]>::to_vec);
        let mut parts = self.parts.lock().expect("not poisoned");
        let at = first * t.dtype.size_in_bytes();
        match parts
            .entry(t.name.clone())
            .or_insert_with(|| Assembly::Stored(Vec::new()))
        {
            Assembly::Stored(p) => p.push((at, bytes)),
            Assembly::Transposed(_) => unreachable!("one form per tensor"),
        }
        Ok(())
    }

    fn finish(&self, t: &OutputTensor) -> Result<()> {
        let assembly = (self.parts.lock().expect("not poisoned")).remove(&t.name);
        let incomplete = |covered: String| {
            Error::write(
                "(in memory)",
                format!("tensor `{}`: the streamed chunks cover {covered}", t.name),
            )
        };
        let mut parts = match assembly {
            Some(Assembly::Transposed(a)) => {
                let a = Arc::try_unwrap(a)
                    .map_err(|_| incomplete("a range still being written".into()))?;
                let numel = t.shape.iter().product::<usize>();
                if a.written() != numel {
                    return Err(incomplete(format!("{} of {numel} elements", a.written())));
                }
                let Some((columns, rows, cols)) = a.into_columns() else {
                    return self.sink.written(&t.name);
                };
                let err = |e| Error::tensor(&t.name, e);
                let tensor = Tensor::from_vec(columns, (cols, rows), &Device::Cpu)
                    .and_then(|c| c.t())
                    .map_err(err)?;
                return self.sink.put(&t.name, tensor);
            }
            Some(Assembly::Stored(parts)) => parts,
            None => Vec::new(),
        };
        parts.sort_unstable_by_key(|p| p.0);
        let mut bytes = Vec::with_capacity(t.bytes() as usize);
        for (at, part) in parts {
            if at != bytes.len() {
                break;
            }
            bytes.extend_from_slice(&part);
        }
        if bytes.len() as u64 != t.bytes() {
            return Err(incomplete(format!(
                "{} of {} bytes",
                bytes.len(),
                t.bytes()
            )));
        }
        let tensor = Tensor::from_raw_buffer(&bytes, t.dtype, &t.shape, &Device::Cpu)
            .map_err(|e| Error::tensor(&t.name, e))?;
        drop(bytes);
        self.sink.put(&t.name, tensor)
    }

    fn write(&self, t: &OutputTensor, tensor: &Tensor) -> Result<()> {
        if tensor.dims() != t.shape.as_slice() {
            return Err(Error::write(
                "(in memory)",
                format!(
                    "tensor `{}` has shape {:?}, planned {:?}",
                    t.name,
                    tensor.dims(),
                    t.shape
                ),
            ));
        }
        self.sink.put(&t.name, as_stored(t, tensor)?)
    }
}
