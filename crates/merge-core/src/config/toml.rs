//! Our merge config format: TOML with one `[merge]` table (see [`super`] for the schema).

use std::path::Path;

use super::{MergeConfig, MergeFile};
use crate::error::{Error, Result};

/// Read a TOML merge config file (schema checks only).
pub fn read(path: &Path) -> Result<MergeConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, &path.display().to_string())
}

/// Parse TOML text (schema checks only); `origin` names the text in errors (a file path).
pub fn parse(text: &str, origin: &str) -> Result<MergeConfig> {
    let file: MergeFile = ::toml::from_str(text).map_err(|e| toml_error(origin, text, &e))?;
    file.merge.check_schema(origin)?;
    Ok(file.merge)
}

/// One-line TOML error: `origin:line:column: message`.
pub fn toml_error(origin: &str, text: &str, err: &::toml::de::Error) -> Error {
    let message = err.message().trim().replace('\n', " ");
    match err.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            Error::config(format!("{origin}:{line}:{col}"), message)
        }
        None => Error::config(origin, message),
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}
