//! One PyTorch `.bin` file (zip archive with a pickled state dict), read lazily per tensor
//! through `pth-reader`, which treats the file as untrusted (no code run, every size checked
//! against the bytes that back it).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use pth_reader::{Archive, Dtype};

use super::TensorInfo;
use crate::error::{Error, Result};

type FileArchive = Archive<std::io::BufReader<std::fs::File>>;

pub(super) struct PthFile {
    path: PathBuf,
    archive: Mutex<FileArchive>,
}

fn dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::U8 | Dtype::Bool => DType::U8,
        Dtype::I8 => return None,
    })
}

impl PthFile {
    pub(super) fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: None,
            });
        }
        let corrupt = |m: String| Error::corrupt(path.to_path_buf(), m);
        let archive = Archive::open(path).map_err(|e| corrupt(e.to_string()))?;
        if let Some((name, t)) = archive
            .tensors()
            .iter()
            .find(|(_, t)| dtype(t.dtype).is_none())
        {
            return Err(corrupt(format!(
                "tensor `{name}` has unsupported dtype {:?}",
                t.dtype
            )));
        }
        Ok(PthFile {
            path: path.to_path_buf(),
            archive: Mutex::new(archive),
        })
    }
}

impl super::Shard for PthFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn infos(&self) -> Vec<(String, TensorInfo)> {
        let archive = self.archive.lock().expect("not poisoned");
        let info = |t: &pth_reader::TensorInfo| TensorInfo {
            shape: t.shape.clone(),
            dtype: dtype(t.dtype).expect("checked at open"),
        };
        archive
            .tensors()
            .iter()
            .map(|(n, t)| (n.clone(), info(t)))
            .collect()
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        let mut archive = self.archive.lock().expect("not poisoned");
        let corrupt =
            |m: String| Error::corrupt(self.path.clone(), format!("tensor `{name}`: {m}"));
        let bytes = archive.read(name).map_err(|e| corrupt(e.to_string()))?;
        let (Some(bytes), Some(t)) = (bytes, archive.tensors().get(name)) else {
            return Err(Error::MissingTensor {
                tensor: name.to_string(),
                model: self.path.display().to_string(),
            });
        };
        let dtype = dtype(t.dtype).expect("checked at open");
        Tensor::from_raw_buffer(&bytes, dtype, &t.shape, &Device::Cpu)
            .map_err(|e| Error::tensor(name, e))
    }
}
