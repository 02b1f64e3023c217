//! What can go wrong when writing a report.

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The entry has no evaluation outputs yet.
    #[error("entry `{entry}` has not been run (no {}): run `{command}` first", missing.display())]
    NotRun {
        /// The entry's name.
        entry: String,
        /// The file that is missing.
        missing: PathBuf,
        /// The command that produces it.
        command: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not what the kit writes there.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Compared entries were evaluated on different rows of a dataset.
    #[error(
        "entries `{a}` and `{b}` were evaluated on different rows of `{dataset}`; a paired \
         comparison needs the same rows (the same [eval] datasets and limit)"
    )]
    DifferentRows {
        /// The dataset.
        dataset: String,
        /// One entry.
        a: String,
        /// The other.
        b: String,
    },
    /// The template failed to render (a bug in the template).
    #[error("rendering the report: {0}")]
    Template(#[from] minijinja::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parse(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Parse {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
