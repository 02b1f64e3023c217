//! f32 slice helpers shared by the methods, the streaming engine and the writer: merges
//! compute in f32 on plain slices, whatever the tensors' storage.

use candle_core::{DType, Result, Storage, StorageRef, Tensor};

/// Elements per parallel chunk for elementwise loops within one tensor: large enough that
/// rayon's overhead vanishes, small enough that a big tensor (an embedding) splits over
/// every core.
pub const CHUNK: usize = 1 << 16;

/// Run `f` on the f32 data of `tensors`, without copying when they are contiguous f32 CPU
/// tensors (the common case: the executor loads every input as f32 on the CPU). Other
/// tensors (another device, a strided view) are copied to host memory first.
pub fn with_f32_slices<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    enum Held<'a> {
        Borrowed(StorageRef<'a>, usize, usize),
        Owned(Vec<f32>),
    }
    let mut held = Vec::with_capacity(tensors.len());
    for t in tensors {
        let (storage, layout) = t.storage_and_layout();
        let borrowed = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(_), Some((start, end))) if t.dtype() == DType::F32 => Some((start, end)),
            _ => None,
        };
        match borrowed {
            Some((start, end)) => held.push(Held::Borrowed(storage, start, end)),
            None => {
                drop(storage);
                held.push(Held::Owned(
                    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                ));
            }
        }
    }
    let mut slices: Vec<&[f32]> = Vec::with_capacity(held.len());
    for h in &held {
        slices.push(match h {
            Held::Borrowed(storage, start, end) => match &**storage {
                Storage::Cpu(c) => &c.as_slice::<f32>()?[*start..*end],
                _ => unreachable!("only CPU storage is borrowed"),
            },
            Held::Owned(v) => v.as_slice(),
        });
    }
    f(&slices)
}

/// A tensor with `like`'s shape and device from f32 data.
pub fn tensor_like(data: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(data, like.shape(), &candle_core::Device::Cpu)?.to_device(like.device())
}
