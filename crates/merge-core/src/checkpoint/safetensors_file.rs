//! One memory-mapped `.safetensors` file.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use memmap2::{Mmap, UncheckedAdvice};

use super::{dtype_from_safetensors, TensorInfo};
use crate::error::{Error, Result};

pub(super) struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// Start of the data section (8 + header length).
    data_start: usize,
    tensors: Vec<(String, TensorInfo, usize, usize)>,
}

impl SafetensorsFile {
    pub(super) fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; checkpoints are not modified while a merge
        // reads them (the same assumption every safetensors loader makes).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let corrupt = |message: String| Error::Corrupt {
            path: path.to_path_buf(),
            message,
        };
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| corrupt(format!("not a valid safetensors file: {e}")))?;
        let mut tensors = Vec::new();
        for (name, info) in metadata.tensors() {
            let dtype = dtype_from_safetensors(info.dtype).ok_or_else(|| {
                corrupt(format!(
                    "tensor `{name}` has unsupported dtype {:?}",
                    info.dtype
                ))
            })?;
            let (start, end) = info.data_offsets;
            tensors.push((
                name,
                TensorInfo {
                    shape: info.shape.clone(),
                    dtype,
                },
                start,
                end,
            ));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn infos(&self) -> Vec<(String, TensorInfo)> {
        self.tensors
            .iter()
            .map(|(n, i, _, _)| (n.clone(), i.clone()))
            .collect()
    }

    pub(super) fn load(&self, name: &str) -> Result<Tensor> {
        let idx = self
            .tensors
            .binary_search_by(|t| t.0.as_str().cmp(name))
            .map_err(|_| Error::MissingTensor {
                tensor: name.to_string(),
                model: self.path.display().to_string(),
            })?;
        let (_, info, start, end) = &self.tensors[idx];
        let (start, end) = (self.data_start + start, self.data_start + end);
        let tensor = Tensor::from_raw_buffer(
            &self.mmap[start..end],
            info.dtype,
            &info.shape,
            &Device::Cpu,
        )
        .map_err(|e| Error::tensor(name, e))?;
        // The bytes are copied into the tensor: drop the mapped pages so the resident set stays
        // at the tensors in flight, not the whole model. Page-align the range inwards; the
        // kernel reads the pages back from the page cache if they are needed again.
        let page = 4096;
        let aligned_start = start.div_ceil(page) * page;
        let aligned_end = end / page * page;
        if aligned_end > aligned_start {
            // SAFETY: the mapping is read-only and file-backed; after MADV_DONTNEED the pages
            // are re-read from the file on access, so no data visible to Rust changes.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    UncheckedAdvice::DontNeed,
                    aligned_start,
                    aligned_end - aligned_start,
                )
            };
        }
        Ok(tensor)
    }
}
