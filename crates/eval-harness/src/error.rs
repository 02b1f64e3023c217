//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while evaluating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A competition CSV file is malformed (carries file:line:column).
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A model or tokenizer configuration is missing something or unsupported.
    #[error("{}: {message}", path.display())]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizers library failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A weight is missing or has the wrong shape.
    #[error("weights: {0}")]
    Weights(String),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// A merge (done in memory, see [`crate::merged`]) failed: its inputs, configuration or a
    /// tensor.
    #[error(transparent)]
    Merge(Box<merge_core::Error>),
    /// One row of a data file could not be evaluated.
    #[error("{}:{line}: row id `{id}`: {source}", path.display())]
    Row {
        /// The data file.
        path: PathBuf,
        /// Its line.
        line: u64,
        /// The row's id.
        id: String,
        /// Why.
        source: Box<Error>,
    },
    /// A row's prompt could not be rendered ([`prompt`]: demonstrations, chat template).
    #[error(transparent)]
    Prompt(#[from] prompt::Error),
    /// A request the model cannot run (an empty batch, a token outside the vocabulary, an
    /// input that tokenizes to nothing), or an output that cannot be written.
    #[error("{0}")]
    Msg(String),
}

impl From<merge_core::Error> for Error {
    fn from(e: merge_core::Error) -> Self {
        Error::Merge(Box::new(e))
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A configuration problem in `path`.
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}
