//! Successive halving, asynchronous (ASHA's rule): every candidate is first scored on the
//! first rung's rows; it goes on to the next rung (eta times the rows) only when its score is
//! among the top 1/eta of all scores seen at its rung so far. Most of the budget so goes to
//! candidates that looked good on a first look, and no candidate waits for a cohort.

/// The scores seen at each rung.
#[derive(Debug, Clone)]
pub struct Ladder {
    eta: usize,
    seen: Vec<Vec<f64>>,
}

impl Ladder {
    /// A ladder of `rungs` rungs with halving rate `eta` (≥ 2).
    pub fn new(rungs: usize, eta: usize) -> Ladder {
        Ladder {
            eta: eta.max(2),
            seen: vec![Vec::new(); rungs],
        }
    }

    /// The number of rungs.
    pub fn rungs(&self) -> usize {
        self.seen.len()
    }

    /// Records a candidate's score at `rung`.
    pub fn record(&mut self, rung: usize, score: f64) {
        self.seen[rung].push(score);
    }

    /// Whether a candidate that scored `score` at `rung` (already recorded) goes on: there is
    /// a next rung, and `score` is at least the ⌈n/eta⌉-th best of the n scores seen there.
    pub fn promote(&self, rung: usize, score: f64) -> bool {
        if rung + 1 >= self.seen.len() {
            return false;
        }
        let mut s = self.seen[rung].clone();
        s.sort_by(|a, b| b.total_cmp(a));
        let k = s.len().div_ceil(self.eta).max(1);
        s.get(k - 1).is_none_or(|&kth| score >= kth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotes_the_top_third() {
        let mut l = Ladder::new(2, 3);
        l.record(0, 0.5);
        assert!(l.promote(0, 0.5), "the first candidate is the best so far");
        l.record(0, 0.4);
        assert!(!l.promote(0, 0.4));
        l.record(0, 0.6);
        assert!(l.promote(0, 0.6));
        // Four seen: the top ⌈4/3⌉ = 2 go on.
        l.record(0, 0.55);
        assert!(l.promote(0, 0.55));
        assert!(!l.promote(1, 1.0), "the last rung has no next");
    }
}
