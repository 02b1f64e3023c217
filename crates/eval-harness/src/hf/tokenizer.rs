//! A model's tokenizer with the starter kit's semantics (see docs/starter-kit-semantics.md), for
//! both model kinds, from `tokenizer.json` and (if present) `tokenizer_config.json`.
//!
//! - Decoders: an *input* tokenizer (the model's own special tokens, e.g. BOS) and a *target*
//!   tokenizer (`add_bos_token=False, add_eos_token=True`), where those flags only act for the
//!   tokenizer classes that implement them in transformers 4.39 (Llama, CodeLlama, Gemma);
//!   inputs are never truncated; pad falls back to EOS.
//! - Encoder-decoders (T5): one tokenizer for inputs and choices, `tokenizer.json` as shipped
//!   (T5's post-processor appends `</s>` to every text), truncated at `model_max_length`.
//!
//! Decoding skips special tokens and applies `clean_up_tokenization_spaces` unless the config
//! sets it false (transformers 4.39 defaults it to true).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Tokenizer classes whose fast implementation rebuilds the post-processor from the
/// `add_bos_token` / `add_eos_token` flags.
const FLAG_CLASSES: [&str; 6] = [
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "CodeLlamaTokenizerFast",
    "GemmaTokenizer",
    "GemmaTokenizerFast",
];

/// transformers writes `model_max_length` as `int(1e30)` when a tokenizer has no limit.
const UNLIMITED: f64 = 1e18;

/// Which of the kit's two tokenizer set-ups to build, with the ids `config.json` supplies when
/// `tokenizer_config.json` names no special token.
#[derive(Debug, Clone, Copy)]
pub enum TokenizerKind {
    /// Decoder-only: input and target tokenizers, no truncation, pad = EOS by default.
    Decoder {
        /// `config.json`'s first `eos_token_id`.
        eos: Option<u32>,
    },
    /// Encoder-decoder: one tokenizer, truncated at `model_max_length`.
    EncoderDecoder {
        /// `config.json`'s `eos_token_id`.
        eos: u32,
        /// `config.json`'s `pad_token_id`.
        pad: u32,
    },
}

/// A model's tokenizer plus the settings from `tokenizer_config.json` that change results.
pub struct Tokenizer {
    tok: tokenizers::Tokenizer,
    /// The class implements add_bos/add_eos (Llama-2 style): special tokens are added by us.
    flag_class: bool,
    add_bos: bool,
    add_eos: bool,
    bos_id: Option<u32>,
    eos_id: u32,
    pad_id: u32,
    clean_up_spaces: bool,
    max_length: Option<usize>,
}

/// Without the vocabulary.
impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids = (self.bos_id, self.eos_id, self.pad_id);
        f.debug_struct("Tokenizer")
            .field("bos_eos_pad", &ids)
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

/// A special token in tokenizer_config.json is a string or an AddedToken object.
fn token_text(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from a model directory.
    pub fn from_dir(dir: &Path, kind: TokenizerKind) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&tj).map_err(|e| {
            Error::config(
                &tj,
                format!(
                    "cannot read the tokenizer ({e}); the model directory needs a tokenizer.json"
                ),
            )
        })?;
        let config = super::read_json_if_present(&dir.join("tokenizer_config.json"))?
            .unwrap_or_else(|| serde_json::json!({}));
        let bad = |message: String| Error::config(&tj, message);
        let mut tok: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| Error::Tokenizer(format!("cannot parse tokenizer.json: {e}")))?;
        tok.with_padding(None);
        let max_length = match kind {
            // The kit never truncates decoder inputs.
            TokenizerKind::Decoder { .. } => None,
            TokenizerKind::EncoderDecoder { .. } => {
                match config.get("model_max_length").and_then(|v| v.as_f64()) {
                    Some(m) if m < UNLIMITED => {
                        if m < 2.0 {
                            return Err(bad(format!(
                                "model_max_length {m} in tokenizer_config.json is too small"
                            )));
                        }
                        Some(m as usize)
                    }
                    _ => None,
                }
            }
        };
        // tokenizers' truncation leaves room for the post-processor's special tokens, as
        // transformers' `truncation=True` does: the text is cut, `</s>` stays.
        tok.with_truncation(max_length.map(|max_length| tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let flag =
            |k: &str, default: bool| config.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
        let id_of = |key: &str| -> Result<Option<u32>> {
            match token_text(config.get(key)) {
                None => Ok(None),
                Some(t) => tok
                    .token_to_id(t)
                    .map(Some)
                    .ok_or_else(|| bad(format!("special token `{t}` is not in the vocabulary"))),
            }
        };
        let (flag_class, bos_id, eos_id, pad_id) =
            match kind {
                TokenizerKind::Decoder { eos } => {
                    let class = config.get("tokenizer_class").and_then(|v| v.as_str());
                    let bos_id = id_of("bos_token")?;
                    let eos_id = id_of("eos_token")?.or(eos).ok_or_else(|| {
                    bad("no eos_token in tokenizer_config.json and no eos_token_id in config.json"
                        .into())
                })?;
                    let pad_id = id_of("pad_token")?.unwrap_or(eos_id);
                    let flag_class = class.is_some_and(|c| FLAG_CLASSES.contains(&c));
                    (flag_class, bos_id, eos_id, pad_id)
                }
                TokenizerKind::EncoderDecoder { eos, pad } => {
                    let eos_id = id_of("eos_token")?.unwrap_or(eos);
                    (false, None, eos_id, id_of("pad_token")?.unwrap_or(pad))
                }
            };
        let add_bos = flag("add_bos_token", true);
        if flag_class && add_bos && bos_id.is_none() {
            return Err(bad(
                "add_bos_token is true but tokenizer_config.json has no bos_token".into(),
            ));
        }
        Ok(Tokenizer {
            tok,
            flag_class,
            add_bos,
            add_eos: flag("add_eos_token", false),
            bos_id,
            eos_id,
            pad_id,
            // transformers 4.39 (the kit's) cleans up unless the config says false.
            clean_up_spaces: flag("clean_up_tokenization_spaces", true),
            max_length,
        })
    }

    fn encode_with(&self, text: &str, add_bos: bool, add_eos: bool) -> Result<Vec<u32>> {
        let tokenize = |special: bool| {
            self.tok
                .encode(text, special)
                .map_err(|e| Error::Tokenizer(e.to_string()))
        };
        if !self.flag_class {
            // Other classes keep tokenizer.json's post-processor and ignore the flags.
            return Ok(tokenize(true)?.get_ids().to_vec());
        }
        let enc = tokenize(false)?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        if add_eos {
            ids.push(self.eos_id);
        }
        Ok(ids)
    }

    /// The kit's input tokenizer: the model's tokenizer as configured (for T5: post-processed,
    /// `</s>` appended, truncated to `model_max_length`).
    pub fn encode_input(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, self.add_bos, self.add_eos)
    }

    /// The kit's target tokenizer for answer choices: `add_bos_token=False, add_eos_token=True`
    /// where the class implements the flags, else the input tokenizer.
    pub fn encode_target(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false, true)
    }

    /// Text that carries its own special tokens (a chat template's rendering), tokenized as
    /// transformers' `apply_chat_template(tokenize=True)` does: nothing added.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tok.encode(text, false);
        Ok(enc
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Decodes generated ids with special tokens skipped, then the optional space clean-up.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let s = self
            .tok
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&s)
        } else {
            s
        })
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Padding id (decoders: EOS when the tokenizer has none).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// BOS id if the tokenizer config names one (decoders only).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Inputs are cut to this many tokens (EOS included), when the tokenizer has a limit.
    pub fn max_length(&self) -> Option<usize> {
        self.max_length
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Warns when the tokenizer has more tokens than the model's `vocab` rows.
    pub fn check_vocab(&self, vocab: usize) {
        if self.vocab_size() > vocab {
            let n = self.vocab_size();
            tracing::warn!("tokenizer has {n} tokens, the model's vocabulary {vocab}");
        }
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }
}

/// transformers' `clean_up_tokenization`: removes spaces before punctuation and contractions.
pub fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
