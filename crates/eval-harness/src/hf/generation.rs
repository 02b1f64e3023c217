//! The parts of a model's generation config that greedy decoding uses, read as transformers
//! builds it: `generation_config.json` when the directory has one, else `config.json`, unset
//! fields taking transformers' defaults.

use std::path::Path;

use crate::error::{Error, Result};

use super::TokenIds;

#[derive(Debug, Default, serde::Deserialize)]
struct Raw {
    max_length: Option<usize>,
    max_new_tokens: Option<usize>,
    decoder_start_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    num_beams: Option<usize>,
    num_beam_groups: Option<usize>,
}

/// What greedy decoding takes from the generation config.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Total output length, decoder start token included (transformers' default 20).
    pub max_length: usize,
    /// New tokens, when the config sets it (it then wins over `max_length`).
    pub max_new_tokens: Option<usize>,
    /// First decoder input, when the config names one.
    pub decoder_start_token_id: Option<u32>,
    /// Generation stops at any of these, when the config names them.
    pub eos_token_ids: Option<Vec<u32>>,
}

impl GenerationConfig {
    /// From `dir`'s `generation_config.json`, else its `config.json`, else the defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let gp = dir.join("generation_config.json");
        let (path, v) = match super::read_json_if_present(&gp)? {
            Some(v) => (gp, v),
            None => {
                let cp = dir.join("config.json");
                let v = super::read_json_if_present(&cp)?;
                (cp, v.unwrap_or_else(|| serde_json::json!({})))
            }
        };
        Self::from_json(v).map_err(|e| Error::config(path, e.to_string()))
    }

    /// Interprets a generation config (or config.json) object.
    pub fn from_json(v: serde_json::Value) -> serde_json::Result<Self> {
        let raw: Raw = serde_json::from_value(v)?;
        for (k, n) in [
            ("num_beams", raw.num_beams),
            ("num_beam_groups", raw.num_beam_groups),
        ] {
            if n.is_some_and(|n| n > 1) {
                tracing::warn!("the generation config sets {k} > 1; the kit decodes greedily");
            }
        }
        Ok(GenerationConfig {
            max_length: raw.max_length.unwrap_or(20),
            max_new_tokens: raw.max_new_tokens,
            decoder_start_token_id: raw.decoder_start_token_id,
            eos_token_ids: raw.eos_token_id.map(|e| e.to_vec()),
        })
    }

    /// New tokens to generate when the caller sets none: `max_new_tokens`, else `max_length`
    /// less the decoder start token.
    pub fn new_tokens(&self) -> usize {
        self.max_new_tokens
            .unwrap_or(self.max_length.saturating_sub(1))
    }
}
