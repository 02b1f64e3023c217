//! How sure a score is: the statistics the kit reports beside its scores, all seeded so the
//! same rows give the same numbers.
//!
//! - [`bootstrap_se`]: the standard error of a mean over rows (resampling rows);
//! - [`paired_bootstrap`]: the difference of two systems' means on the same rows, with a 95%
//!   interval (resampling rows, both systems together);
//! - [`mcnemar`]: the exact McNemar test of two systems' right/wrong answers on the same rows.
//!
//! ```
//! let a = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0];
//! let b = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
//! let se = stats::bootstrap_se(&a, 1000, 0);
//! assert!(se > 0.0 && se < 0.5);
//! let d = stats::paired_bootstrap(&a, &b, 1000, 0);
//! assert!(d.low <= d.difference && d.difference <= d.high);
//! let m = stats::mcnemar(&[true, false, true, true, false, true], &[true, false, false, true, false, false]);
//! assert_eq!((m.only_a, m.only_b), (2, 0));
//! ```

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Resamples the kit uses unless told otherwise.
pub const DEFAULT_RESAMPLES: usize = 1000;

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// The mean of `resamples` resamplings (with replacement) of the row indices `0..n`, each
/// summarised by `stat` over the chosen indices.
fn bootstrap(
    n: usize,
    resamples: usize,
    seed: u64,
    mut stat: impl FnMut(&[usize]) -> f64,
) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx = vec![0usize; n];
    (0..resamples)
        .map(|_| {
            for i in idx.iter_mut() {
                *i = rng.gen_range(0..n);
            }
            stat(&idx)
        })
        .collect()
}

/// The bootstrap standard error of the mean of `values` (one per row): the standard deviation
/// of the means of `resamples` resamplings of the rows. 0 for fewer than two rows.
pub fn bootstrap_se(values: &[f64], resamples: usize, seed: u64) -> f64 {
    if values.len() < 2 || resamples < 2 {
        return 0.0;
    }
    let means = bootstrap(values.len(), resamples, seed, |idx| {
        idx.iter().map(|&i| values[i]).sum::<f64>() / idx.len() as f64
    });
    let m = mean(&means);
    (means.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (means.len() - 1) as f64).sqrt()
}

/// Two systems compared on the same rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedDifference {
    /// mean(a) − mean(b).
    pub difference: f64,
    /// The 2.5th percentile of the resampled differences.
    pub low: f64,
    /// The 97.5th percentile of the resampled differences.
    pub high: f64,
}

impl PairedDifference {
    /// Whether the 95% interval contains 0: the difference is within the noise.
    pub fn includes_zero(&self) -> bool {
        self.low <= 0.0 && 0.0 <= self.high
    }
}

/// The difference of the means of `a` and `b` (the same rows, in the same order) with a
/// paired bootstrap 95% percentile interval.
///
/// # Panics
/// When `a` and `b` differ in length (they must score the same rows).
pub fn paired_bootstrap(a: &[f64], b: &[f64], resamples: usize, seed: u64) -> PairedDifference {
    assert_eq!(a.len(), b.len(), "paired scores must cover the same rows");
    let difference = mean(a) - mean(b);
    if a.is_empty() || resamples == 0 {
        return PairedDifference {
            difference,
            low: difference,
            high: difference,
        };
    }
    let mut diffs = bootstrap(a.len(), resamples, seed, |idx| {
        idx.iter().map(|&i| a[i] - b[i]).sum::<f64>() / idx.len() as f64
    });
    diffs.sort_by(f64::total_cmp);
    let at = |q: f64| diffs[((q * (diffs.len() - 1) as f64).round() as usize).min(diffs.len() - 1)];
    PairedDifference {
        difference,
        low: at(0.025),
        high: at(0.975),
    }
}

/// McNemar's test of two systems' right/wrong answers on the same rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct McNemar {
    /// Rows only `a` got right.
    pub only_a: usize,
    /// Rows only `b` got right.
    pub only_b: usize,
    /// The exact two-sided p-value (binomial on the discordant rows, p = 1/2).
    pub p_value: f64,
}

/// The exact McNemar test of `a` against `b` (right or wrong per row, the same rows).
///
/// # Panics
/// When `a` and `b` differ in length.
pub fn mcnemar(a: &[bool], b: &[bool]) -> McNemar {
    assert_eq!(a.len(), b.len(), "paired answers must cover the same rows");
    let only_a = a.iter().zip(b).filter(|(x, y)| **x && !**y).count();
    let only_b = a.iter().zip(b).filter(|(x, y)| !**x && **y).count();
    let n = only_a + only_b;
    let k = only_a.min(only_b);
    // P(X <= k) for X ~ Binomial(n, 1/2), in logs to stay finite for large n; doubled.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_choose = 0.0f64;
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    McNemar {
        only_a,
        only_b,
        p_value: (2.0 * tail).min(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_error_of_a_proportion_is_close_to_the_formula() {
        // 100 rows, 30 right: sqrt(p(1-p)/n) = 0.0458.
        let v: Vec<f64> = (0..100).map(|i| f64::from(u8::from(i < 30))).collect();
        let se = bootstrap_se(&v, 4000, 7);
        assert!((se - 0.0458).abs() < 0.004, "{se}");
        assert_eq!(bootstrap_se(&v, 4000, 7), se, "seeded");
        assert_eq!(bootstrap_se(&[1.0], 100, 0), 0.0);
    }

    #[test]
    fn paired_intervals_see_real_differences_and_not_noise() {
        let a: Vec<f64> = (0..200).map(|i| f64::from(u8::from(i % 3 != 0))).collect();
        let clear = paired_bootstrap(&a, &vec![0.0; 200], 1000, 1);
        assert!(!clear.includes_zero() && clear.low > 0.5, "{clear:?}");
        let same = paired_bootstrap(&a, &a, 1000, 1);
        assert_eq!((same.difference, same.low, same.high), (0.0, 0.0, 0.0));
        let b: Vec<f64> = (0..200).map(|i| f64::from(u8::from(i % 3 != 1))).collect();
        assert!(paired_bootstrap(&a, &b, 1000, 1).includes_zero());
    }

    #[test]
    fn mcnemar_matches_the_exact_binomial() {
        // 10 discordant rows split 9/1: p = 2 * (1 + 10) / 1024.
        let a: Vec<bool> = (0..12).map(|i| i < 9 || i == 11).collect();
        let b: Vec<bool> = (0..12).map(|i| i == 9 || i == 11).collect();
        let m = mcnemar(&a, &b);
        assert_eq!((m.only_a, m.only_b), (9, 1));
        assert!((m.p_value - 22.0 / 1024.0).abs() < 1e-12, "{m:?}");
        assert_eq!(mcnemar(&a, &a).p_value, 1.0);
    }
}
