//! Declared parameters: what a method takes (a number or a flag, with a default or required),
//! how a config's values resolve to one value per tensor, the one check of parameter names,
//! and a tensor's layer position (what gradients are sampled at).
//!
//! A value resolves in this order: the model's own `[merge.models.parameters]` (per-model
//! parameters only), then `[merge.parameters]`, then the declared default; a required
//! parameter left without a value is an error naming it and the tensor. A gradient (a list of
//! numbers) is sampled at the tensor's layer position, and a filter list takes its first entry
//! whose `filter` is a substring of the tensor name. Values convert as in mergekit (Python
//! truthiness): a flag given as a number is true when nonzero, a number given as `true` is 1.

use std::collections::BTreeMap;

use crate::config::{MergeConfig, ParamValue, ScalarOrGradient};
use crate::error::{Error, Result};

/// One parameter value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A number.
    Number(f64),
    /// A boolean.
    Flag(bool),
}

/// A declared parameter: mergekit's name and its default, whose kind (a number or a flag) is
/// the parameter's; `None`: a number the config must set.
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    /// mergekit's parameter name.
    pub name: &'static str,
    /// Default value; `None` when the config must set it.
    pub default: Option<Value>,
}

impl ParamSpec {
    /// A number the config must set.
    pub const fn required(name: &'static str) -> Self {
        let default = None;
        ParamSpec { name, default }
    }

    /// A number with a default.
    pub const fn optional(name: &'static str, default: f64) -> Self {
        let default = Some(Value::Number(default));
        ParamSpec { name, default }
    }

    /// A flag with a default.
    pub const fn flag(name: &'static str, default: bool) -> Self {
        let default = Some(Value::Flag(default));
        ParamSpec { name, default }
    }

    /// `value` as this parameter's kind (see the module docs for the conversions).
    fn convert(&self, value: Value) -> Value {
        match (value, self.default) {
            (Value::Flag(b), None | Some(Value::Number(_))) => {
                Value::Number(f64::from(u8::from(b)))
            }
            (Value::Number(x), Some(Value::Flag(_))) => Value::Flag(x != 0.0),
            (v, _) => v,
        }
    }
}

/// Parameters resolved for one tensor: every declared parameter, defaults included.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(BTreeMap<&'static str, Value>);

impl Params {
    /// No parameters.
    pub fn new() -> Self {
        Params::default()
    }

    /// The defaults of `specs` (required parameters left out).
    pub fn defaults(specs: &[ParamSpec]) -> Self {
        Params(
            specs
                .iter()
                .filter_map(|s| Some((s.name, s.default?)))
                .collect(),
        )
    }

    /// Set `name`; numbers and booleans convert into [`Value`].
    pub fn set(&mut self, name: &'static str, value: impl Into<Value>) {
        self.0.insert(name, value.into());
    }

    fn get(&self, name: &str) -> Value {
        // Planning resolved every declared parameter, so a missing one is a bug in the method.
        *self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("parameter `{name}` is not declared by the method"))
    }

    /// A number parameter. Panics if the method did not declare `name` as a number.
    pub fn number(&self, name: &str) -> f64 {
        match self.get(name) {
            Value::Number(x) => x,
            Value::Flag(_) => panic!("parameter `{name}` is declared as a flag, not a number"),
        }
    }

    /// A flag parameter. Panics if the method did not declare `name` as a flag.
    pub fn flag(&self, name: &str) -> bool {
        match self.get(name) {
            Value::Flag(b) => b,
            Value::Number(_) => panic!("parameter `{name}` is declared as a number, not a flag"),
        }
    }
}

impl From<f64> for Value {
    fn from(x: f64) -> Self {
        Value::Number(x)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Flag(b)
    }
}

/// The value of `v` for `tensor` at layer position `t` ∈ [0, 1] (mergekit's semantics: a
/// gradient of n values is sampled at t·(n−1), interpolating linearly); `None` when no filter
/// entry matches the tensor.
pub fn evaluate(v: &ParamValue, tensor: &str, t: f64) -> Option<Value> {
    let scalar = |s: &ScalarOrGradient| match s {
        ScalarOrGradient::Bool(b) => Some(Value::Flag(*b)),
        ScalarOrGradient::Number(x) => Some(Value::Number(*x)),
        ScalarOrGradient::Gradient(values) => gradient_at(values, t).map(Value::Number),
    };
    match v {
        ParamValue::Bool(b) => Some(Value::Flag(*b)),
        ParamValue::Number(x) => Some(Value::Number(*x)),
        ParamValue::Gradient(values) => gradient_at(values, t).map(Value::Number),
        ParamValue::Filtered(entries) => entries
            .iter()
            .find(|e| match e.filter.as_deref() {
                None | Some("*") => true,
                Some(f) => tensor.contains(f),
            })
            .and_then(|e| scalar(&e.value)),
    }
}

/// Linear interpolation of a gradient at t ∈ [0, 1].
fn gradient_at(values: &[f64], t: f64) -> Option<f64> {
    match values.len() {
        0 => None,
        1 => Some(values[0]),
        n => {
            let scaled = t.clamp(0.0, 1.0) * (n - 1) as f64;
            let i0 = scaled.floor() as usize;
            let i1 = (i0 + 1).min(n - 1);
            let frac = scaled - i0 as f64;
            Some((1.0 - frac) * values[i0] + frac * values[i1])
        }
    }
}

/// A config's parameters, checked against one method's declarations, resolved per tensor.
pub struct ConfigParams<'a> {
    cfg: &'a MergeConfig,
    globals: &'static [ParamSpec],
    per_model: &'static [ParamSpec],
}

impl<'a> ConfigParams<'a> {
    /// Checks that every parameter `cfg` sets is one that method `method` declares: globally
    /// its global or per-model parameters (a global value of a per-model parameter is every
    /// model's default), per model its per-model ones.
    pub fn new(
        cfg: &'a MergeConfig,
        method: &str,
        globals: &'static [ParamSpec],
        per_model: &'static [ParamSpec],
    ) -> Result<Self> {
        let names = |specs: &[ParamSpec]| specs.iter().map(|p| p.name).collect::<Vec<_>>();
        let (global, model) = (names(globals), names(per_model));
        let declared = |list: &[&str], key: &String| list.contains(&key.as_str());
        for key in cfg.parameters.keys() {
            if !declared(&global, key) && !declared(&model, key) {
                return Err(Error::config(
                    "[merge.parameters]",
                    format!(
                        "`{key}` is not a parameter of `{method}` (it takes: {})",
                        [global.clone(), model.clone()].concat().join(", ")
                    ),
                ));
            }
        }
        for m in &cfg.models {
            if let Some(key) = m.parameters.keys().find(|k| !declared(&model, k)) {
                return Err(Error::config(
                    format!("[[merge.models]] {}", m.model),
                    format!(
                        "`{key}` is not a per-model parameter of `{method}` (it takes: {})",
                        model.join(", ")
                    ),
                ));
            }
        }
        Ok(ConfigParams {
            cfg,
            globals,
            per_model,
        })
    }

    /// The global parameters for `tensor` at layer position `t`.
    pub fn globals(&self, tensor: &str, t: f64) -> Result<Params> {
        let sources = [&self.cfg.parameters];
        resolve_all(self.globals, &sources, tensor, t, "[merge.parameters]")
    }

    /// The per-model parameters of `[[merge.models]]` entry `entry` for `tensor` at `t`.
    pub fn model(&self, entry: usize, tensor: &str, t: f64) -> Result<Params> {
        let m = &self.cfg.models[entry];
        let sources = [&m.parameters, &self.cfg.parameters];
        let what = format!("[[merge.models]] {}", m.model);
        resolve_all(self.per_model, &sources, tensor, t, &what)
    }
}

fn resolve_all(
    specs: &[ParamSpec],
    sources: &[&BTreeMap<String, ParamValue>],
    tensor: &str,
    t: f64,
    what: &str,
) -> Result<Params> {
    let mut params = Params::new();
    for spec in specs {
        let value = sources
            .iter()
            .find_map(|s| evaluate(s.get(spec.name)?, tensor, t))
            .or(spec.default)
            .ok_or_else(|| {
                Error::config(
                    what,
                    format!(
                        "missing required parameter `{}` (for tensor `{tensor}`)",
                        spec.name
                    ),
                )
            })?;
        params.set(spec.name, spec.convert(value));
    }
    Ok(params)
}

/// A sort key for tensor names that compares numbers as numbers (layer 2 before layer 10).
pub fn natural_key(name: &str) -> Vec<(String, u64)> {
    name.split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (String::new(), n),
            Err(_) => (p.to_string(), 0),
        })
        .collect()
}

/// Number of layers from `config.json`, if it says.
pub fn num_layers(config: Option<&serde_json::Value>) -> Option<usize> {
    let c = config?;
    ["num_hidden_layers", "n_layer", "num_layers"]
        .iter()
        .find_map(|k| c.get(*k).and_then(|v| v.as_u64()))
        .map(|n| n as usize)
}

/// Number of layers that tensors named `names` span: one more than the largest layer index
/// (1 when none is in a layer).
pub fn layers_in<'n>(names: impl Iterator<Item = &'n str>) -> usize {
    names.filter_map(layer_index).max().map_or(1, |m| m + 1)
}

/// The layer index in a tensor name (`model.layers.7.mlp...` → 7).
pub fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| match w[0] {
        "layers" | "h" | "block" | "blocks" | "layer" => w[1].parse().ok(),
        _ => None,
    })
}

/// mergekit's layer position: layer i of n at i/(n−1) (1 for a single layer); every tensor
/// outside the layers (embeddings, final norm, head) at 0, as mergekit plans them.
pub fn layer_position(name: &str, n_layers: usize) -> f64 {
    match layer_index(name) {
        Some(i) if n_layers > 1 => (i.min(n_layers - 1)) as f64 / (n_layers - 1) as f64,
        Some(_) => 1.0,
        None => 0.0,
    }
}
