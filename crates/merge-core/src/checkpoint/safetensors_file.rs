//! One memory-mapped `.safetensors` file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use super::{MappedTensor, TensorInfo};
use crate::error::{Error, Result};

pub(super) struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// The open file, for reading ranges with `pread`.
    file: std::fs::File,
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
            let dtype = DType::try_from(info.dtype).map_err(|_| {
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
            file,
            data_start: 8 + header_len,
            tensors,
        })
    }

    /// The byte range of `name` in the file, and its info.
    fn locate(&self, name: &str) -> Result<(&TensorInfo, usize, usize)> {
        let idx = self
            .tensors
            .binary_search_by(|t| t.0.as_str().cmp(name))
            .map_err(|_| Error::MissingTensor {
                tensor: name.to_string(),
                model: self.path.display().to_string(),
            })?;
        let (_, info, start, end) = &self.tensors[idx];
        Ok((info, self.data_start + start, self.data_start + end))
    }
}

impl super::Shard for SafetensorsFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn infos(&self) -> Vec<(String, TensorInfo)> {
        self.tensors
            .iter()
            .map(|(n, i, _, _)| (n.clone(), i.clone()))
            .collect()
    }

    /// `name`'s bytes, still in the mapped file, for reading a range at a time.
    fn mapped(&self, name: &str) -> Option<MappedTensor<'_>> {
        let (info, start, end) = self.locate(name).ok()?;
        Some(MappedTensor {
            file: &self.file,
            path: &self.path,
            start,
            end,
            dtype: info.dtype,
            map: &self.mmap,
            from_map: false,
        })
    }

    fn populate(&self) {
        // A hint: kernels before 5.14 refuse it, and the pages then fault in as they are read.
        #[cfg(target_os = "linux")]
        let _ = self.mmap.advise(memmap2::Advice::PopulateRead);
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        let (info, start, end) = self.locate(name)?;
        let tensor = Tensor::from_raw_buffer(
            &self.mmap[start..end],
            info.dtype,
            &info.shape,
            &Device::Cpu,
        )
        .map_err(|e| Error::tensor(name, e))?;
        // The bytes are copied into the tensor: drop the mapped pages so the resident set stays
        // at the tensors in flight, not the whole model.
        super::mapped::drop_pages(&self.mmap, start, end);
        Ok(tensor)
    }
}
