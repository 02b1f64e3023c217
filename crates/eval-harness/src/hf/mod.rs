//! The Hugging Face files of a model directory that evaluation reads besides the weights:
//! `config.json` (each model's serde `Deserialize` config, through [`config`]),
//! `tokenizer.json` + `tokenizer_config.json` ([`tokenizer`]) and `generation_config.json`
//! ([`generation`]).

pub mod generation;
pub mod tokenizer;

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

pub use generation::GenerationConfig;
pub use tokenizer::{clean_up_tokenization, Tokenizer};

/// A JSON file, or `None` when it does not exist.
pub fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::config(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// `dir/config.json` as `T` (a model's serde config); every problem names the file.
pub fn config<T: DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(&path, format!("invalid JSON: {e}")))?;
    T::deserialize(v).map_err(|e| Error::config(&path, e.to_string()))
}

/// `model_type` of `dir/config.json` (empty when it names none).
pub fn model_type(dir: &Path) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Type {
        #[serde(default)]
        model_type: Option<serde_json::Value>,
    }
    let t: Type = config(dir)?;
    Ok(t.model_type
        .as_ref()
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string())
}

/// A token id or a list of them (`eos_token_id` in config.json and generation_config.json).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(x) => vec![*x],
            TokenIds::Many(v) => v.clone(),
        }
    }
}
