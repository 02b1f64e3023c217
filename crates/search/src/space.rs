//! The search space, checked: the `[search]` table read against the entry's merge and the
//! registry, before any model is loaded. A candidate is a [`Point`] — a method, which experts
//! are in, and one value in [0, 1] per range — and [`Space::recipe`] turns it into a merge
//! config, parameters filled in (gradients with N knots, per-filter values, as
//! mergekit-evolve's `layer_granularity` and `filters`).
//!
//! Values are rounded to 4 decimals before they reach the recipe, so the recipe a trial
//! evaluated is exactly what `best/entry.toml` holds, and nearby proposals share a recipe (and
//! its cached scores).

use std::collections::BTreeMap;

use merge_core::config::{FilteredValue, ParamValue, ScalarOrGradient};
use merge_core::params::{ConfigParams, ParamSpec, Value};
use merge_core::registry::{self, Method};
use merge_core::MergeConfig;
use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::spec::{OptimizerKind, SearchSpec, Selection};

/// Where a range's values go.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// `[merge.parameters]` (replacing the entry's per-model values of that parameter).
    Global,
    /// The parameters of `[[merge.models]]` entry `i`.
    Model(usize),
}

/// One parameter searched for one target: `knots` values per filter, plus one set for every
/// tensor no filter matches.
#[derive(Debug, Clone)]
struct Group {
    parameter: String,
    target: Target,
    knots: usize,
    filters: Vec<String>,
    first_dim: usize,
    /// Per searched method: whether it declares the parameter there.
    declared: Vec<bool>,
}

/// One continuous dimension.
#[derive(Debug, Clone)]
pub struct Dim {
    /// `parameter[@model][/filter][#knot]`, as the trial table's columns.
    pub label: String,
    /// The range.
    pub low: f64,
    /// The range.
    pub high: f64,
    group: usize,
}

/// A candidate, as the optimizers see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Index into [`Space::methods`].
    pub method: usize,
    /// Per selectable expert ([`Space::selectable`]): kept or left out.
    pub include: Vec<bool>,
    /// Per dimension, in [0, 1].
    pub unit: Vec<f64>,
}

/// The checked space.
#[derive(Debug, Clone)]
pub struct Space {
    base: MergeConfig,
    methods: Vec<String>,
    selectable: Vec<usize>,
    groups: Vec<Group>,
    dims: Vec<Dim>,
    optimizer: OptimizerKind,
}

/// A number rounded as recipes hold it.
pub fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn lookup_methods(spec: &SearchSpec, base: &MergeConfig) -> Result<Vec<Method>, SpecError> {
    let names = if spec.methods.is_empty() {
        vec![base.method.clone()]
    } else {
        spec.methods.clone()
    };
    // The entry's own recipe is merged in memory too (scored beside the trials, and in the
    // held-out check), whatever `methods` lists: a layer-wise method there is refused as well.
    for n in names.iter().chain([&base.method]) {
        if registry::lookup(n).is_some_and(|m| m.merges_layer_by_layer()) {
            return Err(SpecError::LayerwiseMethod { method: n.clone() });
        }
    }
    let mut out: Vec<Method> = Vec::new();
    for n in &names {
        let m = registry::lookup(n).ok_or_else(|| SpecError::UnknownMethod {
            method: n.clone(),
            known: registry::names().join(", "),
        })?;
        if out.iter().any(|o| o.name() == m.name()) {
            return Err(SpecError::Invalid(format!(
                "[search] methods: `{n}` is listed twice"
            )));
        }
        out.push(m);
    }
    Ok(out)
}

fn model_index(base: &MergeConfig, key: &str, name: &str) -> Result<usize, SpecError> {
    base.models
        .iter()
        .position(|m| m.model == name)
        .ok_or_else(|| SpecError::UnknownModel {
            key: key.to_string(),
            model: name.to_string(),
            known: base
                .models
                .iter()
                .map(|m| m.model.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn spec_of<'a>(specs: &'a [ParamSpec], name: &str) -> Option<&'a ParamSpec> {
    specs.iter().find(|s| s.name == name)
}

impl Space {
    /// Checks `spec` against the entry's merge `base` and the registry: known methods, each
    /// range's parameter declared by a searched method (per model where it names a model),
    /// models that are in the entry, non-empty ranges, an optimizer that fits, and every
    /// searched method able to run with the values given.
    pub fn new(spec: &SearchSpec, base: &MergeConfig) -> Result<Space, SpecError> {
        let methods = lookup_methods(spec, base)?;
        let selectable = match &spec.select {
            Selection::All(false) => Vec::new(),
            Selection::All(true) => (0..base.models.len()).collect(),
            Selection::Some(names) => names
                .iter()
                .map(|n| model_index(base, "[search] select", n))
                .collect::<Result<_, _>>()?,
        };
        let mut groups: Vec<Group> = Vec::new();
        let mut dims = Vec::new();
        for r in &spec.space {
            let key = format!("[[search.space]] `{}`", r.parameter);
            let targets = match r.model.as_deref() {
                None => vec![Target::Global],
                Some("*") => (0..base.models.len()).map(Target::Model).collect(),
                Some(name) => vec![Target::Model(model_index(base, &key, name)?)],
            };
            let [low, high] = r.range;
            if !(low.is_finite() && high.is_finite() && low < high) {
                return Err(SpecError::EmptyRange {
                    parameter: r.parameter.clone(),
                    model: r.model.clone(),
                    low,
                    high,
                });
            }
            if r.knots == 0 {
                return Err(SpecError::Invalid(format!(
                    "[[search.space]] `{}`: knots = 0 (1 is one value for every layer)",
                    r.parameter
                )));
            }
            if r.filters.iter().any(|f| f.is_empty() || f == "*") {
                return Err(SpecError::Invalid(format!(
                    "[[search.space]] `{}`: a filter is a piece of a tensor name (e.g. \"self_attn\"); every other tensor gets its own value anyway",
                    r.parameter
                )));
            }
            let per_model = r.model.is_some();
            let declared: Vec<bool> = methods
                .iter()
                .map(|m| {
                    let global = spec_of(m.parameters(), &r.parameter).is_some();
                    let model = spec_of(m.model_parameters(), &r.parameter).is_some();
                    model || (!per_model && global)
                })
                .collect();
            if !declared.iter().any(|d| *d) {
                let takes: Vec<&str> = methods
                    .iter()
                    .flat_map(|m| {
                        let g = if per_model { &[][..] } else { m.parameters() };
                        g.iter().chain(m.model_parameters()).map(|p| p.name)
                    })
                    .fold(Vec::new(), |mut acc, n| {
                        if !acc.contains(&n) {
                            acc.push(n);
                        }
                        acc
                    });
                return Err(SpecError::UndeclaredParameter {
                    parameter: r.parameter.clone(),
                    model: r.model.clone(),
                    methods: methods.iter().map(|m| m.name().to_string()).collect(),
                    takes: takes.join(", "),
                });
            }
            for m in &methods {
                let s = spec_of(m.parameters(), &r.parameter)
                    .or_else(|| spec_of(m.model_parameters(), &r.parameter));
                if matches!(s.and_then(|s| s.default), Some(Value::Flag(_))) {
                    return Err(SpecError::FlagParameter {
                        parameter: r.parameter.clone(),
                        method: m.name().to_string(),
                    });
                }
            }
            for target in targets {
                if groups
                    .iter()
                    .any(|g| g.parameter == r.parameter && g.target == target)
                {
                    return Err(SpecError::Invalid(format!(
                        "[[search.space]] `{}` is given twice for {}",
                        r.parameter,
                        match target {
                            Target::Global => "[merge.parameters]".to_string(),
                            Target::Model(i) => format!("model {}", base.models[i].model),
                        }
                    )));
                }
                let group = groups.len();
                let first_dim = dims.len();
                let filters: Vec<Option<&str>> = r
                    .filters
                    .iter()
                    .map(|f| Some(f.as_str()))
                    .chain([None])
                    .collect();
                for f in &filters {
                    for k in 0..r.knots {
                        let mut label = r.parameter.clone();
                        if let Target::Model(i) = target {
                            label += &format!("@{}", base.models[i].model);
                        }
                        if !r.filters.is_empty() {
                            label += &format!("/{}", f.unwrap_or("*"));
                        }
                        if r.knots > 1 {
                            label += &format!("#{k}");
                        }
                        dims.push(Dim {
                            label,
                            low,
                            high,
                            group,
                        });
                    }
                }
                groups.push(Group {
                    parameter: r.parameter.clone(),
                    target,
                    knots: r.knots,
                    filters: r.filters.clone(),
                    first_dim,
                    declared: declared.clone(),
                });
            }
        }
        let categorical = methods.len() > 1 || !selectable.is_empty();
        let optimizer = match spec.optimizer {
            OptimizerKind::Auto if categorical => OptimizerKind::Tpe,
            OptimizerKind::Auto => OptimizerKind::Cmaes,
            OptimizerKind::Cmaes if categorical => {
                return Err(SpecError::Optimizer {
                    optimizer: "cmaes".into(),
                    reason: "CMA-ES searches continuous ranges only, and this space also chooses methods or experts: use \"tpe\" (or \"random\")".into(),
                })
            }
            k => k,
        };
        if dims.is_empty() && !categorical {
            return Err(SpecError::Invalid(
                "[search] the space is empty: give [[search.space]] ranges, several `methods`, or `select`".into(),
            ));
        }
        if optimizer == OptimizerKind::Cmaes && dims.is_empty() {
            return Err(SpecError::Optimizer {
                optimizer: "cmaes".into(),
                reason: "there is no range to search".into(),
            });
        }
        let space = Space {
            base: base.clone(),
            methods: methods.iter().map(|m| m.name().to_string()).collect(),
            selectable,
            groups,
            dims,
            optimizer,
        };
        space.check_methods(&methods)?;
        Ok(space)
    }

    /// Every searched method can run: it has the base it needs, enough experts, and a value
    /// for every required parameter (merge-core's own check, on the middle of the space).
    fn check_methods(&self, methods: &[Method]) -> Result<(), SpecError> {
        let n = self.base.models.len();
        for (i, m) in methods.iter().enumerate() {
            if m.requires_base() && self.base.base_model.is_none() {
                return Err(SpecError::Invalid(format!(
                    "[search] methods: `{}` needs a base_model, and the entry's [merge] has none",
                    m.name()
                )));
            }
            let (min, max) = m.model_count();
            let n = counted_inputs(m, n, self.base.base_model.is_some());
            if n < min || max.is_some_and(|max| n > max) {
                return Err(SpecError::Invalid(format!(
                    "[search] methods: `{}` merges {min}{} models, and the entry has {n}{}",
                    m.name(),
                    match max {
                        Some(max) if max == min => String::new(),
                        Some(max) => format!(" to {max}"),
                        None => " or more".into(),
                    },
                    if m.base_is_input() && self.base.base_model.is_some() {
                        " (its base_model counts: this method merges it as one more input)"
                    } else {
                        ""
                    }
                )));
            }
            let point = Point {
                method: i,
                include: vec![true; self.selectable.len()],
                unit: vec![0.5; self.dims.len()],
            };
            let cfg = self.recipe(&point).expect("every expert included");
            let origin = format!("[search] method `{}`", m.name());
            let check = || -> merge_core::Result<()> {
                let p = ConfigParams::new(&cfg, m.name(), m.parameters(), m.model_parameters())?;
                let tensor = "model.layers.0.self_attn.q_proj.weight";
                p.globals(tensor, 0.0)?;
                for e in 0..cfg.models.len() {
                    p.model(e, tensor, 0.0)?;
                }
                Ok(())
            };
            check().map_err(|e| SpecError::Invalid(format!("{origin}: {e}")))?;
        }
        Ok(())
    }

    /// The optimizer chosen (`auto` resolved).
    pub fn optimizer(&self) -> OptimizerKind {
        self.optimizer
    }

    /// The methods searched (the entry's alone unless `methods` lists several).
    pub fn methods(&self) -> &[String] {
        &self.methods
    }

    /// Indices into the entry's `[[merge.models]]` of the experts the search may leave out.
    pub fn selectable(&self) -> &[usize] {
        &self.selectable
    }

    /// The continuous dimensions.
    pub fn dims(&self) -> &[Dim] {
        &self.dims
    }

    /// The entry's own recipe.
    pub fn base(&self) -> &MergeConfig {
        &self.base
    }

    /// Whether the space chooses a method or experts (a categorical part).
    pub fn is_categorical(&self) -> bool {
        self.methods.len() > 1 || !self.selectable.is_empty()
    }

    /// The value of dimension `d` at `unit` ∈ [0, 1] (clamped), rounded as recipes hold it.
    pub fn value(&self, d: usize, unit: f64) -> f64 {
        let dim = &self.dims[d];
        round4(dim.low + unit.clamp(0.0, 1.0) * (dim.high - dim.low))
    }

    /// Whether dimension `d` reaches the recipe of `p` (its method declares it, its model is
    /// in); optimizers tell TPE "unused" for the others.
    pub fn is_active(&self, d: usize, p: &Point) -> bool {
        let g = &self.groups[self.dims[d].group];
        g.declared[p.method]
            && match g.target {
                Target::Global => true,
                Target::Model(i) => self.included(p, i),
            }
    }

    fn included(&self, p: &Point, model: usize) -> bool {
        match self.selectable.iter().position(|&s| s == model) {
            Some(k) => p.include[k],
            None => true,
        }
    }

    /// The entry's own values in [0, 1] where it sets them as plain numbers (else the middle):
    /// where CMA-ES starts.
    pub fn entry_unit(&self) -> Vec<f64> {
        self.dims
            .iter()
            .map(|d| {
                let g = &self.groups[d.group];
                let v = match g.target {
                    Target::Global => self.base.parameters.get(&g.parameter),
                    Target::Model(i) => self.base.models[i]
                        .parameters
                        .get(&g.parameter)
                        .or_else(|| self.base.parameters.get(&g.parameter)),
                };
                match v {
                    Some(ParamValue::Number(x)) => ((x - d.low) / (d.high - d.low)).clamp(0.0, 1.0),
                    _ => 0.5,
                }
            })
            .collect()
    }

    /// The merge config of `p`: the entry's recipe with the method, experts and searched
    /// values of `p`; `None` when `p` leaves fewer experts than its method merges.
    pub fn recipe(&self, p: &Point) -> Option<MergeConfig> {
        let mut cfg = self.base.clone();
        let method_name = &self.methods[p.method];
        if *method_name != cfg.method {
            // Another method: the entry's values of parameters it does not take go.
            let m = registry::lookup(method_name).expect("checked");
            let global: Vec<&str> = m
                .parameters()
                .iter()
                .chain(m.model_parameters())
                .map(|s| s.name)
                .collect();
            let per_model: Vec<&str> = m.model_parameters().iter().map(|s| s.name).collect();
            cfg.parameters.retain(|k, _| global.contains(&k.as_str()));
            for model in &mut cfg.models {
                model
                    .parameters
                    .retain(|k, _| per_model.contains(&k.as_str()));
            }
            cfg.method = method_name.clone();
        }
        for g in self.groups.iter().filter(|g| g.declared[p.method]) {
            let value = self.group_value(g, p);
            match g.target {
                Target::Global => {
                    for model in &mut cfg.models {
                        model.parameters.remove(&g.parameter);
                    }
                    cfg.parameters.insert(g.parameter.clone(), value);
                }
                Target::Model(i) => {
                    cfg.models[i].parameters.insert(g.parameter.clone(), value);
                }
            }
        }
        let kept: Vec<_> = cfg
            .models
            .iter()
            .enumerate()
            .filter(|(i, _)| self.included(p, *i))
            .map(|(_, m)| m.clone())
            .collect();
        let m = registry::lookup(method_name).expect("checked");
        let (min, max) = m.model_count();
        let n = counted_inputs(&m, kept.len(), cfg.base_model.is_some());
        if kept.is_empty() || n < min || max.is_some_and(|max| n > max) {
            return None;
        }
        cfg.models = kept;
        Some(cfg)
    }

    fn group_value(&self, g: &Group, p: &Point) -> ParamValue {
        let values = |f: usize| -> Vec<f64> {
            (0..g.knots)
                .map(|k| {
                    let d = g.first_dim + f * g.knots + k;
                    self.value(d, p.unit[d])
                })
                .collect()
        };
        let scalar = |v: Vec<f64>| {
            if v.len() == 1 {
                ScalarOrGradient::Number(v[0])
            } else {
                ScalarOrGradient::Gradient(v)
            }
        };
        if g.filters.is_empty() {
            return match scalar(values(0)) {
                ScalarOrGradient::Number(x) => ParamValue::Number(x),
                ScalarOrGradient::Gradient(v) => ParamValue::Gradient(v),
                ScalarOrGradient::Bool(b) => ParamValue::Bool(b),
            };
        }
        let mut entries: Vec<FilteredValue> = g
            .filters
            .iter()
            .enumerate()
            .map(|(f, name)| FilteredValue {
                filter: Some(name.clone()),
                value: scalar(values(f)),
            })
            .collect();
        entries.push(FilteredValue {
            filter: None,
            value: scalar(values(g.filters.len())),
        });
        ParamValue::Filtered(entries)
    }

    /// `p` in words for the trial table: the method, the experts in, every active value.
    pub fn describe(&self, p: &Point) -> PointRecord {
        PointRecord {
            method: self.methods[p.method].clone(),
            models: self
                .base
                .models
                .iter()
                .enumerate()
                .filter(|(i, _)| self.included(p, *i))
                .map(|(_, m)| m.model.clone())
                .collect(),
            values: (0..self.dims.len())
                .filter(|&d| self.is_active(d, p))
                .map(|d| (self.dims[d].label.clone(), self.value(d, p.unit[d])))
                .collect(),
        }
    }
}

/// A point in words (stored with each trial, and the trial table's columns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointRecord {
    /// The method.
    pub method: String,
    /// The experts in the recipe.
    pub models: Vec<String>,
    /// Dimension label → value.
    pub values: BTreeMap<String, f64>,
}

/// How many free values a recipe has (a number 1, a gradient its knots, a filter list the sum
/// of its entries, plus one per expert): the measure of "simpler".
pub fn complexity(cfg: &MergeConfig) -> usize {
    fn count(v: &ParamValue) -> usize {
        match v {
            ParamValue::Bool(_) | ParamValue::Number(_) => 1,
            ParamValue::Gradient(g) => g.len(),
            ParamValue::Filtered(f) => f
                .iter()
                .map(|e| match &e.value {
                    ScalarOrGradient::Gradient(g) => g.len(),
                    _ => 1,
                })
                .sum(),
        }
    }
    cfg.parameters.values().map(count).sum::<usize>()
        + cfg
            .models
            .iter()
            .map(|m| 1 + m.parameters.values().map(count).sum::<usize>())
            .sum::<usize>()
}

/// The inputs a method's model bounds count for `n` experts: the named base too where the
/// method merges it as one more input (`karcher`, `passthrough`), as merge-core's plan does.
fn counted_inputs(m: &Method, n: usize, base_named: bool) -> usize {
    n + usize::from(m.base_is_input() && base_named)
}
