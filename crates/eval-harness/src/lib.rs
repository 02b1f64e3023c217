//! A checkpoint in, predictions and scores out: the competition's local evaluation of decoder
//! and encoder-decoder (T5) models with the official starter kit's semantics (see
//! docs/starter-kit-semantics.md).
//!
//! [`load`] a model directory into a [`LanguageModel`] (the architecture comes from
//! `config.json`), then [`evaluate`] it on a [`dataset`]; [`report`] writes the outputs.
//! [`LanguageModel::set_weight`] replaces weights in place, so merges can be evaluated in
//! memory.

pub mod choices;
pub mod dataset;
pub mod error;
pub mod evaluate;
pub mod greedy;
pub mod hf;
pub mod layer_target;
pub mod lm;
pub mod merged;
pub mod metrics;
pub mod models;
pub mod report;

pub use choices::Scoring;
pub use error::{Error, Result};
pub use evaluate::{evaluate, EvalOptions, DEFAULT_BATCH_SIZE};
pub use lm::{LanguageModel, ModelKind};
pub use models::{load, load_input, resolve_dtype};
