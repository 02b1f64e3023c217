//! Linear layers with weights stored transposed (`[in, out]`, contiguous).
//!
//! Large inputs (prompt prefill) go through candle's matmul, which runs faster on a contiguous
//! right-hand side than on the transposed view of HF's `[out, in]` layout. Inputs with few rows
//! (one token per sequence while decoding) are memory-bound: a dedicated kernel streams the
//! weights once and updates every row from each weight row. Its summation order does not depend
//! on the number of rows, so a sequence decodes to the same numbers alone or in a batch.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// At most this many input rows use the streaming kernel.
const SMALL_ROWS: usize = 32;
/// Output columns per parallel task of the streaming kernel (its accumulators stay in L1).
const BLOCK: usize = 256;

/// `y = x·W^T + b` with `W^T` kept contiguous.
pub struct Lin {
    wt: Tensor,
    bias: Option<Tensor>,
    inp: usize,
    out: usize,
}

impl Lin {
    /// From HF's `[out, in]` weight (transposed once here) and optional `[out]` bias.
    pub fn new(w: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        Ok(Lin {
            wt: w.t()?.contiguous()?,
            bias,
            inp,
            out,
        })
    }

    /// Applies the layer to `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, self.inp))?;
        let y =
            if rows <= SMALL_ROWS && x.dtype() == DType::F32 && matches!(x.device(), Device::Cpu) {
                self.small(&x2.contiguous()?, rows)?
            } else {
                x2.matmul(&self.wt)?
            };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out;
        Ok(y.reshape(out_dims)?)
    }

    fn small(&self, x: &Tensor, rows: usize) -> Result<Tensor> {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = self.wt.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else {
            return Err(Error::Msg("small-row linear expects CPU tensors".into()));
        };
        let xv = &xs.as_slice::<f32>()?[xl.start_offset()..xl.start_offset() + rows * self.inp];
        let wv = &ws.as_slice::<f32>()?[wl.start_offset()..wl.start_offset() + self.inp * self.out];
        let y = stream_matmul(xv, rows, wv, self.inp, self.out);
        Ok(Tensor::from_vec(y, (rows, self.out), x.device())?)
    }
}

/// `y[r, c] = Σ_i x[r, i] · wt[i, c]`, summing over `i` in order, parallel over column blocks.
fn stream_matmul(x: &[f32], rows: usize, wt: &[f32], inp: usize, out: usize) -> Vec<f32> {
    let blocks: Vec<Vec<f32>> = (0..out.div_ceil(BLOCK))
        .into_par_iter()
        .map(|bi| {
            let c0 = bi * BLOCK;
            let w = BLOCK.min(out - c0);
            let mut acc = vec![0f32; rows * w];
            block(x, rows, wt, inp, out, c0, w, &mut acc);
            acc
        })
        .collect();
    let mut y = vec![0f32; rows * out];
    for (bi, acc) in blocks.iter().enumerate() {
        let c0 = bi * BLOCK;
        let w = BLOCK.min(out - c0);
        for r in 0..rows {
            y[r * out + c0..r * out + c0 + w].copy_from_slice(&acc[r * w..(r + 1) * w]);
        }
    }
    y
}

#[allow(clippy::too_many_arguments)]
fn block(
    x: &[f32],
    rows: usize,
    wt: &[f32],
    inp: usize,
    out: usize,
    c0: usize,
    w: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { block_fma(x, rows, wt, inp, out, c0, w, acc) };
            return;
        }
    }
    block_generic(x, rows, wt, inp, out, c0, w, acc);
}

#[allow(clippy::too_many_arguments)]
fn block_generic(
    x: &[f32],
    rows: usize,
    wt: &[f32],
    inp: usize,
    out: usize,
    c0: usize,
    w: usize,
    acc: &mut [f32],
) {
    for i in 0..inp {
        let wrow = &wt[i * out + c0..i * out + c0 + w];
        for r in 0..rows {
            let xv = x[r * inp + i];
            for (a, &wv) in acc[r * w..(r + 1) * w].iter_mut().zip(wrow) {
                *a += xv * wv;
            }
        }
    }
}

/// The same loop compiled with AVX2 + FMA (fused multiply-add, vectorised by LLVM).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_fma(
    x: &[f32],
    rows: usize,
    wt: &[f32],
    inp: usize,
    out: usize,
    c0: usize,
    w: usize,
    acc: &mut [f32],
) {
    for i in 0..inp {
        let wrow = &wt[i * out + c0..i * out + c0 + w];
        for r in 0..rows {
            let xv = x[r * inp + i];
            for (a, &wv) in acc[r * w..(r + 1) * w].iter_mut().zip(wrow) {
                *a = xv.mul_add(wv, *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_paths_agree_and_rows_are_independent() {
        let d = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (300, 70), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 300, &d).unwrap();
        let lin = Lin::new(w.clone(), Some(b.clone())).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 70), &d).unwrap();
        let reference = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let small = lin.forward(&x).unwrap();
        let diff: f32 = (&small - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
        // Each row alone gives bit-identical results.
        let alone = lin.forward(&x.narrow(0, 3, 1).unwrap()).unwrap();
        let in_batch = small.narrow(0, 3, 1).unwrap();
        let a: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
        let c: Vec<f32> = in_batch.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, c);
        // Many rows go through matmul.
        let xl = Tensor::randn(0f32, 1.0, (2, 40, 70), &d).unwrap();
        let big = lin.forward(&xl).unwrap();
        assert_eq!(big.dims(), &[2, 40, 300]);
    }
}
