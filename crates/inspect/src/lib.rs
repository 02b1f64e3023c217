//! Task-vector diagnostics of a merge's experts (`llm-merging inspect`): before merging, see
//! how the experts' changes to the base relate.
//!
//! For every expert's task vector δₑ = expert − base (a LoRA adapter's ΔW, from its factors)
//! and every tensor, then per layer, per module kind ([`Kind`]) and for the whole model:
//! the L2 norm and the norm relative to the base's, the cosine between experts, the kept sets
//! TIES would keep at the configured density (each expert's top-k by magnitude), their
//! overlap and the rate of sign conflicts inside them, and the fraction of each task vector
//! the configured method keeps. Tensors stream chunk by chunk from the checkpoint files
//! (merge-core's readers, a few 64K-element buffers per thread), so memory does not grow with
//! the model; see [`passes`](mod@passes) for the passes.
//!
//! ```no_run
//! use merge_core::{source::Resolver, MergeConfig};
//!
//! let cfg = MergeConfig::from_file("ties.toml".as_ref())?;
//! let inspection = inspect::inspect(&cfg, &Resolver::from_env(), false)?;
//! print!("{}", inspection.summary());
//! inspection.write("inspect/".as_ref())?; // inspect.json and the SVG heatmaps
//! # Ok::<(), inspect::Error>(())
//! ```

pub mod error;
pub mod experts;
pub mod findings;
pub mod heatmap;
pub mod kind;
mod output;
mod passes;
mod summary;
pub mod sums;
mod vectors;

use std::time::Instant;

use merge_core::engine::Inputs;
use merge_core::params::{layer_position, layers_in, num_layers, ConfigParams};
use merge_core::registry::{self, Method};
use merge_core::source::Resolver;
use merge_core::MergeConfig;
use serde::{Deserialize, Serialize};

pub use error::{Error, Result};
pub use experts::{Expert, ExpertModel, Experts};
pub use kind::Kind;
pub use sums::{Metrics, Sums};

use passes::{Keep, Rule};
use vectors::{Stored, TaskVector, TensorVectors};

/// The file name of the JSON output.
pub const JSON: &str = "inspect.json";

/// One expert, as the outputs name it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpertInfo {
    /// 1-based, as findings and tables number experts.
    pub number: usize,
    /// A short name (the last part of the model's id or path).
    pub name: String,
    /// The model (and its base, for adapters), as resolved.
    pub label: String,
    /// Whether it is a LoRA adapter (task vector from its factors).
    pub lora: bool,
}

/// What the kept sets and `kept_fraction` follow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleInfo {
    /// The configured merge method.
    pub method: String,
    /// Whether the method sparsifies task vectors by `density` (kept sets are then TIES'
    /// top-k at each expert's density; otherwise every nonzero element).
    pub sparsifies: bool,
    /// Whether the method elects signs (TIES' consensus), which `kept_fraction` then applies.
    pub elects_signs: bool,
}

/// One tensor's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorRecord {
    /// Tensor name.
    pub name: String,
    /// Its layer, when it is in one.
    pub layer: Option<usize>,
    /// Its module kind.
    pub kind: Kind,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Each expert's density for this tensor (1 where the method does not sparsify).
    pub density: Vec<f64>,
    /// The metrics.
    #[serde(flatten)]
    pub metrics: Metrics,
    /// The sums they come from.
    pub sums: Sums,
}

/// The aggregate of a group of tensors: one layer (all of it, or one module kind in it), one
/// module kind over the model, or the whole model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The layer, for per-layer groups.
    pub layer: Option<usize>,
    /// The module kind, or `all`.
    pub kind: String,
    /// Tensors in the group.
    pub tensors: usize,
    /// The metrics of the group's sums.
    #[serde(flatten)]
    pub metrics: Metrics,
    /// The group's sums.
    pub sums: Sums,
}

/// The whole diagnosis: what `inspect.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inspection {
    /// Schema version.
    pub version: u32,
    /// The base model.
    pub base: String,
    /// The experts, in config order.
    pub experts: Vec<ExpertInfo>,
    /// What the kept sets follow.
    pub rule: RuleInfo,
    /// One record per tensor, in name order (layers numerically).
    pub tensors: Vec<TensorRecord>,
    /// Per layer: the whole layer (`kind` = `all`), then each module kind in it.
    pub layers: Vec<GroupRecord>,
    /// Per module kind over the whole model.
    pub kinds: Vec<GroupRecord>,
    /// The whole model.
    pub model: GroupRecord,
    /// Plain-language findings.
    pub findings: Vec<String>,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Resolves and opens the models of `cfg` (memory-mapped; nothing is loaded whole) and
/// inspects their task vectors.
pub fn inspect(cfg: &MergeConfig, resolver: &Resolver, progress: bool) -> Result<Inspection> {
    let inputs = Inputs::open(cfg, resolver)?;
    inspect_inputs(cfg, &inputs, progress)
}

/// The short name of a model reference: its last path or id component.
fn short_name(model: &str) -> String {
    model
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or(model)
        .to_string()
}

/// Inspects the task vectors of `cfg`'s experts over already opened `inputs`.
pub fn inspect_inputs(cfg: &MergeConfig, inputs: &Inputs, progress: bool) -> Result<Inspection> {
    let start = Instant::now();
    let experts = Experts::from_inputs(cfg, inputs)?;
    let names = experts.tensors()?;
    let method = registry::get(&cfg.method, "method")?;
    let rule = match method {
        Method::Tensor(m) => m.task_vector_rule(),
        Method::Adapter(_) => None,
    };
    let sparsifies = rule.is_some_and(|(s, _)| s != merge_core::methods::Sparsification::None);
    let elects_signs = rule.is_some_and(|(_, c)| c.is_some());
    let params = ConfigParams::new(
        cfg,
        method.name(),
        method.parameters(),
        method.model_parameters(),
    )?;
    let declared = |p: &str| method.model_parameters().iter().any(|s| s.name == p);
    let base = &experts.base;
    let n_layers = num_layers(base.config()).unwrap_or_else(|| layers_in(base.names()));
    let total: u64 = names
        .iter()
        .map(|n| base.info(n).map_or(0, |i| i.numel() as u64))
        .sum();
    let bar = if progress {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "inspect {bar:30} {percent:>3}% {elapsed_precise} {msg}",
        )
        .expect("valid template"),
    );
    let mut tensors = Vec::with_capacity(names.len());
    for name in &names {
        let info = base.info(name).expect("checked");
        bar.set_message(name.clone());
        let t = layer_position(name, n_layers);
        let mut density = Vec::new();
        let mut weights = Vec::new();
        for e in &experts.list {
            let p = params.model(e.entry, name, t)?;
            let d = if sparsifies && declared("density") {
                p.number("density")
            } else {
                1.0
            };
            density.push(d);
            weights.push(if declared("weight") {
                p.number("weight") as f32
            } else {
                1.0
            });
        }
        let vectors = TensorVectors {
            name,
            n: info.numel(),
            base: Stored::open(base, name)?,
            experts: experts
                .list
                .iter()
                .map(|e| TaskVector::open(e, name))
                .collect::<Result<_>>()?,
        };
        let rule = Rule {
            keep: density
                .iter()
                .map(|d| Keep::ties(*d, info.numel()))
                .collect(),
            weights,
            consensus: elects_signs,
        };
        let sums = passes::tensor_sums(&vectors, &rule)?;
        tensors.push(TensorRecord {
            name: name.clone(),
            layer: kind::layer(name),
            kind: Kind::of(name),
            shape: info.shape.clone(),
            density,
            metrics: sums.metrics(),
            sums,
        });
        bar.inc(info.numel() as u64);
    }
    bar.finish_and_clear();
    let (layers, kinds, model) = aggregate(&tensors, experts.list.len());
    let infos = experts
        .list
        .iter()
        .enumerate()
        .map(|(i, e)| ExpertInfo {
            number: i + 1,
            name: short_name(&cfg.models[e.entry].model),
            label: e.label.clone(),
            lora: e.is_lora(),
        })
        .collect();
    let mut inspection = Inspection {
        version: 1,
        base: base.label.clone(),
        experts: infos,
        rule: RuleInfo {
            method: cfg.method.clone(),
            sparsifies,
            elects_signs,
        },
        tensors,
        layers,
        kinds,
        model,
        findings: Vec::new(),
        seconds: 0.0,
    };
    inspection.findings = findings::findings(&inspection);
    inspection.seconds = start.elapsed().as_secs_f64();
    Ok(inspection)
}

/// The per-layer, per-kind and whole-model groups of `tensors`.
fn aggregate(
    tensors: &[TensorRecord],
    e: usize,
) -> (Vec<GroupRecord>, Vec<GroupRecord>, GroupRecord) {
    let group = |layer: Option<usize>, kind: &str, members: Vec<&TensorRecord>| {
        let mut sums = Sums::zero(e);
        for t in &members {
            sums.add(&t.sums);
        }
        GroupRecord {
            layer,
            kind: kind.to_string(),
            tensors: members.len(),
            metrics: sums.metrics(),
            sums,
        }
    };
    let mut layer_ids: Vec<usize> = tensors.iter().filter_map(|t| t.layer).collect();
    layer_ids.sort_unstable();
    layer_ids.dedup();
    let mut layers = Vec::new();
    for l in layer_ids {
        let in_layer: Vec<&TensorRecord> = tensors.iter().filter(|t| t.layer == Some(l)).collect();
        layers.push(group(Some(l), "all", in_layer.clone()));
        for k in Kind::ALL {
            let members: Vec<&TensorRecord> =
                in_layer.iter().copied().filter(|t| t.kind == k).collect();
            if !members.is_empty() {
                layers.push(group(Some(l), k.name(), members));
            }
        }
    }
    let kinds = Kind::ALL
        .iter()
        .filter_map(|k| {
            let members: Vec<&TensorRecord> = tensors.iter().filter(|t| t.kind == *k).collect();
            (!members.is_empty()).then(|| group(None, k.name(), members))
        })
        .collect();
    let model = group(None, "all", tensors.iter().collect());
    (layers, kinds, model)
}

impl Inspection {
    /// The per-layer groups of one kind (`all` for whole layers), in layer order.
    pub fn layer_groups(&self, kind: &str) -> Vec<&GroupRecord> {
        self.layers.iter().filter(|g| g.kind == kind).collect()
    }

    /// The whole-model group of one module kind, if the model has such tensors.
    pub fn kind_group(&self, kind: Kind) -> Option<&GroupRecord> {
        self.kinds.iter().find(|g| g.kind == kind.name())
    }

    /// Every pair of experts (0-based, i < j).
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        let e = self.experts.len();
        (0..e)
            .flat_map(|i| (i + 1..e).map(move |j| (i, j)))
            .collect()
    }
}
