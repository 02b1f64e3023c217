//! The layer-wise driver of `regmean_plus` (RegMean++, see `merge_core::methods::RegMeanPlus`
//! for the formula): merge-core cannot run a model, so this module alternates our decoder's
//! forward pass and RegMean's closed form, layer by layer, as FusionBench's
//! `RegMeanAlgorithmPlusPlus.run` does:
//!
//! 1. one decoder (the reference model's config and tokenizer, f32) gets the mean of the
//!    models' embeddings (FusionBench's `merge_embedding_layer`); each model's calibration rows
//!    are tokenized as `llm-merging stats` does, with the reference's tokenizer (the merged
//!    model's), right-padded into batches of 8 and embedded: Hᵢ;
//! 2. for each block l: the block takes model i's weights and runs on Hᵢ with a [`GramSums`]
//!    observer (its output is dropped), giving model i's Gram matrices for layer l; the block
//!    then takes the merged weights, each tensor computed by the method itself (RegMean's
//!    solve with the mean Grams where there are Grams, the models' mean elsewhere), and
//!    Hᵢ ← block l (Hᵢ) for every model.
//!
//! The Grams so computed are each model's statistics in `llm-merging stats`' format, written
//! under a temporary directory (removed when done; one a killed merge left, by the next merge
//! there); the engine then merges the whole model from them (the block
//! weights it writes are the ones the forward pass used: the same solve on the same
//! matrices). Memory: the hidden states of every model's rows (tokens × hidden × 4 bytes,
//! with padding), one model's copy of the decoder, and every model's Grams until the end
//! (one f32 `[in, in]` matrix per distinct linear input per layer, as `stats` writes).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use eval_harness::models::{BlockBatch, CheckpointSource, Decoder};
use eval_harness::LanguageModel;
use merge_core::config::MergeConfig;
use merge_core::engine::Inputs;
use merge_core::input_stats::{self, StatsMeta};
use merge_core::methods::{MergeMethod, Params, TensorInputs};
use merge_core::params::{layer_index, layer_position, num_layers, ConfigParams};
use merge_core::registry::{self, Method};

use crate::calibration::{self, GramSums, DEFAULT_BATCH_SIZE};

/// The name of the statistics' temporary directory, before this process's id.
const STATS_PREFIX: &str = ".regmean-plus-";

/// A layer-wise merge, checked: the method, each model's calibration file and rows.
struct Plan<'a> {
    method: &'a dyn MergeMethod,
    params: ConfigParams<'a>,
    n_layers: usize,
    /// Per model (in `inputs.models` order): the calibration file and its rows.
    calibration: Vec<(PathBuf, Vec<eval_harness::dataset::Example>)>,
}

/// The statistics a layer-wise merge computed: `cfg` with every model's `stats` pointing into
/// a temporary directory that lives as long as this value.
pub struct LayerwiseStats {
    /// The config to hand the engine.
    pub cfg: MergeConfig,
    _dir: tempfile::TempDir,
}

/// Whether `cfg`'s method merges layer by layer (`regmean_plus`).
pub fn is_layerwise(cfg: &MergeConfig) -> Result<bool> {
    Ok(registry::get(&cfg.method, "method")?.merges_layer_by_layer())
}

/// Each model's calibration file, resolved as `stats` paths are (next to the config first).
pub fn calibration_files(cfg: &MergeConfig, inputs: &Inputs) -> Result<Vec<PathBuf>> {
    let method = &cfg.method;
    inputs
        .models
        .iter()
        .zip(&inputs.model_entries)
        .map(|(m, &entry)| {
            let e = &cfg.models[entry];
            if e.stats.is_some() {
                bail!(
                    "{method}: model {} sets `stats`, which `{method}` computes itself from \
                     `calibration` rows (`stats` is for regmean)",
                    m.label()
                );
            }
            let Some(file) = &e.calibration else {
                bail!(
                    "{method}: model {} has no calibration rows: set `calibration = \"CSV\"` \
                     in its [[merge.models]] entry",
                    m.label()
                );
            };
            let file = Path::new(file);
            Ok(match &inputs.base_dir {
                Some(base) if file.is_relative() && base.join(file).is_file() => base.join(file),
                _ => file.to_path_buf(),
            })
        })
        .collect()
}

/// Check `cfg` (a layer-wise method) over `inputs` before any forward pass: the parameters of
/// every tensor, decoder models of one architecture, every model's calibration rows.
fn check<'a>(cfg: &'a MergeConfig, inputs: &Inputs) -> Result<Plan<'a>> {
    let Method::Tensor(method) = registry::get(&cfg.method, "method")? else {
        bail!("{}: not a tensor-level method", cfg.method);
    };
    let name = method.name();
    let params = ConfigParams::new(cfg, name, method.parameters(), method.model_parameters())?;
    let reference = &inputs.reference;
    let n_layers = num_layers(reference.config())
        .with_context(|| format!("{name}: {}: no num_hidden_layers", reference.label))?;
    let n_models = inputs.models.len();
    for tensor in reference.names() {
        let globals = params.globals(tensor, layer_position(tensor, n_layers))?;
        method
            .check_params(&globals, &vec![Params::new(); n_models])
            .map_err(|m| anyhow::anyhow!("{name}: tensor `{tensor}`: {m}"))?;
    }
    let model_type = |c: Option<&serde_json::Value>| {
        c.and_then(|c| c.get("model_type"))
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_string()
    };
    let ours = model_type(reference.config());
    if eval_harness::models::t5::T5_MODEL_TYPES.contains(&ours.as_str()) {
        bail!(
            "{name}: {} is an encoder-decoder (`{ours}`); {name} runs decoder models \
             (Llama, Mistral, Qwen2, Gemma) layer by layer",
            reference.label
        );
    }
    let fingerprint = input_stats::fingerprint(reference.config().unwrap_or(&Default::default()));
    for m in &inputs.models {
        let theirs =
            input_stats::fingerprint(m.checkpoint().config().unwrap_or(&Default::default()));
        if theirs != fingerprint {
            bail!(
                "{name}: model {} has another architecture than {}: {} against {}; {name} \
                 merges experts of one architecture",
                m.label(),
                reference.label,
                serde_json::to_string(&theirs)?,
                serde_json::to_string(&fingerprint)?
            );
        }
    }
    let mut calibration = Vec::new();
    for ((file, m), &entry) in calibration_files(cfg, inputs)?
        .into_iter()
        .zip(&inputs.models)
        .zip(&inputs.model_entries)
    {
        let rows = calibration::rows(&file, cfg.models[entry].calibration_rows)
            .with_context(|| format!("{name}: calibration rows of model {}", m.label()))?;
        calibration.push((file, rows));
    }
    Ok(Plan {
        method,
        params,
        n_layers,
        calibration,
    })
}

/// What `--dry-run` prints for a layer-wise merge (after checking it).
pub fn describe(cfg: &MergeConfig, inputs: &Inputs) -> Result<String> {
    let plan = check(cfg, inputs)?;
    let mut s = format!(
        "layer-wise merge method: {} over {} decoder layers (statistics computed through the \
         merged layers, then merged as regmean)\n",
        plan.method.name(),
        plan.n_layers
    );
    for (i, (m, (file, rows))) in inputs.models.iter().zip(&plan.calibration).enumerate() {
        s.push_str(&format!(
            "model {}: {} ({} calibration rows from {})\n",
            i + 1,
            m.label(),
            rows.len(),
            file.display()
        ));
    }
    Ok(s)
}

/// Compute every model's statistics of `cfg` (a layer-wise method) layer by layer on `device`,
/// into a temporary directory under `work`; see the module docs.
pub fn statistics(
    cfg: &MergeConfig,
    inputs: &Inputs,
    work: &Path,
    device: &Device,
) -> Result<LayerwiseStats> {
    let plan = check(cfg, inputs)?;
    let name = plan.method.name();
    let reference = &inputs.reference;
    let dir = reference.files().model_dir()?;
    let vb = CheckpointSource::open(&dir, None)?.into_var_builder(DType::F32, device);
    let mut model = Decoder::load(&dir, vb)
        .with_context(|| format!("{name}: loading {} to run it", reference.label))?;
    if model.config().num_layers != plan.n_layers {
        bail!(
            "{name}: {}: config and decoder disagree on the layer count",
            reference.label
        );
    }
    let mut names: Vec<&str> = reference
        .names()
        .filter(|n| reference.info(n).is_some_and(|i| i.dtype.is_float()))
        .collect();
    names.sort();
    let mean = |tensor: &str| merged(&plan, inputs, tensor, None);

    // 1. The merged embedding, and every model's rows through it.
    let embed = "model.embed_tokens.weight";
    model.set_weight(embed, &mean(embed)?.to_device(device)?)?;
    let pad = model.tokenizer().pad_id();
    let mut states: Vec<Vec<BlockBatch>> = Vec::new();
    let mut tokens = Vec::new();
    for (file, rows) in &plan.calibration {
        let tokenized = calibration::tokenize(&model, rows, file)?;
        tokens.push(tokenized.iter().map(|r| r.len() as u64).sum::<u64>());
        let batches = calibration::batches(&tokenized, DEFAULT_BATCH_SIZE, pad);
        states.push(
            batches
                .iter()
                .map(|(ids, valid)| model.embed_batch(ids, valid))
                .collect::<eval_harness::Result<_>>()?,
        );
    }

    // 2. Layer by layer: each model's Grams through its own block, then the merged block.
    let n = inputs.models.len();
    let mut grams: Vec<BTreeMap<String, String>> = vec![BTreeMap::new(); n];
    let mut sums: Vec<HashMap<String, Tensor>> = vec![HashMap::new(); n];
    let progress = indicatif::ProgressBar::new((plan.n_layers * (n + 1)) as u64);
    for layer in 0..plan.n_layers {
        let block: Vec<&str> = names
            .iter()
            .copied()
            .filter(|t| layer_index(t) == Some(layer))
            .collect();
        let mut layer_grams: Vec<HashMap<String, Tensor>> = Vec::with_capacity(n);
        for (i, m) in inputs.models.iter().enumerate() {
            for t in &block {
                model.set_weight(t, &m.load_f32(t, device)?)?;
            }
            let observer = Arc::new(GramSums::default());
            model.set_observer(Some(observer.clone()));
            for batch in &states[i] {
                observer.set_valid(batch.valid());
                model.block_forward(layer, batch)?;
            }
            model.set_observer(None);
            let (keys, matrices) = observer.take()?;
            let mut mean_grams = HashMap::new();
            for (weight, key) in &keys {
                // As the engine divides them: the f32 sum over the model's token count.
                let g = (&matrices[key] / tokens[i].max(1) as f64)?;
                mean_grams.insert(weight.clone(), g);
            }
            layer_grams.push(mean_grams);
            grams[i].extend(keys);
            sums[i].extend(matrices);
            progress.inc(1);
        }
        for t in &block {
            let w = merged(&plan, inputs, t, Some(&layer_grams))?;
            model.set_weight(t, &w.to_device(device)?)?;
        }
        for batches in &mut states {
            for batch in batches.iter_mut() {
                *batch = model.block_forward(layer, batch)?;
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();

    // 3. The statistics, in `llm-merging stats`' format, for the engine. Dropping the
    // directory removes it (on success, and on any error); a process killed by a signal
    // (Ctrl-C included) cannot, and every model's Grams may be gigabytes: the pid in the name
    // lets the next merge into `work` remove them (`run` also sweeps its work directory).
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    merge_core::checkpoint::writer::remove_abandoned(work, STATS_PREFIX);
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{STATS_PREFIX}{}-", std::process::id()))
        .tempdir_in(work)
        .with_context(|| format!("creating a directory in {}", work.display()))?;
    let mut out = cfg.clone();
    for (i, (m, &entry)) in inputs.models.iter().zip(&inputs.model_entries).enumerate() {
        let (file, rows) = &plan.calibration[i];
        let meta = StatsMeta {
            format: input_stats::FORMAT.to_string(),
            model: m.label(),
            fingerprint: input_stats::fingerprint(
                m.checkpoint().config().unwrap_or(&Default::default()),
            ),
            tokens: tokens[i],
            data: file.display().to_string(),
            rows: rows.iter().map(|e| e.id.clone()).collect(),
            grams: std::mem::take(&mut grams[i]),
            skipped: BTreeMap::from([(
                "lm_head.weight".to_string(),
                "its input is the final hidden state; the head is the models' mean".to_string(),
            )]),
        };
        let stats_dir = tmp.path().join(format!("model-{}", i + 1));
        crate::stats_cmd::write(&stats_dir, &meta, &sums[i])?;
        out.models[entry].stats = Some(stats_dir.display().to_string());
    }
    Ok(LayerwiseStats {
        cfg: out,
        _dir: tmp,
    })
}

/// Tensor `tensor` merged by the plan's method, on the CPU: with `grams` (per model, weight →
/// mean Gram of the layer), a linear weight that has them is solved; anything else is what
/// the method does without statistics (the models' mean).
fn merged(
    plan: &Plan,
    inputs: &Inputs,
    tensor: &str,
    grams: Option<&[HashMap<String, Tensor>]>,
) -> Result<Tensor> {
    let cpu = Device::Cpu;
    let models = inputs
        .models
        .iter()
        .map(|m| m.load_f32(tensor, &cpu))
        .collect::<merge_core::Result<Vec<_>>>()?;
    let globals = plan
        .params
        .globals(tensor, layer_position(tensor, plan.n_layers))?;
    let model_params = vec![Params::new(); models.len()];
    let mut x = TensorInputs::new(tensor, None, &models, &globals, &model_params);
    let these = match grams {
        Some(per_model) if per_model.iter().all(|g| g.contains_key(tensor)) => Some(
            per_model
                .iter()
                .map(|g| g[tensor].to_device(&cpu))
                .collect::<candle_core::Result<Vec<_>>>()?,
        ),
        _ => None,
    };
    x.grams = these.as_deref();
    plan.method
        .merge(&x)
        .with_context(|| format!("{}: merging `{tensor}`", plan.method.name()))
}
