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
//! Everything else (`slices` and `modules`, which change the layers: see `passthrough`;
//! `tokenizer`, `tokenizer_source` other than `base`, `chat_template`, string parameters,
//! `base+lora` over another model...) is an error that names it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_yaml::Value;

use super::{FilteredValue, MergeConfig, ModelEntry, OutDType, ParamValue};
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

/// The part of mergekit's schema we read (see the module docs).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    merge_method: String,
    base_model: Option<String>,
    dtype: Option<String>,
    out_dtype: Option<String>,
    tokenizer_source: Option<Value>,
    parameters: Option<Parameters>,
    models: Option<Vec<Model>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Model {
    model: String,
    parameters: Option<Parameters>,
}

type Parameters = BTreeMap<String, Value>;

/// A parameter value: ours, or one `{filter, value}` mapping on its own.
#[derive(Deserialize)]
#[serde(untagged)]
enum Parameter {
    Value(ParamValue),
    Filtered(FilteredValue),
}

/// Parameters as ours; `at` locates them in errors.
fn ours(p: Option<Parameters>, at: &str) -> Result<BTreeMap<String, ParamValue>> {
    let convert = |(k, v): (String, Value)| match serde_yaml::from_value(v.clone()) {
        Ok(Parameter::Value(p)) => Ok((k, p)),
        Ok(Parameter::Filtered(f)) => Ok((k, ParamValue::Filtered(vec![f]))),
        Err(_) => Err(Error::config(
            format!("{at}.{k}"),
            format!(
                "unsupported parameter value {v:?} (numbers, booleans, gradients or filter lists)"
            ),
        )),
    };
    p.unwrap_or_default().into_iter().map(convert).collect()
}

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

/// A YAML error as ours, located at `origin:line:column` where serde_yaml knows it.
fn yaml_error(origin: &str, e: serde_yaml::Error) -> Error {
    let at = match e.location() {
        Some(l) => format!("{origin}:{}:{}", l.line(), l.column()),
        None => origin.to_string(),
    };
    Error::config(at, e.to_string().replace('\n', " "))
}

/// Parse mergekit YAML text (schema checks only); `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<MergeConfig> {
    let doc: Value = serde_yaml::from_str(text).map_err(|e| yaml_error(origin, e))?;
    let Value::Mapping(top) = doc else {
        return Err(Error::config(origin, "a mergekit config is a YAML mapping"));
    };
    // Unknown keys first, with what to do instead where there is something.
    if let Some(k) = top
        .keys()
        .map(|k| k.as_str().unwrap_or("?"))
        .find(|k| !KNOWN.contains(k))
    {
        let hint = match k {
            "slices" | "modules" => {
                " (layer slices build the output from layer ranges, a frankenmerge that \
                 changes the layer count or order: the ≤8B / one-architecture rule allows only \
                 outputs of the inputs' shape; merge whole models with `models:`, e.g. \
                 `passthrough` of one model)"
            }
            "tokenizer" | "chat_template" => " (the output takes the base model's tokenizer as is)",
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
    let doc: Document = serde_yaml::from_str(text).map_err(|e| yaml_error(origin, e))?;
    let (base_model, base_revision) = match doc.base_model.as_deref() {
        None => (None, None),
        Some(s) if s.contains('+') => {
            return Err(Error::config(
                origin,
                format!("base_model `{s}`: a LoRA on the base (`+`) is not supported"),
            ))
        }
        Some(s) => {
            let (m, r) = split_revision(s);
            (Some(m), r)
        }
    };
    if let Some(v) = &doc.tokenizer_source {
        if v.as_str() != Some("base") || base_model.is_none() {
            return Err(Error::config(
                origin,
                format!("unsupported tokenizer_source {v:?}: the output takes the base model's tokenizer (only `base` with a base_model is accepted)"),
            ));
        }
    }
    let dtype = match doc.out_dtype.or(doc.dtype) {
        None => None,
        Some(s) => Some(
            serde_json::from_value::<OutDType>(serde_json::Value::String(s.clone())).map_err(
                |_| {
                    Error::config(
                        origin,
                        format!("unsupported dtype `{s}` (float32, float16, bfloat16)"),
                    )
                },
            )?,
        ),
    };
    let Some(entries) = doc.models else {
        return Err(Error::config(
            origin,
            "missing `models` (slices are not supported)",
        ));
    };
    let base = base_model.clone().map(|m| (m, base_revision.clone()));
    let mut models = Vec::new();
    for (i, m) in entries.into_iter().enumerate() {
        let name = match m.model.split_once('+') {
            // `base+lora` where base is the base model: the adapter over the base, which is
            // what an adapter entry means here.
            Some((b, lora)) if Some(split_revision(b)) == base.clone() => lora.to_string(),
            Some(_) => {
                return Err(Error::config(
                    format!("{origin}: models[{i}]"),
                    format!(
                        "`{}`: a LoRA (`+`) is supported only over the base_model",
                        m.model
                    ),
                ))
            }
            None => m.model,
        };
        let (model, revision) = split_revision(&name);
        models.push(ModelEntry {
            model,
            revision,
            parameters: ours(m.parameters, &format!("{origin}: models[{i}].parameters"))?,
            stats: None,
            calibration: None,
            calibration_rows: None,
        });
    }
    let cfg = MergeConfig {
        method: doc.merge_method,
        base_model,
        base_revision,
        dtype,
        seed: 0,
        parameters: ours(doc.parameters, &format!("{origin}: parameters"))?,
        models,
    };
    cfg.check_schema(origin)?;
    Ok(cfg)
}
