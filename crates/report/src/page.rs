//! The page: its context (everything the template shows) rendered by minijinja from
//! `templates/report.html`, with HTML escaping on (only the inlined SVGs are marked safe).

use minijinja::value::Serde;
use minijinja::{Environment, Value};
use serde::Serialize;

use crate::error::Result;
use crate::examples::Browser;
use crate::extras::{InspectSection, SearchSection};
use crate::paired::Paired;
use crate::scores::ScoreTable;
use crate::timings::Timings;
use crate::EntrySource;

const TEMPLATE: &str = include_str!("../templates/report.html");

/// An entry as the page introduces it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EntryInfo {
    pub name: String,
    pub method: String,
    pub path: String,
    pub toml: String,
}

impl EntryInfo {
    pub(crate) fn of(s: &EntrySource) -> Self {
        EntryInfo {
            name: s.name.clone(),
            method: s.method.clone(),
            path: s.entry_path.clone(),
            toml: s.entry_toml.clone(),
        }
    }
}

/// Everything on the page.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Page {
    pub title: String,
    pub entries: Vec<EntryInfo>,
    pub scores: ScoreTable,
    pub paired: Vec<Paired>,
    pub timings: Vec<(String, Timings)>,
    pub inspect: Option<InspectSection>,
    pub search: Option<SearchSection>,
    pub browsers: Vec<Browser>,
    /// What the browser's first column is ("merge", "first entry"), for the filter labels.
    pub first_is: String,
    pub hints: Vec<String>,
}

pub(crate) fn render(page: &Page) -> Result<String> {
    let mut env = Environment::new();
    env.add_template("report.html", TEMPLATE)?;
    let html = env
        .get_template("report.html")?
        .render(Value::from(Serde(page)))?;
    Ok(html)
}
