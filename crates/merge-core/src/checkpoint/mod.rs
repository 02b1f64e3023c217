//! Checkpoints: reading tensor by tensor without loading whole models, and writing merged
//! models atomically.
//!
//! Reading covers every layout the hub holds: `model.safetensors`, sharded safetensors with
//! `model.safetensors.index.json` (memory-mapped), `pytorch_model.bin` and sharded `.bin` with
//! `pytorch_model.bin.index.json` (PyTorch's zip pickle format). Tied embeddings
//! (`tie_word_embeddings`) read `lm_head.weight` as the input embedding.

mod convert;
mod mapped;
mod pth;
mod safetensors_file;
pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::source::{ModelFiles, ModelRef};

pub use convert::{encodable, f32_to_bf16, round_through_bf16, tensor_bytes, with_encoded};
pub use mapped::MappedTensor;
pub use writer::{CheckpointWriter, OutputTensor, DEFAULT_SHARD_SIZE};

/// Shape and storage dtype of a tensor, known without reading its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Storage dtype.
    pub dtype: DType,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes in storage.
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }
}

/// One weights file of a checkpoint.
trait Shard: Send + Sync {
    fn path(&self) -> &Path;
    fn infos(&self) -> Vec<(String, TensorInfo)>;
    fn load(&self, name: &str) -> Result<Tensor>;
    /// `name`'s bytes in the memory-mapped file, where the format allows reading them so.
    fn mapped(&self, _name: &str) -> Option<MappedTensor<'_>> {
        None
    }
    /// Maps every page of the file now (a hint: no error where the kernel cannot).
    fn populate(&self) {}
}

fn open_shard(path: &Path) -> Result<Box<dyn Shard>> {
    Ok(if path.extension().is_some_and(|e| e == "safetensors") {
        Box::new(safetensors_file::SafetensorsFile::open(path)?)
    } else {
        Box::new(pth::PthFile::open(path)?)
    })
}

/// The weight file layouts a checkpoint can have, in the order they are looked for.
/// (index file, single file)
const LAYOUTS: [(&str, &str); 2] = [
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
];

/// A model checkpoint, opened for tensor-by-tensor reading.
pub struct Checkpoint {
    /// Where it came from, for messages (`org/name@sha` or a directory).
    pub label: String,
    files: ModelFiles,
    config: Option<serde_json::Value>,
    shards: Vec<Box<dyn Shard>>,
    /// tensor name → (shard index, info)
    entries: BTreeMap<String, (usize, TensorInfo)>,
    tied: bool,
    /// Range reads come from the mapped pages, not `pread` ([`Checkpoint::read_mapped`]).
    mapped_reads: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Checkpoint({}, {} tensors)",
            self.label,
            self.entries.len()
        )
    }
}

/// Name of the output embedding that tied models omit.
pub const LM_HEAD: &str = "lm_head.weight";
/// Name of the input embedding that tied models share with the head.
const TIED_SOURCES: [&str; 3] = [
    "model.embed_tokens.weight",
    "shared.weight",
    "transformer.wte.weight",
];

impl Checkpoint {
    /// Open a local directory.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                hint: Some("model directory".into()),
            });
        }
        Self::open(&ModelFiles::local(
            ModelRef::new(dir.display().to_string()),
            dir.to_path_buf(),
        ))
    }

    /// Open the weights of a resolved model, fetching only the files the layout needs.
    pub fn open(files: &ModelFiles) -> Result<Self> {
        let label = files.describe();
        let config = files.json("config.json")?;
        let mut shard_paths: Option<Vec<PathBuf>> = None;
        for (index, single) in LAYOUTS {
            if let Some(index_path) = files.get(index)? {
                let names = index_shards(&index_path)?;
                let mut paths = Vec::new();
                for name in names {
                    paths.push(files.get(&name)?.ok_or_else(|| Error::MissingFile {
                        path: index_path.with_file_name(&name),
                        hint: Some(format!("listed in {index}")),
                    })?);
                }
                shard_paths = Some(paths);
                break;
            }
            if let Some(path) = files.get(single)? {
                shard_paths = Some(vec![path]);
                break;
            }
        }
        let shard_paths = shard_paths.ok_or_else(|| Error::MissingFile {
            path: files
                .local_dir()
                .map_or_else(|| PathBuf::from(&label), Path::to_path_buf)
                .join("model.safetensors"),
            hint: Some(
                "no model.safetensors, model.safetensors.index.json, pytorch_model.bin or \
                 pytorch_model.bin.index.json"
                    .into(),
            ),
        })?;
        let shards = shard_paths
            .iter()
            .map(|p| open_shard(p))
            .collect::<Result<Vec<_>>>()?;
        Self::from_shards(label, files.clone(), config, shards)
    }

    /// Open one weights file (a `.safetensors` or a `.bin`) as a checkpoint of its own.
    pub fn open_file(path: &Path, files: &ModelFiles) -> Result<Self> {
        let shard = open_shard(path)?;
        Self::from_shards(path.display().to_string(), files.clone(), None, vec![shard])
    }

    fn from_shards(
        label: String,
        files: ModelFiles,
        config: Option<serde_json::Value>,
        shards: Vec<Box<dyn Shard>>,
    ) -> Result<Self> {
        let mut entries = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for (name, info) in shard.infos() {
                if let Some((j, _)) = entries.insert(name.clone(), (i, info)) {
                    return Err(Error::corrupt(
                        shard.path().to_path_buf(),
                        format!("tensor `{name}` is also in {}", shards[j].path().display()),
                    ));
                }
            }
        }
        // transformers ties unless the config says otherwise (Llama sets it false by default,
        // and writes it when true); the head is only aliased when it is absent.
        let tied = config
            .as_ref()
            .and_then(|c| c.get("tie_word_embeddings"))
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        Ok(Checkpoint {
            label,
            files,
            config,
            shards,
            entries,
            tied,
            mapped_reads: Default::default(),
        })
    }

    /// Whether range reads ([`Checkpoint::mapped`]) come from the file's mapped pages instead
    /// of `pread`. For a process that reads the same tensors over and over (a search's
    /// merges): after the first read the pages stay mapped, so a read is a conversion, not a
    /// copy out of the page cache by the kernel. The mapped pages count in the resident set
    /// (they are the page cache's, reclaimable); a one-off merge keeps `pread` (the default),
    /// which maps nothing.
    ///
    /// Turning it on maps the files' pages at once (one call each, not a fault per page in the
    /// next merge).
    pub fn read_mapped(&self, on: bool) {
        self.mapped_reads
            .store(on, std::sync::atomic::Ordering::Relaxed);
        if on {
            for shard in &self.shards {
                shard.populate();
            }
        }
    }

    /// The parsed `config.json`, if the model has one.
    pub fn config(&self) -> Option<&serde_json::Value> {
        self.config.as_ref()
    }

    /// The files this checkpoint was opened from.
    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    /// Whether the output embedding is the input embedding.
    pub fn tie_word_embeddings(&self) -> bool {
        self.tied && !self.entries.contains_key(LM_HEAD)
    }

    /// Tensor names stored in the checkpoint, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Number of stored tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the checkpoint stores no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The stored name a requested name reads from (the embedding for a tied head).
    fn resolve<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if self.entries.contains_key(name) {
            return Some(name);
        }
        if name == LM_HEAD && self.tie_word_embeddings() {
            return TIED_SOURCES
                .into_iter()
                .find(|s| self.entries.contains_key(*s));
        }
        None
    }

    /// Whether `name` can be read (stored, or the tied head).
    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// Shape and dtype of `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.resolve(name).map(|n| &self.entries[n].1)
    }

    /// Read `name` in its storage dtype, on the CPU.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let stored = self.resolve(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_string(),
            model: self.label.clone(),
        })?;
        let (shard, _) = &self.entries[stored];
        self.shards[*shard].load(stored)
    }

    /// `name` in its memory-mapped file, for reading a range at a time, when it is a floating
    /// tensor in a safetensors file (`None` for `.bin` checkpoints and other dtypes).
    pub fn mapped(&self, name: &str) -> Option<MappedTensor<'_>> {
        let stored = self.resolve(name)?;
        let (shard, info) = &self.entries[stored];
        if !MappedTensor::readable(info.dtype) {
            return None;
        }
        let mut m = self.shards[*shard].mapped(stored)?;
        m.from_map = self.mapped_reads.load(std::sync::atomic::Ordering::Relaxed);
        Some(m)
    }

    /// Read `name` as f32 on `device` (merges always compute in f32).
    pub fn load_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        if let Some(m) = self.mapped(name) {
            // Straight from the mapped bytes into one f32 buffer, in parallel.
            use rayon::prelude::*;
            let shape = self.info(name).expect("mapped").shape.clone();
            let mut data = vec![0f32; m.len()];
            const CHUNK: usize = 1 << 20;
            data.par_chunks_mut(CHUNK)
                .enumerate()
                .try_for_each(|(c, out)| m.read_f32(c * CHUNK, out))
                .map_err(|e| Error::io(m.path, e))?;
            return Tensor::from_vec(data, shape, &Device::Cpu)
                .and_then(|t| t.to_device(device))
                .map_err(|e| Error::tensor(name, e));
        }
        self.load(name)?
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(device))
            .map_err(|e| Error::tensor(name, e))
    }

    /// The most common floating dtype of the stored tensors (the model's storage dtype).
    pub fn storage_dtype(&self) -> DType {
        let mut counts: BTreeMap<&'static str, (usize, DType)> = BTreeMap::new();
        for (_, info) in self.entries.values() {
            if info.dtype.is_float() {
                counts
                    .entry(info.dtype.as_str())
                    .or_insert((0, info.dtype))
                    .0 += info.numel();
            }
        }
        counts
            .into_values()
            .max_by_key(|(n, _)| *n)
            .map(|(_, d)| d)
            .unwrap_or(DType::F32)
    }

    /// The weight files, for hashing and plans.
    pub fn weight_files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path()).collect()
    }
}

/// The shard file names of an index file, in first-appearance order.
fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let corrupt = |message: String| Error::Corrupt {
        path: index.to_path_buf(),
        message,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| corrupt("no `weight_map` object".into()))?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| corrupt(format!("`weight_map.{tensor}` is not a file name")))?;
        if file.contains("..") || file.starts_with('/') {
            return Err(corrupt(format!(
                "shard name `{file}` leaves the model directory"
            )));
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    shards.sort();
    Ok(shards)
}
