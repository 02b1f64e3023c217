//! A merge input: a full checkpoint, or a base checkpoint plus a PEFT adapter's delta.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::error::{Error, Result};
use crate::lora::Adapter;

/// The weights one input model contributes.
#[derive(Clone)]
pub enum InputModel {
    /// A full checkpoint.
    Full(Arc<Checkpoint>),
    /// base + ΔW of an adapter: the adapter stands for the model it produces.
    Adapted {
        /// The base the adapter applies to.
        base: Arc<Checkpoint>,
        /// The adapter.
        adapter: Arc<Adapter>,
    },
}

impl std::fmt::Debug for InputModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

impl InputModel {
    /// An adapter over `base`, checked to fit it.
    pub fn adapted(base: Arc<Checkpoint>, adapter: Arc<Adapter>) -> Result<Self> {
        adapter.check_against(&base)?;
        Ok(InputModel::Adapted { base, adapter })
    }

    /// For messages: the checkpoint, or `adapter (over base)`.
    pub fn label(&self) -> String {
        match self {
            InputModel::Full(c) => c.label.clone(),
            InputModel::Adapted { base, adapter } => {
                format!("{} (adapter over {})", adapter.label, base.label)
            }
        }
    }

    /// The checkpoint that holds the full tensors (the base for adapters).
    pub fn checkpoint(&self) -> &Arc<Checkpoint> {
        match self {
            InputModel::Full(c) => c,
            InputModel::Adapted { base, .. } => base,
        }
    }

    /// Whether `name` can be read.
    pub fn contains(&self, name: &str) -> bool {
        self.checkpoint().contains(name)
    }

    /// Shape and storage dtype of `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.checkpoint().info(name)
    }

    /// `name` in f32 on `device`, with the adapter applied.
    pub fn load_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        match self {
            InputModel::Full(c) => c.load_f32(name, device),
            InputModel::Adapted { base, adapter } => {
                if let Some(full) = adapter.replacement(name, device)? {
                    return Ok(full);
                }
                let w = base.load_f32(name, device)?;
                match adapter.delta(name, device)? {
                    Some(d) => (&w + &d).map_err(|e| Error::tensor(name, e)),
                    None => Ok(w),
                }
            }
        }
    }
}
