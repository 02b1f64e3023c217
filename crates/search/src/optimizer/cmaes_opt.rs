//! CMA-ES (the `cmaes` crate), maximising, over the unit cube of the ranges: it starts at the
//! entry's own values (where it sets them) with step size `sigma`; a proposal outside the cube
//! is scored at its nearest point inside, less the squared distance, so the search is pulled
//! back in. When the strategy converges before the budget is spent it restarts from the best
//! point with the next seed.

use cmaes::{CMAESOptions, DVector, Mode};

use super::{Optimizer, TrialFn};
use crate::error::{Error, Result};
use crate::space::{Point, Space};

/// CMA-ES.
pub struct Cmaes {
    /// Seed of the first run (restarts take the next ones).
    pub seed: u64,
    /// Initial step size, as a share of each range.
    pub sigma: f64,
    /// Candidates per generation (default 4 + ⌊3 ln d⌋).
    pub population: Option<usize>,
}

impl Optimizer for Cmaes {
    fn run(&mut self, space: &Space, trial: &mut TrialFn<'_>) -> Result<()> {
        let d = space.dims().len();
        let mut mean = space.entry_unit();
        let mut best: Option<(f64, Vec<f64>)> = None;
        for restart in 0u64.. {
            let mut stopped = false;
            let mut failed: Option<Error> = None;
            {
                let objective = |x: &DVector<f64>| -> f64 {
                    if stopped || failed.is_some() {
                        return f64::NAN;
                    }
                    let unit: Vec<f64> = x.iter().map(|v| v.clamp(0.0, 1.0)).collect();
                    let outside: f64 = x.iter().zip(&unit).map(|(a, b)| (a - b) * (a - b)).sum();
                    let p = Point {
                        method: 0,
                        include: Vec::new(),
                        unit: unit.clone(),
                    };
                    match trial(&p) {
                        Ok(Some(score)) => {
                            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                                best = Some((score, unit));
                            }
                            score - outside
                        }
                        Ok(None) => {
                            stopped = true;
                            f64::NAN
                        }
                        Err(e) => {
                            failed = Some(e);
                            f64::NAN
                        }
                    }
                };
                let mut options = CMAESOptions::new(mean.clone(), self.sigma)
                    .mode(Mode::Maximize)
                    .seed(self.seed.wrapping_add(restart));
                if let Some(p) = self.population {
                    options = options.population_size(p.max(2));
                } else if d == 1 {
                    // The crate's default for one dimension is 4; keep it.
                    options = options.population_size(4);
                }
                let mut state = options
                    .build(objective)
                    .map_err(|e| Error::Optimizer(format!("cmaes: {e:?}")))?;
                while state.next().is_none() {}
            }
            if let Some(e) = failed {
                return Err(e);
            }
            if stopped {
                return Ok(());
            }
            // Converged before the budget was spent: start again from the best point.
            if let Some((_, unit)) = &best {
                mean = unit.clone();
            }
        }
        Ok(())
    }
}
