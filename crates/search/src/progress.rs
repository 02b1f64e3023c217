//! What a running search shows: a line per trial on stdout (trial, method, rows, score, best
//! so far, time left) and, on a terminal, a progress bar with the same summary.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::spec::Budget;
use crate::store::Trial;

/// The display of one search run.
pub struct Progress {
    bar: ProgressBar,
    budget: Budget,
    lines: bool,
    start: Instant,
}

/// `secs` as `1m05s` / `42s` / `1h02m`.
pub fn human(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl Progress {
    /// A display for a search with `budget`; `lines`: print a line per trial.
    pub fn new(budget: Budget, lines: bool) -> Progress {
        let bar = match budget.trials {
            Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
        };
        bar.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix("search");
        Progress {
            bar,
            budget,
            lines,
            start: Instant::now(),
        }
    }

    /// Prints a line (above the bar).
    pub fn say(&self, line: &str) {
        if self.lines {
            self.bar.suspend(|| println!("{line}"));
        }
    }

    /// Seconds left in the budget, given the trials so far (estimated from their mean time
    /// when the budget is a trial count).
    pub fn time_left(&self, trials: &[Trial]) -> Option<f64> {
        let spent: f64 = trials.iter().map(|t| t.seconds).sum();
        let by_time = self.budget.seconds.map(|s| (s - spent).max(0.0));
        let by_count = self.budget.trials.and_then(|n| {
            let done = trials.len() as f64;
            (done > 0.0).then(|| (n as f64 - done).max(0.0) * spent / done)
        });
        match (by_time, by_count) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Reports a finished trial and the best so far.
    pub fn trial(&self, t: &Trial, rungs: usize, best: Option<&Trial>, trials: &[Trial]) {
        let best_text = best
            .map(|b| format!("best {:.4} (#{})", b.objective, b.seq))
            .unwrap_or_else(|| "best -".into());
        let left = self
            .time_left(trials)
            .map(|s| format!("~{} left", human(s)))
            .unwrap_or_default();
        self.bar.set_position(trials.len() as u64);
        self.bar.set_message(format!("{best_text} · {left}"));
        if let Some(e) = &t.error {
            self.say(&format!(
                "trial {:>3}  {:<16} refused by the merge: {e}  {best_text}",
                t.seq, t.point.method
            ));
            return;
        }
        self.say(&format!(
            "trial {:>3}  {:<16} rows {:>4} (rung {}/{})  score {:.4}  {}  {:>6}  {}",
            t.seq,
            t.point.method,
            t.rows,
            t.rung + 1,
            rungs,
            t.objective,
            best_text,
            format!("{:.1}s", t.seconds),
            left
        ));
    }

    /// Wall time since the display started.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
