//! The terminal summary of an inspection: experts, pairs (whole model, attention, MLP) and
//! the findings.

use crate::kind::Kind;
use crate::Inspection;

fn opt(v: Option<f64>, pct: bool) -> String {
    match (v, pct) {
        (None, _) => "-".into(),
        (Some(v), true) => format!("{:.0}%", 100.0 * v),
        (Some(v), false) => format!("{v:.3}"),
    }
}

impl Inspection {
    /// The summary printed by `llm-merging inspect`.
    pub fn summary(&self) -> String {
        let m = &self.model.metrics;
        let mut s = format!(
            "task vectors of {} expert(s) over {} ({} tensors, {:.1}s); method {}\n\n",
            self.experts.len(),
            self.base,
            self.tensors.len(),
            self.seconds,
            self.rule.method
        );
        s.push_str(&format!(
            "{:<28} {:>10} {:>14} {:>10}\n",
            "expert", "norm", "relative norm", "kept"
        ));
        for (i, e) in self.experts.iter().enumerate() {
            let name = format!(
                "{} {}{}",
                e.number,
                e.name,
                if e.lora { " (LoRA)" } else { "" }
            );
            s.push_str(&format!(
                "{:<28} {:>10.4} {:>14} {:>10}\n",
                name,
                m.norm[i],
                opt(m.relative_norm[i], false),
                opt(m.kept_fraction[i], true)
            ));
        }
        let pairs = self.pairs();
        if !pairs.is_empty() {
            s.push_str(&format!(
                "\n{:<8} {:>8} {:>10} {:>10} {:>10} {:>10}\n",
                "pair", "cosine", "conflict", "attention", "mlp", "overlap"
            ));
            let kind_conflict = |k: Kind, i: usize, j: usize| {
                self.kind_group(k)
                    .and_then(|g| g.metrics.sign_conflict[i][j])
            };
            for (i, j) in pairs {
                s.push_str(&format!(
                    "{:<8} {:>8} {:>10} {:>10} {:>10} {:>10}\n",
                    format!("{}-{}", i + 1, j + 1),
                    opt(m.cosine[i][j], false),
                    opt(m.sign_conflict[i][j], true),
                    opt(kind_conflict(Kind::Attention, i, j), true),
                    opt(kind_conflict(Kind::Mlp, i, j), true),
                    opt(m.overlap[i][j], true),
                ));
            }
        }
        if !self.findings.is_empty() {
            s.push_str("\nfindings:\n");
            for f in &self.findings {
                s.push_str(&format!("  - {f}\n"));
            }
        }
        s
    }
}
