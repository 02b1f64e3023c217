//! One PyTorch `.bin` file (zip archive with a pickled state dict), read lazily per tensor.

use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::Tensor;

use super::TensorInfo;
use crate::error::{Error, Result};

pub(super) struct PthFile {
    path: PathBuf,
    tensors: PthTensors,
}

impl PthFile {
    pub(super) fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: None,
            });
        }
        let tensors = PthTensors::new(path, None).map_err(|e| {
            Error::corrupt(
                path.to_path_buf(),
                format!("not a readable PyTorch checkpoint (zip pickle): {e}"),
            )
        })?;
        Ok(PthFile {
            path: path.to_path_buf(),
            tensors,
        })
    }
}

impl super::Shard for PthFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn infos(&self) -> Vec<(String, TensorInfo)> {
        self.tensors
            .tensor_infos()
            .iter()
            .map(|(name, info)| {
                (
                    name.clone(),
                    TensorInfo {
                        shape: info.layout.shape().dims().to_vec(),
                        dtype: info.dtype,
                    },
                )
            })
            .collect()
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .map_err(|e| Error::corrupt(self.path.clone(), format!("tensor `{name}`: {e}")))?
            .ok_or_else(|| Error::MissingTensor {
                tensor: name.to_string(),
                model: self.path.display().to_string(),
            })
    }
}
