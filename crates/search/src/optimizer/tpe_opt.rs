//! TPE (the `tpe` crate): one estimator per dimension — Parzen for ranges, histograms for the
//! method and each expert's in/out — after `startup` uniform random proposals. A range the
//! proposal's method does not use (or whose expert is out) is told as unused (NaN), as the
//! crate asks for conditional spaces.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tpe::{categorical_range, histogram_estimator, parzen_estimator, range, TpeOptimizer};

use super::random::uniform;
use super::{Optimizer, TrialFn};
use crate::error::{Error, Result};
use crate::space::{Point, Space};

/// TPE.
pub struct Tpe {
    /// Seed of every proposal.
    pub seed: u64,
    /// Uniform random proposals before the estimators take over.
    pub startup: usize,
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Optimizer(format!("tpe: {e}"))
}

impl Optimizer for Tpe {
    fn run(&mut self, space: &Space, trial: &mut TrialFn<'_>) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let unit = || range(0.0, 1.0).map_err(err);
        let mut dims = (0..space.dims().len())
            .map(|_| Ok(TpeOptimizer::new(parzen_estimator(), unit()?)))
            .collect::<Result<Vec<_>>>()?;
        let mut method = match space.methods().len() {
            1 => None,
            n => Some(TpeOptimizer::new(
                histogram_estimator(),
                categorical_range(n).map_err(err)?,
            )),
        };
        let mut include = (0..space.selectable().len())
            .map(|_| {
                Ok(TpeOptimizer::new(
                    histogram_estimator(),
                    categorical_range(2).map_err(err)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        for i in 0.. {
            let p = if i < self.startup {
                uniform(space, &mut rng)
            } else {
                Point {
                    method: match &mut method {
                        Some(m) => m.ask(&mut rng).map_err(err)? as usize,
                        None => 0,
                    },
                    include: include
                        .iter_mut()
                        .map(|o| Ok(o.ask(&mut rng).map_err(err)? >= 1.0))
                        .collect::<Result<_>>()?,
                    unit: dims
                        .iter_mut()
                        .map(|o| o.ask(&mut rng).map_err(err))
                        .collect::<Result<_>>()?,
                }
            };
            let Some(score) = trial(&p)? else {
                return Ok(());
            };
            // TPE minimises.
            let value = -score;
            if let Some(m) = &mut method {
                m.tell(p.method as f64, value).map_err(err)?;
            }
            for (o, &inc) in include.iter_mut().zip(&p.include) {
                o.tell(f64::from(u8::from(inc)), value).map_err(err)?;
            }
            for (d, o) in dims.iter_mut().enumerate() {
                // The crate's ranges exclude their end.
                let u = if space.is_active(d, &p) {
                    p.unit[d].min(1.0 - f64::EPSILON)
                } else {
                    f64::NAN
                };
                o.tell(u, value).map_err(err)?;
            }
        }
        Ok(())
    }
}
