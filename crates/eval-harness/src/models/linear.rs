//! Linear layers with weights stored transposed (`[in, out]`, contiguous): candle's CPU matmul
//! runs measurably faster on a contiguous right-hand side than on the transposed view of HF's
//! `[out, in]` layout (about 15% on prompt-sized inputs on the development machine).
//!
//! Inputs of a few rows (decoding batches) on the CPU in f32 go through [`small_matmul`], which
//! streams the weights once instead of packing them as gemm does; everything else through
//! candle's matmul.

use candle_core::{DType, Device, Storage, Tensor};

use crate::error::Result;

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

    /// Several bias-free layers over the same input as one (HF `[out_i, in]` weights, outputs
    /// side by side in the given order): one product instead of several smaller ones.
    pub fn stacked(ws: &[Tensor]) -> Result<Self> {
        Self::new(Tensor::cat(ws, 0)?, None)
    }

    /// Applies the layer to `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, self.inp))?;
        let y = match self.small(&x2, rows)? {
            Some(y) => y,
            None => x2.matmul(&self.wt)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out;
        Ok(y.reshape(out_dims)?)
    }

    /// [`small_matmul`] where it applies: f32 on the CPU, at most [`SMALL_ROWS`] rows.
    fn small(&self, x: &Tensor, rows: usize) -> Result<Option<Tensor>> {
        if rows > SMALL_ROWS || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Ok(None);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let (storage, layout) = self.wt.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        let wt = &cpu.as_slice::<f32>()?[start..end];
        Ok(small_matmul(&xs, wt, rows, self.inp, self.out)
            .map(|y| Tensor::from_vec(y, (rows, self.out), &Device::Cpu))
            .transpose()?)
    }
}

/// Rows up to which [`small_matmul`] is used instead of candle's gemm (decoding batches).
pub const SMALL_ROWS: usize = 12;

/// Rows of `x` handled together by one kernel call.
const ROW_BLOCK: usize = 4;
/// Rows of `W^T` (input features) accumulated between loads and stores of the output tile.
const K_BLOCK: usize = 8;

/// `y = x·W^T` for a few rows of `x` (`[m, k]`, row-major) against `W^T` (`[k, n]`, row-major),
/// on AVX2+FMA x86-64: `None` where those instructions are missing. The weights stream from
/// memory once, row after row, each element feeding every row of `x`; candle's gemm packs them
/// first and runs well below the memory bandwidth for so few rows.
pub fn small_matmul(x: &[f32], wt: &[f32], m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            assert_eq!(x.len(), m * k);
            assert_eq!(wt.len(), k * n);
            let mut y = vec![0f32; m * n];
            // Column stripes, one per thread, multiples of 16 wide.
            let threads = rayon::current_num_threads().max(1);
            let stripe = n.div_ceil(threads).div_ceil(24) * 24;
            let stripes: Vec<(usize, usize)> = (0..n)
                .step_by(stripe.max(24))
                .map(|c| (c, (c + stripe.max(24)).min(n)))
                .collect();
            let yp = SendPtr(y.as_mut_ptr());
            rayon::scope(|s| {
                for &(c0, c1) in &stripes {
                    let yp = &yp;
                    s.spawn(move |_| unsafe { stripe_kernel(x, wt, yp.0, m, k, n, c0, c1) });
                }
            });
            return Some(y);
        }
    }
    let _ = (x, wt, m, k, n);
    None
}

struct SendPtr(*mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Columns `c0..c1` of `y` (`[m, n]`, zeroed): every thread writes its own columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn stripe_kernel(
    x: &[f32],
    wt: &[f32],
    y: *mut f32,
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
) {
    let mut k0 = 0;
    while k0 < k {
        let kb = K_BLOCK.min(k - k0);
        let g = Geom { k, n, k0, kb };
        let mut c = c0;
        // 24 columns (three registers) per tile where they fit, then 16, then 8.
        while c < c1 {
            let w = c1 - c;
            let step = if w >= 24 {
                rows::<3>(x, wt, y, m, &g, c);
                24
            } else if w >= 16 {
                rows::<2>(x, wt, y, m, &g, c);
                16
            } else if w >= 8 {
                rows::<1>(x, wt, y, m, &g, c);
                8
            } else {
                // Fewer than 8 columns left, plainly.
                for cc in c..c1 {
                    for r in 0..m {
                        let mut acc = *y.add(r * n + cc);
                        for kk in k0..k0 + kb {
                            acc += x[r * k + kk] * wt[kk * n + cc];
                        }
                        *y.add(r * n + cc) = acc;
                    }
                }
                w
            };
            c += step;
        }
        k0 += kb;
    }
}

/// Shape of one pass: `k`, `n` of the product and the block `k0..k0+kb` of input features.
struct Geom {
    k: usize,
    n: usize,
    k0: usize,
    kb: usize,
}

/// All rows for the `8·C` columns at `c`, [`ROW_BLOCK`] rows per tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn rows<const C: usize>(x: &[f32], wt: &[f32], y: *mut f32, m: usize, g: &Geom, c: usize) {
    let mut r = 0;
    while r < m {
        match (m - r).min(ROW_BLOCK) {
            4 => tile::<4, C>(x, wt, y, g, r, c),
            3 => tile::<3, C>(x, wt, y, g, r, c),
            2 => tile::<2, C>(x, wt, y, g, r, c),
            _ => tile::<1, C>(x, wt, y, g, r, c),
        }
        r += ROW_BLOCK;
    }
}

/// `y[r..r+R, c..c+8C] += x[r..r+R, k0..k0+kb] · W^T[k0..k0+kb, c..c+8C]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize, const C: usize>(
    x: &[f32],
    wt: &[f32],
    y: *mut f32,
    g: &Geom,
    r: usize,
    c: usize,
) {
    use std::arch::x86_64::*;
    let (k, n) = (g.k, g.n);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for (i, a) in acc.iter_mut().enumerate() {
        let yr = y.add((r + i) * n + c);
        for (j, v) in a.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(yr.add(8 * j));
        }
    }
    let xp = x.as_ptr();
    let wp = wt.as_ptr();
    for kk in g.k0..g.k0 + g.kb {
        let w = wp.add(kk * n + c);
        let mut wv = [_mm256_setzero_ps(); C];
        for (j, v) in wv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(w.add(8 * j));
        }
        for (i, a) in acc.iter_mut().enumerate() {
            let xb = _mm256_broadcast_ss(&*xp.add((r + i) * k + kk));
            for (j, v) in a.iter_mut().enumerate() {
                *v = _mm256_fmadd_ps(xb, wv[j], *v);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let yr = y.add((r + i) * n + c);
        for (j, v) in a.iter().enumerate() {
            _mm256_storeu_ps(yr.add(8 * j), *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_untransposed_product() {
        let d = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (300, 70), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 300, &d).unwrap();
        let lin = Lin::new(w.clone(), Some(b.clone())).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 70), &d).unwrap();
        let reference = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let y = lin.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 5, 300]);
        let diff: f32 = (&y - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
    }
}
