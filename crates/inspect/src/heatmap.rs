//! SVG heatmaps with plotters' SVG backend (no system libraries: text is SVG `<text>`, which
//! the viewer lays out): layers × expert pairs for cosine and sign conflict, layers × experts
//! for relative norm and kept fraction.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::Inspection;

/// How values map to colours.
#[derive(Debug, Clone, Copy)]
pub enum Scale {
    /// `min` white to `max` dark blue.
    Sequential { min: f64, max: f64 },
    /// −`bound` blue, 0 white, +`bound` red.
    Diverging { bound: f64 },
}

/// A heatmap: `values[row][col]`, `None` drawn grey.
pub struct Heatmap {
    /// Title above the map.
    pub title: String,
    /// A second line (what the rows and columns are).
    pub subtitle: String,
    /// Row labels (layers).
    pub rows: Vec<String>,
    /// Column labels (expert pairs or experts).
    pub cols: Vec<String>,
    /// Values, rows × cols.
    pub values: Vec<Vec<Option<f64>>>,
    /// The colour scale.
    pub scale: Scale,
}

fn lerp(a: (u8, u8, u8), b: (u8, u8, u8), t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let c = |x: u8, y: u8| (f64::from(x) + (f64::from(y) - f64::from(x)) * t).round() as u8;
    RGBColor(c(a.0, b.0), c(a.1, b.1), c(a.2, b.2))
}

/// The colour bar's height for a map `map_h` pixels high.
fn bar_height(map_h: i32) -> i32 {
    map_h.clamp(80, 200)
}

const WHITE_RGB: (u8, u8, u8) = (255, 255, 255);
const BLUE_RGB: (u8, u8, u8) = (33, 102, 172);
const RED_RGB: (u8, u8, u8) = (178, 24, 43);
const MISSING: RGBColor = RGBColor(215, 215, 215);

impl Scale {
    fn color(&self, v: f64) -> RGBColor {
        match *self {
            Scale::Sequential { min, max } => {
                let span = if max > min { max - min } else { 1.0 };
                lerp(WHITE_RGB, BLUE_RGB, (v - min) / span)
            }
            Scale::Diverging { bound } => {
                let t = v / bound.max(f64::MIN_POSITIVE);
                if t >= 0.0 {
                    lerp(WHITE_RGB, RED_RGB, t)
                } else {
                    lerp(WHITE_RGB, BLUE_RGB, -t)
                }
            }
        }
    }

    fn range(&self) -> (f64, f64) {
        match *self {
            Scale::Sequential { min, max } => (min, max),
            Scale::Diverging { bound } => (-bound, bound),
        }
    }
}

impl Heatmap {
    /// The SVG document.
    pub fn svg(&self) -> String {
        let (nr, nc) = (self.rows.len().max(1), self.cols.len().max(1));
        let cw: i32 = (560 / nc as i32).clamp(28, 90);
        let ch: i32 = (480 / nr as i32).clamp(12, 26);
        let (left, top, right, bottom) = (78, 58, 110, 40);
        // Wide enough for the title and subtitle too (a map of one expert pair is narrow);
        // text widths estimated from the font sizes (16 and 11 px: about 6 and 4 px a character).
        let text = |s: &str, px: f64| 20 + (s.chars().count() as f64 * px) as i32;
        let width = (left + cw * nc as i32 + right)
            .max(text(&self.title, 6.5))
            .max(text(&self.subtitle, 4.5));
        let height = top + (ch * nr as i32).max(bar_height(nr as i32 * ch) + 28) + bottom;
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (width as u32, height as u32))
                .into_drawing_area();
            // Drawing into a String cannot fail; errors are ignored rather than unwrapped.
            let _ = self.draw(&root, (left, top), (cw, ch));
            let _ = root.present();
        }
        out
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, plotters::coord::Shift>,
        (left, top): (i32, i32),
        (cw, ch): (i32, i32),
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let font = |size: i32| ("sans-serif", size).into_font().color(&BLACK);
        root.draw(&Text::new(self.title.clone(), (10, 8), font(16)))?;
        root.draw(&Text::new(self.subtitle.clone(), (10, 30), font(11)))?;
        let centre = Pos::new(HPos::Center, VPos::Center);
        let right = Pos::new(HPos::Right, VPos::Center);
        let show_values = cw >= 40 && ch >= 16;
        for (r, label) in self.rows.iter().enumerate() {
            let y = top + r as i32 * ch;
            root.draw(&Text::new(
                label.clone(),
                (left - 6, y + ch / 2),
                font(11).pos(right),
            ))?;
            for c in 0..self.cols.len() {
                let x = left + c as i32 * cw;
                let v = self
                    .values
                    .get(r)
                    .and_then(|row| row.get(c))
                    .copied()
                    .flatten();
                let fill = v.map_or(MISSING, |v| self.scale.color(v));
                root.draw(&Rectangle::new(
                    [(x, y), (x + cw - 1, y + ch - 1)],
                    fill.filled(),
                ))?;
                if let (true, Some(v)) = (show_values, v) {
                    let dark = matches!(self.scale, Scale::Sequential { min, max }
                        if (v - min) / (max - min).max(f64::MIN_POSITIVE) > 0.6)
                        || matches!(self.scale, Scale::Diverging { bound } if v.abs() / bound > 0.6);
                    let style = ("sans-serif", 10)
                        .into_font()
                        .color(if dark { &WHITE } else { &BLACK })
                        .pos(centre);
                    root.draw(&Text::new(
                        format!("{v:.2}"),
                        (x + cw / 2, y + ch / 2),
                        style,
                    ))?;
                }
            }
        }
        let bottom_y = top + self.rows.len() as i32 * ch;
        for (c, label) in self.cols.iter().enumerate() {
            let x = left + c as i32 * cw + cw / 2;
            root.draw(&Text::new(
                label.clone(),
                (x, bottom_y + 12),
                font(11).pos(centre),
            ))?;
        }
        // Colour bar.
        let bar_x = left + self.cols.len() as i32 * cw + 24;
        let (lo, hi) = self.scale.range();
        let steps = 40;
        let bar_h = bar_height(self.rows.len() as i32 * ch);
        for s in 0..steps {
            let v = hi - (hi - lo) * f64::from(s) / f64::from(steps - 1);
            let y = top + s * bar_h / steps;
            root.draw(&Rectangle::new(
                [(bar_x, y), (bar_x + 14, y + bar_h / steps)],
                self.scale.color(v).filled(),
            ))?;
        }
        let label = Pos::new(HPos::Left, VPos::Center);
        for (v, y) in [
            (hi, top),
            ((hi + lo) / 2.0, top + bar_h / 2),
            (lo, top + bar_h),
        ] {
            root.draw(&Text::new(
                format!("{v:.2}"),
                (bar_x + 20, y),
                font(10).pos(label),
            ))?;
        }
        root.draw(&Text::new(
            "grey: undefined".to_string(),
            (bar_x - 4, top + bar_h + 18),
            font(10),
        ))?;
        Ok(())
    }
}

impl Inspection {
    /// The heatmaps, as (file name, SVG): `cosine.svg` and `sign_conflict.svg` (layers ×
    /// expert pairs, when there are two experts or more), `relative_norm.svg` and, when the
    /// method sparsifies or elects signs, `kept_fraction.svg` (layers × experts).
    pub fn heatmaps(&self) -> Vec<(String, String)> {
        let mut groups = self.layer_groups("all");
        if groups.is_empty() {
            groups = vec![&self.model];
        }
        let rows: Vec<String> = groups
            .iter()
            .map(|g| g.layer.map_or("model".into(), |l| format!("layer {l}")))
            .collect();
        let legend = self
            .experts
            .iter()
            .map(|e| format!("{} = {}", e.number, e.name))
            .collect::<Vec<_>>()
            .join(", ");
        let pairs = self.pairs();
        let pair_cols: Vec<String> = pairs
            .iter()
            .map(|(i, j)| format!("{}-{}", i + 1, j + 1))
            .collect();
        let expert_cols: Vec<String> = self.experts.iter().map(|e| e.number.to_string()).collect();
        let mut out = Vec::new();
        let mut map =
            |file: &str,
             title: &str,
             what: &str,
             cols: &[String],
             scale,
             value: &dyn Fn(&crate::GroupRecord, usize) -> Option<f64>| {
                let values = groups
                    .iter()
                    .map(|g| (0..cols.len()).map(|c| value(g, c)).collect())
                    .collect();
                let h = Heatmap {
                    title: title.to_string(),
                    subtitle: format!("rows: layers; columns: {what} (experts: {legend})"),
                    rows: rows.clone(),
                    cols: cols.to_vec(),
                    values,
                    scale,
                };
                out.push((file.to_string(), h.svg()));
            };
        if !pairs.is_empty() {
            map(
                "cosine.svg",
                "Cosine similarity of task vectors",
                "expert pairs",
                &pair_cols,
                Scale::Diverging { bound: 1.0 },
                &|g, c| g.metrics.cosine[pairs[c].0][pairs[c].1],
            );
            map(
                "sign_conflict.svg",
                "Sign conflicts among the weights both experts keep (0.5 = unrelated)",
                "expert pairs",
                &pair_cols,
                Scale::Sequential { min: 0.0, max: 1.0 },
                &|g, c| g.metrics.sign_conflict[pairs[c].0][pairs[c].1],
            );
        }
        let max_rel = groups
            .iter()
            .flat_map(|g| g.metrics.relative_norm.iter().flatten())
            .fold(0f64, |a, b| a.max(*b));
        map(
            "relative_norm.svg",
            "Task-vector norm relative to the base's",
            "experts",
            &expert_cols,
            Scale::Sequential {
                min: 0.0,
                max: if max_rel > 0.0 { max_rel } else { 1.0 },
            },
            &|g, c| g.metrics.relative_norm[c],
        );
        if self.rule.sparsifies || self.rule.elects_signs {
            map(
                "kept_fraction.svg",
                &format!(
                    "Share of each task vector {} keeps (squared norm)",
                    self.rule.method
                ),
                "experts",
                &expert_cols,
                Scale::Sequential { min: 0.0, max: 1.0 },
                &|g, c| g.metrics.kept_fraction[c],
            );
        }
        out
    }
}
