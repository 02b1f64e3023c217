//! Plain-language findings from an [`Inspection`]: what a participant choosing experts and a
//! method should know, each a sentence with its numbers (e.g. "experts 2 (b) and 3 (c)
//! disagree in sign on 41% of the MLP weights both keep in layers 12-20").

use crate::kind::Kind;
use crate::sums::Sums;
use crate::{GroupRecord, Inspection};

/// How far above a pair's overall conflict rate a run of layers must be to be reported.
const HOTSPOT_MARGIN: f64 = 0.05;

fn pct(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

fn expert(x: &Inspection, i: usize) -> String {
    format!("expert {} ({})", i + 1, x.experts[i].name)
}

fn pair(x: &Inspection, i: usize, j: usize) -> String {
    format!(
        "experts {} ({}) and {} ({})",
        i + 1,
        x.experts[i].name,
        j + 1,
        x.experts[j].name
    )
}

/// `layers 3-7` or `layer 3`.
pub fn layer_range(first: usize, last: usize) -> String {
    if first == last {
        format!("layer {first}")
    } else {
        format!("layers {first}-{last}")
    }
}

/// Every finding, most general first.
pub fn findings(x: &Inspection) -> Vec<String> {
    let mut out = Vec::new();
    let e = x.experts.len();
    let m = &x.model.metrics;
    // Size of each change, and where it lives.
    for i in 0..e {
        let Some(rel) = m.relative_norm[i] else {
            continue;
        };
        if m.norm[i] == 0.0 {
            out.push(format!(
                "{} leaves the base unchanged: its task vector is zero",
                expert(x, i)
            ));
            continue;
        }
        let total = x.model.sums.dot[i][i];
        let mut shares: Vec<(f64, Kind)> = Kind::ALL
            .iter()
            .filter_map(|k| Some((x.kind_group(*k)?.sums.dot[i][i] / total, *k)))
            .filter(|(s, _)| *s >= 0.05)
            .collect();
        shares.sort_by(|a, b| b.0.total_cmp(&a.0));
        let shares: Vec<String> = shares
            .iter()
            .map(|(s, k)| format!("{} of it in {} weights", pct(*s), k.prose()))
            .collect();
        out.push(format!(
            "{}: task vector {:.3} of the base's norm; {}",
            expert(x, i),
            rel,
            shares.join(", ")
        ));
    }
    let sized: Vec<(usize, f64)> = (0..e)
        .filter_map(|i| Some((i, m.relative_norm[i]?)).filter(|(_, r)| *r > 0.0))
        .collect();
    if let (Some(big), Some(small)) = (
        sized.iter().max_by(|a, b| a.1.total_cmp(&b.1)),
        sized.iter().min_by(|a, b| a.1.total_cmp(&b.1)),
    ) {
        let ratio = big.1 / small.1;
        if ratio >= 3.0 {
            out.push(format!(
                "{} changes the base {ratio:.1}× more than {} ({:.4} vs {:.4}): with equal \
                 weights it dominates the merge",
                expert(x, big.0),
                expert(x, small.0),
                big.1,
                small.1
            ));
        }
    }
    // Each pair: direction, sign agreement, overlap, and the layers where they clash most.
    for (i, j) in x.pairs() {
        out.push(pair_finding(x, i, j));
        for kind in [Kind::Attention, Kind::Mlp] {
            if let Some(s) = conflict_hotspot(x, i, j, kind) {
                out.push(s);
            }
        }
    }
    // What the configured method keeps.
    if x.rule.sparsifies || x.rule.elects_signs {
        let kept: Vec<String> = (0..e)
            .filter_map(|i| Some(format!("{} for {}", pct(m.kept_fraction[i]?), expert(x, i))))
            .collect();
        if !kept.is_empty() {
            out.push(format!(
                "{} keeps, of each task vector (by squared norm{}): {}",
                x.rule.method,
                if x.rule.elects_signs {
                    ", after its sign election"
                } else {
                    ""
                },
                kept.join(", ")
            ));
        }
        for i in 0..e {
            if let Some(f) = m.kept_fraction[i].filter(|f| *f < 0.5) {
                out.push(format!(
                    "{} loses most of its change in the merge (keeps {}): raise its density or \
                     weight, or choose a method that keeps more",
                    expert(x, i),
                    pct(f)
                ));
            }
        }
    }
    out
}

fn pair_finding(x: &Inspection, i: usize, j: usize) -> String {
    let m = &x.model.metrics;
    let mut s = pair(x, i, j);
    match m.cosine[i][j] {
        Some(c) => {
            let how = if c >= 0.5 {
                "point the same way"
            } else if c >= 0.1 {
                "are somewhat aligned"
            } else if c > -0.1 {
                "are nearly orthogonal"
            } else {
                "point in opposite directions"
            };
            s.push_str(&format!(" {how} (cosine {c:.2})"));
        }
        None => s.push_str(" cannot be compared (one task vector is zero)"),
    }
    match m.sign_conflict[i][j] {
        Some(r) => s.push_str(&format!(
            " and disagree in sign on {} of the weights both keep (unrelated changes: 50%)",
            pct(r)
        )),
        None => s.push_str(" and keep no weight in common"),
    }
    if x.rule.sparsifies {
        if let Some(o) = m.overlap[i][j] {
            s.push_str(&format!(
                "; their kept sets overlap by {} (Jaccard)",
                pct(o)
            ));
        }
    }
    s
}

/// The longest run of consecutive layers where the pair's sign-conflict rate on `kind`
/// weights is at least [`HOTSPOT_MARGIN`] above its rate over all such weights.
fn conflict_hotspot(x: &Inspection, i: usize, j: usize, kind: Kind) -> Option<String> {
    let overall = x.kind_group(kind)?.metrics.sign_conflict[i][j]?;
    let layers: Vec<&GroupRecord> = x.layer_groups(kind.name());
    if layers.len() < 2 {
        return None;
    }
    let hot = |g: &GroupRecord| {
        g.metrics.sign_conflict[i][j].is_some_and(|r| r >= overall + HOTSPOT_MARGIN)
    };
    // Runs of hot layers as (first, last) positions in `layers`.
    let mut best: Option<(usize, usize)> = None;
    let mut run: Option<(usize, usize)> = None;
    for (p, g) in layers.iter().enumerate() {
        let consecutive = p > 0 && layers[p - 1].layer.map(|l| l + 1) == g.layer;
        run = match (hot(g), run) {
            (true, Some((a, _))) if consecutive => Some((a, p)),
            (true, _) => Some((p, p)),
            (false, _) => None,
        };
        if let Some((a, b)) = run {
            if best.is_none_or(|(c, d)| b - a > d - c) {
                best = Some((a, b));
            }
        }
    }
    let (a, b) = best?;
    let mut sums = Sums::zero(x.experts.len());
    for g in &layers[a..=b] {
        sums.add(&g.sums);
    }
    let rate = sums.metrics().sign_conflict[i][j]?;
    let (first, last) = (layers[a].layer?, layers[b].layer?);
    Some(format!(
        "{} disagree in sign on {} of the {} weights both keep in {} ({} over all {} weights)",
        pair(x, i, j),
        pct(rate),
        kind.prose(),
        layer_range(first, last),
        pct(overall),
        kind.prose()
    ))
}
