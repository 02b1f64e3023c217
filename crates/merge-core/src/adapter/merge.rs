//! Adapter-level merges: LoRA adapters in, one PEFT LoRA adapter out (not a full model).
//!
//! These differ from [`crate::methods`] in kind: the output is a pair of factors per module,
//! so they run on the adapters' factors, never on dense weights; the engine writes the result
//! with [`super::write_adapter`] (or folds it onto its base in memory). Every input must be a
//! PEFT LoRA adapter; writing one does not read `base_model` (the output keeps the first
//! adapter's `base_model_name_or_path`).
//!
//! | method | result | parameters |
//! |---|---|---|
//! | `lora_avg` | Σᵢ wᵢ·pad(Pᵢ) for every factor P (the starter kit's `llama_avg` / `flant5_avg`) | per model `weight` (required) |
//! | `cat` | factors stacked: ΔW = Σᵢ wᵢ·ΔWᵢ exactly, rank Σᵢ rᵢ | per model `weight` (default 1) |
//! | `svd` | ΔW = Σᵢ wᵢ·ΔWᵢ truncated to `rank` by SVD (best rank-r approximation) | per model `weight` (default 1); global `rank` (default: the largest input rank) |
//!
//! `lora_avg` is the official starter kit's rule (see docs/starter-kit-semantics.md): it
//! averages the *factors*, not the products, so the result is not the average of the
//! deltas. A lower-rank factor is zero-padded to the highest rank with the zeros FIRST
//! (lora_A: zero rows before its rows; lora_B: zero columns before its columns); the tensor
//! names are the first adapter's and so is the config (r, lora_alpha, target modules). If a
//! later adapter has a higher rank than the first, `r` grows to it and `lora_alpha` with it,
//! so the scale stays the first adapter's.
//!
//! `cat` and `svd` follow PEFT's `add_weighted_adapter` (combination types "cat" and "svd"):
//! both fold each adapter's scale (alpha/r) and weight into its A factor and write r =
//! lora_alpha, so the output's scale is 1. `svd` never forms the dense delta: with B the
//! stacked B factors (out × R) and A the stacked, scaled A factors (R × in),
//! B = Q_b·R_b and Aᵀ = Q_a·R_a (thin QR), so ΔW = Q_b·(R_b·R_aᵀ)·Q_aᵀ and the SVD of the
//! small R × R core gives ΔW's exact SVD (one-sided Jacobi, f64). The output splits √σ
//! between B and A.
//!
//! Per-model parameters honour gradients and name filters, evaluated at each module's base
//! weight name (`model.layers.3.self_attn.q_proj.weight`).
//!
//! ```toml
//! [merge]
//! method = "lora_avg"
//! base_model = "meta-llama/Llama-2-7b-hf"
//! [[merge.models]]
//! model = "abcdabcd987/gsm8k-llama2-7b-lora-16"
//! parameters = { weight = 0.8 }
//! [[merge.models]]
//! model = "FinGPT/fingpt-forecaster_dow30_llama2-7b_lora"
//! parameters = { weight = 0.2 }
//! ```

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::linalg::truncated_svd;
use super::Adapter;
use crate::error::{Error, Result};
use crate::params::{layer_position, layers_in, ConfigParams, ParamSpec};

/// An adapter-level merge method: LoRA adapters in, one adapter out. Listed in
/// [`crate::registry::REGISTRY`] beside the tensor-level methods.
pub trait AdapterMerge: Send + Sync {
    /// The name configs use.
    fn name(&self) -> &'static str;
    /// Global parameters.
    fn parameters(&self) -> &'static [ParamSpec] {
        &[]
    }
    /// Per-model parameters.
    fn model_parameters(&self) -> &'static [ParamSpec];
    /// Merge `adapters` (one per `[[merge.models]]` entry, in order) with the config's
    /// parameters into one adapter, factors in f32.
    fn merge(&self, adapters: &[&Adapter], params: &ConfigParams) -> Result<MergedAdapter>;
}

/// The result of an adapter-level merge.
pub struct MergedAdapter {
    /// Factors (and `modules_to_save` tensors) by PEFT key, in f32.
    pub tensors: Vec<(String, Tensor)>,
    /// Its `adapter_config.json`.
    pub config: serde_json::Value,
}

/// `lora_avg`: the starter kit's factor average.
pub struct LoraAvg;

/// `cat` (factors stacked) and `svd` (their sum truncated to a rank).
pub struct Stack {
    name: &'static str,
    svd: bool,
}

/// `cat`: stacked factors, the exact weighted sum of deltas.
pub static CAT: Stack = Stack {
    name: "cat",
    svd: false,
};
/// `svd`: the weighted sum of deltas truncated to `rank` by SVD.
pub static SVD: Stack = Stack {
    name: "svd",
    svd: true,
};

fn err(method: &str, message: impl Into<String>) -> Error {
    Error::method(method, message)
}

fn terr(name: &str) -> impl FnOnce(candle_core::Error) -> Error + '_ {
    move |e| Error::tensor(name, e)
}

/// Per-model weight of adapter `i` for `tensor` (a base weight name or an adapter key without
/// its prefix).
fn weight(params: &ConfigParams, i: usize, tensor: &str, layers: usize) -> Result<f64> {
    let t = layer_position(tensor, layers);
    Ok(params.model(i, tensor, t)?.number("weight"))
}

/// Where a factor's rank is: dim 0 for A factors, dim 1 for B factors, none otherwise.
fn rank_axis(key: &str) -> Option<usize> {
    if key.contains("lora_A") || key.contains("lora_embedding_A") {
        Some(0)
    } else if key.contains("lora_B") || key.contains("lora_embedding_B") {
        Some(1)
    } else {
        None
    }
}

const PREFIX: &str = "base_model.model.";

/// Zero-pad `t` to `rank` along `axis`, zeros first.
fn pad_front(t: &Tensor, axis: usize, rank: usize) -> candle_core::Result<Tensor> {
    let have = t.dim(axis)?;
    if have == rank {
        return Ok(t.clone());
    }
    let mut shape = t.dims().to_vec();
    shape[axis] = rank - have;
    let zeros = Tensor::zeros(shape, t.dtype(), t.device())?;
    Tensor::cat(&[&zeros, t], axis)
}

impl AdapterMerge for LoraAvg {
    fn name(&self) -> &'static str {
        "lora_avg"
    }

    fn model_parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::required("weight")];
        P
    }

    fn merge(&self, adapters: &[&Adapter], params: &ConfigParams) -> Result<MergedAdapter> {
        let method = self.name();
        let first = adapters[0];
        let keys: Vec<&str> = first.tensor_keys().collect();
        let layers = layers_in(keys.iter().copied());
        let mut out = Vec::with_capacity(keys.len());
        let mut max_rank = 0usize;
        let mut grew = false;
        for &key in &keys {
            let short = key.strip_prefix(PREFIX).unwrap_or(key);
            let axis = rank_axis(key);
            let mut factors = Vec::with_capacity(adapters.len());
            for a in adapters {
                if !a.has_tensor(key) {
                    return Err(err(
                        method,
                        format!(
                            "`{key}` of the first adapter is missing in {} (the kit's rule iterates the first adapter's tensors)",
                            a.label
                        ),
                    ));
                }
                factors.push(a.load_factor_f32(key)?);
            }
            let rank = match axis {
                Some(ax) => factors
                    .iter()
                    .map(|f| f.dim(ax))
                    .collect::<candle_core::Result<Vec<_>>>()
                    .map_err(terr(key))?
                    .into_iter()
                    .max()
                    .unwrap_or(0),
                None => 0,
            };
            if let Some(ax) = axis {
                let own = factors[0].dim(ax).map_err(terr(key))?;
                grew |= rank > own;
                max_rank = max_rank.max(rank);
            }
            let mut acc: Option<Tensor> = None;
            for (i, f) in factors.iter().enumerate() {
                let w = weight(params, i, short, layers)?;
                let padded = match axis {
                    Some(ax) => pad_front(f, ax, rank).map_err(terr(key))?,
                    None => f.clone(),
                };
                if padded.dims() != factors[0].dims() && axis.is_none() {
                    return Err(err(
                        method,
                        format!(
                            "`{key}` has shape {:?} in {} but {:?} in {}",
                            padded.dims(),
                            adapters[i].label,
                            factors[0].dims(),
                            first.label
                        ),
                    ));
                }
                let term = padded.affine(w, 0.0).map_err(terr(key))?;
                acc = Some(match acc {
                    None => term,
                    Some(a) => (a + term).map_err(|e| {
                        err(
                            method,
                            format!(
                                "`{key}`: factors of {} do not fit the first adapter's: {e}",
                                adapters[i].label
                            ),
                        )
                    })?,
                });
            }
            out.push((key.to_string(), acc.expect("at least one adapter")));
        }
        let mut config = first.raw_config.clone();
        if grew {
            if !first.config.rank_pattern.is_empty() {
                return Err(err(
                    method,
                    "a later adapter has a higher rank than the first, whose config has a rank_pattern; list the highest-rank adapter first",
                ));
            }
            // Keep the first adapter's scale alpha/r (alpha/√r with rslora) at the new rank.
            let (r, alpha) = (first.config.r as f64, first.config.lora_alpha);
            let ratio = max_rank as f64 / r;
            let alpha = if first.config.use_rslora {
                alpha * ratio.sqrt()
            } else {
                alpha * ratio
            };
            config["r"] = max_rank.into();
            config["lora_alpha"] = alpha.into();
        }
        Ok(MergedAdapter {
            tensors: out,
            config,
        })
    }
}

impl Stack {
    /// Stacked factors of one module over the adapters that adapt it: (B: out × R, A: R × in),
    /// with each adapter's weight and scale folded into its A rows.
    fn stacked(
        adapters: &[&Adapter],
        params: &ConfigParams,
        name: &str,
        layers: usize,
    ) -> Result<(Tensor, Tensor)> {
        let mut bs = Vec::new();
        let mut as_ = Vec::new();
        for (i, a) in adapters.iter().enumerate() {
            let Some(m) = a.modules().get(name) else {
                continue;
            };
            let s = a.scale(m) * weight(params, i, name, layers)?;
            let scaled = a.load_factor_f32(&m.a_key)?.affine(s, 0.0);
            as_.push(scaled.map_err(terr(name))?);
            bs.push(a.load_factor_f32(&m.b_key)?);
        }
        let a = Tensor::cat(&as_, 0).map_err(terr(name))?;
        let b = Tensor::cat(&bs, 1).map_err(terr(name))?;
        Ok((b, a))
    }
}

impl AdapterMerge for Stack {
    fn name(&self) -> &'static str {
        self.name
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const SVD: &[ParamSpec] = &[ParamSpec::optional("rank", 0.0)];
        if self.svd {
            SVD
        } else {
            &[]
        }
    }

    fn model_parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::optional("weight", 1.0)];
        P
    }

    fn merge(&self, adapters: &[&Adapter], params: &ConfigParams) -> Result<MergedAdapter> {
        let method = self.name;
        let first = adapters[0];
        for a in adapters {
            if a.saved_modules().next().is_some() {
                return Err(err(
                    method,
                    format!("{} has modules_to_save (full tensors), which `{method}` cannot express as LoRA factors", a.label),
                ));
            }
            if a.config.fan_in_fan_out != first.config.fan_in_fan_out {
                return Err(err(method, "the adapters disagree on fan_in_fan_out"));
            }
        }
        // Union of adapted modules, by base weight name.
        let mut modules: BTreeMap<&str, (&str, bool)> = BTreeMap::new();
        for a in adapters {
            for (name, m) in a.modules() {
                modules.entry(name).or_insert((&m.module, m.embedding));
            }
        }
        let layers = layers_in(modules.keys().copied());
        let svd_rank = if self.svd {
            let r = params.globals("", 0.0)?.number("rank");
            if r < 0.0 || r.fract() != 0.0 {
                return Err(Error::config(
                    "[merge.parameters]",
                    format!("`rank` must be a whole number ≥ 1, got {r}"),
                ));
            }
            match r as usize {
                0 => adapters
                    .iter()
                    .flat_map(|a| a.modules().values().map(|m| m.rank))
                    .max()
                    .unwrap_or(1),
                r => r,
            }
        } else {
            0
        };
        let mut tensors = Vec::new();
        let mut ranks: BTreeMap<&str, usize> = BTreeMap::new();
        for (&name, &(module, embedding)) in &modules {
            let (b, a) = Self::stacked(adapters, params, name, layers)?;
            let (b, a) = if self.svd {
                truncated_svd(&b, &a, svd_rank).map_err(terr(name))?
            } else {
                (b, a)
            };
            ranks.insert(module, a.dim(0).map_err(terr(name))?);
            let (ka, kb) = if embedding {
                ("lora_embedding_A", "lora_embedding_B")
            } else {
                ("lora_A.weight", "lora_B.weight")
            };
            tensors.push((format!("{PREFIX}{module}.{ka}"), a));
            tensors.push((format!("{PREFIX}{module}.{kb}"), b));
        }
        let config = unit_scale_config(first.raw_config.clone(), &ranks);
        Ok(MergedAdapter { tensors, config })
    }
}

/// `config` (an `adapter_config.json`) made to describe factors of scale 1 with these ranks
/// (by module name): r = the highest rank and lora_alpha = r, a `rank_pattern` and an equal
/// `alpha_pattern` for modules of another rank, no rsLoRA, and `target_modules` = the
/// modules' last name components. Used by `cat`, `svd` and LoRA extraction.
pub(crate) fn unit_scale_config(
    mut config: serde_json::Value,
    ranks: &BTreeMap<&str, usize>,
) -> serde_json::Value {
    let r = ranks.values().copied().max().unwrap_or(1);
    config["r"] = r.into();
    config["lora_alpha"] = r.into();
    config["use_rslora"] = false.into();
    let pattern: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|(_, &rk)| rk != r)
        .map(|(m, &rk)| (m.to_string(), rk.into()))
        .collect();
    config["rank_pattern"] = pattern.clone().into();
    config["alpha_pattern"] = pattern.into();
    let mut targets: Vec<&str> = ranks
        .keys()
        .map(|m| m.rsplit('.').next().unwrap_or(m))
        .collect();
    targets.sort();
    targets.dedup();
    config["target_modules"] = targets.into();
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pad_puts_zeros_first() {
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let rows = pad_front(&t, 0, 3).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows, vec![vec![0.0, 0.0], vec![1.0, 2.0], vec![3.0, 4.0]]);
        let cols = pad_front(&t, 1, 3).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(cols, vec![vec![0.0, 1.0, 2.0], vec![0.0, 3.0, 4.0]]);
    }
}
