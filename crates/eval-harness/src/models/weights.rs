//! Where model weights come from, and the one way each lands in a model.
//!
//! Models read their weights through candle's [`VarBuilder`]: [`CheckpointSource`] is its
//! backend over merge-core's checkpoint reader (every layout it reads, a PEFT LoRA adapter
//! optionally folded in), and `VarBuilder::from_tensors` serves tensors held in memory.
//!
//! Every tensor a model holds goes through [`prepare`] — at load and when
//! `LanguageModel::set_weight` replaces it later — so a replaced weight is exactly what loading
//! it would have produced.

use std::path::Path;

use candle_core::{CpuStorage, DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::layer_target::LayerTarget;

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
        let werr = |e: merge_core::Error| Error::Weights(e.to_string());
        let ckpt = merge_core::checkpoint::Checkpoint::open_dir(dir).map_err(werr)?;
        let adapter = match adapter_dir {
            None => None,
            Some(a) => {
                let adapter = merge_core::adapter::Adapter::open_dir(a).map_err(werr)?;
                adapter.check_against(&ckpt).map_err(werr)?;
                Some(adapter)
            }
        };
        Ok(CheckpointSource { ckpt, adapter })
    }

    /// The tensor called `name` as stored (its dtype, on the CPU), the adapter folded in.
    pub fn tensor(&self, name: &str) -> candle_core::Result<Tensor> {
        let err = |e: merge_core::Error| candle_core::Error::Msg(e.to_string());
        if let Some(a) = &self.adapter {
            if let Some(t) = a.apply(&self.ckpt, name, &Device::Cpu).map_err(err)? {
                return Ok(t);
            }
        }
        self.ckpt.load(name).map_err(err)
    }

    /// A [`VarBuilder`] over this source that converts to `dtype` on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for CheckpointSource {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!("tensor `{name}` has shape {:?}, expected {s:?}", t.dims());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }
}

/// The checkpoint name of `name` under `vb`'s prefix.
pub(crate) fn full_name(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Reads `name` (under `vb`'s prefix) from `vb` converted to `dtype` on `vb`'s device.
pub(crate) fn fetch(vb: &VarBuilder, name: &str, dtype: DType) -> Result<Tensor> {
    vb.get_unchecked_dtype(name, dtype)
        .map_err(|e| Error::Weights(e.to_string()))
}

/// A checkpoint tensor as a model holds it: `t` checked against `shape` (an error naming
/// `name`), Gemma's norm weights with the 1 of `(1 + w)` folded in (`fold_one`, in f32 before
/// the conversion), converted to `dtype` on `device`.
pub(crate) fn prepare(
    name: &str,
    t: &Tensor,
    shape: &[usize],
    dtype: DType,
    device: &Device,
    fold_one: bool,
) -> Result<Tensor> {
    if t.dims() != shape {
        return Err(Error::Weights(format!(
            "tensor `{name}` has shape {:?}, config.json implies {shape:?}",
            t.dims()
        )));
    }
    let t = if fold_one {
        (t.to_dtype(DType::F32)? + 1.0)?
    } else {
        t.clone()
    };
    Ok(t.to_dtype(dtype)?.to_device(device)?)
}

/// One checkpoint tensor held whole (norm weights, embeddings, T5's relative position bias).
pub(crate) struct Weight {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
    fold_one: bool,
    tensor: Tensor,
}

impl Weight {
    /// Reads `name` under `vb`'s prefix, kept in `dtype` (see [`prepare`] for `fold_one`).
    pub fn load(
        vb: &VarBuilder,
        name: &str,
        shape: &[usize],
        dtype: DType,
        fold_one: bool,
    ) -> Result<Self> {
        let t = fetch(vb, name, if fold_one { DType::F32 } else { dtype })?;
        let name = full_name(vb, name);
        let device = vb.device().clone();
        Ok(Weight {
            tensor: prepare(&name, &t, shape, dtype, &device, fold_one)?,
            name,
            shape: shape.to_vec(),
            dtype,
            device,
            fold_one,
        })
    }

    /// The checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The in-place target of a 2-D weight kept in f32 on the CPU (an embedding), row-major
    /// as stored; `None` for any other.
    ///
    /// # Safety
    /// As [`crate::LanguageModel::layer_targets`]: the target writes into this weight's
    /// tensor, which nothing may use (or replace) while it is alive and which must be written
    /// whole through it.
    pub unsafe fn layer_target(&mut self) -> Option<(String, LayerTarget)> {
        let &[rows, cols] = self.shape.as_slice() else {
            return None;
        };
        if self.fold_one || rows == 0 || cols == 0 {
            return None;
        }
        let at = storage_ptr(&self.tensor)?;
        Some((self.name.clone(), LayerTarget::row_major(at, rows, cols)))
    }

    /// Replaces the tensor when `name` is this weight's; `Ok(false)` otherwise.
    pub fn set(&mut self, name: &str, t: &Tensor) -> Result<bool> {
        if name != self.name {
            return Ok(false);
        }
        self.tensor = prepare(
            &self.name,
            t,
            &self.shape,
            self.dtype,
            &self.device,
            self.fold_one,
        )?;
        Ok(true)
    }
}

/// A pointer to the elements of `t` (a contiguous f32 CPU tensor, else `None`), taken under
/// its storage's write lock so that writing through it later — while nothing else uses the
/// tensor — is a write the storage allows.
pub(crate) fn storage_ptr(t: &Tensor) -> Option<*mut f32> {
    struct Ptr(std::cell::Cell<Option<*mut f32>>);
    impl candle_core::InplaceOp1 for Ptr {
        fn name(&self) -> &'static str {
            "storage-pointer"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &candle_core::Layout) -> candle_core::Result<()> {
            if let (CpuStorage::F32(v), Some((start, end))) = (s, l.contiguous_offsets()) {
                self.0.set(Some(v[start..end].as_mut_ptr()));
            }
            Ok(())
        }
    }
    let p = Ptr(std::cell::Cell::new(None));
    if t.dtype() != DType::F32 || !t.device().is_cpu() || !t.is_contiguous() {
        return None;
    }
    t.inplace_op1(&p).ok()?;
    p.0.get()
}
