//! The trial store: an SQLite database (`store.sqlite`) in the search directory holding every
//! row ever scored (per recipe, per data file and evaluation settings), every evaluation's
//! timings, and every trial of every search, each written in one transaction when it
//! completes. A search killed at any moment loses at most the trial in flight; rerun, it
//! replays its trials from here without computing them and never scores a row twice.
//!
//! Keys: a recipe's key is the sha256 of its canonical TOML; a data key is the sha256 of a
//! validation file's bytes and of the evaluation settings; a search's key covers the entry's
//! recipe, the `[search]` table without its budget and the data keys.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::objective::{RowMetrics, RowScore};
use crate::rows::RowSet;
use crate::space::{Point, PointRecord};

/// The schema's version; a store of another version is refused, not misread.
const SCHEMA_VERSION: &str = "1";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS recipes (key TEXT PRIMARY KEY, toml TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recipe TEXT NOT NULL,
    rows INTEGER NOT NULL,
    merge_seconds REAL NOT NULL,
    eval_seconds REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rows (
    recipe TEXT NOT NULL,
    data TEXT NOT NULL,
    row INTEGER NOT NULL,
    prediction TEXT NOT NULL,
    metrics TEXT NOT NULL,
    evaluation INTEGER NOT NULL REFERENCES evaluations(id),
    PRIMARY KEY (recipe, data, row)
);
CREATE TABLE IF NOT EXISTS searches (key TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    search TEXT NOT NULL,
    seq INTEGER NOT NULL,
    recipe TEXT NOT NULL,
    point TEXT NOT NULL,
    raw TEXT NOT NULL,
    rung INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    objective REAL NOT NULL,
    rung_scores TEXT NOT NULL,
    scores TEXT NOT NULL,
    new_rows INTEGER NOT NULL,
    merge_seconds REAL NOT NULL,
    eval_seconds REAL NOT NULL,
    seconds REAL NOT NULL,
    error TEXT,
    PRIMARY KEY (search, seq)
);
";

/// One completed trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// 1-based number in its search.
    pub seq: usize,
    /// The recipe's key.
    pub recipe: String,
    /// The candidate in words.
    pub point: PointRecord,
    /// The candidate as the optimizer proposed it.
    pub raw: Point,
    /// The last rung it reached (0: the first look).
    pub rung: usize,
    /// Rows scored at that rung.
    pub rows: usize,
    /// The objective at that rung.
    pub objective: f64,
    /// The objective at every rung it reached.
    pub rung_scores: Vec<f64>,
    /// Each dataset's main metric at that rung.
    pub scores: Vec<Option<f64>>,
    /// Rows this trial scored itself (the others came from the store).
    pub new_rows: usize,
    /// Seconds merging.
    pub merge_seconds: f64,
    /// Seconds evaluating.
    pub eval_seconds: f64,
    /// Wall seconds of the whole trial.
    pub seconds: f64,
    /// Why the merge engine refused the recipe (then the trial scored nothing, and counts as
    /// the worst score, 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The open store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let conn = Connection::open(path).map_err(|source| Error::Store {
            path: path.to_path_buf(),
            source,
        })?;
        let store = Store {
            conn,
            path: path.to_path_buf(),
        };
        store.init()?;
        Ok(store)
    }

    /// Opens an existing store read-only (`--report`); `None` when there is none.
    pub fn open_existing(path: &Path) -> Result<Option<Store>> {
        if !path.is_file() {
            return Ok(None);
        }
        Store::open(path).map(Some)
    }

    fn err(&self, source: rusqlite::Error) -> Error {
        Error::Store {
            path: self.path.clone(),
            source,
        }
    }

    fn init(&self) -> Result<()> {
        // WAL: a reader (a report, a test watching progress) never blocks the search; a
        // transaction is durable once committed, whatever kills the process after.
        self.conn
            .busy_timeout(Duration::from_secs(30))
            .map_err(|e| self.err(e))?;
        self.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| self.err(e))?;
        self.conn.execute_batch(SCHEMA).map_err(|e| self.err(e))?;
        let version: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        match version.as_deref() {
            None => {
                self.conn
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                        [SCHEMA_VERSION],
                    )
                    .map_err(|e| self.err(e))?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(other) => {
                return Err(self.err(rusqlite::Error::InvalidParameterName(format!(
                    "schema version {other}, this tool reads {SCHEMA_VERSION}: move the store away to start over"
                ))))
            }
        }
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rows of `set` already scored for `recipe` (per dataset `data` keys), and the rows
    /// still to score.
    pub fn cached(
        &self,
        recipe: &str,
        data: &[String],
        set: &RowSet,
    ) -> Result<(Vec<RowScore>, RowSet)> {
        let mut found = Vec::new();
        let mut missing = RowSet(vec![Vec::new(); set.0.len()]);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT row, prediction, metrics FROM rows WHERE recipe = ?1 AND data = ?2",
            )
            .map_err(|e| self.err(e))?;
        for (d, rows) in set.0.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let mut have: HashMap<usize, (String, String)> = HashMap::new();
            let it = stmt
                .query_map(params![recipe, data[d]], |r| {
                    Ok((r.get::<_, i64>(0)? as usize, r.get(1)?, r.get(2)?))
                })
                .map_err(|e| self.err(e))?;
            for x in it {
                let (row, prediction, metrics) = x.map_err(|e| self.err(e))?;
                have.insert(row, (prediction, metrics));
            }
            for &row in rows {
                match have.get(&row) {
                    Some((prediction, metrics)) => found.push(RowScore {
                        dataset: d,
                        row,
                        prediction: prediction.clone(),
                        metrics: parse_metrics(metrics).map_err(|e| self.err(e))?,
                    }),
                    None => missing.0[d].push(row),
                }
            }
        }
        Ok((found, missing))
    }

    /// Records one evaluation of `recipe` (its TOML kept for reports) and its rows, in one
    /// transaction. A row already in the store is an error: rows are never scored twice.
    pub fn add_evaluation(
        &mut self,
        recipe: &str,
        toml: &str,
        data: &[String],
        rows: &[RowScore],
        merge_seconds: f64,
        eval_seconds: f64,
    ) -> Result<()> {
        let path = self.path.clone();
        let err = |source| Error::Store {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "INSERT OR IGNORE INTO recipes (key, toml) VALUES (?1, ?2)",
            params![recipe, toml],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO evaluations (recipe, rows, merge_seconds, eval_seconds) VALUES (?1, ?2, ?3, ?4)",
            params![recipe, rows.len() as i64, merge_seconds, eval_seconds],
        )
        .map_err(err)?;
        let evaluation = tx.last_insert_rowid();
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO rows (recipe, data, row, prediction, metrics, evaluation) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(err)?;
            for r in rows {
                let metrics = serde_json::to_string(&r.metrics).expect("metrics serialise");
                stmt.execute(params![
                    recipe,
                    data[r.dataset],
                    r.row as i64,
                    r.prediction,
                    metrics,
                    evaluation
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// The TOML of a recipe the store has seen.
    pub fn recipe_toml(&self, recipe: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT toml FROM recipes WHERE key = ?1", [recipe], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Registers a search (its key and `[search]` table).
    pub fn begin_search(&self, key: &str, spec: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO searches (key, spec) VALUES (?1, ?2)",
                params![key, spec],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The trials of search `key`, in order.
    pub fn trials(&self, key: &str) -> Result<Vec<Trial>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT seq, recipe, point, raw, rung, rows, objective, rung_scores, scores, new_rows, merge_seconds, eval_seconds, seconds, error FROM trials WHERE search = ?1 ORDER BY seq",
            )
            .map_err(|e| self.err(e))?;
        let bad_json = |i: usize, s: String| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, s.into())
        };
        let rows = stmt
            .query_map([key], |r| {
                let point: String = r.get(2)?;
                let raw: String = r.get(3)?;
                let rung_scores: String = r.get(7)?;
                let scores: String = r.get(8)?;
                Ok(Trial {
                    seq: r.get::<_, i64>(0)? as usize,
                    recipe: r.get(1)?,
                    point: serde_json::from_str(&point).map_err(|e| bad_json(2, e.to_string()))?,
                    raw: serde_json::from_str(&raw).map_err(|e| bad_json(3, e.to_string()))?,
                    rung: r.get::<_, i64>(4)? as usize,
                    rows: r.get::<_, i64>(5)? as usize,
                    objective: r.get(6)?,
                    rung_scores: serde_json::from_str(&rung_scores)
                        .map_err(|e| bad_json(7, e.to_string()))?,
                    scores: serde_json::from_str(&scores)
                        .map_err(|e| bad_json(8, e.to_string()))?,
                    new_rows: r.get::<_, i64>(9)? as usize,
                    merge_seconds: r.get(10)?,
                    eval_seconds: r.get(11)?,
                    seconds: r.get(12)?,
                    error: r.get(13)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Records a completed trial of search `key`.
    pub fn add_trial(&self, key: &str, t: &Trial) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO trials (search, seq, recipe, point, raw, rung, rows, objective, rung_scores, scores, new_rows, merge_seconds, eval_seconds, seconds, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![
                    key,
                    t.seq as i64,
                    t.recipe,
                    json(&t.point),
                    json(&t.raw),
                    t.rung as i64,
                    t.rows as i64,
                    t.objective,
                    json(&t.rung_scores),
                    json(&t.scores),
                    t.new_rows as i64,
                    t.merge_seconds,
                    t.eval_seconds,
                    t.seconds,
                    t.error
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Rows scored over the store's whole life, and the evaluations that scored them.
    pub fn scored_rows(&self) -> Result<(usize, usize)> {
        self.conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM rows), (SELECT COUNT(*) FROM evaluations)",
                [],
                |r| Ok((r.get::<_, i64>(0)? as usize, r.get::<_, i64>(1)? as usize)),
            )
            .map_err(|e| self.err(e))
    }
}

fn parse_metrics(s: &str) -> rusqlite::Result<RowMetrics> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// JSON text of a trial's structured column.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("trial fields serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_are_never_stored_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("store.sqlite")).unwrap();
        let data = vec!["d0".to_string(), "d1".to_string()];
        let rows = vec![
            RowScore {
                dataset: 0,
                row: 3,
                prediction: "1".into(),
                metrics: RowMetrics::Choice {
                    correct: true,
                    correct_norm: Some(false),
                },
            },
            RowScore {
                dataset: 1,
                row: 0,
                prediction: "a b".into(),
                metrics: RowMetrics::Generation {
                    rouge1: 0.1,
                    rouge2: 0.2,
                    rouge_l: 1.0 / 3.0,
                    rouge_lsum: 0.4,
                },
            },
        ];
        s.add_evaluation("r", "[merge]", &data, &rows, 0.5, 1.5)
            .unwrap();
        let (found, missing) = s
            .cached("r", &data, &RowSet(vec![vec![3, 4], vec![0]]))
            .unwrap();
        assert_eq!(found, rows);
        assert_eq!(missing, RowSet(vec![vec![4], vec![]]));
        assert!(s
            .add_evaluation("r", "[merge]", &data, &rows[..1], 0.0, 0.0)
            .is_err());
        assert_eq!(s.scored_rows().unwrap(), (2, 1));
        // Another data key is another row.
        let (found, _) = s
            .cached(
                "r",
                &["other".to_string(), "d1".to_string()],
                &RowSet(vec![vec![3], vec![]]),
            )
            .unwrap();
        assert!(found.is_empty());
        assert_eq!(s.recipe_toml("r").unwrap().as_deref(), Some("[merge]"));
    }
}
