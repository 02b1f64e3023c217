//! Which rows a search sees. Each validation file's rows are shuffled with a seed; the first
//! `held_out` share is set aside and never scored while searching — only the final check
//! scores the best recipe and the entry's own on it. The rest are the tuning rows, and the
//! rungs of successive halving are growing prefixes of them: `first_look` rows per file, then
//! eta times as many, ..., then all of them. A rung's rows include every earlier rung's, so a
//! promoted candidate is only scored on the rows it has not seen.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::error::SpecError;
use crate::spec::RowsSpec;

/// Rows of some datasets: per dataset (index into the search's datasets), row indices into
/// the file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RowSet(pub Vec<Vec<usize>>);

impl RowSet {
    /// Rows in all datasets.
    pub fn len(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }

    /// No rows at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The split and the rungs.
#[derive(Debug, Clone)]
pub struct RowPlan {
    /// Per dataset: its held-out rows.
    pub held_out: RowSet,
    /// Per rung: the tuning rows scored there (the last rung: all of them).
    pub rungs: Vec<RowSet>,
    /// Successive halving's rate.
    pub eta: usize,
}

/// A dataset as the plan needs it: its name (for errors) and its row count.
#[derive(Debug, Clone)]
pub struct DatasetSize {
    /// File stem.
    pub name: String,
    /// Rows in the file.
    pub rows: usize,
}

/// The seed of one file's shuffle: the split seed and the file's name, so adding a file does
/// not reshuffle the others.
fn file_seed(seed: u64, name: &str) -> u64 {
    let h = Sha256::digest(format!("{seed}:{name}").as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

impl RowPlan {
    /// Splits every dataset: `spec.held_out` of its rows (rounded) held out, the rest tuning
    /// rows in rungs. A file left with no held-out or no tuning row is an error naming it.
    pub fn new(spec: &RowsSpec, seed: u64, datasets: &[DatasetSize]) -> Result<RowPlan, SpecError> {
        let fraction = spec.held_out;
        if !(0.0..=1.0).contains(&fraction) {
            return Err(SpecError::Invalid(format!(
                "[search.rows] held_out = {fraction}: a share of each file, between 0 and 1 (e.g. 0.3)"
            )));
        }
        if spec.eta < 2 {
            return Err(SpecError::Invalid(format!(
                "[search.rows] eta = {}: the halving rate is at least 2 (default 3)",
                spec.eta
            )));
        }
        if spec.first_look == Some(0) {
            return Err(SpecError::Invalid(
                "[search.rows] first_look = 0: a first look needs at least one row per file".into(),
            ));
        }
        let seed = spec.split_seed.unwrap_or(seed);
        let mut held_out = Vec::new();
        let mut tuning = Vec::new();
        for d in datasets {
            let n_held = (d.rows as f64 * fraction).round() as usize;
            if n_held == 0 {
                return Err(SpecError::NoHeldOutRows {
                    dataset: d.name.clone(),
                    rows: d.rows,
                    fraction,
                });
            }
            if n_held >= d.rows {
                return Err(SpecError::NoTuningRows {
                    dataset: d.name.clone(),
                    rows: d.rows,
                    fraction,
                });
            }
            let mut order: Vec<usize> = (0..d.rows).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(file_seed(seed, &d.name)));
            let (h, t) = order.split_at(n_held);
            held_out.push(h.to_vec());
            tuning.push(t.to_vec());
        }
        let most = tuning.iter().map(Vec::len).max().unwrap_or(0);
        let eta = spec.eta;
        let first = spec
            .first_look
            .unwrap_or_else(|| (most / (eta * eta)).max(1));
        let mut sizes = Vec::new();
        let mut size = first;
        while size < most {
            sizes.push(size);
            size = size.saturating_mul(eta);
        }
        sizes.push(most);
        let rungs = sizes
            .iter()
            .map(|&s| {
                RowSet(
                    tuning
                        .iter()
                        .map(|t| t[..s.min(t.len())].to_vec())
                        .collect(),
                )
            })
            .collect();
        Ok(RowPlan {
            held_out: RowSet(held_out),
            rungs,
            eta,
        })
    }

    /// Every tuning row (the last rung).
    pub fn tuning(&self) -> &RowSet {
        self.rungs.last().expect("at least one rung")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(rows: &[usize]) -> Vec<DatasetSize> {
        rows.iter()
            .enumerate()
            .map(|(i, &rows)| DatasetSize {
                name: format!("d{i}"),
                rows,
            })
            .collect()
    }

    #[test]
    fn split_is_seeded_disjoint_and_nested() {
        let spec = RowsSpec::default();
        let p = RowPlan::new(&spec, 7, &sizes(&[100, 40])).unwrap();
        assert_eq!(p.held_out.0[0].len(), 30);
        assert_eq!(p.held_out.0[1].len(), 12);
        assert_eq!(p.tuning().0[0].len(), 70);
        // 70 tuning rows, eta 3: 7 → 21 → 63 → 70.
        let r: Vec<usize> = p.rungs.iter().map(|r| r.0[0].len()).collect();
        assert_eq!(r, vec![7, 21, 63, 70]);
        for w in p.rungs.windows(2) {
            assert!(w[1].0[0].starts_with(&w[0].0[0]), "rungs are nested");
        }
        for i in &p.held_out.0[0] {
            assert!(!p.tuning().0[0].contains(i), "held-out rows never tune");
        }
        let again = RowPlan::new(&spec, 7, &sizes(&[100, 40])).unwrap();
        assert_eq!(again.held_out, p.held_out);
        let other = RowPlan::new(&spec, 8, &sizes(&[100, 40])).unwrap();
        assert_ne!(other.held_out, p.held_out);
    }

    #[test]
    fn empty_splits_name_the_file() {
        let spec = RowsSpec {
            held_out: 0.0,
            ..RowsSpec::default()
        };
        let e = RowPlan::new(&spec, 0, &sizes(&[100])).unwrap_err();
        assert!(
            matches!(&e, SpecError::NoHeldOutRows { dataset, .. } if dataset == "d0"),
            "{e}"
        );
        let spec = RowsSpec {
            held_out: 0.3,
            ..RowsSpec::default()
        };
        let e = RowPlan::new(&spec, 0, &sizes(&[100, 1])).unwrap_err();
        assert!(e.to_string().contains("`d1` (1 rows)"), "{e}");
        let spec = RowsSpec {
            held_out: 1.0,
            ..RowsSpec::default()
        };
        let e = RowPlan::new(&spec, 0, &sizes(&[10])).unwrap_err();
        assert!(matches!(e, SpecError::NoTuningRows { .. }), "{e}");
    }
}
