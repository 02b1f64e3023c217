//! The scores table: one row per evaluated model (the merge first, then the references or the
//! other entries), the published baselines where they score the same datasets, one column per
//! dataset and metric (the dataset's primary metric first) and the average of the primary
//! metrics; bootstrap standard errors beside every value computed from rows.

use serde::Serialize;

use crate::baselines::PUBLISHED;
use crate::outcomes::{primary_metric, Evaluated};

/// A column: one metric of one dataset (or the average).
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    pub dataset: String,
    pub metric: String,
    /// Whether it is the dataset's primary metric (accuracy / rougeL).
    pub primary: bool,
}

/// One cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub value: Option<f64>,
    pub text: String,
    /// `± 0.021`, where a standard error was computed.
    pub se: String,
    /// The best model value of its column.
    pub best: bool,
}

/// One row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    /// `merge`, `base`, `expert`, `entry` or `published`.
    pub role: String,
    pub cells: Vec<Cell>,
}

/// The table.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreTable {
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
    /// Where the published rows come from, when there are any.
    pub notes: Vec<String>,
}

/// The columns: the first model's datasets and metrics (primary first), then `average`.
fn columns(first: &Evaluated) -> Vec<Column> {
    let mut cols = Vec::new();
    for (dataset, metrics) in &first.scores {
        let primary = primary_metric(metrics).map(str::to_string);
        let mut names: Vec<&String> = metrics.keys().collect();
        names.sort_by_key(|m| (Some(m.as_str()) != primary.as_deref(), m.to_string()));
        for m in names {
            cols.push(Column {
                dataset: dataset.clone(),
                metric: m.clone(),
                primary: Some(m.as_str()) == primary.as_deref(),
            });
        }
    }
    if cols.iter().filter(|c| c.primary).count() > 1 {
        cols.push(Column {
            dataset: "average".into(),
            metric: "primary metrics".into(),
            primary: true,
        });
    }
    cols
}

fn text(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.3}"))
}

/// The scores table of `models` (the first defines the columns).
pub fn table(models: &[Evaluated]) -> ScoreTable {
    let Some(first) = models.first() else {
        return ScoreTable {
            columns: Vec::new(),
            rows: Vec::new(),
            notes: Vec::new(),
        };
    };
    let columns = columns(first);
    let primaries: Vec<&Column> = columns
        .iter()
        .filter(|c| c.primary && c.dataset != "average")
        .collect();
    let value = |get: &dyn Fn(&str, &str) -> Option<f64>, c: &Column| {
        if c.dataset == "average" {
            let v: Option<Vec<f64>> = primaries
                .iter()
                .map(|p| get(&p.dataset, &p.metric))
                .collect();
            v.map(|v| v.iter().sum::<f64>() / v.len() as f64)
        } else {
            get(&c.dataset, &c.metric)
        }
    };
    let mut rows: Vec<Row> = models
        .iter()
        .map(|m| {
            let get = |d: &str, k: &str| m.scores.get(d).and_then(|s| s.get(k)).copied();
            Row {
                name: m.name.clone(),
                role: serde_json::to_value(m.role)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                cells: columns
                    .iter()
                    .map(|c| {
                        let v = value(&get, c);
                        let se = (c.dataset != "average")
                            .then(|| m.standard_error(&c.dataset, &c.metric))
                            .flatten();
                        Cell {
                            value: v,
                            text: text(v),
                            se: se.map_or(String::new(), |s| format!("± {s:.3}")),
                            best: false,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    for (c, _) in columns.iter().enumerate() {
        let best = rows
            .iter()
            .filter_map(|r| r.cells[c].value)
            .fold(f64::NEG_INFINITY, f64::max);
        if rows.len() > 1 {
            for r in rows.iter_mut() {
                r.cells[c].best = r.cells[c].value == Some(best);
            }
        }
    }
    let mut notes = Vec::new();
    for p in PUBLISHED {
        let get = |d: &str, k: &str| p.value(d, k);
        let cells: Vec<Cell> = columns
            .iter()
            .map(|c| {
                let v = value(&get, c);
                Cell {
                    value: v,
                    text: text(v),
                    se: String::new(),
                    best: false,
                }
            })
            .collect();
        if cells.iter().any(|c| c.value.is_some()) {
            rows.push(Row {
                name: p.name.to_string(),
                role: "published".into(),
                cells,
            });
            notes.push(format!("{}: {}", p.name, p.source));
        }
    }
    ScoreTable {
        columns,
        rows,
        notes,
    }
}
