//! The panel copy of a linear layer's `Wᵀ` and the product of a few input rows with it
//! ([`Panels::matmul`]): inputs of a few rows (decoding batches, choice tokens, short prompts)
//! on the CPU in f32, where candle's gemm repacks the weights on every call and runs far below
//! the memory bandwidth (a quarter of the panel kernel's speed at 16 rows on the development
//! machine).
//!
//! Where every weight of the layer is a bf16 value — a bf16 checkpoint, or a bf16 merge,
//! evaluated in f32, the competition's usual case — the panels keep the weights' 16 bf16 bits
//! and the kernel widens them as it loads them. Widening is exact, so the product is bit for bit
//! the f32 one, reading half the bytes: a decoding step, which streams every weight once for a
//! few rows, is bound by exactly those bytes.

use rayon::prelude::*;

use crate::layer_target::PanelsPtr;

/// Rows up to which [`Panels::matmul`] is used instead of candle's gemm.
pub const SMALL_ROWS: usize = 32;

/// Columns per panel: two AVX registers.
pub const PANEL: usize = 16;
/// Most rows of `x` per register tile (6 rows × 16 columns = 12 accumulators).
const ROW_TILE: usize = 6;
/// Most rows for which the kernel runs two panels at once ([`pair`]).
const PAIRED_ROWS: usize = 3;
/// Panel elements ahead of the current step that the kernel prefetches.
const PREFETCH: usize = PANEL * 64;

/// `Wᵀ` (`[k, n]`) rearranged as `[n/16][k][16]` (the last panel zero-filled past `n`): each
/// panel is one contiguous stream for the kernel. bf16 where every weight is a bf16 value.
pub enum Panels {
    /// The weights as they are.
    F32(Vec<f32>),
    /// The upper 16 bits of each weight, whose lower 16 are all zero.
    Bf16(Vec<u16>),
}

impl Panels {
    /// The panels of `wt` (`[k, n]`, row-major): bf16 when every value is one.
    pub fn pack(wt: &[f32], k: usize, n: usize) -> Panels {
        if wt.par_iter().all(|v| v.to_bits() & 0xffff == 0) {
            Panels::Bf16(pack_with(wt, k, n, |v| (v.to_bits() >> 16) as u16))
        } else {
            Panels::F32(pack_with(wt, k, n, |v| v))
        }
    }

    /// Whether the panels keep bf16 values.
    pub fn is_bf16(&self) -> bool {
        matches!(self, Panels::Bf16(_))
    }

    pub(crate) fn ptr(&mut self) -> PanelsPtr {
        match self {
            Panels::F32(p) => PanelsPtr::F32(p.as_mut_ptr()),
            Panels::Bf16(p) => PanelsPtr::Bf16(p.as_mut_ptr()),
        }
    }

    /// Writes the weights back into `wt` (`[k, n]`, row-major), as [`Panels::pack`] took them.
    pub fn unpack(&self, wt: &mut [f32], k: usize, n: usize) {
        assert_eq!(wt.len(), k * n);
        match self {
            Panels::F32(p) => unpack_with(p, wt, k, n, |v| v),
            Panels::Bf16(p) => unpack_with(p, wt, k, n, |h| f32::from_bits(u32::from(h) << 16)),
        }
    }

    /// `y = x·Wᵀ` for the `m` rows of `x` (`[m, k]`, row-major) on AVX2+FMA x86-64: `None`
    /// where those instructions are missing. Each panel streams from memory once and then
    /// feeds every row tile from cache; the accumulators stay in registers over all of `k`.
    /// Every output element is summed over the input features in order with fused
    /// multiply-adds, whatever `m` is and whichever form the panels have, so a row's result does
    /// not depend on the batch it is in nor on the panels' form.
    pub fn matmul(&self, x: &[f32], m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
        match self {
            Panels::F32(p) => matmul_with(x, p, m, k, n),
            Panels::Bf16(p) => matmul_with(x, p, m, k, n),
        }
    }
}

/// `wt` (`[k, n]`) in panels of `T`, each value through `f`.
fn pack_with<T: Copy + Default + Send + Sync>(
    wt: &[f32],
    k: usize,
    n: usize,
    f: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    assert_eq!(wt.len(), k * n);
    if k == 0 {
        return Vec::new();
    }
    let mut packed = vec![T::default(); n.div_ceil(PANEL) * k * PANEL];
    packed
        .par_chunks_mut(k * PANEL)
        .enumerate()
        .for_each(|(p, panel)| {
            let (c0, c1) = (p * PANEL, ((p + 1) * PANEL).min(n));
            for (kk, dst) in panel.chunks_exact_mut(PANEL).enumerate() {
                for (d, &v) in dst.iter_mut().zip(&wt[kk * n + c0..kk * n + c1]) {
                    *d = f(v);
                }
            }
        });
    packed
}

/// The inverse of [`pack_with`].
fn unpack_with<T: Copy + Send + Sync>(
    packed: &[T],
    wt: &mut [f32],
    k: usize,
    n: usize,
    f: impl Fn(T) -> f32 + Sync,
) {
    if k == 0 || n == 0 {
        return;
    }
    wt.par_chunks_mut(n).enumerate().for_each(|(kk, row)| {
        for (p, dst) in row.chunks_mut(PANEL).enumerate() {
            let src = &packed[(p * k + kk) * PANEL..];
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = f(v);
            }
        }
    });
}

/// A panel element the kernel loads 16 of at a time, widened to f32.
trait PanelElem: Copy + Sync {
    /// Lanes 0..8 and 8..16 of the 16 values at `p`.
    ///
    /// # Safety
    /// AVX2 must be available; `p` points at 16 readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256);
}

impl PanelElem for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        use std::arch::x86_64::*;
        (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
    }
}

impl PanelElem for u16 {
    /// bf16 → f32: the 16 bits become the upper half of the f32 (exact).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p.cast());
        let lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(h));
        let hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(h));
        (
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(lo)),
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(hi)),
        )
    }
}

/// [`Panels::matmul`] over panels of `T`.
fn matmul_with<T: PanelElem>(
    x: &[f32],
    packed: &[T],
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
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
                    // Up to PAIRED_ROWS rows, two panels at a time: one panel's few
                    // accumulator chains would leave the multiply-add units waiting on each
                    // other's latency.
                    let step = if m <= PAIRED_ROWS { 2 } else { 1 };
                    for (i, y) in out.chunks_mut(step * m * PANEL).enumerate() {
                        let p = t * per_task + i * step;
                        let panels = y.len() / (m * PANEL);
                        let w = &packed[p * k * PANEL..(p + panels) * k * PANEL];
                        // SAFETY: AVX2 and FMA were detected above; `w` is `panels` whole
                        // panels (`k·16` each), `y` their outputs (`m·16` each) and `xt` is
                        // `k·m` long.
                        unsafe {
                            match (panels, m) {
                                (2, 1) => pair::<1, T>(&xt, w, y, k),
                                (2, 2) => pair::<2, T>(&xt, w, y, k),
                                (2, 3) => pair::<3, T>(&xt, w, y, k),
                                _ => panel_rows(&xt, w, y, m, k),
                            }
                        }
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
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xt.len() >= k·m`, `w.len() == k·16`, `y.len() == m·16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_rows<T: PanelElem>(xt: &[f32], w: &[T], y: &mut [f32], m: usize, k: usize) {
    let tiles = m.div_ceil(ROW_TILE);
    let mut r0 = 0;
    for t in 0..tiles {
        let rows = m / tiles + usize::from(t < m % tiles);
        let out = &mut y[r0 * PANEL..(r0 + rows) * PANEL];
        // SAFETY: this function's contract, with `out` exactly `rows` output rows at `r0`.
        match rows {
            6 => tile::<6, T>(xt, w, out, m, k, r0),
            5 => tile::<5, T>(xt, w, out, m, k, r0),
            4 => tile::<4, T>(xt, w, out, m, k, r0),
            3 => tile::<3, T>(xt, w, out, m, k, r0),
            2 => tile::<2, T>(xt, w, out, m, k, r0),
            _ => tile::<1, T>(xt, w, out, m, k, r0),
        }
        r0 += rows;
    }
}

/// `y[0..R][0..16] = x[r0..r0+R, ..] · panel`, the sums in registers over all `k`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `w.len() == k·16`, `y.len() == R·16` and `xt` (`[k, m]`)
/// holds columns `r0..r0+R` (the loads read `xt[kk·m + r0 + i]` and `w` through raw pointers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize, T: PanelElem>(
    xt: &[f32],
    w: &[T],
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
        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH).cast());
        let (w0, w1) = T::load16(wp);
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

/// [`tile`] for all `R` rows (`m == R`) of two adjacent panels at once (`w`: `2·k·16`, `y`:
/// their outputs, `2·R·16`): the same fused sums in the same order, twice the independent
/// accumulator chains.
///
/// # Safety
/// As [`tile`], with `m == R` and `w`, `y` two panels' worth.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pair<const R: usize, T: PanelElem>(xt: &[f32], w: &[T], y: &mut [f32], k: usize) {
    use std::arch::x86_64::*;
    debug_assert!(w.len() == 2 * k * PANEL && y.len() == 2 * R * PANEL && xt.len() >= k * R);
    let (mut acc_a, mut acc_b) = ([[_mm256_setzero_ps(); 2]; R], [[_mm256_setzero_ps(); 2]; R]);
    let mut xp = xt.as_ptr();
    let mut wa = w.as_ptr();
    let mut wb = wa.add(k * PANEL);
    for _ in 0..k {
        _mm_prefetch::<_MM_HINT_T0>(wa.wrapping_add(PREFETCH).cast());
        _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(PREFETCH).cast());
        let (a0, a1) = T::load16(wa);
        let (b0, b1) = T::load16(wb);
        for (i, (a, b)) in acc_a.iter_mut().zip(acc_b.iter_mut()).enumerate() {
            let xb = _mm256_broadcast_ss(&*xp.add(i));
            a[0] = _mm256_fmadd_ps(xb, a0, a[0]);
            a[1] = _mm256_fmadd_ps(xb, a1, a[1]);
            b[0] = _mm256_fmadd_ps(xb, b0, b[0]);
            b[1] = _mm256_fmadd_ps(xb, b1, b[1]);
        }
        xp = xp.add(R);
        wa = wa.add(PANEL);
        wb = wb.add(PANEL);
    }
    for (p, panel) in [acc_a, acc_b].iter().enumerate() {
        for (i, a) in panel.iter().enumerate() {
            let at = (p * R + i) * PANEL;
            _mm256_storeu_ps(y.as_mut_ptr().add(at), a[0]);
            _mm256_storeu_ps(y.as_mut_ptr().add(at + 8), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// bf16 values packed as bf16 panels give every product bit for bit as the same values
    /// in f32 panels, for row counts across the tile sizes and a partial last panel; values
    /// that are not all bf16 stay f32; unpacking either form restores `Wᵀ`.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn bf16_panels_multiply_bit_for_bit_as_f32_panels() {
        let (k, n) = (37usize, 45usize);
        let mut next = lcg(7);
        let bf16: Vec<f32> = (0..k * n)
            .map(|_| f32::from_bits(next().to_bits() & 0xffff_0000))
            .collect();
        let packed = Panels::pack(&bf16, k, n);
        assert!(packed.is_bf16());
        let as_f32 = Panels::F32(pack_with(&bf16, k, n, |v| v));
        for m in [1usize, 2, 3, 5, 6, 7, 13, 32] {
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let a = packed
                .matmul(&x, m, k, n)
                .expect("the CPU has AVX2 and FMA");
            let b = as_f32
                .matmul(&x, m, k, n)
                .expect("the CPU has AVX2 and FMA");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "m = {m}");
            // And both are the product: each element the in-order fused sum.
            for r in 0..m {
                for c in 0..n {
                    let want =
                        (0..k).fold(0f32, |s, kk| x[r * k + kk].mul_add(bf16[kk * n + c], s));
                    assert_eq!(a[r * n + c].to_bits(), want.to_bits(), "({r}, {c})");
                }
            }
        }
        let mut not_bf16 = bf16.clone();
        not_bf16[3 * n + 44] = 0.1;
        let f32_packed = Panels::pack(&not_bf16, k, n);
        assert!(!f32_packed.is_bf16());
        for (p, want) in [(&packed, &bf16), (&f32_packed, &not_bf16)] {
            let mut back = vec![f32::NAN; k * n];
            p.unpack(&mut back, k, n);
            assert_eq!(&back, want);
        }
    }
}
