//! Optimizers: they propose [`Point`]s and learn from their scores. CMA-ES (the `cmaes` crate)
//! for spaces of ranges only, as mergekit-evolve does; TPE (the `tpe` crate) where the space
//! also chooses methods or experts; uniform random as the baseline. All are seeded: the same
//! space, seed and scores give the same proposals.
//!
//! The search drives them through one call: [`Optimizer::run`] proposes, calls `trial` for a
//! score, and stops when `trial` answers `None` (the budget is spent). That shape fits CMA-ES,
//! whose crate evaluates a generation through a callback, as well as the ask/tell loops.

mod cmaes_opt;
mod random;
mod tpe_opt;

use crate::error::Result;
use crate::space::Point;
use crate::space::Space;
use crate::spec::{OptimizerKind, SearchSpec};

/// A trial as optimizers see it: the score of a point (higher is better), or `None` when the
/// budget is spent.
pub type TrialFn<'a> = dyn FnMut(&Point) -> Result<Option<f64>> + 'a;

/// An optimizer.
pub trait Optimizer {
    /// Proposes points and tells itself their scores until `trial` answers `None`.
    fn run(&mut self, space: &Space, trial: &mut TrialFn<'_>) -> Result<()>;
}

/// The optimizer `space` chose (see [`Space::optimizer`]), seeded from `spec`.
pub fn for_space(space: &Space, spec: &SearchSpec) -> Box<dyn Optimizer> {
    match space.optimizer() {
        OptimizerKind::Cmaes | OptimizerKind::Auto => Box::new(cmaes_opt::Cmaes {
            seed: spec.seed,
            sigma: spec.sigma.unwrap_or(0.3),
            population: spec.population,
        }),
        OptimizerKind::Tpe => Box::new(tpe_opt::Tpe {
            seed: spec.seed,
            startup: spec.startup.unwrap_or(10),
        }),
        OptimizerKind::Random => Box::new(random::Random { seed: spec.seed }),
    }
}
