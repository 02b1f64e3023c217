//! `llm-merging extract-lora --base B --model M --rank R [--energy E] --out DIR`: a PEFT LoRA
//! adapter approximating M − B by truncated SVD per linear layer (see
//! `merge_core::adapter::extract`), as `mergekit-extract-lora` does.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use merge_core::adapter::extract::{extract_lora, ExtractOptions};
use merge_core::checkpoint::Checkpoint;
use merge_core::source::{ModelRef, Resolver};

/// Arguments of `llm-merging extract-lora`.
#[derive(Args, Debug, Clone)]
pub struct ExtractLoraArgs {
    /// The base model (hub id or local directory).
    #[arg(long)]
    pub base: String,
    /// The fine-tuned model to approximate (same architecture as the base).
    #[arg(long)]
    pub model: String,
    /// LoRA rank per layer (with --energy: the most rank any layer gets).
    #[arg(long)]
    pub rank: usize,
    /// Give each layer the smallest rank holding this share of its squared singular value
    /// mass (Σ of the kept σ² ≥ E·Σσ²), capped at --rank. In (0, 1].
    #[arg(long)]
    pub energy: Option<f64>,
    /// Output adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Runs `llm-merging extract-lora`.
pub fn run(args: ExtractLoraArgs) -> Result<()> {
    let resolver = Resolver::from_env();
    let open = |r: &str| -> Result<Checkpoint> {
        let files = resolver
            .resolve(&ModelRef::new(r))
            .with_context(|| format!("resolving {r}"))?;
        Checkpoint::open(&files).with_context(|| format!("opening {r}"))
    };
    let base = open(&args.base)?;
    let model = open(&args.model)?;
    let opts = ExtractOptions {
        rank: args.rank,
        energy: args.energy,
        base_name: args.base.clone(),
    };
    let lora = extract_lora(&base, &model, &opts)?;
    lora.write(&args.out, args.force)
        .with_context(|| format!("writing the adapter to {}", args.out.display()))?;
    let (min_e, max_e) = lora.modules.iter().fold((1f64, 0f64), |(lo, hi), m| {
        (lo.min(m.energy()), hi.max(m.energy()))
    });
    let ranks: Vec<usize> = lora.modules.iter().map(|m| m.rank).collect();
    println!(
        "extracted {} layers (ranks {}..{}, {:.1}%..{:.1}% of the squared singular value mass kept) into {}",
        lora.modules.len(),
        ranks.iter().min().expect("at least one layer"),
        ranks.iter().max().expect("at least one layer"),
        100.0 * min_e,
        100.0 * max_e,
        args.out.display()
    );
    if !lora.unchanged.is_empty() {
        println!(
            "left out {} linear layers the model does not change",
            lora.unchanged.len()
        );
    }
    println!(
        "embeddings, lm_head and norms are not extracted (the adapter leaves them at the base's)"
    );
    Ok(())
}
