//! Where model weights come from. The decoder only asks for tensors by name, so any checkpoint
//! reader (plain safetensors here; merge-core's checkpoint reader and adapter folding when
//! available) can feed it.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// A source of named tensors (in their storage dtype, on the CPU).
pub trait WeightSource {
    /// The tensor called `name`; an error naming the tensor when it is absent.
    fn get(&self, name: &str) -> Result<Tensor>;
    /// Whether `name` exists (used for optional tensors such as biases and `lm_head`).
    fn contains(&self, name: &str) -> bool;
}

/// Memory-mapped safetensors files: `model.safetensors` or the shards of a
/// `model.safetensors.index.json` (any `*.safetensors` in the directory).
pub struct SafetensorsDir {
    files: Vec<PathBuf>,
    st: candle_core::safetensors::MmapedSafetensors,
}

impl SafetensorsDir {
    /// Maps every `*.safetensors` file of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Weights(format!(
                "no *.safetensors file in {} (PyTorch .bin checkpoints need merge-core's reader)",
                dir.display()
            )));
        }
        // SAFETY: the files are opened read-only; like every mmap-based reader we assume they
        // are not truncated while we run.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::Weights(format!("cannot map {}: {e}", dir.display())))?;
        Ok(SafetensorsDir { files, st })
    }

    /// The mapped files.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl WeightSource for SafetensorsDir {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.st.load(name, &Device::Cpu).map_err(|e| {
            Error::Weights(format!(
                "tensor `{name}` cannot be read from {}: {e}",
                self.files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }
}

/// In-memory tensors (tests, and adapters folded into a base).
impl WeightSource for std::collections::HashMap<String, Tensor> {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.get(name)
            .cloned()
            .ok_or_else(|| Error::Weights(format!("tensor `{name}` is missing")))
    }

    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }
}

/// Any checkpoint merge-core reads (safetensors single/sharded, PyTorch `.bin`), optionally
/// with a PEFT LoRA adapter folded in: W + scale·B·A for adapted modules, full replacements
/// for `modules_to_save`.
pub struct CheckpointSource {
    ckpt: merge_core::checkpoint::Checkpoint,
    adapter: Option<merge_core::adapter::Adapter>,
}

impl CheckpointSource {
    /// Opens the checkpoint in `dir` and, if given, the adapter in `adapter_dir`, checking that
    /// the adapter fits the base.
    pub fn open(dir: &Path, adapter_dir: Option<&Path>) -> Result<Self> {
        let ckpt = merge_core::checkpoint::Checkpoint::open_dir(dir)
            .map_err(|e| Error::Weights(e.to_string()))?;
        let adapter = match adapter_dir {
            None => None,
            Some(a) => {
                let adapter = merge_core::adapter::Adapter::open_dir(a)
                    .map_err(|e| Error::Weights(e.to_string()))?;
                adapter
                    .check_against(&ckpt)
                    .map_err(|e| Error::Weights(e.to_string()))?;
                Some(adapter)
            }
        };
        Ok(CheckpointSource { ckpt, adapter })
    }
}

impl WeightSource for CheckpointSource {
    fn get(&self, name: &str) -> Result<Tensor> {
        let werr = |e: merge_core::Error| Error::Weights(e.to_string());
        if let Some(a) = &self.adapter {
            if let Some(r) = a.replacement(name, &Device::Cpu).map_err(werr)? {
                return Ok(r);
            }
            if let Some(d) = a.delta(name, &Device::Cpu).map_err(werr)? {
                let base = self.ckpt.load_f32(name, &Device::Cpu).map_err(werr)?;
                return Ok((base + d)?);
            }
        }
        self.ckpt.load(name).map_err(werr)
    }

    fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }
}
