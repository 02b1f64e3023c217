//! Linear layers with weights stored transposed (`[in, out]`, contiguous): candle's CPU matmul
//! runs measurably faster on a contiguous right-hand side than on the transposed view of HF's
//! `[out, in]` layout (about 15% on prompt-sized inputs on the development machine).
//!
//! Inputs of a few rows (decoding batches, choice tokens) on the CPU in f32 go through
//! [`panel_matmul`] over a second copy of the weights packed in 16-column panels, made the
//! first time such an input comes: candle's gemm repacks the weights on every call and runs far
//! below the memory bandwidth for so few rows (a quarter of the panel kernel's speed at 16 rows
//! on the development machine). The copy doubles the weights' memory, which only CPU f32
//! evaluation pays.

use std::sync::OnceLock;

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// `y = x·W^T + b` with `W^T` kept contiguous.
pub struct Lin {
    wt: Tensor,
    bias: Option<Tensor>,
    inp: usize,
    out: usize,
    /// `W^T` in [`PANEL`]-column panels for [`panel_matmul`]; `None` inside where the weights
    /// are not f32 on the CPU.
    panels: OnceLock<Option<Vec<f32>>>,
}

impl Lin {
    /// From HF's `[out, in]` weight (transposed once here) and optional `[out]` bias.
    pub fn new(w: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        Ok(Lin {
            wt: transposed(&w)?,
            bias,
            inp,
            out,
            panels: OnceLock::new(),
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

    /// [`panel_matmul`] where it applies: f32 on the CPU, at most [`SMALL_ROWS`] rows.
    fn small(&self, x: &Tensor, rows: usize) -> Result<Option<Tensor>> {
        if rows == 0 || rows > SMALL_ROWS || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Ok(None);
        }
        let Some(panels) = self.panels.get_or_init(|| self.pack().ok().flatten()) else {
            return Ok(None);
        };
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        Ok(panel_matmul(&xs, panels, rows, self.inp, self.out)
            .map(|y| Tensor::from_vec(y, (rows, self.out), &Device::Cpu))
            .transpose()?)
    }

    /// The panel copy of `W^T`, or `None` where it is not f32 on the CPU.
    fn pack(&self) -> Result<Option<Vec<f32>>> {
        if self.inp == 0 || self.out == 0 {
            return Ok(None);
        }
        with_cpu_f32(&self.wt, |wt| pack_panels(wt, self.inp, self.out))
    }
}

/// `w` (`[rows, cols]`) transposed into a new contiguous tensor. On the CPU in f32 in parallel
/// square blocks: candle's strided copy walks the source column by column on one thread and
/// took a fifth of a model's load time.
fn transposed(w: &Tensor) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    const B: usize = 32;
    let blocked = with_cpu_f32(w, |src| {
        let mut dst = vec![0f32; rows * cols];
        // Each task writes B rows of the result from B columns of every source row.
        dst.par_chunks_mut((B * rows).max(1))
            .enumerate()
            .for_each(|(cb, out)| {
                let c0 = cb * B;
                let cn = out.len() / rows.max(1);
                for r in 0..rows {
                    for (c, &x) in src[r * cols + c0..r * cols + c0 + cn].iter().enumerate() {
                        out[c * rows + r] = x;
                    }
                }
            });
        dst
    })?;
    match blocked {
        Some(dst) => Ok(Tensor::from_vec(dst, (cols, rows), w.device())?),
        None => Ok(w.t()?.contiguous()?),
    }
}

/// `f` on the elements of `t` where it is a contiguous f32 tensor on the CPU (borrowed, not
/// copied); `None` otherwise.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    if t.dtype() != DType::F32 {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    Ok(Some(f(&cpu.as_slice::<f32>()?[start..end])))
}

/// Rows up to which [`panel_matmul`] is used instead of candle's gemm.
pub const SMALL_ROWS: usize = 32;

/// Columns per panel: two AVX registers.
const PANEL: usize = 16;
/// Most rows of `x` per register tile (6 rows × 16 columns = 12 accumulators).
const ROW_TILE: usize = 6;

/// `W^T` (`[k, n]`, row-major) rearranged as `[n/16][k][16]` (the last panel zero-filled past
/// `n`): each panel is one contiguous stream for [`panel_matmul`].
pub fn pack_panels(wt: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert_eq!(wt.len(), k * n);
    if k == 0 {
        return Vec::new();
    }
    let mut packed = vec![0f32; n.div_ceil(PANEL) * k * PANEL];
    packed
        .par_chunks_mut(k * PANEL)
        .enumerate()
        .for_each(|(p, panel)| {
            let (c0, c1) = (p * PANEL, ((p + 1) * PANEL).min(n));
            for (kk, dst) in panel.chunks_exact_mut(PANEL).enumerate() {
                dst[..c1 - c0].copy_from_slice(&wt[kk * n + c0..kk * n + c1]);
            }
        });
    packed
}

/// `y = x·W^T` for a few rows of `x` (`[m, k]`, row-major) against `W^T` packed by
/// [`pack_panels`], on AVX2+FMA x86-64: `None` where those instructions are missing. Each panel
/// streams from memory once and then feeds every row tile from cache; the accumulators stay in
/// registers over all of `k`. Every output element is summed over the input features in order
/// with fused multiply-adds, whatever `m` is, so a row's result does not depend on the batch
/// it is in.
pub fn panel_matmul(x: &[f32], packed: &[f32], m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            assert_eq!(x.len(), m * k);
            assert_eq!(packed.len(), n.div_ceil(PANEL) * k * PANEL);
            if m == 0 || n == 0 {
                return Some(Vec::new());
            }
            // `x` transposed (`[k, m]`) so the values broadcast at one step are adjacent.
            let mut xt = vec![0f32; k * m];
            for (r, row) in x.chunks_exact(k.max(1)).enumerate() {
                for (kk, &v) in row.iter().enumerate() {
                    xt[kk * m + r] = v;
                }
            }
            // Output panel by panel (`[n/16][m][16]`), each written by one task.
            let mut yp = vec![0f32; n.div_ceil(PANEL) * m * PANEL];
            let per_task = n
                .div_ceil(PANEL)
                .div_ceil(rayon::current_num_threads().max(1));
            yp.par_chunks_mut(per_task.max(1) * m * PANEL)
                .enumerate()
                .for_each(|(t, out)| {
                    for (i, y) in out.chunks_exact_mut(m * PANEL).enumerate() {
                        let p = t * per_task + i;
                        let w = &packed[p * k * PANEL..(p + 1) * k * PANEL];
                        // Safety: AVX2 and FMA were detected above.
                        unsafe { panel_rows(&xt, w, y, m, k) };
                    }
                });
            let mut y = vec![0f32; m * n];
            for (p, panel) in yp.chunks_exact(m * PANEL).enumerate() {
                let (c0, c1) = (p * PANEL, ((p + 1) * PANEL).min(n));
                for (r, row) in panel.chunks_exact(PANEL).enumerate() {
                    y[r * n + c0..r * n + c1].copy_from_slice(&row[..c1 - c0]);
                }
            }
            return Some(y);
        }
    }
    let _ = (x, packed, m, k, n);
    None
}

/// One panel's output (`[m][16]`) for all rows, in near-equal tiles of up to [`ROW_TILE`] rows
/// (16 rows: 6 + 5 + 5).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_rows(xt: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize) {
    let tiles = m.div_ceil(ROW_TILE);
    let mut r0 = 0;
    for t in 0..tiles {
        let rows = m / tiles + usize::from(t < m % tiles);
        let out = &mut y[r0 * PANEL..(r0 + rows) * PANEL];
        match rows {
            6 => tile::<6>(xt, w, out, m, k, r0),
            5 => tile::<5>(xt, w, out, m, k, r0),
            4 => tile::<4>(xt, w, out, m, k, r0),
            3 => tile::<3>(xt, w, out, m, k, r0),
            2 => tile::<2>(xt, w, out, m, k, r0),
            _ => tile::<1>(xt, w, out, m, k, r0),
        }
        r0 += rows;
    }
}

/// `y[0..R][0..16] = x[r0..r0+R, ..] · panel`, the sums in registers over all `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize>(
    xt: &[f32],
    w: &[f32],
    y: &mut [f32],
    m: usize,
    k: usize,
    r0: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(w.len() == k * PANEL && y.len() == R * PANEL && xt.len() >= k * m);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut xp = xt.as_ptr().add(r0);
    let mut wp = w.as_ptr();
    for _ in 0..k {
        let (w0, w1) = (_mm256_loadu_ps(wp), _mm256_loadu_ps(wp.add(8)));
        for (i, a) in acc.iter_mut().enumerate() {
            let xb = _mm256_broadcast_ss(&*xp.add(i));
            a[0] = _mm256_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm256_fmadd_ps(xb, w1, a[1]);
        }
        xp = xp.add(m);
        wp = wp.add(PANEL);
    }
    for (i, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(y.as_mut_ptr().add(i * PANEL), a[0]);
        _mm256_storeu_ps(y.as_mut_ptr().add(i * PANEL + 8), a[1]);
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_rows_product_does_not_depend_on_its_batch() {
        // 93 columns: five full panels and a partial one.
        let (k, n) = (300, 93);
        let mut s = 7u32;
        let mut rnd = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / 16_777_216.0 - 0.5
        };
        let wt: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
        let x: Vec<f32> = (0..SMALL_ROWS * k).map(|_| rnd()).collect();
        let packed = pack_panels(&wt, k, n);
        let Some(all) = panel_matmul(&x, &packed, SMALL_ROWS, k, n) else {
            // Without AVX2/FMA the kernel declines and candle's matmul is used instead.
            assert!(!std::arch::is_x86_feature_detected!("fma"));
            return;
        };
        for m in 1..=SMALL_ROWS {
            let part = panel_matmul(&x[..m * k], &packed, m, k, n).unwrap();
            for (i, (a, b)) in part.iter().zip(&all).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "batch of {m}: element {i}");
            }
        }
        for r in 0..SMALL_ROWS {
            for c in 0..n {
                let exact: f64 = (0..k)
                    .map(|kk| x[r * k + kk] as f64 * wt[kk * n + c] as f64)
                    .sum();
                assert!((all[r * n + c] as f64 - exact).abs() < 1e-4, "({r}, {c})");
            }
        }
    }
}
