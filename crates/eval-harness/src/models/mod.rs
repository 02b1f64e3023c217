//! Model implementations on candle, shaped like candle-transformers' (small structs, each with
//! `new(cfg, vb)` and `forward`), and [`load`], which picks one from `config.json`.

mod attention;
mod attention_cpu;
pub mod decoder;
pub mod linear;
pub mod panels;
pub mod t5;
pub(crate) mod vector_math;
pub mod weights;

use std::path::Path;

use candle_core::{DType, Device};

pub use decoder::{BlockBatch, Decoder, DecoderConfig, KvCache};
pub use t5::{EncoderOutput, T5Cache, T5Config, T5};
pub use weights::CheckpointSource;

use crate::error::{Error, Result};
use crate::lm::LanguageModel;

/// Loads a model directory (config.json, tokenizer files, weights in any checkpoint layout
/// merge-core reads), optionally folding a PEFT LoRA adapter into the weights; the
/// architecture comes from `config.json`'s `model_type`, so callers need no flag to tell T5
/// from a decoder.
pub fn load(
    dir: &Path,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn LanguageModel>> {
    let model_type = crate::hf::model_type(dir)?;
    let vb = CheckpointSource::open(dir, adapter)?.into_var_builder(dtype, device);
    Ok(if t5::T5_MODEL_TYPES.contains(&model_type.as_str()) {
        Box::new(T5::load(dir, vb)?)
    } else {
        Box::new(Decoder::load(dir, vb)?)
    })
}

/// Loads one input of a merge alone, as the merge reads it: a full checkpoint, or an adapter
/// on its base. The base and each expert scored this way are the reference rows a merge's
/// scores are compared with (the demo's table, `run --references`).
pub fn load_input(
    model: &merge_core::engine::InputModel,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn LanguageModel>> {
    use merge_core::engine::InputModel;
    match model {
        InputModel::Full(c) => load(&c.files().model_dir()?, None, dtype, device),
        InputModel::Adapted { base, adapter } => {
            let files = adapter.files().ok_or_else(|| {
                Error::Msg(format!("{}: an adapter held in memory", adapter.label))
            })?;
            let dir = files.model_dir()?;
            load(&base.files().model_dir()?, Some(&dir), dtype, device)
        }
    }
}

/// `(rows, length)` of a batch of token rows (with per-token `valid` flags of the same shape,
/// when given): an error when it is empty or ragged or a token is outside the vocabulary.
pub(crate) fn batch_shape(
    ids: &[Vec<u32>],
    valid: Option<&[Vec<bool>]>,
    vocab: usize,
) -> Result<(usize, usize)> {
    let (b, t) = (ids.len(), ids.first().map_or(0, Vec::len));
    if b == 0 || t == 0 {
        return Err(Error::Msg("a model called with an empty batch".into()));
    }
    if ids.iter().any(|r| r.len() != t)
        || valid.is_some_and(|v| v.len() != b || v.iter().any(|r| r.len() != t))
    {
        return Err(Error::Msg("a model called with ragged rows".into()));
    }
    if let Some(bad) = ids.iter().flatten().find(|&&i| i as usize >= vocab) {
        return Err(Error::Msg(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    Ok((b, t))
}

/// Parses `f32|float32|bf16|bfloat16|f16|float16`.
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(format!("unknown dtype `{s}` (f32, bf16 or f16)")),
    }
}

/// A dtype setting for `device`: `auto` is bf16 on a GPU (fast, within rounding of f32) and f32
/// on the CPU (the kit's exact numbers, and faster than bf16 there); otherwise as
/// [`parse_dtype`].
pub fn resolve_dtype(s: &str, device: &Device) -> std::result::Result<DType, String> {
    match s {
        "auto" => Ok(if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        }),
        _ => parse_dtype(s).map_err(|e| e.replace("(f32,", "(auto, f32,")),
    }
}
