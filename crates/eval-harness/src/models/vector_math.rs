//! Element-wise maths over f32 slices with AVX2/FMA, for the CPU paths that candle runs one
//! scalar libm call at a time: softmax rows, the tanh-GELU of gated feed-forward layers and
//! log-sum-exp over a vocabulary (on a Flan-T5 evaluation these exponentials were about a fifth
//! of the samples). Each function returns `false`/`None` where AVX2/FMA are missing, and the
//! caller then uses candle's operations. Results are within a few ulp of libm's; every row is
//! computed on its own, so nothing depends on the batch around it.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Whether this CPU runs the functions here.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Softmax of every `cols`-long row of `x`, in place (rows in parallel). `-inf` entries get
/// weight 0; a row of only `-inf` is left as NaN, as candle's softmax leaves it.
pub fn softmax_rows(x: &mut [f32], cols: usize) -> bool {
    if !available() || cols == 0 {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    x.par_chunks_mut(cols).for_each(|row| {
        // SAFETY: AVX2/FMA checked above.
        unsafe { softmax_row(row) }
    });
    true
}

/// The activation of a gated feed-forward layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// SiLU: Llama-family decoders.
    Silu,
    /// tanh-approximated GELU: T5 v1.1 (transformers' `gelu_new`).
    GeluTanh,
}

/// `act(y[.., ..ff]) · y[.., ff..]` for `y` `[.., 2·ff]` (gate and up projections side by side)
/// on the CPU in f32, in one vectorised pass instead of candle's scalar activation and a
/// product; `None` elsewhere (the caller composes candle operations).
pub fn gated_tensor(y: &Tensor, ff: usize, gate: Gate) -> Result<Option<Tensor>> {
    if !y.device().is_cpu() || y.dtype() != DType::F32 {
        return Ok(None);
    }
    let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
    let Some(h) = gated(&v, ff, gate) else {
        return Ok(None);
    };
    let mut dims = y.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = ff;
    Ok(Some(Tensor::from_vec(h, dims, y.device())?))
}

/// `act(y[r, ..ff]) · y[r, ff..2ff]` for every row of `y` (`[rows, 2·ff]`), or `None` without
/// AVX2/FMA.
fn gated(y: &[f32], ff: usize, gate_fn: Gate) -> Option<Vec<f32>> {
    if !available() || ff == 0 || !y.len().is_multiple_of(2 * ff) {
        return None;
    }
    let mut out = vec![0f32; y.len() / 2];
    #[cfg(target_arch = "x86_64")]
    out.par_chunks_mut(ff)
        .zip(y.par_chunks(2 * ff))
        .for_each(|(o, row)| {
            let (gate, up) = row.split_at(ff);
            // SAFETY: AVX2/FMA checked above; `gate`, `up` and `o` are all `ff` long.
            unsafe { gated_row(gate, up, o, gate_fn) }
        });
    Some(out)
}

/// `log_softmax(logits)[row, targets[row]]` for every row of `logits` (`[.., vocab]`), without
/// materialising the log-softmax: one pass for the maximum and one for the sum of exponentials
/// per row (vectorised where the CPU allows), rows in parallel.
pub(crate) fn picked_log_probs(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let flat: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if flat.len() != targets.len() * vocab {
        return Err(Error::Msg(format!(
            "{} targets for {} rows of logits",
            targets.len(),
            flat.len() / vocab.max(1)
        )));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Msg(format!(
            "target id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(flat
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let lse = log_sum_exp(row).unwrap_or_else(|| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln()
            });
            row[t as usize] - lse
        })
        .collect())
}

/// `ln Σ e^x` over `row`, or `None` without AVX2/FMA.
pub fn log_sum_exp(row: &[f32]) -> Option<f32> {
    if !available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX2/FMA checked above.
        Some(unsafe { log_sum_exp_row(row) })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Largest element (`-inf` for an empty row).
fn max_of(row: &[f32]) -> f32 {
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Softmax of one row in place.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row(row: &mut [f32]) {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(max_of(row));
    let mut acc = _mm256_setzero_ps();
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        let e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
        acc = _mm256_add_ps(acc, e);
        _mm256_storeu_ps(c.as_mut_ptr(), e);
    }
    let mut sum = hsum(acc);
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let e = exp8_partial(tail, m);
        for (x, v) in tail.iter_mut().zip(e) {
            *x = v;
            sum += v;
        }
    }
    let inv = _mm256_set1_ps(1.0 / sum);
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        _mm256_storeu_ps(
            c.as_mut_ptr(),
            _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), inv),
        );
    }
    for x in chunks.into_remainder() {
        *x *= 1.0 / sum;
    }
}

/// `ln Σ e^x` over one row.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn log_sum_exp_row(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let max = max_of(row);
    let m = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        acc = _mm256_add_ps(acc, exp_ps(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m)));
    }
    let mut sum = hsum(acc);
    let tail = chunks.remainder();
    if !tail.is_empty() {
        sum += exp8_partial(tail, m)[..tail.len()].iter().sum::<f32>();
    }
    max + sum.ln()
}

/// `act(gate) · up` element by element. Both activations are `x / (1 + e^{-z})`: SiLU with
/// `z = x`; `gelu_new(x) = ½x(1 + tanh u)`, `u = √(2/π)(x + 0.044715x³)`, with `z = 2u` (the
/// same function, without the cancellation of `1 + tanh u` for negative `u`).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `up` and `out` are at least as long as `gate`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gated_row(gate: &[f32], up: &[f32], out: &mut [f32], gate_fn: Gate) {
    use std::arch::x86_64::*;
    let act = |x: __m256| {
        let minus_z = match gate_fn {
            Gate::Silu => _mm256_sub_ps(_mm256_setzero_ps(), x),
            Gate::GeluTanh => {
                let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
                let u = _mm256_fmadd_ps(_mm256_set1_ps(0.044_715), x3, x);
                // -2·√(2/π)·(x + 0.044715x³)
                _mm256_mul_ps(u, _mm256_set1_ps(-1.595_769))
            }
        };
        _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), exp_ps(minus_z)))
    };
    let n = gate.len();
    let mut i = 0;
    while i + 8 <= n {
        let g = act(_mm256_loadu_ps(gate.as_ptr().add(i)));
        let y = _mm256_mul_ps(g, _mm256_loadu_ps(up.as_ptr().add(i)));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
        i += 8;
    }
    if i < n {
        let mut g = [0f32; 8];
        g[..n - i].copy_from_slice(&gate[i..]);
        let mut r = [0f32; 8];
        _mm256_storeu_ps(r.as_mut_ptr(), act(_mm256_loadu_ps(g.as_ptr())));
        for (j, o) in out[i..].iter_mut().enumerate() {
            *o = r[j] * up[i + j];
        }
    }
}

/// `e^(x - m)` for up to 8 values (the tail of a row), through the same vector code.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8_partial(xs: &[f32], m: std::arch::x86_64::__m256) -> [f32; 8] {
    use std::arch::x86_64::*;
    let mut v = [f32::NEG_INFINITY; 8];
    v[..xs.len()].copy_from_slice(xs);
    let mut out = [0f32; 8];
    _mm256_storeu_ps(
        out.as_mut_ptr(),
        exp_ps(_mm256_sub_ps(_mm256_loadu_ps(v.as_ptr()), m)),
    );
    out
}

/// Sum of the eight lanes.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn hsum(x: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// `e^x` lane by lane, within 2 ulp of the exact value for results in the normal range; `-inf`
/// and anything whose result is below the smallest normal float give 0, and inputs above 88
/// are taken as 88 (about 1.7e38).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn exp_ps(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // Below ln(2^-126) the result is not a normal float; softmax weights that small are 0.
    let underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.336_54), _CMP_LT_OQ);
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.336_54)),
        _mm256_set1_ps(88.0),
    );
    // x = n·ln2 + r with |r| ≤ ln2/2; ln2 split in two so n·ln2_hi is exact.
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    // e^r by its Taylor series to r^7 (error below 2^-24 relative on |r| ≤ ln2/2).
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    // Times 2^n, built in the exponent field.
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    ));
    _mm256_andnot_ps(underflow, _mm256_mul_ps(p, pow2))
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn exp8(xs: [f32; 8]) -> [f32; 8] {
        use std::arch::x86_64::*;
        let mut out = [0f32; 8];
        // SAFETY: both arrays hold eight floats; the caller checked AVX2/FMA.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp_ps(_mm256_loadu_ps(xs.as_ptr()))) };
        out
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        if !available() {
            // exp_ps cannot run; the callers must decline instead.
            assert!(log_sum_exp(&[0.0]).is_none());
            return;
        }
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x <= 88.0 {
            let xs = std::array::from_fn(|i| x + i as f32 * 1e-3);
            for (xi, got) in xs.iter().zip(exp8(xs)) {
                let exact = (*xi as f64).exp();
                let ulp = (exact as f32).abs() as f64 * f32::EPSILON as f64;
                worst = worst.max((got as f64 - exact).abs() / ulp);
            }
            x += 0.0371;
        }
        assert!(worst <= 2.0, "{worst} ulp");
        let edge = exp8([
            f32::NEG_INFINITY,
            -1e30,
            -88.0,
            -100.0,
            0.0,
            -0.0,
            -1e-30,
            -87.0,
        ]);
        assert_eq!(&edge[..6], &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
        assert_eq!(edge[6], 1.0);
        assert!((edge[7] as f64 / (-87f64).exp() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_gelu_and_log_sum_exp_match_plain_f64() {
        if !available() {
            // Every entry point declines, so candle's operations run instead.
            assert!(!softmax_rows(&mut [0.0], 1));
            assert!(gated(&[0.0, 0.0], 1, Gate::Silu).is_none());
            assert!(log_sum_exp(&[0.0]).is_none());
            return;
        }
        let mut s = 3u32;
        let mut rnd = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / 16_777_216.0 - 0.5) * 20.0
        };
        // 19 columns: two vectors and a tail; one -inf entry.
        let cols = 19;
        let x: Vec<f32> = (0..3 * cols).map(|_| rnd()).collect();
        let mut sm = x.clone();
        sm[5] = f32::NEG_INFINITY;
        let orig = sm.clone();
        assert!(softmax_rows(&mut sm, cols));
        for (row, out) in orig.chunks(cols).zip(sm.chunks(cols)) {
            let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            for (&v, &p) in row.iter().zip(out) {
                assert!((p as f64 - (v as f64 - lse).exp()).abs() < 1e-6, "{v}: {p}");
            }
            let got = log_sum_exp(row).unwrap() as f64;
            assert!(
                (got - lse).abs() < 1e-5 * lse.abs().max(1.0),
                "{got} vs {lse}"
            );
        }
        let ff = cols;
        let y: Vec<f32> = (0..2 * 2 * ff).map(|_| rnd()).collect();
        let got = gated(&y, ff, Gate::Silu).unwrap();
        for (r, row) in y.chunks(2 * ff).enumerate() {
            for i in 0..ff {
                let g = row[i] as f64;
                let want = g / (1.0 + (-g).exp()) * row[ff + i] as f64;
                let have = got[r * ff + i] as f64;
                assert!(
                    (have - want).abs() < 1e-5 * want.abs().max(1.0),
                    "{have} vs {want}"
                );
            }
        }
        let got = gated(&y, ff, Gate::GeluTanh).unwrap();
        for (r, row) in y.chunks(2 * ff).enumerate() {
            for i in 0..ff {
                let g = row[i] as f64;
                let u = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
                let want = 0.5 * g * (1.0 + u.tanh()) * row[ff + i] as f64;
                let have = got[r * ff + i] as f64;
                assert!(
                    (have - want).abs() < 1e-5 * want.abs().max(1.0),
                    "{have} vs {want}"
                );
            }
        }
    }
}
