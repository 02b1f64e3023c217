//! Sections read from other tools' outputs when they exist: the task-vector diagnostics of
//! `llm-merging inspect` (`inspect.json` and its SVG heatmaps) and a search's directory
//! (`trials.csv` and its SVG plots), inlined so the page needs no other file.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// An inlined SVG figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub title: String,
    pub svg: String,
}

/// The diagnostics section.
#[derive(Debug, Clone, Serialize)]
pub struct InspectSection {
    pub findings: Vec<String>,
    pub experts: Vec<String>,
    pub figures: Vec<Figure>,
}

/// The search section.
#[derive(Debug, Clone, Serialize)]
pub struct SearchSection {
    pub figures: Vec<Figure>,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Trials left out of the table (the CSV has them all).
    pub more: usize,
}

/// Trials shown in the table.
const MAX_TRIALS: usize = 500;

/// An SVG file's `<svg>` element (without an XML prolog), or `None` if it holds none.
fn svg(path: &Path) -> Result<Option<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text.find("<svg").map(|i| text[i..].to_string()))
}

/// The heatmaps inspect writes, in reading order, with their titles.
const HEATMAPS: [(&str, &str); 4] = [
    (
        "cosine.svg",
        "Cosine similarity of task vectors (layers × expert pairs)",
    ),
    (
        "sign_conflict.svg",
        "Sign conflicts among kept weights (layers × expert pairs)",
    ),
    (
        "relative_norm.svg",
        "Task-vector norm relative to the base (layers × experts)",
    ),
    (
        "kept_fraction.svg",
        "Share of each task vector the method keeps (layers × experts)",
    ),
];

/// The diagnostics in `dir`, when it holds an `inspect.json`.
pub fn inspect_section(dir: &Path) -> Result<Option<InspectSection>> {
    let json = dir.join("inspect.json");
    if !json.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::parse(&json, e))?;
    let strings = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let experts = v["experts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| format!("{} = {}", e["number"], e["name"].as_str().unwrap_or("?")))
                .collect()
        })
        .unwrap_or_default();
    let mut figures = Vec::new();
    for (file, title) in HEATMAPS {
        let path = dir.join(file);
        if path.is_file() {
            if let Some(svg) = svg(&path)? {
                figures.push(Figure {
                    title: title.into(),
                    svg,
                });
            }
        }
    }
    Ok(Some(InspectSection {
        findings: strings("findings"),
        experts,
        figures,
    }))
}

/// The search in `dir` (its `trials.csv` and SVG plots), when the directory exists.
pub fn search_section(dir: &Path) -> Result<Option<SearchSection>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut svgs: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "svg"))
        .collect();
    svgs.sort();
    let mut figures = Vec::new();
    for p in svgs {
        if let Some(svg) = svg(&p)? {
            let title = p
                .file_stem()
                .map(|s| s.to_string_lossy().replace('_', " "))
                .unwrap_or_default();
            figures.push(Figure { title, svg });
        }
    }
    let (mut header, mut rows, mut more) = (Vec::new(), Vec::new(), 0);
    let csv_path = dir.join("trials.csv");
    if csv_path.is_file() {
        let mut r = csv::Reader::from_path(&csv_path).map_err(|e| Error::parse(&csv_path, e))?;
        header = r
            .headers()
            .map_err(|e| Error::parse(&csv_path, e))?
            .iter()
            .map(String::from)
            .collect();
        for rec in r.records() {
            let rec = rec.map_err(|e| Error::parse(&csv_path, e))?;
            if rows.len() < MAX_TRIALS {
                rows.push(rec.iter().map(String::from).collect());
            } else {
                more += 1;
            }
        }
    }
    if figures.is_empty() && header.is_empty() {
        return Ok(None);
    }
    Ok(Some(SearchSection {
        figures,
        header,
        rows,
        more,
    }))
}
