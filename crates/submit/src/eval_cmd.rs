//! `llm-merging eval` and `llm-merging predict`: a model directory (or a merge config, merged
//! in memory) in, predictions and scores out, with the starter kit's semantics by default and
//! an entry's `[prompt]` with `--prompt FILE.toml`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use eval_harness::dataset::{self, Dataset};
use eval_harness::merged::MergedModel;
use eval_harness::report::{self, DatasetOutcome};
use eval_harness::{EvalOptions, LanguageModel, Scoring};
use merge_core::engine::Inputs;
use merge_core::registry;
use merge_core::source::Resolver;
use merge_core::MergeConfig;

use crate::prompting::{self, Prompting};

/// Options shared by `eval` and `predict`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory: config.json, tokenizer.json (+ tokenizer_config.json) and weights.
    #[arg(long, required_unless_present = "merge")]
    pub model: Option<PathBuf>,
    /// PEFT LoRA adapter directory folded into the model's weights before evaluating.
    #[arg(long, requires = "model")]
    pub adapter: Option<PathBuf>,
    /// A merge config (TOML or mergekit YAML), merged in memory and evaluated without writing
    /// a checkpoint: the same scores and predictions as `merge` then `eval --model`.
    #[arg(long, conflicts_with_all = ["model", "adapter"])]
    pub merge: Option<PathBuf>,
    /// Generation rows decoded together: at most N rows and N × 1024 cached tokens (prompt + new),
    /// so long prompts go in smaller batches. Results do not depend on it; memory does (the KV
    /// cache: Llama-2-7B in bf16 takes about 0.5 MB per cached token).
    #[arg(
        long,
        default_value_t = eval_harness::DEFAULT_BATCH_SIZE,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub batch_size: usize,
    /// Most new tokens per generation (the kit's max_gen_len) [default: 64 for decoders; for
    /// encoder-decoders the model's generation config, 19 new tokens for flan-t5].
    #[arg(long)]
    pub max_gen_len: Option<usize>,
    /// Only the first N rows of each file.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Multiple-choice scoring: `starter-kit` (the official kit, exactly) or `full` (every
    /// choice token scored; adds accuracy_norm).
    #[arg(long, default_value = "starter-kit")]
    pub scoring: Scoring,
    /// Compute dtype: auto (bf16 on a GPU, f32 on the CPU), f32 (the kit's exact numbers), bf16
    /// or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// auto (the GPU when this binary has the `cuda` feature and one is visible), cpu or cuda.
    /// No device ids: select the GPU with CUDA_VISIBLE_DEVICES.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Prompting: a TOML file with a `[prompt]` table (an entry.toml works too): templates,
    /// few-shot demonstrations, the model's chat template, generate-mode multiple choice. Use
    /// the same file for eval and predict. Default: each row's raw input, as the starter kit.
    #[arg(long)]
    pub prompt: Option<PathBuf>,
}

/// `llm-merging eval`: scores a model on competition files.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Competition CSV files (default: data/validation/cosmos_qa.csv and data/validation/xsum.csv).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Output directory: predictions/<stem>.csv, scores.json, details/<stem>.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// Bootstrap standard errors of every metric over rows (`<metric>_stderr`, seeded) with N
    /// resamples; `--stderr` alone: 1000. On (1000) with --prompt; `--stderr 0` turns them off.
    #[arg(long, num_args = 0..=1, default_missing_value = "1000")]
    pub stderr: Option<usize>,
}

/// `llm-merging predict`: the leaderboard submission file for the test set.
#[derive(clap::Args, Debug, Clone)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The test file.
    #[arg(long, default_value = "data/test.csv")]
    pub data: PathBuf,
    /// Submission CSV to write (id,prediction,dummy_field).
    #[arg(long, default_value = "submission.csv")]
    pub out: PathBuf,
}

fn options(a: &ModelArgs, prompting: Option<&Prompting>) -> EvalOptions {
    EvalOptions {
        batch_size: a.batch_size.max(1),
        max_gen_len: a.max_gen_len,
        limit: a.limit,
        scoring: a.scoring,
        progress: true,
        prompt: prompting.map(|p| p.prompter.clone()),
        stderr_resamples: None,
    }
}

/// Refuses `--merge CONFIG` when its method merges layer by layer (`regmean_plus`): `--merge`
/// merges in memory in one pass, which cannot compute statistics through the merged lower
/// layers. Before any data file, prompt or model is read.
fn refuse_layerwise_merge(a: &ModelArgs) -> Result<()> {
    let Some(config) = &a.merge else {
        return Ok(());
    };
    let cfg = MergeConfig::from_file(config)?;
    if registry::lookup(&cfg.method).is_some_and(|m| m.merges_layer_by_layer()) {
        bail!(
            "{}: method `{}` cannot be merged by --merge: its statistics depend on the merged \
             lower layers (forward passes alternate with merging, layer by layer), and --merge \
             merges in memory in one pass; run `llm-merging merge {} --out DIR`, then \
             --model DIR (or `llm-merging run` on an entry)",
            config.display(),
            cfg.method,
            config.display()
        );
    }
    Ok(())
}

/// The models `--merge CONFIG` names, resolved from the config's directory first.
fn merge_resolver(config: &Path) -> Resolver {
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    demo::with_demo_models(Resolver::from_env().with_base_dir(dir))
}

/// Prompting from `--prompt FILE` (if given) for the model `a` names: demonstrations from
/// `few_shot_file` (relative to the prompt file's directory first) or `validation`, every row
/// of `rows` rendered once. Before the model loads.
fn prompting(
    a: &ModelArgs,
    validation: &[PathBuf],
    rows: &[&Dataset],
) -> Result<Option<Prompting>> {
    let Some(file) = &a.prompt else {
        return Ok(None);
    };
    let settings = prompting::read_file(file)?;
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &str| -> Result<PathBuf> {
        let data = std::env::var("LLM_MERGING_DATA").unwrap_or_else(|_| "data".into());
        let p = PathBuf::from(crate::entry::expand(p, |v| match v {
            "DATA_DIR" => Some(data.clone()),
            other => std::env::var(other).ok(),
        })?);
        Ok(if p.is_relative() && base.join(&p).exists() {
            base.join(p)
        } else {
            p
        })
    };
    let (tokenizer_dir, model) = match (&a.model, &a.merge) {
        (Some(m), _) => (Ok(m.clone()), m.display().to_string()),
        (None, Some(c)) => {
            // A merge takes its tokenizer (and chat template) from its reference model.
            let dir = MergeConfig::from_file(c).and_then(|cfg| {
                let inputs = Inputs::open(&cfg, &merge_resolver(c))?;
                inputs.reference.files().model_dir()
            });
            (
                dir.map_err(anyhow::Error::from),
                format!("of {}", c.display()),
            )
        }
        (None, None) => bail!("--model or --merge is required"),
    };
    let p = prompting::prepare(
        &settings,
        resolve,
        validation,
        || tokenizer_dir,
        &model,
        rows,
    )
    .with_context(|| file.display().to_string())?;
    Ok(Some(p))
}

/// The model to evaluate: loaded from a directory, or merged in memory.
enum Loaded {
    Dir(Box<dyn LanguageModel>),
    Merged(Box<MergedModel>),
}

impl Loaded {
    fn model(&self) -> &dyn LanguageModel {
        match self {
            Loaded::Dir(m) => &**m,
            Loaded::Merged(m) => m.model(),
        }
    }
}

fn load_model(a: &ModelArgs) -> Result<Loaded> {
    let device = crate::device::resolve(&a.device)?;
    let dtype = eval_harness::resolve_dtype(&a.dtype, &device).map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    let m = match (&a.model, &a.merge) {
        (_, Some(config)) => {
            let cfg = MergeConfig::from_file(config)?;
            let m = MergedModel::open(&cfg, &merge_resolver(config), dtype, &device)
                .with_context(|| format!("merging {} in memory", config.display()))?;
            Loaded::Merged(Box::new(m))
        }
        (Some(model), None) => Loaded::Dir(
            eval_harness::load(model, a.adapter.as_deref(), dtype, &device).with_context(|| {
                match &a.adapter {
                    Some(ad) => {
                        format!("loading {} with adapter {}", model.display(), ad.display())
                    }
                    None => format!("loading the model from {}", model.display()),
                }
            })?,
        ),
        (None, None) => bail!("--model or --merge is required"),
    };
    tracing::info!(
        "{} model {} in {:.1}s",
        m.model().kind().as_str(),
        if a.merge.is_some() {
            "merged"
        } else {
            "loaded"
        },
        t.elapsed().as_secs_f64()
    );
    Ok(m)
}

fn load_datasets(paths: &[PathBuf]) -> Result<Vec<dataset::Dataset>> {
    let mut out: Vec<dataset::Dataset> = Vec::new();
    for p in paths {
        let ds = dataset::load(p)?;
        if out.iter().any(|d| d.name == ds.name) {
            bail!(
                "{}: another data file has the stem `{}`; outputs are named by stem, rename one",
                p.display(),
                ds.name
            );
        }
        out.push(ds);
    }
    Ok(out)
}

/// The official validation files, where `eval` reads them without --data.
fn default_validation() -> Vec<PathBuf> {
    let d = Path::new("data/validation");
    vec![d.join("cosmos_qa.csv"), d.join("xsum.csv")]
}

/// Runs `llm-merging eval`.
pub fn run_eval(args: EvalArgs) -> Result<()> {
    refuse_layerwise_merge(&args.model)?;
    let paths = if args.data.is_empty() {
        let paths = default_validation();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            bail!(
                "{} not found: without --data, eval reads the official validation files from \
                 data/validation/ (fetch them as data/README describes, or pass --data FILE...)",
                missing.display()
            );
        }
        paths
    } else {
        args.data.clone()
    };
    // Read every data file (and prompt every row) first so a bad row fails before minutes of
    // model loading.
    let datasets = load_datasets(&paths)?;
    let prompting = prompting(&args.model, &paths, &datasets.iter().collect::<Vec<_>>())?;
    let m = load_model(&args.model)?;
    let mut opts = options(&args.model, prompting.as_ref());
    opts.stderr_resamples = prompting::stderr_resamples(args.stderr, prompting.is_some());
    let mut results: Vec<DatasetOutcome> = Vec::new();
    for ds in &datasets {
        let r = eval_harness::evaluate(m.model(), ds, &opts)?;
        eprintln!(
            "{}: {} rows in {:.1}s ({:.2} rows/s)",
            r.name,
            r.examples.len(),
            r.seconds,
            r.examples.len() as f64 / r.seconds.max(1e-9)
        );
        results.push(r);
    }
    report::write_eval_outputs(&args.out, &results)
        .with_context(|| format!("writing outputs to {}", args.out.display()))?;
    print!("{}", report::score_table(&results));
    eprintln!("outputs in {}", args.out.display());
    Ok(())
}

/// Runs `llm-merging predict`.
pub fn run_predict(args: PredictArgs) -> Result<()> {
    refuse_layerwise_merge(&args.model)?;
    let ds = dataset::load(&args.data)?;
    // Demonstrations default to the validation files, as `eval` without --data reads them.
    let validation = default_validation();
    let prompting = prompting(&args.model, &validation, &[&ds])?;
    let m = load_model(&args.model)?;
    let opts = options(&args.model, prompting.as_ref());
    let r = eval_harness::evaluate(m.model(), &ds, &opts)?;
    report::write_atomic(&args.out, |p| report::write_predictions_csv(p, &r.examples))
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "{}: {} predictions in {:.1}s -> {}",
        ds.name,
        r.examples.len(),
        r.seconds,
        args.out.display()
    );
    Ok(())
}
