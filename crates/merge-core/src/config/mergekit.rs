//! mergekit's YAML configs, read into our [`MergeConfig`], so a participant's configs run
//! unchanged (`llm-merging merge CONFIG.yml`) and translate (`llm-merging convert`). Schema
//! only, like [`super::toml`]: the method name is checked by the registry.
//!
//! The part of mergekit's schema this reads:
//!
//! ```yaml
//! merge_method: ties              # any method of our registry, under the same name
//! base_model: org/base@revision   # `@revision` optional
//! dtype: bfloat16                 # output dtype (`out_dtype`, if given, wins)
//! parameters:                     # global parameters
//!   normalize: true
//!   density: [1.0, 0.7, 0.1]      # gradients
//! models:
//!   - model: org/expert@revision
//!     parameters:
//!       weight:                   # name filters
//!         - filter: self_attn
//!           value: 0.3
//!         - value: 0.5
//!   - model: org/base+org/adapter # `base+lora`, when `base` is the base_model
//! ```
//!
//! Everything else (`slices`, `modules`, `tokenizer`, `tokenizer_source` other than `base`,
//! `chat_template`, string parameters, `base+lora` over another model...) is an error that
//! names it.

use std::collections::BTreeMap;
use std::path::Path;

use serde_yaml::Value;

use super::{FilteredValue, MergeConfig, ModelEntry, OutDType, ParamValue, ScalarOrGradient};
use crate::error::{Error, Result};

const KNOWN: [&str; 7] = [
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
];

/// Whether `path` names a YAML file (`.yml` / `.yaml`).
pub fn is_yaml(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yml") || e.eq_ignore_ascii_case("yaml"))
}

/// Read a mergekit YAML config file (schema checks only).
pub fn read(path: &Path) -> Result<MergeConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, &path.display().to_string())
}

/// Split `model@revision`.
fn split_revision(s: &str) -> (String, Option<String>) {
    match s.rsplit_once('@') {
        Some((m, r)) if !m.is_empty() && !r.is_empty() => (m.to_string(), Some(r.to_string())),
        _ => (s.to_string(), None),
    }
}

fn scalar(v: &Value) -> Option<std::result::Result<ScalarOrGradient, ()>> {
    match v {
        Value::Bool(b) => Some(Ok(ScalarOrGradient::Bool(*b))),
        Value::Number(n) => Some(n.as_f64().map(ScalarOrGradient::Number).ok_or(())),
        Value::Sequence(items) if items.iter().all(|i| matches!(i, Value::Number(_))) => Some(Ok(
            ScalarOrGradient::Gradient(items.iter().filter_map(Value::as_f64).collect()),
        )),
        _ => None,
    }
}

fn filtered(v: &Value, at: &str) -> Result<FilteredValue> {
    let Value::Mapping(m) = v else {
        return Err(Error::config(
            at,
            "a filtered value must be a mapping with `value` (and `filter`)",
        ));
    };
    let mut filter = None;
    let mut value = None;
    for (k, v) in m {
        match k.as_str() {
            Some("filter") => {
                filter = Some(
                    v.as_str()
                        .ok_or_else(|| Error::config(at, "`filter` must be a string"))?
                        .to_string(),
                )
            }
            Some("value") => {
                value = Some(match scalar(v) {
                    Some(Ok(s)) => s,
                    _ => {
                        return Err(Error::config(
                            at,
                            format!(
                                "unsupported value {v:?} (numbers, booleans or lists of numbers)"
                            ),
                        ))
                    }
                })
            }
            other => {
                return Err(Error::config(
                    at,
                    format!(
                        "unsupported key `{}` in a filtered value",
                        other.unwrap_or("?")
                    ),
                ))
            }
        }
    }
    Ok(FilteredValue {
        filter,
        value: value.ok_or_else(|| Error::config(at, "a filtered value needs `value`"))?,
    })
}

fn param_value(v: &Value, at: &str) -> Result<ParamValue> {
    if let Some(s) = scalar(v) {
        return match s {
            Ok(ScalarOrGradient::Bool(b)) => Ok(ParamValue::Bool(b)),
            Ok(ScalarOrGradient::Number(x)) => Ok(ParamValue::Number(x)),
            Ok(ScalarOrGradient::Gradient(g)) => Ok(ParamValue::Gradient(g)),
            Err(()) => Err(Error::config(at, "number out of range")),
        };
    }
    match v {
        Value::Mapping(_) => Ok(ParamValue::Filtered(vec![filtered(v, at)?])),
        Value::Sequence(items) => Ok(ParamValue::Filtered(
            items.iter().map(|i| filtered(i, at)).collect::<Result<_>>()?,
        )),
        other => Err(Error::config(
            at,
            format!("unsupported parameter value {other:?} (numbers, booleans, gradients or filter lists)"),
        )),
    }
}

fn parameters(v: &Value, at: &str) -> Result<BTreeMap<String, ParamValue>> {
    match v {
        Value::Null => Ok(BTreeMap::new()),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let k = k
                    .as_str()
                    .ok_or_else(|| Error::config(at, "parameter names must be strings"))?;
                Ok((k.to_string(), param_value(v, &format!("{at}.{k}"))?))
            })
            .collect(),
        _ => Err(Error::config(at, "`parameters` must be a mapping")),
    }
}

fn string<'a>(v: &'a Value, at: &str) -> Result<&'a str> {
    v.as_str()
        .ok_or_else(|| Error::config(at, "must be a string"))
}

/// Parse mergekit YAML text (schema checks only); `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<MergeConfig> {
    let doc: Value = serde_yaml::from_str(text).map_err(|e| {
        let at = match e.location() {
            Some(l) => format!("{origin}:{}:{}", l.line(), l.column()),
            None => origin.to_string(),
        };
        Error::config(at, e.to_string().replace('\n', " "))
    })?;
    let Value::Mapping(top) = doc else {
        return Err(Error::config(origin, "a mergekit config is a YAML mapping"));
    };
    for k in top.keys() {
        let k = k.as_str().unwrap_or("?");
        if !KNOWN.contains(&k) {
            let hint = match k {
                "slices" | "modules" => {
                    " (layer slicing is not supported; merge whole models with `models:`)"
                }
                "tokenizer" | "chat_template" => {
                    " (the output takes the base model's tokenizer as is)"
                }
                _ => "",
            };
            return Err(Error::config(
                origin,
                format!(
                    "unsupported mergekit key `{k}`{hint}; supported: {}",
                    KNOWN.join(", ")
                ),
            ));
        }
    }
    let get = |k: &str| top.get(Value::String(k.into()));
    let method = string(
        get("merge_method").ok_or_else(|| Error::config(origin, "missing `merge_method`"))?,
        &format!("{origin}: merge_method"),
    )?
    .to_string();
    let (base_model, base_revision) = match get("base_model") {
        None | Some(Value::Null) => (None, None),
        Some(v) => {
            let s = string(v, &format!("{origin}: base_model"))?;
            if s.contains('+') {
                return Err(Error::config(
                    origin,
                    format!("base_model `{s}`: a LoRA on the base (`+`) is not supported"),
                ));
            }
            let (m, r) = split_revision(s);
            (Some(m), r)
        }
    };
    if let Some(v) = get("tokenizer_source") {
        if v.as_str() != Some("base") || base_model.is_none() {
            return Err(Error::config(
                origin,
                format!("unsupported tokenizer_source {v:?}: the output takes the base model's tokenizer (only `base` with a base_model is accepted)"),
            ));
        }
    }
    let dtype = match get("out_dtype").or_else(|| get("dtype")) {
        None | Some(Value::Null) => None,
        Some(v) => {
            let s = string(v, &format!("{origin}: dtype"))?;
            Some(
                serde_json::from_value::<OutDType>(serde_json::Value::String(s.into())).map_err(
                    |_| {
                        Error::config(
                            origin,
                            format!("unsupported dtype `{s}` (float32, float16, bfloat16)"),
                        )
                    },
                )?,
            )
        }
    };
    let params = match get("parameters") {
        Some(v) => parameters(v, &format!("{origin}: parameters"))?,
        None => BTreeMap::new(),
    };
    let mut models = Vec::new();
    match get("models") {
        Some(Value::Sequence(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = format!("{origin}: models[{i}]");
                let Value::Mapping(m) = item else {
                    return Err(Error::config(
                        at,
                        "each model is a mapping with `model` (and `parameters`)",
                    ));
                };
                for k in m.keys() {
                    let k = k.as_str().unwrap_or("?");
                    if k != "model" && k != "parameters" {
                        return Err(Error::config(
                            &at,
                            format!("unsupported key `{k}` (model, parameters)"),
                        ));
                    }
                }
                let name = string(
                    m.get(Value::String("model".into()))
                        .ok_or_else(|| Error::config(&at, "missing `model`"))?,
                    &at,
                )?;
                let name = match name.split_once('+') {
                    // `base+lora` where base is the base model: the adapter over the base,
                    // which is what an adapter entry means here.
                    Some((b, lora))
                        if Some(split_revision(b).0) == base_model
                            && split_revision(b).1 == base_revision =>
                    {
                        lora.to_string()
                    }
                    Some(_) => {
                        return Err(Error::config(
                            &at,
                            format!("`{name}`: a LoRA (`+`) is supported only over the base_model"),
                        ))
                    }
                    None => name.to_string(),
                };
                let (model, revision) = split_revision(&name);
                let parameters = match m.get(Value::String("parameters".into())) {
                    Some(v) => parameters(v, &format!("{at}.parameters"))?,
                    None => BTreeMap::new(),
                };
                models.push(ModelEntry {
                    model,
                    revision,
                    parameters,
                });
            }
        }
        Some(_) => return Err(Error::config(origin, "`models` must be a list")),
        None => {
            return Err(Error::config(
                origin,
                "missing `models` (slices are not supported)",
            ))
        }
    }
    let cfg = MergeConfig {
        method,
        base_model,
        base_revision,
        dtype,
        seed: 0,
        parameters: params,
        models,
    };
    cfg.check_schema(origin)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIES: &str = r#"
merge_method: ties
base_model: meta-llama/Meta-Llama-3-8B@abc123
dtype: bfloat16
parameters:
  normalize: true
  density: [1.0, 0.7, 0.1]
models:
  - model: meta-llama/Meta-Llama-3-8B@abc123
  - model: org/instruct
    parameters:
      weight:
        - filter: self_attn
          value: 0.3
        - value: 0.5
  - model: meta-llama/Meta-Llama-3-8B@abc123+org/adapter
    parameters:
      weight: {value: 0.2}
"#;

    #[test]
    fn reads_the_supported_schema() {
        let c = parse(TIES, "c.yml").unwrap();
        assert_eq!(c.method, "ties");
        assert_eq!(c.base_model.as_deref(), Some("meta-llama/Meta-Llama-3-8B"));
        assert_eq!(c.base_revision.as_deref(), Some("abc123"));
        assert_eq!(c.dtype, Some(OutDType::Bfloat16));
        assert_eq!(c.models.len(), 3);
        assert_eq!(c.models[0].revision.as_deref(), Some("abc123"));
        assert_eq!(c.models[2].model, "org/adapter");
        assert_eq!(
            c.parameters["density"],
            ParamValue::Gradient(vec![1.0, 0.7, 0.1])
        );
        let filter = |f: Option<&str>, v: f64| FilteredValue {
            filter: f.map(str::to_string),
            value: ScalarOrGradient::Number(v),
        };
        assert_eq!(
            c.models[1].parameters["weight"],
            ParamValue::Filtered(vec![filter(Some("self_attn"), 0.3), filter(None, 0.5)])
        );
        // and it converts to TOML that reads back the same
        let again = super::super::toml::parse(&c.to_toml(), "c.toml").unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn unsupported_parts_are_named() {
        for (text, needle) in [
            ("merge_method: linear\nslices: []\n", "`slices`"),
            (
                "merge_method: linear\nmodels: [{model: a}]\ntokenizer: {}\n",
                "`tokenizer`",
            ),
            (
                "merge_method: linear\nmodels: [{model: a, layer_range: [0, 2]}]\n",
                "`layer_range`",
            ),
            (
                "merge_method: linear\nmodels: [{model: a+b}]\n",
                "only over the base_model",
            ),
            (
                "merge_method: linear\nmodels: [{model: a, parameters: {weight: high}}]\n",
                "weight",
            ),
        ] {
            let e = parse(text, "c.yml").unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
