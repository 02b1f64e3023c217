//! Scaled dot-product attention for the decoder on the CPU in f32, fused: each query's scores,
//! softmax and weighted sum of values in one pass over the keys it can see, so causal prompts
//! skip the masked half of the score matrix and nothing `[heads, queries, keys]`-sized is
//! built. Composing it from candle operations (product, mask, softmax, product, transposes)
//! took about a fifth of a long-prompt evaluation on the development machine.
//!
//! Every query is computed on its own and its keys are visited in order, with masked keys
//! contributing exact zeros, so a row's result does not depend on the batch or padding around
//! it.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::vector_math::{exp_ps, hsum};

/// One attention pass: queries `[b, heads, t, head_dim]` (contiguous), keys and values
/// `[b, kv_heads, keys, head_dim]` with `kv_stride` elements from one (row, kv head) block to
/// the next (`keys · head_dim` when contiguous; more for a cache with spare capacity).
pub struct CpuAttention<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
    pub kv_stride: usize,
    /// Cache index of query 0 (queries follow one another).
    pub first_query: usize,
    /// Sliding window: a query sees keys less than this many cache slots back.
    pub window: Option<usize>,
    /// Per row, which cache slots hold real tokens (`None`: all of them).
    pub valid: Option<&'a [Vec<bool>]>,
    pub scale: f32,
}

/// Queries handled by one task.
const QUERY_BLOCK: usize = 16;

/// The attention output `[b, t, heads, head_dim]` (the layout the output projection reads), or
/// `None` where the CPU lacks AVX2/FMA or the head size is not a multiple of 8 (the caller
/// then uses candle's operations).
pub fn attend(a: &CpuAttention) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    {
        if a.head_dim.is_multiple_of(8)
            && a.heads.is_multiple_of(a.kv_heads.max(1))
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            let (b, nh, t, hd) = (a.batch, a.heads, a.queries, a.head_dim);
            assert_eq!(a.q.len(), b * nh * t * hd);
            assert!(a.kv_stride >= a.keys * hd);
            assert!(a.k.len() >= (b * a.kv_heads - 1) * a.kv_stride + a.keys * hd);
            assert_eq!(a.v.len(), a.k.len());
            assert!(a.first_query + t <= a.keys);
            let mut out = vec![0f32; b * t * nh * hd];
            // One task per (row, head, block of queries), so a task reuses its keys and values
            // from cache; its output slots (one per query, `head_dim` long, strided in the
            // output) are handed to it as disjoint slices.
            let blocks = t.div_ceil(QUERY_BLOCK);
            let mut tasks: Vec<Vec<&mut [f32]>> = (0..b * nh * blocks)
                .map(|_| Vec::with_capacity(QUERY_BLOCK))
                .collect();
            for (slot, o) in out.chunks_exact_mut(hd).enumerate() {
                let (row, qi, head) = (slot / (t * nh), slot / nh % t, slot % nh);
                tasks[(row * nh + head) * blocks + qi / QUERY_BLOCK].push(o);
            }
            tasks.into_par_iter().enumerate().for_each(|(task, slots)| {
                let (row, head, block) = (task / (nh * blocks), task / blocks % nh, task % blocks);
                let mut scores = vec![0f32; a.keys.next_multiple_of(8)];
                for (i, o) in slots.into_iter().enumerate() {
                    // SAFETY: AVX2 and FMA were detected above, and the asserts above bound
                    // every query, key and value read for (row, head, query).
                    unsafe { attend_one(a, row, head, block * QUERY_BLOCK + i, &mut scores, o) };
                }
            });
            return Some(out);
        }
    }
    let _ = a;
    None
}

/// Output `out` (`head_dim` long: slot `[row, qi, head, ..]`) from the keys query `qi` sees.
///
/// # Safety
/// The CPU must support AVX2 and FMA, and `a` must satisfy the bounds [`attend`] asserts
/// (queries, keys and values are read through raw pointers); `scores` holds `a.keys` rounded
/// up to a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_one(
    a: &CpuAttention,
    row: usize,
    head: usize,
    qi: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = a.head_dim;
    let kv_head = head / (a.heads / a.kv_heads);
    let q =
        a.q.as_ptr()
            .add(((row * a.heads + head) * a.queries + qi) * hd);
    let kv_base = (row * a.kv_heads + kv_head) * a.kv_stride;
    let (k, v) = (a.k.as_ptr().add(kv_base), a.v.as_ptr().add(kv_base));
    let abs = a.first_query + qi;
    let mut lo = a.window.map_or(0, |w| (abs + 1).saturating_sub(w));
    // Leading masked keys (a left-padded row's padding) are skipped outright: their weights
    // would be exact zeros, which change neither the sum nor the output.
    if let Some(v) = a.valid {
        lo += v[row][lo..=abs].iter().take_while(|&&x| !x).count();
    }
    if lo > abs {
        // No real key visible (a padding position): its output is never used.
        out.fill(0.0);
        return;
    }
    let n = abs + 1 - lo;
    let valid = a.valid.map(|v| &v[row][lo..=abs]);

    // Scores of the visible keys, four keys at a time (independent sums, each over the head
    // in order); masked ones -inf (their weight below is exactly 0).
    let dot = |kp: *const f32, acc: __m256, d: usize| {
        _mm256_fmadd_ps(_mm256_loadu_ps(q.add(d)), _mm256_loadu_ps(kp.add(d)), acc)
    };
    let mut i = 0;
    while i + 4 <= n {
        let kp = k.add((lo + i) * hd);
        let mut acc = [_mm256_setzero_ps(); 4];
        for d in (0..hd).step_by(8) {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = dot(kp.add(j * hd), *a, d);
            }
        }
        for (j, sum) in acc.iter().enumerate() {
            scores[i + j] = hsum(*sum) * a.scale;
        }
        i += 4;
    }
    while i < n {
        let kp = k.add((lo + i) * hd);
        let mut acc = _mm256_setzero_ps();
        for d in (0..hd).step_by(8) {
            acc = dot(kp, acc, d);
        }
        scores[i] = hsum(acc) * a.scale;
        i += 1;
    }
    let mut max = f32::NEG_INFINITY;
    for (i, s) in scores[..n].iter_mut().enumerate() {
        if valid.is_some_and(|v| !v[i]) {
            *s = f32::NEG_INFINITY;
        } else {
            max = max.max(*s);
        }
    }
    if max == f32::NEG_INFINITY {
        // No real key visible (a padding position): its output is never used.
        out.fill(0.0);
        return;
    }
    // Weights exp(s - max), eight at a time (the tail padded with -inf, which gives 0).
    scores[n..n.next_multiple_of(8)].fill(f32::NEG_INFINITY);
    let m = _mm256_set1_ps(max);
    for c in scores[..n.next_multiple_of(8)].chunks_exact_mut(8) {
        let e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
        _mm256_storeu_ps(c.as_mut_ptr(), e);
    }
    // Sum and weighted values in key order.
    let mut sum = 0f32;
    for &p in &scores[..n] {
        sum += p;
    }
    // Up to 64 output values (eight registers) per sweep over the keys.
    let inv = _mm256_set1_ps(1.0 / sum);
    for d0 in (0..hd).step_by(64) {
        let lanes = ((hd - d0) / 8).min(8);
        let mut acc = [_mm256_setzero_ps(); 8];
        for (i, &p) in scores[..n].iter().enumerate() {
            let (pv, vp) = (_mm256_set1_ps(p), v.add((lo + i) * hd + d0));
            for (l, a) in acc[..lanes].iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vp.add(8 * l)), *a);
            }
        }
        for (l, a) in acc[..lanes].iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(d0 + 8 * l), _mm256_mul_ps(*a, inv));
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// On a CPU without AVX2/FMA: checks that the kernel declines (candle's operations run
    /// instead) and returns true, so the caller's test ends there.
    fn kernel_declines() -> bool {
        if crate::models::vector_math::available() {
            return false;
        }
        let none: [f32; 0] = [];
        let a = CpuAttention {
            q: &none,
            k: &none,
            v: &none,
            batch: 0,
            heads: 1,
            kv_heads: 1,
            queries: 0,
            keys: 0,
            head_dim: 8,
            kv_stride: 0,
            first_query: 0,
            window: None,
            valid: None,
            scale: 1.0,
        };
        assert!(attend(&a).is_none());
        true
    }

    /// Plain softmax attention in f64, from the same inputs.
    fn reference(a: &CpuAttention) -> Vec<f64> {
        let (hd, rep) = (a.head_dim, a.heads / a.kv_heads);
        let mut out = vec![0f64; a.batch * a.queries * a.heads * hd];
        for r in 0..a.batch {
            for h in 0..a.heads {
                for qi in 0..a.queries {
                    let abs = a.first_query + qi;
                    let q = &a.q[((r * a.heads + h) * a.queries + qi) * hd..][..hd];
                    let base = (r * a.kv_heads + h / rep) * a.kv_stride;
                    let seen: Vec<usize> = (0..=abs)
                        .filter(|&j| a.window.is_none_or(|w| abs - j < w))
                        .filter(|&j| a.valid.is_none_or(|v| v[r][j]))
                        .collect();
                    let s: Vec<f64> = seen
                        .iter()
                        .map(|&j| {
                            let k = &a.k[base + j * hd..][..hd];
                            q.iter()
                                .zip(k)
                                .map(|(x, y)| *x as f64 * *y as f64)
                                .sum::<f64>()
                                * a.scale as f64
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    let o = &mut out[((r * a.queries + qi) * a.heads + h) * hd..][..hd];
                    for (&j, wj) in seen.iter().zip(&w) {
                        for (od, vd) in o.iter_mut().zip(&a.v[base + j * hd..][..hd]) {
                            *od += wj / sum * *vd as f64;
                        }
                    }
                }
            }
        }
        out
    }

    fn random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / 16_777_216.0 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn matches_plain_softmax_attention_with_causal_window_and_padding_masks() {
        if kernel_declines() {
            return;
        }
        let (b, nh, nkv, hd, keys) = (2, 4, 2, 16, 37);
        let k = random(b * nkv * keys * hd, 1);
        let v = random(b * nkv * keys * hd, 2);
        let mut valid = vec![vec![true; keys]; b];
        valid[1][..5].fill(false); // left padding
        valid[0][20] = false;
        for (t, window, padded) in [(keys, None, false), (9, Some(6), true), (1, None, true)] {
            let q = random(b * nh * t * hd, 3 + t as u32);
            let a = CpuAttention {
                q: &q,
                k: &k,
                v: &v,
                batch: b,
                heads: nh,
                kv_heads: nkv,
                queries: t,
                keys,
                head_dim: hd,
                kv_stride: keys * hd,
                first_query: keys - t,
                window,
                valid: padded.then_some(&valid[..]),
                scale: 0.25,
            };
            let got = attend(&a).unwrap();
            let want = reference(&a);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // Query 0 of padded row 1 sees no real key when t = keys; not the case here.
                assert!(
                    (*g as f64 - w).abs() < 1e-5,
                    "t={t} element {i}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn a_rows_output_does_not_depend_on_the_padding_before_it() {
        if kernel_declines() {
            return;
        }
        let (nh, hd, keys, pad) = (2, 8, 23, 6);
        let k = random(nh * keys * hd, 5);
        let v = random(nh * keys * hd, 6);
        let q = random(nh * hd, 7);
        let alone = CpuAttention {
            q: &q,
            k: &k,
            v: &v,
            batch: 1,
            heads: nh,
            kv_heads: nh,
            queries: 1,
            keys,
            head_dim: hd,
            kv_stride: keys * hd,
            first_query: keys - 1,
            window: None,
            valid: None,
            scale: 0.3,
        };
        // The same keys after `pad` padding slots holding garbage.
        let shift = |x: &[f32]| -> Vec<f32> {
            let mut y = Vec::new();
            for h in 0..nh {
                y.extend(random(pad * hd, 9 + h as u32));
                y.extend_from_slice(&x[h * keys * hd..][..keys * hd]);
            }
            y
        };
        let (kp, vp) = (shift(&k), shift(&v));
        let valid = vec![(0..pad + keys).map(|j| j >= pad).collect::<Vec<_>>()];
        let padded = CpuAttention {
            k: &kp,
            v: &vp,
            keys: pad + keys,
            kv_stride: (pad + keys) * hd,
            first_query: pad + keys - 1,
            valid: Some(&valid),
            ..alone
        };
        let (a, b) = (attend(&alone).unwrap(), attend(&padded).unwrap());
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}
