//! Sparsification of task vectors (δ = expert − base), decided chunk by chunk so that merges
//! stream (and whole-tensor merges use the same masks):
//!
//! - magnitude (TIES): keep the ⌊density·n⌋ largest |δ| (at least one);
//! - magnitude outliers (Model Breadcrumbs): drop the ⌊gamma·n⌋ largest |δ|, then the
//!   smallest, keeping ⌊density·n⌋;
//! - random (DARE): keep each element with probability `density`, drawn per `RNG_CHUNK` block;
//! - [`della_magprune`] (DELLA): keep with a probability that grows with the element's
//!   magnitude rank in its row, from density − ε to density + ε (whole tensors only).
//!
//! Magnitude ranks come from selection (`select_ranks`: a parallel two-pass radix select on
//! the bits of |δ| over the streamed inputs, O(n)), never a full sort; only DELLA, whose
//! probabilities need every rank, sorts (one row at a time, rows in parallel). Equal
//! magnitudes are ranked by position, so results never depend on thread scheduling.
//!
//! Rescaling: the deterministic methods rescale like mergekit (the kept L1 norm is scaled back
//! to the original's; the method merges such tensors whole). The random ones divide each kept
//! element by its keep probability, as in the DARE and DELLA papers, which keeps the expected
//! value of every element (and so of the sum) equal to the input; mergekit instead matches L1
//! norms, which for large tensors is the same factor up to sampling noise.

use std::collections::HashMap;
use std::sync::Arc;

use rand::RngCore;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::{fold_chunks, map_chunks, StreamInputs, STREAM_CHUNK};

/// Elements per independently seeded random chunk: the mask depends only on the seed and the
/// chunk index, so it is the same however many threads draw it.
pub const RNG_CHUNK: usize = 1 << 16;

/// Mix a seed with a stream index (SplitMix64 finaliser), for independent RNG streams.
pub fn mix_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// |x| as an order-preserving integer key (for finite floats and ±inf).
#[inline]
pub fn mag_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Σ|x| in f64.
pub fn l1(x: &[f32]) -> f64 {
    x.par_chunks(RNG_CHUNK)
        .map(|c| c.iter().map(|v| f64::from(v.abs())).sum::<f64>())
        .sum()
}

/// Scale `x` so its L1 norm is `before` again (mergekit's `RescaleNorm.l1`); left as is when
/// either norm is below 1e-7.
pub fn rescale_l1(x: &mut [f32], before: f64) {
    let after = l1(x);
    if before < 1e-7 || after < 1e-7 {
        return;
    }
    let f = (before / after) as f32;
    x.par_iter_mut().for_each(|v| *v *= f);
}

/// The bin of a histogram that holds ascending rank `rank`, and how many counts lie in the
/// bins below it. Panics unless `rank` < the total count.
pub fn locate<T: Copy + Into<u64>>(h: &[T], rank: usize) -> (usize, usize) {
    let mut rank = rank as u64;
    let mut below = 0u64;
    for (bin, &n) in h.iter().enumerate() {
        let n: u64 = n.into();
        if rank < n {
            return (bin, below as usize);
        }
        rank -= n;
        below += n;
    }
    unreachable!("rank < number of elements")
}

/// DARE on `RNG_CHUNK`-element block number `block` of a task vector (the last block may be
/// shorter), for 0 < density < 1: keep each element with probability `density`, dividing it
/// by `density` when `rescale`; the same mask whichever way the tensor is split.
pub fn bernoulli_block(x: &mut [f32], block: usize, density: f64, rescale: bool, seed: u64) {
    // keep iff a uniform u32 < density·2³²
    let threshold = (density * 4_294_967_296.0) as u64;
    let scale = if rescale { (1.0 / density) as f32 } else { 1.0 };
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, block as u64));
    for v in x {
        if u64::from(rng.next_u32()) < threshold {
            *v *= scale;
        } else {
            *v = 0.0;
        }
    }
}

/// DELLA's MagPrune: within each row of `row_len` elements, rank |x| ascending (0..m−1),
/// keep with probability p = density − ε + 2ε·rank/(m−1), and divide kept elements by p when
/// `rescale`. A one-element row keeps with probability `density`.
///
/// Errors when density ± ε leaves (0, 1) (for density < 1), as mergekit does.
pub fn della_magprune(
    x: &mut [f32],
    row_len: usize,
    density: f64,
    epsilon: f64,
    rescale: bool,
    seed: u64,
) -> Result<(), String> {
    if density >= 1.0 {
        return Ok(());
    }
    if density <= 0.0 {
        x.fill(0.0);
        return Ok(());
    }
    if density + epsilon >= 1.0 || density - epsilon <= 0.0 {
        return Err(format!(
            "epsilon ({epsilon}) must keep density ± epsilon in (0, 1) (density {density})"
        ));
    }
    let row_len = row_len.max(1);
    x.par_chunks_mut(row_len).enumerate().for_each(|(r, row)| {
        let m = row.len();
        let mut order: Vec<u32> = (0..m as u32).collect();
        order.sort_by_key(|&i| (mag_key(row[i as usize]), i));
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, r as u64));
        // Draw in position order so the mask does not depend on the sort.
        let mut probs = vec![0f64; m];
        for (rank, &i) in order.iter().enumerate() {
            let norm = if m > 1 {
                rank as f64 / (m - 1) as f64
            } else {
                0.5
            };
            probs[i as usize] = density - epsilon + norm * 2.0 * epsilon;
        }
        for (v, p) in row.iter_mut().zip(&probs) {
            let u = f64::from(rng.next_u32()) / 4_294_967_296.0;
            if u < *p {
                if rescale {
                    *v = (f64::from(*v) / p) as f32;
                }
            } else {
                *v = 0.0;
            }
        }
    });
    Ok(())
}

// Masks are cut at chunk boundaries: random blocks must not straddle them.
const _: () = assert!(STREAM_CHUNK.is_multiple_of(RNG_CHUNK));

/// A magnitude rank located in one task vector by [`select_ranks`]: the key at that rank, how
/// many keys equal to it rank below it, and per chunk how many equal keys precede the chunk
/// (`starts`: one entry more than there are chunks, the last the total).
pub(super) struct Rank {
    key: u32,
    ties_below: usize,
    starts: Vec<usize>,
}

/// How one expert's task vector is masked, decided per element of a chunk.
pub(super) enum Mask {
    /// Keep every element.
    All,
    /// Zero every element.
    Nothing,
    /// Keep the elements whose magnitude rank is in `from ..= to` (an absent bound: no limit).
    Ranks {
        from: Option<Rank>,
        to: Option<Rank>,
    },
    /// DARE's Bernoulli mask, drawn per `RNG_CHUNK` block from `seed`.
    Random {
        density: f64,
        rescale: bool,
        seed: u64,
    },
}

/// Zero the elements of `d` where `keep` is false, branch-free (whether an element is kept is
/// as good as random), so the loop vectorises.
#[inline]
fn keep_where(d: &mut [f32], mut keep: impl FnMut(u32) -> bool) {
    for v in d.iter_mut() {
        let k = keep(mag_key(*v));
        *v = f32::from_bits(v.to_bits() & 0u32.wrapping_sub(u32::from(k)));
    }
}

/// What a mask keeps of one chunk when that is decided by the magnitude key alone
/// ([`Mask::kept`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kept {
    /// Every element.
    All,
    /// No element.
    Nothing,
    /// The elements whose key ([`mag_key`]) is at least `lo` and, when `hi` is set, below it.
    Keys { lo: u32, hi: Option<u32> },
}

impl Kept {
    /// Zero the elements of `d` this does not keep.
    pub(super) fn apply(self, d: &mut [f32]) {
        match self {
            Kept::All => {}
            Kept::Nothing => d.fill(0.0),
            Kept::Keys { lo, hi: None } => keep_where(d, |k| k >= lo),
            Kept::Keys { lo, hi: Some(hi) } => keep_where(d, |k| (k >= lo) & (k < hi)),
        }
    }
}

impl Mask {
    /// What this mask keeps of chunk `index` where the magnitude key alone decides it: always
    /// for `All` and `Nothing`; for ranks, in every chunk but the one where the count of keys
    /// equal to a bound runs out. `None`: decided element by element ([`Mask::apply`]).
    pub(super) fn kept(&self, index: usize) -> Option<Kept> {
        match self {
            Mask::All => Some(Kept::All),
            Mask::Nothing => Some(Kept::Nothing),
            Mask::Random { .. } => None,
            Mask::Ranks { from, to } => {
                let (c, end) = (index, index + 1);
                // Within a chunk the keys equal to a bound are all in the range, all out, or
                // (in the one chunk where the count runs out) decided one by one.
                let lower_all = from.as_ref().is_none_or(|r| r.starts[c] >= r.ties_below);
                let lower_none = from.as_ref().is_some_and(|r| r.starts[end] <= r.ties_below);
                let upper_all = to
                    .as_ref()
                    .is_none_or(|r| r.starts[end] <= r.ties_below + 1);
                let upper_none = to.as_ref().is_some_and(|r| r.starts[c] > r.ties_below);
                ((lower_all || lower_none) && (upper_all || upper_none)).then(|| Kept::Keys {
                    lo: from.as_ref().map_or(0, |r| r.key + u32::from(lower_none)),
                    hi: to.as_ref().map(|r| r.key + u32::from(upper_all)),
                })
            }
        }
    }

    /// Apply to chunk `index` (whose first element is `first`) of a task vector.
    pub(super) fn apply(&self, d: &mut [f32], index: usize, first: usize) {
        if let Some(kept) = self.kept(index) {
            return kept.apply(d);
        }
        match self {
            Mask::All | Mask::Nothing => unreachable!("always decided by the key"),
            Mask::Ranks { from, to } => {
                let mut seen_from = from.as_ref().map_or(0, |r| r.starts[index]);
                let mut seen_to = to.as_ref().map_or(0, |r| r.starts[index]);
                keep_where(d, |k| {
                    let after_from = from.as_ref().is_none_or(|r| {
                        let tie = k == r.key;
                        let keep = (k > r.key) | (tie & (seen_from >= r.ties_below));
                        seen_from += usize::from(tie);
                        keep
                    });
                    let before_to = to.as_ref().is_none_or(|r| {
                        let tie = k == r.key;
                        let keep = (k < r.key) | (tie & (seen_to <= r.ties_below));
                        seen_to += usize::from(tie);
                        keep
                    });
                    after_from & before_to
                });
            }
            Mask::Random {
                density,
                rescale,
                seed,
            } => {
                for (b, block) in d.chunks_mut(RNG_CHUNK).enumerate() {
                    bernoulli_block(block, first / RNG_CHUNK + b, *density, *rescale, *seed);
                }
            }
        }
    }

    /// The mask keeping magnitude ranks `lo .. hi` of an `n`-element task vector, with its
    /// bounds' ranks added to `select` (to be located by [`select_ranks`] and put in by
    /// [`Mask::locate`]) where they are inside the tensor.
    pub(super) fn rank_range(
        lo: usize,
        hi: usize,
        n: usize,
        expert: usize,
        select: &mut Vec<(usize, usize)>,
    ) -> Mask {
        if hi <= lo {
            return Mask::Nothing;
        }
        if lo == 0 && hi >= n {
            return Mask::All;
        }
        // A bound's rank is queued for selection and its Rank left empty until `locate`.
        let mut bound = |inside: bool, rank: usize| {
            inside.then(|| {
                select.push((expert, rank));
                Rank {
                    key: 0,
                    ties_below: 0,
                    starts: Vec::new(),
                }
            })
        };
        let from = bound(lo > 0, lo);
        let to = bound(hi < n, hi - 1);
        Mask::Ranks { from, to }
    }

    /// Fill in the bounds of every `Ranks` mask from `ranks`, located in the order
    /// [`Mask::rank_range`] pushed them.
    pub(super) fn locate(masks: &mut [Mask], ranks: Vec<Rank>) {
        let mut ranks = ranks.into_iter();
        for m in masks {
            if let Mask::Ranks { from, to } = m {
                for bound in [from, to].into_iter().flatten() {
                    *bound = ranks.next().expect("one rank per bound");
                }
            }
        }
    }
}

/// Adds the high 16 bits of the keys |m − b| to `h` (65536 bins). Two count lanes, so runs
/// of equal keys (common in task vectors of bf16 models) do not wait on one counter.
fn add_high_histogram(h: &mut [u32], m: &[f32], b: &[f32]) {
    const BINS: usize = 1 << 16;
    let (lane0, lane1) = h.split_at_mut(BINS);
    let mut pairs_m = m.chunks_exact(2);
    let mut pairs_b = b.chunks_exact(2);
    for (pm, pb) in (&mut pairs_m).zip(&mut pairs_b) {
        lane0[(mag_key(pm[0] - pb[0]) >> 16) as usize] += 1;
        lane1[(mag_key(pm[1] - pb[1]) >> 16) as usize] += 1;
    }
    for (m, b) in pairs_m.remainder().iter().zip(pairs_b.remainder()) {
        lane0[(mag_key(m - b) >> 16) as usize] += 1;
    }
}

/// Appends to `out`, in order, the low 16 bits of the keys |m − b| whose high 16 bits are
/// `bin`. A trial of a search runs this over every input element, a few percent of which land
/// in the bin: with AVX2 eight keys are compared at once and only the hits are visited.
fn push_bin_lows(out: &mut Vec<u16>, m: &[f32], b: &[f32], bin: u32) {
    let n = m.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just above.
        let done = unsafe { push_bin_lows_avx2(out, &m[..n], &b[..n], bin) };
        return push_bin_lows_scalar(out, &m[done..n], &b[done..n], bin);
    }
    push_bin_lows_scalar(out, &m[..n], &b[..n], bin)
}

fn push_bin_lows_scalar(out: &mut Vec<u16>, m: &[f32], b: &[f32], bin: u32) {
    for (x, y) in m.iter().zip(b) {
        let k = mag_key(x - y);
        if k >> 16 == bin {
            out.push((k & 0xffff) as u16);
        }
    }
}

/// [`push_bin_lows`] over the first multiple of eight elements of `m` and `b` (equal
/// lengths); returns how many it covered. The vector subtraction rounds exactly as the scalar
/// one, so the keys are the same.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn push_bin_lows_avx2(out: &mut Vec<u16>, m: &[f32], b: &[f32], bin: u32) -> usize {
    use std::arch::x86_64::*;
    debug_assert_eq!(m.len(), b.len());
    let whole = m.len() - m.len() % 8;
    let abs = _mm256_set1_epi32(0x7fff_ffff);
    let want = _mm256_set1_epi32(bin as i32);
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= whole <= the length of both slices.
        let (vm, vb) = unsafe {
            (
                _mm256_loadu_ps(m.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
            )
        };
        let key = _mm256_and_si256(_mm256_castps_si256(_mm256_sub_ps(vm, vb)), abs);
        let hit = _mm256_cmpeq_epi32(_mm256_srli_epi32::<16>(key), want);
        let mut bits = _mm256_movemask_ps(_mm256_castsi256_ps(hit)) as u32;
        while bits != 0 {
            let j = i + bits.trailing_zeros() as usize;
            out.push((mag_key(m[j] - b[j]) & 0xffff) as u16);
            bits &= bits - 1;
        }
    }
    whole
}

/// What [`select_ranks`] keeps between merges of a session: per expert, the histogram of the
/// high 16 bits of its magnitude keys.
const HIGH_HISTOGRAM: &str = "sparsify: high-half histogram of |θᵢ − θ₀|";

/// The magnitude ranks `select` (expert index, ascending rank) of the task vectors of `x`: two
/// parallel radix passes over the streamed inputs (the first skipped where the session kept
/// its histogram from an earlier merge) — a histogram of the high 16 bits of every
/// key, then the low 16 bits of the keys in the bin that holds the rank, kept per chunk so the
/// equal keys before each chunk are counted without a third pass.
pub(super) fn select_ranks(
    x: &StreamInputs,
    select: &[(usize, usize)],
) -> candle_core::Result<Vec<Rank>> {
    const BINS: usize = 1 << 16;
    // The histogram of an expert's high halves depends on the base and the expert alone: a
    // session that merges them again (a search's next trial) reuses it.
    let mut experts: Vec<usize> = select.iter().map(|&(i, _)| i).collect();
    experts.sort_unstable();
    experts.dedup();
    let mut totals: HashMap<usize, Arc<Vec<u32>>> = experts
        .iter()
        .filter_map(|&i| Some((i, x.recall::<Vec<u32>>(HIGH_HISTOGRAM, i)?)))
        .collect();
    let missing: Vec<usize> = experts
        .into_iter()
        .filter(|i| !totals.contains_key(i))
        .collect();
    if !missing.is_empty() {
        let m = missing.len();
        // Per thread: two u32 lanes per expert (tensors have fewer than 2³² elements, checked
        // by the caller), summed at the end.
        let high = fold_chunks(
            x,
            || vec![0u32; 2 * BINS * m],
            |mut h, c| {
                let b = c.base.as_deref().expect("requires_base");
                for (s, &i) in missing.iter().enumerate() {
                    add_high_histogram(&mut h[2 * BINS * s..2 * BINS * (s + 1)], c.models[i], b);
                }
                h
            },
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )?;
        for (s, &i) in missing.iter().enumerate() {
            let lanes = &high[2 * BINS * s..2 * BINS * (s + 1)];
            let t: Vec<u32> = (0..BINS)
                .map(|bin| lanes[bin] + lanes[BINS + bin])
                .collect();
            let t = Arc::new(t);
            x.keep(HIGH_HISTOGRAM, i, Arc::clone(&t));
            totals.insert(i, t);
        }
    }
    let bins: Vec<(u32, usize)> = select
        .iter()
        .map(|&(i, rank)| {
            let (bin, below) = locate(&totals[&i], rank);
            (bin as u32, below)
        })
        .collect();
    drop(totals);
    // Per chunk and expert: the low halves of the keys in the selected bin, in order.
    let lows: Vec<Vec<Vec<u16>>> = map_chunks(x, |c| {
        let b = c.base.as_deref().expect("requires_base");
        select
            .iter()
            .zip(&bins)
            .map(|(&(i, _), &(bin, _))| {
                let mut lows = Vec::new();
                push_bin_lows(&mut lows, c.models[i], b, bin);
                lows
            })
            .collect()
    })?;
    Ok(select
        .iter()
        .zip(&bins)
        .enumerate()
        .map(|(s, (&(_, rank), &(bin, below_high)))| {
            let mut h = vec![0u64; BINS];
            for chunk in &lows {
                for &l in &chunk[s] {
                    h[l as usize] += 1;
                }
            }
            let (low, below_low) = locate(&h, rank - below_high);
            let mut starts = Vec::with_capacity(lows.len() + 1);
            let mut acc = 0usize;
            for chunk in &lows {
                starts.push(acc);
                acc += chunk[s].iter().filter(|&&l| l as usize == low).count();
            }
            starts.push(acc);
            Rank {
                key: (bin << 16) | low as u32,
                ties_below: rank - below_high - below_low,
                starts,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked filter keeps exactly what the plain one does, in order, whatever the length
    /// (tails shorter than a block, hits at block edges, negative and equal values).
    #[test]
    fn bin_lows_match_the_plain_filter() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for n in [0usize, 1, 15, 16, 17, 31, 32, 33, 1000, 4099] {
            let m: Vec<f32> = (0..n)
                .map(|i| match i % 7 {
                    0 => 0.0,
                    1 => -0.5,
                    _ => (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 0.02,
                })
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| if i % 5 == 0 { 0.0 } else { 0.001 })
                .collect();
            let bins: std::collections::BTreeSet<u32> = m
                .iter()
                .zip(&b)
                .map(|(x, y)| mag_key(x - y) >> 16)
                .collect();
            for &bin in bins.iter().chain([0x7fff].iter()) {
                let want: Vec<u16> = m
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| mag_key(x - y))
                    .filter(|k| k >> 16 == bin)
                    .map(|k| (k & 0xffff) as u16)
                    .collect();
                let mut got = vec![9u16];
                push_bin_lows(&mut got, &m, &b, bin);
                assert_eq!(got[0], 9, "appends, keeps what was there");
                assert_eq!(got[1..], want[..], "n {n}, bin {bin:#x}");
            }
        }
    }
}
