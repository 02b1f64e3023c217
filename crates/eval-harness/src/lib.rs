//! A checkpoint in, predictions and scores out: the competition's local evaluation of decoder
//! and encoder-decoder (T5) models with the official starter kit's semantics (see
//! docs/starter-kit-semantics.md).

pub mod dataset;
pub mod error;
pub mod metrics;
pub mod models;
pub mod tokenize;
pub mod weights;

pub use error::{Error, Result};
pub mod generate;
pub mod report;
pub mod runner;
pub mod score;
pub mod seq2seq;
pub mod synthetic;
