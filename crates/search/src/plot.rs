//! The search's two plots, SVG (`plotters`): the objective of every trial against its number,
//! with the best-so-far line on all tuning rows and the entry's own score for reference
//! (`score.svg`); and the held-out check (`held_out.svg`): the entry's recipe and the best
//! one per dataset and overall, on the tuning rows and on the held-out rows.

use std::path::Path;

use plotters::prelude::*;

use crate::compare::Check;
use crate::error::{Error, Result};
use crate::store::Trial;

fn plot_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |message| Error::Plot {
        path: path.to_path_buf(),
        message,
    }
}

const FIRST_LOOK: RGBColor = RGBColor(170, 170, 170);
const FULL: RGBColor = RGBColor(31, 119, 180);
const ENTRY: RGBColor = RGBColor(214, 39, 40);
const BEST: RGBColor = RGBColor(44, 160, 44);

/// `score.svg`: every trial's objective (grey: scored on fewer than all tuning rows, blue: on
/// all of them), the best so far on all tuning rows, and the entry's own score.
pub fn score_plot(path: &Path, trials: &[Trial], rungs: usize, entry: f64) -> Result<()> {
    let e = plot_err(path);
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(format!("{x:?}")))?;
    let n = trials.len().max(1) as f64;
    let values = trials.iter().map(|t| t.objective).chain([entry]);
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    let pad = ((hi - lo) * 0.1).max(0.01);
    let mut chart = ChartBuilder::on(&root)
        .caption("search: objective per trial", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5..n + 0.5, (lo - pad)..(hi + pad))
        .map_err(|x| e(format!("{x:?}")))?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .x_desc("trial")
        .y_desc("objective")
        .draw()
        .map_err(|x| e(format!("{x:?}")))?;
    let full = rungs.saturating_sub(1);
    chart
        .draw_series(
            trials
                .iter()
                .filter(|t| t.rung < full)
                .map(|t| Circle::new((t.seq as f64, t.objective), 3, FIRST_LOOK.filled())),
        )
        .map_err(|x| e(format!("{x:?}")))?
        .label("fewer rows (stopped by successive halving)")
        .legend(|(x, y)| Circle::new((x, y), 3, FIRST_LOOK.filled()));
    chart
        .draw_series(
            trials
                .iter()
                .filter(|t| t.rung == full)
                .map(|t| Circle::new((t.seq as f64, t.objective), 4, FULL.filled())),
        )
        .map_err(|x| e(format!("{x:?}")))?
        .label("all tuning rows")
        .legend(|(x, y)| Circle::new((x, y), 4, FULL.filled()));
    let mut line: Vec<(f64, f64)> = Vec::new();
    for t in trials
        .iter()
        .filter(|t| t.rung == full && t.error.is_none())
    {
        if line.last().is_none_or(|&(_, best)| t.objective > best) {
            line.push((t.seq as f64, t.objective));
        }
    }
    let mut steps = Vec::new();
    for (i, &(x, y)) in line.iter().enumerate() {
        if i > 0 {
            steps.push((x, line[i - 1].1));
        }
        steps.push((x, y));
    }
    if let Some(&(_, y)) = line.last() {
        steps.push((n + 0.5, y));
    }
    chart
        .draw_series(LineSeries::new(steps, FULL.stroke_width(2)))
        .map_err(|x| e(format!("{x:?}")))?
        .label("best so far")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], FULL.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            vec![(0.5, entry), (n + 0.5, entry)],
            ENTRY.stroke_width(1),
        ))
        .map_err(|x| e(format!("{x:?}")))?
        .label("entry's own recipe")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], ENTRY.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(format!("{x:?}")))?;
    root.present().map_err(|x| e(format!("{x:?}")))
}

/// `held_out.svg`: per dataset and for the objective, four bars — the entry's recipe and the
/// best one, each on the tuning rows (light) and the held-out rows (dark).
pub fn held_out_plot(path: &Path, check: &Check, datasets: &[String]) -> Result<()> {
    let e = plot_err(path);
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(format!("{x:?}")))?;
    let mut groups: Vec<(String, [f64; 4])> = Vec::new();
    for (d, name) in datasets.iter().enumerate() {
        let v = |x: Option<f64>| x.unwrap_or(0.0);
        groups.push((
            name.clone(),
            [
                v(check.entry.tuning_per_dataset[d]),
                v(check.entry.held_out_per_dataset[d]),
                v(check.best.tuning_per_dataset[d]),
                v(check.best.held_out_per_dataset[d]),
            ],
        ));
    }
    groups.push((
        "objective".into(),
        [
            check.entry.tuning,
            check.entry.held_out,
            check.best.tuning,
            check.best.held_out,
        ],
    ));
    let k = groups.len();
    let labels: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
    let formatter = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
            labels[i as usize].clone()
        } else {
            String::new()
        }
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "held-out check: {} vs {} ({} held-out rows)",
                check.entry.label, check.best.label, check.rows
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..k as f64 - 0.5, 0.0..1.3)
        .map_err(|x| e(format!("{x:?}")))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_labels(k * 4 + 1)
        .x_label_formatter(&formatter)
        .y_desc("score")
        .draw()
        .map_err(|x| e(format!("{x:?}")))?;
    let series: [(&str, RGBColor, f64); 4] = [
        ("entry, tuning rows", ENTRY, 0.35),
        ("entry, held-out rows", ENTRY, 1.0),
        ("best, tuning rows", BEST, 0.35),
        ("best, held-out rows", BEST, 1.0),
    ];
    let width = 0.18;
    for (s, (label, color, alpha)) in series.iter().enumerate() {
        let style = color.mix(*alpha).filled();
        chart
            .draw_series(groups.iter().enumerate().map(|(g, (_, v))| {
                let x0 = g as f64 - 2.0 * width + s as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v[s])], style)
            }))
            .map_err(|x| e(format!("{x:?}")))?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(format!("{x:?}")))?;
    root.present().map_err(|x| e(format!("{x:?}")))
}
