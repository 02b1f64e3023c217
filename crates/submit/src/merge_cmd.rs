//! `llm-merging merge CONFIG --out DIR`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use merge_core::engine::{self, MergeOptions};
use merge_core::source::Resolver;
use merge_core::MergeConfig;

/// Arguments of `llm-merging merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Merge config: TOML with a `[merge]` table, or a mergekit YAML file (`.yml` / `.yaml`).
    pub config: PathBuf,
    /// Output directory for the merged model.
    #[arg(long)]
    pub out: PathBuf,
    /// Print the plan (models, files, tensors, bytes) and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Largest output shard, e.g. `5GB`, `500MB` or a number of bytes.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub shard_size: u64,
    /// Memory budget for tensors in flight, e.g. `8GB` (default: a quarter of RAM).
    #[arg(long, value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub force: bool,
    /// Where methods that work on whole tensors compute: cpu, cuda, or auto (CUDA when built
    /// with it and a GPU is visible). Streaming methods (linear, task_arithmetic, ties, dare_*,
    /// breadcrumbs*) run on the CPU whatever this says. Merging is bound by reading and writing
    /// checkpoints: on an H100 machine even geometric_median took 12.2 s through the GPU
    /// against 6.9 s on its CPU, hence the default.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Parse `5GB`, `500MB`, `64KiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 5GB, 500MB, 1048576)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit `{other}` in `{s}`")),
    };
    Ok((value * mult) as u64)
}

/// Run `llm-merging merge`.
pub fn run(args: MergeArgs) -> Result<()> {
    let cfg = MergeConfig::from_file(&args.config)?;
    let config_dir = args
        .config
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let resolver = demo::with_demo_models(Resolver::from_env().with_base_dir(config_dir));
    let opts = MergeOptions {
        out: args.out.clone(),
        shard_size: args.shard_size,
        max_memory: args.max_memory,
        device: crate::device::resolve(&args.device)?,
        overwrite: args.force,
    };
    let report = if crate::regmean_plus::is_layerwise(&cfg)? {
        // regmean_plus: statistics computed layer by layer, then the engine's merge.
        let inputs = engine::Inputs::open(&cfg, &resolver)?;
        if args.dry_run {
            print!("{}", crate::regmean_plus::describe(&cfg, &inputs)?);
            return Ok(());
        }
        if opts.out.exists() && !opts.overwrite {
            anyhow::bail!("{} exists; pass --force to replace it", opts.out.display());
        }
        let work = match opts.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let stats = crate::regmean_plus::statistics(&cfg, &inputs, &work, &opts.device)?;
        engine::merge_to_disk(&stats.cfg, &inputs, &opts)?
    } else if args.dry_run {
        print!("{}", engine::describe(&cfg, &resolver, &opts)?);
        return Ok(());
    } else {
        engine::run(&cfg, &resolver, &opts)?
    };
    if report.adapter {
        // LoRA-to-LoRA merges write an adapter, not a model.
        println!(
            "merged {} adapter tensors into {} in {:.1}s",
            report.tensors,
            report.out.display(),
            report.seconds
        );
        return Ok(());
    }
    println!(
        "merged {} tensors ({:.2} GB) into {} in {:.1}s",
        report.tensors,
        report.bytes_written as f64 / 1e9,
        report.out.display(),
        report.seconds
    );
    Ok(())
}
