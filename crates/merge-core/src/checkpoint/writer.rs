//! Writing a merged checkpoint: sharded safetensors with an index, streamed tensor by tensor.
//!
//! The shapes and dtypes of every output tensor are known before any data is computed, so the
//! writer lays out each shard (header and offsets) up front and tensors are written at their
//! offsets as they are finished, in any order and from any thread. Everything goes to a
//! temporary directory beside the target, renamed into place by [`CheckpointWriter::finish`];
//! dropping the writer without finishing removes it, so a failure never leaves a half-written
//! model.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::convert::{encodable, tensor_bytes, with_encoded};
use crate::error::{Error, Result};

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// An output tensor as planned: name, shape and storage dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    /// Tensor name in the output checkpoint.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Output storage dtype.
    pub dtype: DType,
}

impl OutputTensor {
    /// Bytes in storage.
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

struct Slot {
    shard: usize,
    offset: u64,
    len: u64,
    dtype: DType,
    shape: Vec<usize>,
}

/// Streams tensors into a sharded safetensors checkpoint in a temporary directory.
pub struct CheckpointWriter {
    target: PathBuf,
    tmp: tempfile::TempDir,
    shard_names: Vec<String>,
    files: Vec<File>,
    slots: HashMap<String, Slot>,
    written: Mutex<Vec<bool>>,
    order: Vec<String>,
    total_size: u64,
}

/// Removes temporary directories `prefix<pid>-…` in `parent` whose process is gone: a merge
/// killed by a signal cannot clean up after itself, so the next merge to the same target does.
/// Directories of live processes (or whose owner cannot be told) are left alone. Public for
/// the other temporaries a merge writes beside its output (the layer-wise driver's
/// statistics), named the same way: `prefix`, this process's id, `-`.
pub fn remove_abandoned(parent: &Path, prefix: &str) {
    if !cfg!(target_os = "linux") {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(
                    "removed {}, left by an interrupted merge",
                    entry.path().display()
                ),
                Err(e) => tracing::warn!("cannot remove {}: {e}", entry.path().display()),
            }
        }
    }
}

impl CheckpointWriter {
    /// Lay out `tensors` in shards of at most `max_shard_size` bytes (a tensor larger than
    /// that gets a shard of its own) and create the files in a temporary directory beside
    /// `target`. Fails if `target` exists, unless `overwrite`.
    pub fn create(
        target: &Path,
        tensors: &[OutputTensor],
        max_shard_size: u64,
        overwrite: bool,
    ) -> Result<Self> {
        if target.exists() && !overwrite {
            return Err(Error::write(
                target.to_path_buf(),
                "already exists (use --force to replace it)",
            ));
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let stem = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "merged".into());
        let prefix = format!(".{stem}.partial-");
        remove_abandoned(&parent, &prefix);
        // The pid in the name tells a later run whether the writer is still alive.
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{prefix}{}-", std::process::id()))
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;

        // Group tensors into shards in order, like transformers' shard_checkpoint.
        let mut groups: Vec<Vec<&OutputTensor>> = vec![Vec::new()];
        let mut current = 0u64;
        for t in tensors {
            let last = groups.last_mut().expect("one group");
            if !last.is_empty() && current + t.bytes() > max_shard_size {
                groups.push(Vec::new());
                current = 0;
            }
            groups.last_mut().expect("one group").push(t);
            current += t.bytes();
        }
        let n = groups.len();
        let shard_names: Vec<String> = if n == 1 {
            vec!["model.safetensors".into()]
        } else {
            (1..=n)
                .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
                .collect()
        };

        let mut slots = HashMap::new();
        let mut files = Vec::new();
        for (shard, (group, name)) in groups.iter().zip(&shard_names).enumerate() {
            let ShardLayout {
                header,
                data_len,
                offsets,
            } = header_for(group)?;
            let path = tmp.path().join(name);
            let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            let data_start = 8 + header.len() as u64;
            file.set_len(data_start + data_len)
                .map_err(|e| Error::io(&path, e))?;
            let mut prefix = (header.len() as u64).to_le_bytes().to_vec();
            prefix.extend_from_slice(header.as_bytes());
            file.write_all_at(&prefix, 0)
                .map_err(|e| Error::io(&path, e))?;
            for (t, (start, end)) in group.iter().zip(offsets) {
                let prev = slots.insert(
                    t.name.clone(),
                    Slot {
                        shard,
                        offset: data_start + start,
                        len: end - start,
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                    },
                );
                if prev.is_some() {
                    return Err(Error::write(
                        target.to_path_buf(),
                        format!("tensor `{}` planned twice", t.name),
                    ));
                }
            }
            files.push(file);
        }
        Ok(CheckpointWriter {
            target: target.to_path_buf(),
            tmp,
            shard_names,
            files,
            written: Mutex::new(vec![false; tensors.len()]),
            order: tensors.iter().map(|t| t.name.clone()).collect(),
            slots,
            total_size: tensors.iter().map(OutputTensor::bytes).sum(),
        })
    }

    /// The temporary directory, for extra files written before [`CheckpointWriter::finish`].
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Write a small extra file (config, model card) into the output.
    pub fn add_file(&self, name: &str, contents: &[u8]) -> Result<()> {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, contents).map_err(|e| Error::io(&path, e))
    }

    /// Copy a file into the output under `name`.
    pub fn copy_file(&self, from: &Path, name: &str) -> Result<()> {
        let path = self.tmp.path().join(name);
        std::fs::copy(from, &path).map_err(|e| Error::io(from, e))?;
        Ok(())
    }

    fn slot(&self, name: &str) -> Result<&Slot> {
        self.slots.get(name).ok_or_else(|| {
            Error::write(
                self.target.clone(),
                format!("tensor `{name}` was not planned"),
            )
        })
    }

    /// Write one planned tensor (converted to the planned dtype). Safe to call from many
    /// threads at once, for different tensors.
    pub fn write(&self, name: &str, tensor: &Tensor) -> Result<()> {
        let slot = self.slot(name)?;
        if tensor.dims() != slot.shape.as_slice() {
            return Err(Error::write(
                self.target.clone(),
                format!(
                    "tensor `{name}` has shape {:?}, planned {:?}",
                    tensor.dims(),
                    slot.shape
                ),
            ));
        }
        if tensor.dtype() == DType::F32 && encodable(slot.dtype) {
            // Converted and written a chunk at a time, from the tensor's own buffer.
            let data = tensor
                .to_device(&candle_core::Device::Cpu)
                .and_then(|t| t.flatten_all())
                .map_err(|e| Error::tensor(name, e))?;
            let done = crate::tensor::with_f32_slices(&[&data], |s| {
                Ok(s[0]
                    .par_chunks(WRITE_CHUNK)
                    .enumerate()
                    .try_for_each(|(c, chunk)| self.write_f32_range(name, c * WRITE_CHUNK, chunk)))
            })
            .map_err(|e| Error::tensor(name, e))?;
            done?;
            return self.mark_written(name);
        }
        let bytes = tensor_bytes(tensor, slot.dtype).map_err(|e| Error::tensor(name, e))?;
        debug_assert_eq!(bytes.len() as u64, slot.len);
        self.write_bytes(slot, 0, &bytes)?;
        self.mark_written(name)
    }

    fn write_bytes(&self, slot: &Slot, at: u64, bytes: &[u8]) -> Result<()> {
        let path = || self.tmp.path().join(&self.shard_names[slot.shard]);
        if at + bytes.len() as u64 > slot.len {
            return Err(Error::write(path(), "write past the end of a tensor"));
        }
        self.files[slot.shard]
            .write_all_at(bytes, slot.offset + at)
            .map_err(|e| Error::io(path(), e))
    }

    /// Write elements `first .. first + data.len()` of a planned floating-point tensor,
    /// converted to its planned dtype (by [`with_encoded`]). Safe to call from many threads at
    /// once for disjoint ranges; call [`CheckpointWriter::mark_written`] once every range of
    /// the tensor is written.
    pub fn write_f32_range(&self, name: &str, first: usize, data: &[f32]) -> Result<()> {
        let slot = self.slot(name)?;
        if !encodable(slot.dtype) {
            return Err(Error::write(
                self.target.clone(),
                format!(
                    "tensor `{name}` is planned as {:?}, not a float",
                    slot.dtype
                ),
            ));
        }
        let at = (first * slot.dtype.size_in_bytes()) as u64;
        with_encoded(slot.dtype, data, |bytes| self.write_bytes(slot, at, bytes))
    }

    /// Record that every byte of `name` has been written (by [`CheckpointWriter::write_f32_range`]).
    pub fn mark_written(&self, name: &str) -> Result<()> {
        let slot = self.slot(name)?;
        // Start writing the tensor back to disk now, without waiting, so the final fsync in
        // `finish` has little left to do instead of all of the model.
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on an open descriptor; it only schedules writeback.
            unsafe {
                libc::sync_file_range(
                    self.files[slot.shard].as_raw_fd(),
                    slot.offset as libc::off64_t,
                    slot.len as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        let idx = self.order.iter().position(|n| n == name).expect("planned");
        self.written.lock().expect("not poisoned")[idx] = true;
        Ok(())
    }

    /// Check every tensor was written, write the index, and move the directory into place.
    pub fn finish(self) -> Result<PathBuf> {
        let written = self.written.lock().expect("not poisoned").clone();
        if let Some(i) = written.iter().position(|w| !w) {
            return Err(Error::write(
                self.target.clone(),
                format!("tensor `{}` was never written", self.order[i]),
            ));
        }
        for (file, name) in self.files.iter().zip(&self.shard_names) {
            file.sync_all()
                .map_err(|e| Error::io(self.tmp.path().join(name), e))?;
        }
        if self.shard_names.len() > 1 {
            let weight_map: BTreeMap<&str, &str> = self
                .order
                .iter()
                .map(|n| (n.as_str(), self.shard_names[self.slots[n].shard].as_str()))
                .collect();
            let index = serde_json::json!({
                "metadata": { "total_size": self.total_size },
                "weight_map": weight_map,
            });
            self.add_file(
                "model.safetensors.index.json",
                serde_json::to_string_pretty(&index)
                    .expect("serialisable")
                    .as_bytes(),
            )?;
        }
        let tmp_path = self.tmp.keep();
        if self.target.exists() {
            let old = tmp_path.with_extension("old");
            std::fs::rename(&self.target, &old).map_err(|e| Error::io(&self.target, e))?;
            std::fs::rename(&tmp_path, &self.target).map_err(|e| Error::io(&self.target, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else if let Err(e) = std::fs::rename(&tmp_path, &self.target) {
            let _ = std::fs::remove_dir_all(&tmp_path);
            return Err(Error::io(&self.target, e));
        }
        Ok(self.target)
    }
}

/// Elements per chunk when a whole f32 tensor is converted and written in parallel.
const WRITE_CHUNK: usize = 1 << 20;

/// A shard's header text, its data length, and each tensor's (start, end) data offsets.
struct ShardLayout {
    header: String,
    data_len: u64,
    offsets: Vec<(u64, u64)>,
}

fn header_for(group: &[&OutputTensor]) -> Result<ShardLayout> {
    let mut entries = serde_json::Map::new();
    entries.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in group {
        let dtype = safetensors::Dtype::from(t.dtype);
        let end = offset + t.bytes();
        entries.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": format!("{dtype:?}"),
                "shape": t.shape,
                "data_offsets": [offset, end],
            }),
        );
        offsets.push((offset, end));
        offset = end;
    }
    let mut header = serde_json::to_string(&entries).expect("serialisable");
    // The data section must start 8-byte aligned.
    while !(8 + header.len()).is_multiple_of(8) {
        header.push(' ');
    }
    Ok(ShardLayout {
        header,
        data_len: offset,
        offsets,
    })
}
