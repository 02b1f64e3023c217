//! LoRA extraction (`llm-merging extract-lora`, as `mergekit-extract-lora`): a PEFT LoRA
//! adapter whose factors approximate a fine-tune's difference from its base, layer by layer.
//!
//! For every linear weight W (a 2-D `*.weight` tensor; embeddings, `lm_head` and norms are
//! left out) of the base B and the fine-tune M: Δ = W_M − W_B = U·diag(σ)·Vᵀ (thin SVD, f32,
//! [`crate::methods::dense_linalg`]), and with r the kept rank
//! `lora_B` = U_r·diag(√σ_r) (out × r), `lora_A` = diag(√σ_r)·V_rᵀ (r × in), so
//! B·A = U_r·diag(σ_r)·V_rᵀ, the best rank-r approximation of Δ (Eckart–Young): its
//! Frobenius error² is exactly Σ_{i>r} σᵢ², which [`ExtractedModule::error_sq`] reports.
//!
//! The rank is `rank` (at most min(out, in)), or with `energy` e the smallest r whose
//! Σ_{i≤r} σᵢ² ≥ e·Σᵢ σᵢ², capped at `rank`. The adapter has scale 1 (lora_alpha = r; a
//! `rank_pattern` / `alpha_pattern` for layers of another rank), `target_modules` = the
//! layers' names, and loads in PEFT (`PeftModel.from_pretrained`) and in our
//! `eval --adapter`. A layer whose Δ is exactly zero is left out (PEFT starts it at zero).
//! The SVDs are exact (full thin SVDs): a randomised range finder would save time only at
//! ranks far below min(out, in), and not to the precision the parity tests hold it to.
//!
//! ```no_run
//! use merge_core::adapter::extract::{extract_lora, ExtractOptions};
//! use merge_core::checkpoint::Checkpoint;
//! let base = Checkpoint::open_dir("models/base")?;
//! let tuned = Checkpoint::open_dir("models/tuned")?;
//! let opts = ExtractOptions { rank: 32, energy: Some(0.9), base_name: "models/base".into() };
//! let lora = extract_lora(&base, &tuned, &opts)?;
//! lora.write("tuned-lora".as_ref(), false)?;
//! # Ok::<(), merge_core::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::merge::unit_scale_config;
use super::write_adapter;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::methods::dense_linalg::{scale_cols, thin_svd, to_rows, view_rows};

/// What to extract.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Most rank per layer (≥ 1).
    pub rank: usize,
    /// Keep per layer the smallest rank holding this share of Σσ² (in (0, 1]), at most `rank`.
    pub energy: Option<f64>,
    /// `base_model_name_or_path` of the adapter (what the user called the base).
    pub base_name: String,
}

/// One extracted layer.
#[derive(Debug, Clone)]
pub struct ExtractedModule {
    /// Module name (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// Kept rank.
    pub rank: usize,
    /// Every singular value of Δ, descending.
    pub sigma: Vec<f32>,
}

impl ExtractedModule {
    /// ‖Δ − B·A‖²_F as the singular values predict: Σ of the dropped σ².
    pub fn error_sq(&self) -> f64 {
        self.sigma[self.rank..]
            .iter()
            .map(|s| f64::from(*s).powi(2))
            .sum()
    }

    /// Share of Σσ² the kept rank holds.
    pub fn energy(&self) -> f64 {
        let total: f64 = self.sigma.iter().map(|s| f64::from(*s).powi(2)).sum();
        1.0 - self.error_sq() / total
    }
}

/// An extracted adapter, in memory.
pub struct Extraction {
    /// `lora_A` / `lora_B` factors by PEFT key.
    pub tensors: Vec<(String, Tensor)>,
    /// Its `adapter_config.json`.
    pub config: serde_json::Value,
    /// The extracted layers, in name order.
    pub modules: Vec<ExtractedModule>,
    /// Linear layers left out because the fine-tune does not change them.
    pub unchanged: Vec<String>,
    /// Storage dtype of the factors when written (the fine-tune's).
    pub dtype: DType,
}

impl Extraction {
    /// Write the adapter directory atomically (a temporary directory, then renamed).
    pub fn write(&self, out: &Path, overwrite: bool) -> Result<()> {
        write_adapter(out, &self.config, &self.tensors, self.dtype, overwrite)
    }
}

/// Whether tensor `name` of this shape is a linear layer's weight that extraction covers: a
/// 2-D `*.weight` whose module is not an embedding, `lm_head` or a norm.
pub fn is_linear_weight(name: &str, shape: &[usize]) -> bool {
    let Some(module) = name.strip_suffix(".weight") else {
        return false;
    };
    let last = module.rsplit('.').next().unwrap_or(module);
    shape.len() == 2
        && !last.contains("embed")
        && !last.contains("norm")
        && !["lm_head", "wte", "wpe", "shared"].contains(&last)
}

/// The smallest r with Σ_{i≤r} σᵢ² ≥ `energy`·Σᵢ σᵢ² (at least 1).
pub fn energy_rank(sigma: &[f32], energy: f64) -> usize {
    let total: f64 = sigma.iter().map(|s| f64::from(*s).powi(2)).sum();
    let mut kept = 0f64;
    for (i, s) in sigma.iter().enumerate() {
        kept += f64::from(*s).powi(2);
        if kept >= energy * total {
            return i + 1;
        }
    }
    sigma.len().max(1)
}

fn check(opts: &ExtractOptions, base: &Checkpoint, model: &Checkpoint) -> Result<()> {
    let bad = |m: String| Error::config("extract-lora", m);
    if opts.rank == 0 {
        return Err(bad("--rank must be at least 1".into()));
    }
    if let Some(e) = opts.energy {
        if !(e > 0.0 && e <= 1.0) {
            return Err(bad(format!("--energy must be in (0, 1], got {e}")));
        }
    }
    for ck in [base, model] {
        let model_type = ck.config().and_then(|c| c["model_type"].as_str());
        if model_type == Some("gpt2") {
            return Err(bad(format!(
                "{}: GPT-2's Conv1D weights (fan_in_fan_out) are not supported",
                ck.label
            )));
        }
    }
    Ok(())
}

/// Extract a LoRA adapter approximating `model` − `base`; see the module docs.
pub fn extract_lora(
    base: &Checkpoint,
    model: &Checkpoint,
    opts: &ExtractOptions,
) -> Result<Extraction> {
    check(opts, base, model)?;
    let names: Vec<&str> = base
        .names()
        .filter(|n| base.info(n).is_some_and(|i| is_linear_weight(n, &i.shape)))
        .collect();
    if names.is_empty() {
        return Err(Error::config(
            "extract-lora",
            format!("{} has no linear layer weights to extract", base.label),
        ));
    }
    // Every shape checked before any SVD runs.
    for name in &names {
        let want = &base.info(name).expect("listed").shape;
        match model.info(name) {
            None => {
                return Err(Error::MissingTensor {
                    tensor: name.to_string(),
                    model: model.label.clone(),
                })
            }
            Some(i) if &i.shape != want => {
                return Err(Error::ShapeMismatch {
                    tensor: name.to_string(),
                    model_a: base.label.clone(),
                    shape_a: want.clone(),
                    model_b: model.label.clone(),
                    shape_b: i.shape.clone(),
                })
            }
            Some(_) => {}
        }
    }
    let mut tensors = Vec::new();
    let mut modules = Vec::new();
    let mut unchanged = Vec::new();
    for name in names {
        let module = name.strip_suffix(".weight").expect("a weight").to_string();
        let terr = |e| Error::tensor(name, e);
        let w_base = base.load_f32(name, &Device::Cpu)?;
        let w_model = model.load_f32(name, &Device::Cpu)?;
        let (out_dim, in_dim) = w_base.dims2().map_err(terr)?;
        let delta = (w_model - w_base)
            .and_then(|d| d.flatten_all()?.to_vec1::<f32>())
            .map_err(terr)?;
        if delta.iter().all(|x| *x == 0.0) {
            unchanged.push(module);
            continue;
        }
        let svd = thin_svd(view_rows(&delta, out_dim, in_dim))
            .map_err(|e| terr(candle_core::Error::Msg(e.to_string())))?;
        let cap = opts.rank.min(svd.s.len());
        let rank = opts.energy.map_or(cap, |e| energy_rank(&svd.s, e).min(cap));
        let (u, s, v) = svd.truncated(rank);
        let root: Vec<f32> = s.iter().map(|x| x.sqrt()).collect();
        let b = to_rows(scale_cols(u, &root).as_ref());
        let a = to_rows(scale_cols(v, &root).transpose());
        let b = Tensor::from_vec(b, (out_dim, rank), &Device::Cpu).map_err(terr)?;
        let a = Tensor::from_vec(a, (rank, in_dim), &Device::Cpu).map_err(terr)?;
        tensors.push((format!("base_model.model.{module}.lora_A.weight"), a));
        tensors.push((format!("base_model.model.{module}.lora_B.weight"), b));
        tracing::info!("{module}: rank {rank}");
        modules.push(ExtractedModule {
            module,
            rank,
            sigma: svd.s,
        });
    }
    if modules.is_empty() {
        return Err(Error::config(
            "extract-lora",
            format!(
                "{} equals {} on every linear layer: nothing to extract",
                model.label, base.label
            ),
        ));
    }
    let ranks: BTreeMap<&str, usize> = modules
        .iter()
        .map(|m| (m.module.as_str(), m.rank))
        .collect();
    let task_type = base.config().and_then(|c| c["architectures"][0].as_str());
    let task_type = match task_type {
        Some(a) if a.ends_with("ForCausalLM") => serde_json::json!("CAUSAL_LM"),
        Some(a) if a.ends_with("ForConditionalGeneration") => serde_json::json!("SEQ_2_SEQ_LM"),
        _ => serde_json::Value::Null,
    };
    let config = unit_scale_config(
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": opts.base_name,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "lora_dropout": 0.0,
            "modules_to_save": null,
        }),
        &ranks,
    );
    let dtype = match model.storage_dtype() {
        d @ (DType::F16 | DType::BF16 | DType::F32) => d,
        _ => DType::F32,
    };
    Ok(Extraction {
        tensors,
        config,
        modules,
        unchanged,
        dtype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_weights_exclude_embeddings_heads_and_norms() {
        assert!(is_linear_weight(
            "model.layers.0.self_attn.q_proj.weight",
            &[8, 8]
        ));
        assert!(is_linear_weight(
            "encoder.block.0.layer.1.DenseReluDense.wi.weight",
            &[8, 4]
        ));
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.input_layernorm.weight",
            "model.norm.weight",
            "shared.weight",
        ] {
            assert!(!is_linear_weight(name, &[8, 8]), "{name}");
        }
        assert!(!is_linear_weight(
            "model.layers.0.mlp.up_proj.bias",
            &[8, 8]
        ));
        assert!(!is_linear_weight("model.layers.0.mlp.up_proj.weight", &[8]));
    }

    #[test]
    fn energy_rank_is_the_smallest_rank_holding_the_share() {
        let s = [3.0f32, 2.0, 1.0, 0.0]; // σ² = 9, 4, 1, 0 of 14
        assert_eq!(energy_rank(&s, 0.5), 1); // 9/14 = 0.64
        assert_eq!(energy_rank(&s, 0.9), 2); // 13/14 = 0.93
        assert_eq!(energy_rank(&s, 0.95), 3);
        assert_eq!(energy_rank(&s, 1.0), 3);
    }
}
