//! Paired comparisons on the same rows: the first model against each other one, per dataset,
//! on the dataset's primary metric: the difference of means with a paired bootstrap 95%
//! interval and, for multiple choice, the exact McNemar test.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::outcomes::{primary_metric, Evaluated};

/// One comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    pub dataset: String,
    pub metric: String,
    pub a: String,
    pub b: String,
    pub rows: usize,
    /// mean(a) − mean(b), with its interval.
    pub difference: String,
    pub interval: String,
    /// Whether the interval excludes 0.
    pub significant: bool,
    /// McNemar: rows only a / only b got right, and the p-value (multiple choice).
    pub mcnemar: String,
}

/// The first model against each other one, on every dataset both scored. With `strict`, two
/// models that scored a dataset on different rows are an error (comparing entries); without,
/// such a pair is skipped.
pub fn paired(models: &[Evaluated], strict: bool) -> Result<Vec<Paired>> {
    let mut out = Vec::new();
    let Some((first, rest)) = models.split_first() else {
        return Ok(out);
    };
    for (dataset, scores) in &first.scores {
        let Some(metric) = primary_metric(scores) else {
            continue;
        };
        let a = first.values(dataset, metric);
        for other in rest {
            if !other.scores.contains_key(dataset) {
                continue;
            }
            let b = other.values(dataset, metric);
            let same = a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.0 == y.0);
            if !same {
                if strict {
                    return Err(Error::DifferentRows {
                        dataset: dataset.clone(),
                        a: first.name.clone(),
                        b: other.name.clone(),
                    });
                }
                continue;
            }
            let va: Vec<f64> = a.iter().map(|x| x.1).collect();
            let vb: Vec<f64> = b.iter().map(|x| x.1).collect();
            let d = stats::paired_bootstrap(&va, &vb, stats::DEFAULT_RESAMPLES, 0);
            let mcnemar = if metric.starts_with("accuracy") {
                let right = |v: &[f64]| v.iter().map(|x| *x > 0.5).collect::<Vec<_>>();
                let m = stats::mcnemar(&right(&va), &right(&vb));
                format!("{} / {} rows, p = {:.3}", m.only_a, m.only_b, m.p_value)
            } else {
                String::new()
            };
            out.push(Paired {
                dataset: dataset.clone(),
                metric: metric.to_string(),
                a: first.name.clone(),
                b: other.name.clone(),
                rows: va.len(),
                difference: format!("{:+.3}", d.difference),
                interval: format!("[{:+.3}, {:+.3}]", d.low, d.high),
                significant: !d.includes_zero(),
                mcnemar,
            });
        }
    }
    Ok(out)
}
