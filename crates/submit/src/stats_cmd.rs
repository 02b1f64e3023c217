//! `llm-merging stats`: input statistics for data-dependent merges (`regmean`). Calibration
//! rows run through our decoder's forward pass; an observer on every block's linear layers
//! sums XᵀX of each layer's inputs over the non-padding tokens. The result is a statistics
//! directory ([`merge_core::input_stats`]): `grams.safetensors` (f32, one matrix per distinct
//! input: q/k/v share one, gate/up share one) and `stats.json`.
//!
//! Skipped: `lm_head` (its input is the final hidden state after the last norm; RegMean
//! merges a block's linear layers, the head and embeddings are averaged). Memory: one f32
//! `[in, in]` matrix per distinct input, on the compute device (Llama-2-7B: 21.95 GB, see the
//! README's "RegMean: statistics").

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use eval_harness::models::{CheckpointSource, Decoder};
use eval_harness::LanguageModel;
use merge_core::input_stats::{self, StatsMeta};
use merge_core::source::{ModelRef, Resolver};

use crate::calibration::{self, GramSums};

/// `llm-merging stats`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatsArgs {
    /// The model: a local directory or a hub id (a decoder: Llama, Mistral, Qwen2, Gemma).
    #[arg(long)]
    pub model: String,
    /// Calibration rows: a competition CSV. Each row's text is its `input`, tokenized as the
    /// evaluation does (the starter kit's prompt).
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory (`stats.json`, `grams.safetensors`).
    #[arg(long)]
    pub out: PathBuf,
    /// Only the first N rows.
    #[arg(long)]
    pub rows: Option<usize>,
    /// Rows per forward pass (right-padded; padding tokens are not counted).
    #[arg(long, default_value_t = calibration::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Compute dtype: auto (bf16 on a GPU, f32 on the CPU), f32, bf16 or f16. The sums are f32.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// auto, cpu or cuda (as `eval`).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
}

/// `llm-merging stats`.
pub fn run(a: StatsArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.out.exists() && !a.overwrite {
        bail!("{} exists; pass --overwrite to replace it", a.out.display());
    }
    let rows = calibration::rows(&a.data, a.rows)?;
    let files = Resolver::from_env()
        .resolve(&ModelRef::new(a.model.clone()))
        .with_context(|| format!("resolving {}", a.model))?;
    let dir = files.model_dir()?;
    let model_type = eval_harness::hf::model_type(&dir)?;
    if eval_harness::models::t5::T5_MODEL_TYPES.contains(&model_type.as_str()) {
        bail!(
            "{}: statistics are computed for decoder models; `{model_type}` is an \
             encoder-decoder",
            a.model
        );
    }
    let config: serde_json::Value = eval_harness::hf::config(&dir)?;
    let device = crate::device::resolve(&a.device)?;
    let dtype = eval_harness::resolve_dtype(&a.dtype, &device).map_err(anyhow::Error::msg)?;
    let vb = CheckpointSource::open(&dir, None)?.into_var_builder(dtype, &device);
    let mut model = Decoder::load(&dir, vb).with_context(|| format!("loading {}", a.model))?;
    let sums = Arc::new(GramSums::default());
    model.set_observer(Some(sums.clone()));

    let tokenized = calibration::tokenize(&model, &rows, &a.data)?;
    let pad = model.tokenizer().pad_id();
    let progress = indicatif::ProgressBar::new(rows.len() as u64);
    let tokens = tokenized.iter().map(|r| r.len() as u64).sum();
    for (ids, valid) in calibration::batches(&tokenized, a.batch_size, pad) {
        sums.set_valid(&valid);
        model.forward(&ids, &valid, &mut model.new_cache())?;
        progress.inc(ids.len() as u64);
    }
    progress.finish_and_clear();
    model.set_observer(None);
    let (grams, tensors) = sums.take()?;
    let meta = StatsMeta {
        format: input_stats::FORMAT.to_string(),
        model: a.model.clone(),
        fingerprint: input_stats::fingerprint(&config),
        tokens,
        data: a.data.display().to_string(),
        rows: rows.iter().map(|e| e.id.clone()).collect(),
        grams,
        skipped: BTreeMap::from([(
            "lm_head.weight".to_string(),
            "its input is the final hidden state, not a block's; regmean averages the head \
             and the embeddings"
                .to_string(),
        )]),
    };
    write(&a.out, &meta, &tensors)?;
    println!(
        "{}: {} Gram matrices for {} weights over {} tokens of {} rows",
        a.out.display(),
        tensors.len(),
        meta.grams.len(),
        tokens,
        meta.rows.len()
    );
    Ok(())
}

/// Write the statistics directory atomically: into a temporary directory beside `out`, then
/// renamed into place (replacing an old one only then).
pub(crate) fn write(out: &Path, meta: &StatsMeta, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".stats-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a directory in {}", parent.display()))?;
    candle_core::safetensors::save(tensors, tmp.path().join(input_stats::GRAMS_FILE))
        .context("writing the Gram matrices")?;
    std::fs::write(
        tmp.path().join(input_stats::META_FILE),
        serde_json::to_string_pretty(meta)?,
    )?;
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("replacing {}", out.display()))?;
    }
    std::fs::rename(tmp.path(), out).with_context(|| format!("writing {}", out.display()))?;
    // Moved into place: nothing left for the guard to remove.
    let _ = tmp.keep();
    Ok(())
}
