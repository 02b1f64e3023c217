//! The one error type of merge-core. Every variant names what was wrong and where, so the
//! binary can print it as one line and exit non-zero.

use std::path::PathBuf;

/// Result alias used throughout merge-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while resolving, reading, merging or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A merge config (TOML or mergekit YAML) is invalid.
    #[error("{path}: {message}")]
    Config { path: String, message: String },

    /// A file that a step needs is not there.
    #[error("{}: file not found{}", path.display(), hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default())]
    MissingFile { path: PathBuf, hint: Option<String> },

    /// A checkpoint file exists but cannot be parsed.
    #[error("{}: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },

    /// A tensor has a different shape in two inputs.
    #[error("tensor `{tensor}`: shape {shape_a:?} in {model_a} but {shape_b:?} in {model_b}")]
    ShapeMismatch {
        tensor: String,
        model_a: String,
        shape_a: Vec<usize>,
        model_b: String,
        shape_b: Vec<usize>,
    },

    /// A tensor present in the reference model is absent from another input.
    #[error("tensor `{tensor}` is missing in {model}")]
    MissingTensor { tensor: String, model: String },

    /// A PEFT adapter does not fit its base model.
    #[error("adapter {adapter}: {message}")]
    Adapter { adapter: String, message: String },

    /// The hub (or its local cache in offline mode) could not provide a file or revision.
    #[error("{repo}: {message}")]
    Hub { repo: String, message: String },

    /// A merge method was asked for something it cannot do.
    #[error("merge method `{method}`: {message}")]
    Method { method: String, message: String },

    /// A model's input statistics (`stats = "DIR"`) are unreadable or do not fit it.
    #[error("statistics {} of {model}: {message}", path.display())]
    Statistics {
        model: String,
        path: PathBuf,
        message: String,
    },

    /// Writing the output failed.
    #[error("{}: {message}", path.display())]
    Write { path: PathBuf, message: String },

    /// An I/O error while touching `path`.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A [`crate::engine::TensorSink`] refused a tensor.
    #[error("tensor `{tensor}`: {source}")]
    Sink {
        tensor: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A tensor operation failed (candle).
    #[error("tensor `{tensor}`: {source}")]
    Tensor {
        tensor: String,
        /// Boxed: candle's error is large, and every `Result` of the crate carries this type.
        #[source]
        source: Box<candle_core::Error>,
    },
}

impl Error {
    /// An I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::MissingFile { path, hint: None };
        }
        Error::Io { path, source }
    }

    /// A candle error while computing `tensor`.
    pub fn tensor(tensor: impl Into<String>, source: candle_core::Error) -> Self {
        Error::Tensor {
            tensor: tensor.into(),
            source: Box::new(source),
        }
    }

    /// A config error located in `path`.
    pub fn config(path: impl Into<String>, message: impl Into<String>) -> Self {
        let (path, message) = (path.into(), message.into());
        Error::Config { path, message }
    }

    /// Merge method `method` cannot do what it was asked.
    pub fn method(method: impl Into<String>, message: impl Into<String>) -> Self {
        let (method, message) = (method.into(), message.into());
        Error::Method { method, message }
    }

    /// Adapter `adapter` does not fit.
    pub fn adapter(adapter: impl Into<String>, message: impl Into<String>) -> Self {
        let (adapter, message) = (adapter.into(), message.into());
        Error::Adapter { adapter, message }
    }

    /// The file at `path` cannot be parsed.
    pub fn corrupt(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        let (path, message) = (path.into(), message.into());
        Error::Corrupt { path, message }
    }

    /// The statistics in `path` of model `model` do not fit.
    pub fn statistics(
        model: impl Into<String>,
        path: impl Into<PathBuf>,
        message: impl Into<String>,
    ) -> Self {
        let (model, path, message) = (model.into(), path.into(), message.into());
        Error::Statistics {
            model,
            path,
            message,
        }
    }

    /// Writing to `path` failed.
    pub fn write(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        let (path, message) = (path.into(), message.into());
        Error::Write { path, message }
    }
}
