//! Sparsification of task vectors (δ = expert − base), in place on f32 data.
//!
//! - [`magnitude`] (TIES): keep the ⌊density·n⌋ largest |δ| (at least one);
//! - [`magnitude_outliers`] (Model Breadcrumbs): drop the ⌊gamma·n⌋ largest |δ|, then the
//!   smallest, keeping ⌊density·n⌋;
//! - [`bernoulli`] (DARE): keep each element with probability `density`;
//! - [`della_magprune`] (DELLA): keep with a probability that grows with the element's
//!   magnitude rank in its row, from density − ε to density + ε.
//!
//! Streamed merges mask task vectors a chunk at a time instead (`Mask`), with the same
//! result: random masks are drawn per `RNG_CHUNK` block, and magnitude thresholds come from
//! two radix passes over the streamed inputs (`magnitude_masks`).
//!
//! Magnitude ranks come from selection (a parallel two-pass radix select on the bits of |δ|,
//! O(n)), never a full sort; only DELLA, whose probabilities need every rank, sorts (one row
//! at a time, rows in parallel).
//! Equal magnitudes are ranked by position, so results never depend on thread scheduling.
//!
//! Rescaling: the deterministic methods rescale like mergekit (the kept L1 norm is scaled back
//! to the original's). The random ones divide each kept element by its keep probability, as in
//! the DARE and DELLA papers, which keeps the expected value of every element (and so of the
//! sum) equal to the input; mergekit instead matches L1 norms, which for large tensors is
//! the same factor up to sampling noise.

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
fn l1(x: &[f32]) -> f64 {
    x.par_chunks(RNG_CHUNK)
        .map(|c| c.iter().map(|v| f64::from(v.abs())).sum::<f64>())
        .sum()
}

/// Scale `x` so its L1 norm is `before` again (mergekit's `RescaleNorm.l1`); left as is when
/// either norm is below 1e-7.
fn rescale_l1(x: &mut [f32], before: f64) {
    let after = l1(x);
    if before < 1e-7 || after < 1e-7 {
        return;
    }
    let f = (before / after) as f32;
    x.par_iter_mut().for_each(|v| *v *= f);
}

/// Elements per chunk of the parallel passes of the rank selection.
const SELECT_CHUNK: usize = 1 << 18;

/// Histogram of 16 bits of the magnitude keys (`shift` 16: the high half; 0: the low half of
/// keys whose high half is `high`), counted in parallel.
fn histogram(x: &[f32], shift: u32, high: Option<u32>) -> Vec<u64> {
    x.par_chunks(SELECT_CHUNK)
        .map(|c| {
            let mut h = vec![0u64; 1 << 16];
            for v in c {
                let k = mag_key(*v);
                match high {
                    None => h[(k >> shift) as usize] += 1,
                    Some(hi) if k >> 16 == hi => h[(k & 0xffff) as usize] += 1,
                    Some(_) => {}
                }
            }
            h
        })
        .reduce(
            || vec![0u64; 1 << 16],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// The magnitude key at ascending rank `rank` (< x.len()) and how many keys are smaller.
///
/// A two-pass radix selection (16 bits per pass, parallel histograms): O(n), no copy of the
/// data, and unlike `select_nth_unstable` it splits across cores.
pub fn key_at_rank(x: &[f32], rank: usize) -> (u32, usize) {
    let h1 = histogram(x, 16, None);
    let (high, below_high) = locate(&h1, rank);
    let h2 = histogram(x, 0, Some(high as u32));
    let (low, below_low) = locate(&h2, rank - below_high);
    (((high as u32) << 16) | low as u32, below_high + below_low)
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

/// Zero every element whose ascending-|x| rank is outside `lo..hi` (ties ranked by position).
pub fn keep_rank_range(x: &mut [f32], lo: usize, hi: usize) {
    let n = x.len();
    let hi = hi.min(n);
    if lo == 0 && hi == n {
        return;
    }
    if hi <= lo {
        x.fill(0.0);
        return;
    }
    // The key at rank `lo` and the key at rank `hi − 1`, with how many keys are smaller.
    let lower = (lo > 0).then(|| key_at_rank(x, lo));
    let upper = (hi < n).then(|| key_at_rank(x, hi - 1));
    // Elements equal to a threshold are ranked by position: rank = (# smaller) + (# equal
    // before it). Count the equal ones per chunk, then give each chunk its starting count.
    let is_tie = |k: u32| lower.is_some_and(|l| l.0 == k) || upper.is_some_and(|u| u.0 == k);
    let per_chunk: Vec<usize> = x
        .par_chunks(SELECT_CHUNK)
        .map(|c| c.iter().filter(|v| is_tie(mag_key(**v))).count())
        .collect();
    let mut starts = Vec::with_capacity(per_chunk.len());
    let mut acc = 0usize;
    for c in &per_chunk {
        starts.push(acc);
        acc += c;
    }
    // With two distinct thresholds, ties of each are counted apart: recount per key below.
    let two_keys = matches!((lower, upper), (Some(l), Some(u)) if l.0 != u.0);
    let starts_for = |key: u32| -> Vec<usize> {
        if !two_keys {
            return starts.clone();
        }
        let counts: Vec<usize> = x
            .par_chunks(SELECT_CHUNK)
            .map(|c| c.iter().filter(|v| mag_key(**v) == key).count())
            .collect();
        let mut s = Vec::with_capacity(counts.len());
        let mut acc = 0usize;
        for c in counts {
            s.push(acc);
            acc += c;
        }
        s
    };
    let lower_starts = lower.map(|l| starts_for(l.0));
    let upper_starts = upper.map(|u| starts_for(u.0));
    x.par_chunks_mut(SELECT_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut seen_lo = lower_starts.as_ref().map_or(0, |s| s[c]);
            let mut seen_hi = upper_starts.as_ref().map_or(0, |s| s[c]);
            for e in chunk.iter_mut() {
                let k = mag_key(*e);
                let keep = match (lower, upper) {
                    (Some((lk, lb)), _) if k == lk => {
                        let rank = lb + seen_lo;
                        seen_lo += 1;
                        if upper.is_some_and(|u| u.0 == k) {
                            seen_hi += 1;
                        }
                        rank >= lo && rank < hi
                    }
                    (_, Some((uk, ub))) if k == uk => {
                        let rank = ub + seen_hi;
                        seen_hi += 1;
                        rank < hi
                    }
                    _ => lower.is_none_or(|l| k > l.0) && upper.is_none_or(|u| k < u.0),
                };
                if !keep {
                    *e = 0.0;
                }
            }
        });
}

/// TIES' magnitude pruning: keep the k = max(1, ⌊density·n⌋) largest |x|; with `rescale`,
/// restore the L1 norm. density ≥ 1 keeps everything, density ≤ 0 nothing.
pub fn magnitude(x: &mut [f32], density: f64, rescale: bool) {
    if density >= 1.0 {
        return;
    }
    let n = x.len();
    if density <= 0.0 || n == 0 {
        x.fill(0.0);
        return;
    }
    let k = ((density * n as f64) as usize).max(1);
    let before = if rescale { l1(x) } else { 0.0 };
    keep_rank_range(x, n - k, n);
    if rescale {
        rescale_l1(x, before);
    }
}

/// Model Breadcrumbs: drop the ⌊gamma·n⌋ largest |x| (fewer when density needs them), then
/// the smallest, keeping ⌊density·n⌋; with `rescale`, restore the L1 norm.
pub fn magnitude_outliers(x: &mut [f32], density: f64, gamma: f64, rescale: bool) {
    if density >= 1.0 {
        return;
    }
    let n = x.len();
    let target = (density.max(0.0) * n as f64) as usize;
    let n_top = (gamma.max(0.0) * n as f64) as usize;
    let n_bot = n.saturating_sub(target).saturating_sub(n_top);
    let before = if rescale { l1(x) } else { 0.0 };
    keep_rank_range(x, n_bot, n_bot + target);
    if rescale {
        rescale_l1(x, before);
    }
}

/// DARE: keep each element with probability `density` (seeded), dividing kept elements by
/// `density` when `rescale`.
pub fn bernoulli(x: &mut [f32], density: f64, rescale: bool, seed: u64) {
    if density >= 1.0 {
        return;
    }
    if density <= 0.0 {
        x.fill(0.0);
        return;
    }
    x.par_chunks_mut(RNG_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| bernoulli_block(chunk, c, density, rescale, seed));
}

/// [`bernoulli`] on `RNG_CHUNK`-element block number `block` of a tensor (the last block may
/// be shorter), for 0 < density < 1: the same mask whichever way the tensor is split.
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

// Streamed masks are cut at chunk boundaries: random blocks must not straddle them.
const _: () = assert!(STREAM_CHUNK.is_multiple_of(RNG_CHUNK));

/// How one expert's task vector is masked while streaming (what the functions above do to a
/// whole tensor, decided per element).
pub(super) enum Mask {
    /// Keep every element.
    All,
    /// Zero every element.
    Nothing,
    /// Magnitude selection: keep |δ| keys above `key`; of the keys equal to it, drop the
    /// first `skip` in position order (`starts[c]`: how many equal keys precede chunk `c`;
    /// one entry more than there are chunks, the last the total).
    Threshold {
        key: u32,
        skip: usize,
        starts: Vec<usize>,
    },
    /// DARE's Bernoulli mask, drawn per `RNG_CHUNK` block from `seed`.
    Random {
        density: f64,
        rescale: bool,
        seed: u64,
    },
}

impl Mask {
    /// Apply to chunk `index` (whose first element is `first`) of a task vector.
    pub(super) fn apply(&self, d: &mut [f32], index: usize, first: usize) {
        match self {
            Mask::All => {}
            Mask::Nothing => d.fill(0.0),
            Mask::Threshold { key, skip, starts } => {
                let (key, skip) = (*key, *skip);
                let (before, after) = (starts[index], starts[index + 1]);
                // Whether the keys equal to the threshold are kept: all of them in this chunk,
                // none, or (in the one chunk where the count of dropped ties runs out) the
                // later ones, decided element by element.
                let keep_ties = if before >= skip {
                    true
                } else if after <= skip {
                    false
                } else {
                    let mut seen = before;
                    for v in d.iter_mut() {
                        let k = mag_key(*v);
                        let tie = k == key;
                        let keep = (k > key) | (tie & (seen >= skip));
                        seen += usize::from(tie);
                        *v = f32::from_bits(v.to_bits() & 0u32.wrapping_sub(u32::from(keep)));
                    }
                    return;
                };
                // Branch-free (whether an element is kept is as good as random), vectorised.
                let floor = if keep_ties { key } else { key + 1 };
                for v in d.iter_mut() {
                    let keep = mag_key(*v) >= floor;
                    *v = f32::from_bits(v.to_bits() & 0u32.wrapping_sub(u32::from(keep)));
                }
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

/// The magnitude-selection masks for `select` (expert index, ascending rank of the smallest
/// kept key) over the task vectors of `x`: two parallel radix passes over the streamed
/// inputs, like [`key_at_rank`] — a histogram of the high 16 bits of every key,
/// then the low 16 bits of the keys in the bin that holds the rank, kept per chunk so the
/// equal keys before each chunk are counted without a third pass.
pub(super) fn magnitude_masks(
    x: &StreamInputs,
    select: &[(usize, usize)],
) -> candle_core::Result<Vec<Mask>> {
    const BINS: usize = 1 << 16;
    let e = select.len();
    // Per thread: two u32 lanes per expert (`stream_masks` only streams tensors of fewer
    // than 2³² elements), summed at the end.
    let high = fold_chunks(
        x,
        || vec![0u32; 2 * BINS * e],
        |mut h, c| {
            let b = c.base.as_deref().expect("requires_base");
            for (s, &(i, _)) in select.iter().enumerate() {
                add_high_histogram(&mut h[2 * BINS * s..2 * BINS * (s + 1)], c.models[i], b);
            }
            h
        },
        |mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        },
    )?;
    let mut totals = vec![0u64; BINS * e];
    for s in 0..e {
        let lanes = &high[2 * BINS * s..2 * BINS * (s + 1)];
        let t = &mut totals[BINS * s..BINS * (s + 1)];
        for (bin, t) in t.iter_mut().enumerate() {
            *t = u64::from(lanes[bin]) + u64::from(lanes[BINS + bin]);
        }
    }
    drop(high);
    let bins: Vec<(u32, usize)> = select
        .iter()
        .enumerate()
        .map(|(s, &(_, rank))| {
            let (bin, below) = locate(&totals[BINS * s..BINS * (s + 1)], rank);
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
                c.models[i]
                    .iter()
                    .zip(b)
                    .filter_map(|(m, b)| {
                        let k = mag_key(m - b);
                        (k >> 16 == bin).then_some((k & 0xffff) as u16)
                    })
                    .collect()
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
            Mask::Threshold {
                key: (bin << 16) | low as u32,
                skip: rank - below_high - below_low,
                starts,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(x: &[f32]) -> Vec<usize> {
        (0..x.len()).filter(|&i| x[i] != 0.0).collect()
    }

    #[test]
    fn magnitude_keeps_the_largest_k() {
        let mut x = vec![0.1, -5.0, 0.3, 2.0, -0.2, 4.0];
        magnitude(&mut x, 0.5, false);
        assert_eq!(kept(&x), vec![1, 3, 5]);
        assert_eq!(x[1], -5.0);
        // at least one element survives a tiny density
        let mut y = vec![1.0, -3.0, 2.0];
        magnitude(&mut y, 0.01, false);
        assert_eq!(kept(&y), vec![1]);
    }

    #[test]
    fn magnitude_rescale_restores_l1() {
        let mut x = vec![1.0f32, -2.0, 3.0, -4.0];
        magnitude(&mut x, 0.5, true);
        let s: f32 = x.iter().map(|v| v.abs()).sum();
        assert!((s - 10.0).abs() < 1e-5, "{x:?}");
        assert_eq!(x[0], 0.0);
    }

    #[test]
    fn ties_in_magnitude_are_ranked_by_position() {
        let mut x = vec![1.0f32, -1.0, 1.0, 1.0, 0.5];
        keep_rank_range(&mut x, 1, 3); // ranks: 0.5→0, then the four 1s → 1,2,3,4
        assert_eq!(kept(&x), vec![0, 1]);
        let mut y = vec![2.0f32, 1.0, 1.0, 1.0, 3.0];
        keep_rank_range(&mut y, 2, 4); // ranks: idx1→0, idx2→1, idx3→2, idx0→3, idx4→4
        assert_eq!(kept(&y), vec![0, 3]);
    }

    #[test]
    fn radix_selection_agrees_with_sorting() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // Many ties (few distinct values) and both signs, across several chunks.
        let x: Vec<f32> = (0..(SELECT_CHUNK * 2 + 1234))
            .map(|_| ((rng.next_u32() % 2001) as f32 - 1000.0) / 7.0)
            .collect();
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.sort_by_key(|&i| (mag_key(x[i]), i));
        for (lo, hi) in [(0, 10), (100, x.len()), (x.len() / 3, x.len() / 2), (5, 6)] {
            let (key, below) = key_at_rank(&x, lo);
            assert_eq!(key, mag_key(x[order[lo]]));
            assert_eq!(below, x.iter().filter(|v| mag_key(**v) < key).count());
            let mut y = x.clone();
            keep_rank_range(&mut y, lo, hi);
            let want: Vec<usize> = {
                let mut w: Vec<usize> = order[lo..hi].to_vec();
                w.sort();
                w.into_iter().filter(|&i| x[i] != 0.0).collect()
            };
            assert_eq!(kept(&y), want, "ranks {lo}..{hi}");
        }
    }

    #[test]
    fn breadcrumbs_drops_top_and_bottom() {
        let mut x: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        magnitude_outliers(&mut x, 0.5, 0.2, false);
        // drop top 2 (9, 10) and bottom 3 (1, 2, 3): keep 4..=8
        assert_eq!(kept(&x), vec![3, 4, 5, 6, 7]);
    }

    #[test]
    fn della_rejects_bad_epsilon() {
        let mut x = vec![1.0f32; 8];
        assert!(della_magprune(&mut x, 4, 0.9, 0.15, true, 1).is_err());
    }
}
