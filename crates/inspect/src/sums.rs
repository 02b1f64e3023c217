//! What inspect measures: additive sums per tensor ([`Sums`]), which add up over any group of
//! tensors (a layer, a module kind, the model), and the metrics derived from them
//! ([`Metrics`]). Every ratio is computed from the group's sums, so a layer's cosine is the
//! cosine of the layer's concatenated task vectors, not a mean of per-tensor cosines.

use serde::{Deserialize, Serialize};

/// Additive statistics of a group of tensors, for E experts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sums {
    /// Elements.
    pub numel: u64,
    /// ‖base‖².
    pub base_sq: f64,
    /// ⟨δₑ, δ_f⟩ (E × E; the diagonal is ‖δₑ‖²).
    pub dot: Vec<Vec<f64>>,
    /// Σ δₑ² element by element (the denominator of `kept_fraction`).
    pub energy: Vec<f64>,
    /// Elements in each expert's kept set (TIES' top-k at its density, zeros left out).
    pub kept: Vec<u64>,
    /// Σ δₑ² over what the configured method keeps of expert e.
    pub kept_energy: Vec<f64>,
    /// Elements in both kept sets (E × E; the diagonal is `kept`).
    pub both_kept: Vec<Vec<u64>>,
    /// Elements in both kept sets with opposite signs (E × E).
    pub conflicts: Vec<Vec<u64>>,
}

impl Sums {
    /// Zero sums for `e` experts.
    pub fn zero(e: usize) -> Self {
        Sums {
            numel: 0,
            base_sq: 0.0,
            dot: vec![vec![0.0; e]; e],
            energy: vec![0.0; e],
            kept: vec![0; e],
            kept_energy: vec![0.0; e],
            both_kept: vec![vec![0; e]; e],
            conflicts: vec![vec![0; e]; e],
        }
    }

    /// Number of experts.
    pub fn experts(&self) -> usize {
        self.energy.len()
    }

    /// Adds `other` (the same experts) to these sums.
    pub fn add(&mut self, other: &Sums) {
        self.numel += other.numel;
        self.base_sq += other.base_sq;
        add_matrix(&mut self.dot, &other.dot);
        add_vec(&mut self.energy, &other.energy);
        add_vec(&mut self.kept, &other.kept);
        add_vec(&mut self.kept_energy, &other.kept_energy);
        add_matrix(&mut self.both_kept, &other.both_kept);
        add_matrix(&mut self.conflicts, &other.conflicts);
    }

    /// The metrics of these sums.
    pub fn metrics(&self) -> Metrics {
        let e = self.experts();
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        let norm: Vec<f64> = (0..e).map(|i| self.dot[i][i].max(0.0).sqrt()).collect();
        let base = self.base_sq.sqrt();
        let matrix = |f: &dyn Fn(usize, usize) -> Option<f64>| -> Vec<Vec<Option<f64>>> {
            (0..e).map(|i| (0..e).map(|j| f(i, j)).collect()).collect()
        };
        Metrics {
            norm: norm.clone(),
            relative_norm: norm.iter().map(|n| ratio(*n, base)).collect(),
            cosine: matrix(&|i, j| ratio(self.dot[i][j], norm[i] * norm[j])),
            sign_conflict: matrix(&|i, j| {
                ratio(self.conflicts[i][j] as f64, self.both_kept[i][j] as f64)
            }),
            overlap: matrix(&|i, j| {
                let union = self.kept[i] + self.kept[j] - self.both_kept[i][j];
                ratio(self.both_kept[i][j] as f64, union as f64)
            }),
            kept_fraction: (0..e)
                .map(|i| ratio(self.kept_energy[i], self.energy[i]))
                .collect(),
        }
    }
}

fn add_vec<T: Copy + std::ops::AddAssign>(a: &mut [T], b: &[T]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += *b);
}

fn add_matrix<T: Copy + std::ops::AddAssign>(a: &mut [Vec<T>], b: &[Vec<T>]) {
    a.iter_mut().zip(b).for_each(|(a, b)| add_vec(a, b));
}

/// The metrics of a group of tensors. `None` (JSON `null`) where a ratio has a zero
/// denominator (an expert that leaves the group unchanged, experts whose kept sets do not
/// meet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// ‖δₑ‖ per expert.
    pub norm: Vec<f64>,
    /// ‖δₑ‖ / ‖base‖ per expert.
    pub relative_norm: Vec<Option<f64>>,
    /// cos(δₑ, δ_f), experts × experts.
    pub cosine: Vec<Vec<Option<f64>>>,
    /// Of the elements both experts keep, the fraction where their signs differ (experts ×
    /// experts; the diagonal is 0).
    pub sign_conflict: Vec<Vec<Option<f64>>>,
    /// Jaccard overlap of the kept sets, |Kₑ ∩ K_f| / |Kₑ ∪ K_f| (experts × experts).
    pub overlap: Vec<Vec<Option<f64>>>,
    /// The fraction of ‖δₑ‖² the configured method keeps: inside the kept set and, for
    /// methods that elect signs, agreeing with the elected sign.
    pub kept_fraction: Vec<Option<f64>>,
}
