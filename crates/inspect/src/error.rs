//! What can go wrong when inspecting a merge's experts.

use std::path::PathBuf;

/// Errors of [`crate::inspect`] and of writing its outputs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or reading a model failed (merge-core's error names the file or tensor).
    #[error(transparent)]
    Model(#[from] merge_core::Error),
    /// An expert does not have the base's architecture: the first tensor (in name order)
    /// that is missing, extra or shaped differently.
    #[error(
        "expert {expert} ({label}) does not match the base ({base}): tensor `{tensor}` {detail}; \
         task vectors need every expert to have the base's architecture"
    )]
    Mismatch {
        /// 1-based expert number.
        expert: usize,
        /// The expert, for messages.
        label: String,
        /// The base, for messages.
        base: String,
        /// The first mismatched tensor.
        tensor: String,
        /// What is wrong with it.
        detail: String,
    },
    /// There is no base to subtract: the config names none and the experts are not adapters
    /// over one base.
    #[error("{0}")]
    NoBase(String),
    /// A computation on one tensor failed (candle's error, with the tensor named).
    #[error("tensor `{tensor}`: {message}")]
    Tensor {
        /// The tensor.
        tensor: String,
        /// What failed.
        message: String,
    },
    /// Writing the outputs failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `--out` exists and is not an earlier inspect output, so it is not replaced.
    #[error(
        "{}: exists and holds no inspect.json; choose another --out (inspect replaces only its own outputs)",
        .0.display()
    )]
    OutExists(PathBuf),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tensor(tensor: &str, message: impl std::fmt::Display) -> Self {
        Error::Tensor {
            tensor: tensor.to_string(),
            message: message.to_string(),
        }
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
