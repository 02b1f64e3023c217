//! The sums of one tensor, in parallel passes over its chunks (never a tensor-sized buffer):
//!
//! 1. ‖base‖², every ⟨δₑ, δ_f⟩ (adapter pairs from their factors instead), and for each expert
//!    that keeps a top-k a histogram of the high 16 bits of |δ| (merge-core's magnitude keys);
//! 2. for those experts, a histogram of the low 16 bits of the keys in the bin that holds the
//!    k-th largest: the exact threshold key and how many keys equal to it fall below the cut;
//! 3. (only when such ties are split) the number of threshold keys per chunk, so each chunk
//!    knows how many came before it;
//! 4. the kept sets (equal keys ranked by position, as merge-core's TIES ranks them: of the
//!    keys equal to the threshold the earliest are dropped), their overlaps and sign
//!    conflicts, and what the configured method keeps (TIES' elected sign: the sign of
//!    Σ wₑ·kept δₑ, summed in f32 in expert order as the merge does).
//!
//! Floating-point sums are made per chunk and added in chunk order, so the results do not
//! depend on the number of threads.

use merge_core::methods::sparsify::{locate, mag_key};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::sums::Sums;
use crate::vectors::{Chunk, TensorVectors};

const BINS: usize = 1 << 16;

/// Which elements of one expert's task vector count as kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Every nonzero element (density ≥ 1, or a method that does not sparsify).
    All,
    /// None (density ≤ 0).
    Nothing,
    /// The k largest magnitudes (TIES), zeros left out.
    Top(usize),
}

impl Keep {
    /// TIES' rule for `density` over `n` elements: ⌊density·n⌋, at least one.
    pub(crate) fn ties(density: f64, n: usize) -> Keep {
        if density >= 1.0 {
            Keep::All
        } else if density <= 0.0 {
            Keep::Nothing
        } else {
            let k = ((density * n as f64) as usize).max(1);
            if k >= n {
                Keep::All
            } else {
                Keep::Top(k)
            }
        }
    }
}

/// The kept sets and what the method keeps, for one tensor.
pub(crate) struct Rule {
    pub keep: Vec<Keep>,
    /// Per-expert weights (for the elected sign).
    pub weights: Vec<f32>,
    /// Whether the method elects signs (TIES' consensus).
    pub consensus: bool,
}

/// The located threshold of one expert's top-k: keep keys above `key`, and the keys equal to
/// it after the first `drop_ties` (in position order).
#[derive(Debug, Clone, Copy)]
struct Threshold {
    key: u32,
    drop_ties: usize,
}

/// The per-chunk floating-point sums of pass 1.
struct Pass1 {
    base_sq: f64,
    dot: Vec<f64>,
}

/// The per-chunk sums of pass 4.
struct Pass4 {
    kept: Vec<u64>,
    both: Vec<u64>,
    conflicts: Vec<u64>,
    energy: Vec<f64>,
    kept_energy: Vec<f64>,
}

/// Lanes of the f64 sums: independent accumulators, so the sums vectorise instead of waiting
/// on one add chain; their order is fixed, so results stay deterministic.
const LANES: usize = 8;

/// Σ aᵢ·bᵢ in f64.
fn dot64(a: &[f32], b: &[f32]) -> f64 {
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = (ca.remainder().iter().zip(cb.remainder()))
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let mut acc = [0f64; LANES];
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f64::from(x[l]) * f64::from(y[l]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Σ dᵢ² over the elements where `keep`, in f64.
fn energy_where(d: &[f32], keep: &[bool]) -> f64 {
    let (cd, ck) = (d.chunks_exact(LANES), keep.chunks_exact(LANES));
    let tail: f64 = (cd.remainder().iter().zip(ck.remainder()))
        .map(|(v, k)| {
            if *k {
                f64::from(*v) * f64::from(*v)
            } else {
                0.0
            }
        })
        .sum();
    let mut acc = [0f64; LANES];
    for (v, k) in cd.zip(ck) {
        for l in 0..LANES {
            let x = f64::from(v[l]);
            acc[l] += if k[l] { x * x } else { 0.0 };
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Runs `f` on every chunk (read into per-worker buffers), results in chunk order.
fn map_chunks<T: Send>(
    tv: &TensorVectors,
    with_base: bool,
    f: impl Fn(&mut Chunk) -> T + Sync,
) -> Result<Vec<T>> {
    let e = tv.experts.len();
    (0..tv.n_chunks())
        .into_par_iter()
        .map_init(
            || Chunk::new(e),
            |c, i| {
                tv.read(i, c, with_base)?;
                Ok(f(c))
            },
        )
        .collect()
}

/// Folds every chunk into histograms of `width` bins per selecting expert (u32 counts add in
/// any order).
fn histograms(
    tv: &TensorVectors,
    width: usize,
    f: impl Fn(&Chunk, &mut [u32]) + Sync,
) -> Result<Vec<u32>> {
    let e = tv.experts.len();
    (0..tv.n_chunks())
        .into_par_iter()
        .try_fold(
            || (Chunk::new(e), vec![0u32; width]),
            |(mut c, mut h), i| {
                tv.read(i, &mut c, false)?;
                f(&c, &mut h);
                Ok::<_, Error>((c, h))
            },
        )
        .map(|r| r.map(|(_, h)| h))
        .try_reduce(
            || vec![0u32; width],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                Ok(a)
            },
        )
}

/// The sums of one tensor under `rule`.
pub(crate) fn tensor_sums(tv: &TensorVectors, rule: &Rule) -> Result<Sums> {
    let e = tv.experts.len();
    let n = tv.n;
    if n >= u32::MAX as usize {
        return Err(Error::tensor(tv.name, "more than 2³² elements"));
    }
    let mut sums = Sums::zero(e);
    sums.numel = n as u64;
    // Pass 1: norms and inner products; the elementwise ones skip adapter pairs (factors) and
    // task vectors that are known to be zero.
    let elementwise: Vec<(usize, usize)> = (0..e)
        .flat_map(|i| (i..e).map(move |j| (i, j)))
        .filter(|&(i, j)| {
            let (a, b) = (&tv.experts[i], &tv.experts[j]);
            !(a.is_zero() || b.is_zero() || (a.low_rank().is_some() && b.low_rank().is_some()))
        })
        .collect();
    let selecting = selecting(tv, rule);
    let (partials, high) = pass1(tv, &elementwise, &selecting)?;
    for p in &partials {
        sums.base_sq += p.base_sq;
        for (&(i, j), d) in elementwise.iter().zip(&p.dot) {
            sums.dot[i][j] += d;
        }
    }
    for i in 0..e {
        for j in i..e {
            if let (Some(a), Some(b)) = (tv.experts[i].low_rank(), tv.experts[j].low_rank()) {
                sums.dot[i][j] = a.inner(b);
            }
            sums.dot[j][i] = sums.dot[i][j];
        }
    }
    if tv.experts.iter().all(|t| t.is_zero()) {
        return Ok(sums);
    }
    let thresholds = thresholds(tv, &selecting, &high)?;
    // Pass 3: where ties at a threshold are split, the threshold keys before each chunk.
    let split: Vec<usize> = (0..e)
        .filter(|&i| thresholds[i].is_some_and(|t| t.drop_ties > 0))
        .collect();
    let mut tie_starts: Vec<Vec<usize>> = vec![Vec::new(); e];
    if !split.is_empty() {
        let counts = map_chunks(tv, false, |c| {
            split
                .iter()
                .map(|&i| {
                    let t = thresholds[i].expect("split").key;
                    c.deltas[i].iter().filter(|d| mag_key(**d) == t).count()
                })
                .collect::<Vec<_>>()
        })?;
        for (s, &i) in split.iter().enumerate() {
            let mut acc = 0;
            tie_starts[i] = counts
                .iter()
                .map(|c| {
                    let start = acc;
                    acc += c[s];
                    start
                })
                .collect();
        }
    }
    // Pass 4: kept sets, overlaps, conflicts and what the method keeps.
    let partials = map_chunks(tv, false, |c| kept_sums(c, rule, &thresholds, &tie_starts))?;
    for p in &partials {
        for i in 0..e {
            sums.kept[i] += p.kept[i];
            sums.energy[i] += p.energy[i];
            sums.kept_energy[i] += p.kept_energy[i];
            for j in 0..e {
                sums.both_kept[i][j] += p.both[i * e + j];
                sums.conflicts[i][j] += p.conflicts[i * e + j];
            }
        }
    }
    Ok(sums)
}

/// The experts that keep a top-k (`(expert, k)`), in expert order: those whose thresholds
/// passes 1 and 2 locate.
fn selecting(tv: &TensorVectors, rule: &Rule) -> Vec<(usize, usize)> {
    rule.keep
        .iter()
        .enumerate()
        .filter_map(|(i, k)| match k {
            Keep::Top(k) if !tv.experts[i].is_zero() => Some((i, *k)),
            _ => None,
        })
        .collect()
}

/// Pass 1: per chunk (in chunk order) ‖base‖² and the `elementwise` inner products, and for
/// the `selecting` experts the histograms of the high 16 bits of their magnitude keys (one
/// read of every chunk for both).
fn pass1(
    tv: &TensorVectors,
    elementwise: &[(usize, usize)],
    selecting: &[(usize, usize)],
) -> Result<(Vec<Pass1>, Vec<u32>)> {
    let e = tv.experts.len();
    let width = selecting.len() * BINS;
    let (mut parts, high) = (0..tv.n_chunks())
        .into_par_iter()
        .try_fold(
            || (Chunk::new(e), Vec::new(), vec![0u32; width]),
            |(mut c, mut parts, mut h), i| {
                tv.read(i, &mut c, true)?;
                parts.push((
                    i,
                    Pass1 {
                        base_sq: dot64(&c.base, &c.base),
                        dot: elementwise
                            .iter()
                            .map(|&(a, b)| dot64(&c.deltas[a], &c.deltas[b]))
                            .collect(),
                    },
                ));
                for (slot, &(x, _)) in selecting.iter().enumerate() {
                    let h = &mut h[slot * BINS..(slot + 1) * BINS];
                    for d in &c.deltas[x] {
                        h[(mag_key(*d) >> 16) as usize] += 1;
                    }
                }
                Ok::<_, Error>((c, parts, h))
            },
        )
        .map(|r| r.map(|(_, parts, h)| (parts, h)))
        .try_reduce(
            || (Vec::new(), vec![0u32; width]),
            |(mut pa, mut ha), (pb, hb)| {
                pa.extend(pb);
                ha.iter_mut().zip(&hb).for_each(|(a, b)| *a += b);
                Ok((pa, ha))
            },
        )?;
    // Floating-point sums are added in chunk order by the caller.
    parts.sort_unstable_by_key(|(i, _)| *i);
    Ok((parts.into_iter().map(|(_, p)| p).collect(), high))
}

/// Pass 2: each selecting expert's exact threshold, from pass 1's `high` histograms and a
/// histogram of the low 16 bits of the keys in the bin that holds the k-th largest.
fn thresholds(
    tv: &TensorVectors,
    selecting: &[(usize, usize)],
    high: &[u32],
) -> Result<Vec<Option<Threshold>>> {
    let n = tv.n;
    let mut out = vec![None; tv.experts.len()];
    if selecting.is_empty() {
        return Ok(out);
    }
    let s = selecting.len();
    // The lowest kept element has ascending rank n − k.
    let bins: Vec<(u32, usize)> = selecting
        .iter()
        .enumerate()
        .map(|(slot, &(_, k))| {
            let (bin, below) = locate(&high[slot * BINS..(slot + 1) * BINS], n - k);
            (bin as u32, below)
        })
        .collect();
    let low = histograms(tv, s * BINS, |c, h| {
        for (slot, &(i, _)) in selecting.iter().enumerate() {
            let h = &mut h[slot * BINS..(slot + 1) * BINS];
            let bin = bins[slot].0;
            for d in &c.deltas[i] {
                let key = mag_key(*d);
                if key >> 16 == bin {
                    h[(key & 0xffff) as usize] += 1;
                }
            }
        }
    })?;
    for (slot, &(i, k)) in selecting.iter().enumerate() {
        let (bin, below_high) = bins[slot];
        let rank = n - k - below_high;
        let (low_key, below_low) = locate(&low[slot * BINS..(slot + 1) * BINS], rank);
        out[i] = Some(Threshold {
            key: (bin << 16) | low_key as u32,
            drop_ties: rank - below_low,
        });
    }
    Ok(out)
}

/// Pass 4 on one chunk.
fn kept_sums(
    c: &mut Chunk,
    rule: &Rule,
    thresholds: &[Option<Threshold>],
    tie_starts: &[Vec<usize>],
) -> Pass4 {
    let e = c.deltas.len();
    let len = c.deltas.first().map_or(0, Vec::len);
    let mut p = Pass4 {
        kept: vec![0; e],
        both: vec![0; e * e],
        conflicts: vec![0; e * e],
        energy: vec![0.0; e],
        kept_energy: vec![0.0; e],
    };
    for i in 0..e {
        let (d, mask) = (&c.deltas[i], &mut c.masks[i]);
        mask.clear();
        match (rule.keep[i], thresholds[i]) {
            (Keep::Nothing, _) => mask.resize(len, false),
            (Keep::Top(_), Some(t)) => {
                let starts = &tie_starts[i];
                let mut seen = starts.get(c.index).copied().unwrap_or(0);
                let next = starts.get(c.index + 1).copied().unwrap_or(usize::MAX);
                if seen >= t.drop_ties {
                    // Every threshold key here is kept (no split, or the cut came earlier).
                    mask.extend(d.iter().map(|v| {
                        let key = mag_key(*v);
                        key >= t.key && key != 0
                    }));
                } else if next <= t.drop_ties {
                    // Every threshold key here is dropped.
                    mask.extend(d.iter().map(|v| mag_key(*v) > t.key));
                } else {
                    // The cut falls in this chunk: count threshold keys in position order.
                    mask.extend(d.iter().map(|v| {
                        let key = mag_key(*v);
                        let tie = key == t.key;
                        let keep = key > t.key || (tie && seen >= t.drop_ties);
                        seen += usize::from(tie);
                        keep && key != 0
                    }));
                }
            }
            _ => mask.extend(d.iter().map(|v| mag_key(*v) != 0)),
        }
        p.kept[i] = mask.iter().map(|k| u64::from(*k)).sum();
        p.energy[i] = dot64(d, d);
    }
    if rule.consensus {
        // TIES' elected sign: Σ wₑ·(kept δₑ) in f32, expert by expert.
        c.total.clear();
        c.total.resize(len, 0.0);
        for i in 0..e {
            let w = rule.weights[i];
            let terms = c.deltas[i].iter().zip(&c.masks[i]);
            if i == 0 {
                for (t, (v, k)) in c.total.iter_mut().zip(terms) {
                    *t = (if *k { *v } else { 0.0 }) * w;
                }
            } else {
                for (t, (v, k)) in c.total.iter_mut().zip(terms) {
                    *t += (if *k { *v } else { 0.0 }) * w;
                }
            }
        }
    }
    for i in 0..e {
        let w = rule.weights[i];
        let d = &c.deltas[i];
        p.kept_energy[i] = if rule.consensus {
            // Kept and agreeing with the elected sign (a zero total elects +).
            c.elected.clear();
            c.elected
                .extend(d.iter().zip(&c.masks[i]).zip(&c.total).map(|((v, k), t)| {
                    let (v, up) = (v * w, *t >= 0.0);
                    *k && ((up && v > 0.0) || (!up && v < 0.0))
                }));
            energy_where(d, &c.elected)
        } else {
            energy_where(d, &c.masks[i])
        };
        for j in i..e {
            let (mi, mj, dj) = (&c.masks[i], &c.masks[j], &c.deltas[j]);
            let (mut both, mut conflicts) = (0u64, 0u64);
            for ((a, b), (x, y)) in mi.iter().zip(mj).zip(d.iter().zip(dj)) {
                let k = *a & *b;
                both += u64::from(k);
                conflicts += u64::from(k & ((*x > 0.0) != (*y > 0.0)));
            }
            for (a, b) in [(i, j), (j, i)] {
                p.both[a * e + b] = both;
                p.conflicts[a * e + b] = conflicts;
            }
        }
    }
    p
}
