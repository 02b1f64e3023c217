//! Largest absolute differences, the measure every parity and round-trip test states its
//! tolerance in: between two tensors, two `f32` slices, and two checkpoints tensor by tensor.

use candle_core::{DType, Device, Tensor};
use merge_core::checkpoint::Checkpoint;

/// max |t| over every element of `t` (any shape, any float dtype).
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .and_then(|t| t.abs())
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max |t| of a float tensor")
}

/// max |a − b| over every element; the shapes must match (any float dtype, compared in f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (
        a.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    max_abs(&(a - b).unwrap())
}

/// max |a − b| over two slices of the same length.
pub fn max_abs_diff_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// max |ours − golden| over every tensor `golden` holds, `ours` giving the tensor of a name
/// (as f32); the shapes must match.
pub fn against(golden: &Checkpoint, ours: impl Fn(&str) -> Tensor) -> f32 {
    let mut worst = 0f32;
    for name in golden.names() {
        let b = golden.load_f32(name, &Device::Cpu).unwrap();
        let a = ours(name);
        assert_eq!(a.dims(), b.dims(), "{name}");
        worst = worst.max(max_abs_diff(&a, &b));
    }
    worst
}

/// max |ours − golden| over every tensor, after checking both hold the same names in the same
/// order.
pub fn checkpoints(ours: &Checkpoint, golden: &Checkpoint) -> f32 {
    let ours_names: Vec<&str> = ours.names().collect();
    let golden_names: Vec<&str> = golden.names().collect();
    assert_eq!(ours_names, golden_names, "tensor names differ");
    against(golden, |name| ours.load_f32(name, &Device::Cpu).unwrap())
}
