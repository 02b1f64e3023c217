//! Uniform random proposals: every range uniform, every choice equally likely.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Optimizer, TrialFn};
use crate::error::Result;
use crate::space::{Point, Space};

/// The baseline.
pub struct Random {
    /// Seed of every proposal.
    pub seed: u64,
}

/// A uniformly random point of `space`.
pub fn uniform(space: &Space, rng: &mut impl Rng) -> Point {
    Point {
        method: rng.gen_range(0..space.methods().len()),
        include: (0..space.selectable().len())
            .map(|_| rng.gen_bool(0.5))
            .collect(),
        unit: (0..space.dims().len()).map(|_| rng.gen::<f64>()).collect(),
    }
}

impl Optimizer for Random {
    fn run(&mut self, space: &Space, trial: &mut TrialFn<'_>) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        while trial(&uniform(space, &mut rng))?.is_some() {}
        Ok(())
    }
}
