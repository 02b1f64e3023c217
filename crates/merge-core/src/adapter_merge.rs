//! Adapter-level merges: LoRA adapters in, one PEFT LoRA adapter out (not a full model).
//!
//! These differ from [`crate::methods`] in kind: the output is a pair of factors per module,
//! so they run on the adapters' factors, never on dense weights, and write with
//! [`crate::lora::write_adapter`]. Every input must be a PEFT LoRA adapter; `base_model` is
//! not read (the output keeps the first adapter's `base_model_name_or_path`).
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
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::config::MergeConfig;
use crate::error::{Error, Result};
use crate::lora::{write_adapter, Adapter};
use crate::merge::{layer_index, layer_position, MergeOptions, MergeReport};
use crate::methods::ParamSpec;
use crate::source::Resolver;

/// An adapter-level merge method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterMethod {
    /// The starter kit's factor average.
    LoraAvg,
    /// Stacked factors: the exact weighted sum of deltas.
    Cat,
    /// Truncated SVD of the weighted sum of deltas.
    Svd,
}

/// Every adapter-level method.
pub const ADAPTER_METHODS: [AdapterMethod; 3] = [
    AdapterMethod::LoraAvg,
    AdapterMethod::Cat,
    AdapterMethod::Svd,
];

/// The adapter-level method called `name`.
pub fn lookup(name: &str) -> Option<AdapterMethod> {
    ADAPTER_METHODS.into_iter().find(|m| m.name() == name)
}

impl AdapterMethod {
    /// The name configs use.
    pub fn name(self) -> &'static str {
        match self {
            AdapterMethod::LoraAvg => "lora_avg",
            AdapterMethod::Cat => "cat",
            AdapterMethod::Svd => "svd",
        }
    }

    /// Global parameters.
    pub fn parameters(self) -> &'static [ParamSpec] {
        const SVD: &[ParamSpec] = &[ParamSpec::optional("rank", 0.0)];
        match self {
            AdapterMethod::Svd => SVD,
            _ => &[],
        }
    }

    /// Per-model parameters.
    pub fn model_parameters(self) -> &'static [ParamSpec] {
        const REQUIRED: &[ParamSpec] = &[ParamSpec::required("weight")];
        const DEFAULT_ONE: &[ParamSpec] = &[ParamSpec::optional("weight", 1.0)];
        match self {
            AdapterMethod::LoraAvg => REQUIRED,
            _ => DEFAULT_ONE,
        }
    }
}

fn err(method: AdapterMethod, message: impl Into<String>) -> Error {
    Error::Method {
        method: method.name().into(),
        message: message.into(),
    }
}

fn terr(name: &str) -> impl FnOnce(candle_core::Error) -> Error + '_ {
    move |e| Error::tensor(name, e)
}

/// Per-model weight for `tensor` (a base weight name or an adapter key without its prefix).
fn weight_for(
    cfg: &MergeConfig,
    method: AdapterMethod,
    i: usize,
    tensor: &str,
    n_layers: usize,
) -> Result<f64> {
    let t = layer_position(tensor, n_layers);
    let spec = method.model_parameters()[0];
    for source in [&cfg.models[i].parameters, &cfg.parameters] {
        if let Some(v) = source.get("weight").and_then(|v| v.evaluate(tensor, t)) {
            return Ok(v);
        }
    }
    spec.default.ok_or_else(|| {
        Error::config(
            format!("[[merge.models]] {}", cfg.models[i].model),
            format!("missing required parameter `weight` (for `{tensor}`)"),
        )
    })
}

fn check_parameter_names(cfg: &MergeConfig, method: AdapterMethod) -> Result<()> {
    let global: Vec<&str> = method.parameters().iter().map(|p| p.name).collect();
    let per_model: Vec<&str> = method.model_parameters().iter().map(|p| p.name).collect();
    let all = [global.clone(), per_model.clone()].concat().join(", ");
    for key in cfg.parameters.keys() {
        if !global.contains(&key.as_str()) && !per_model.contains(&key.as_str()) {
            return Err(Error::config(
                "[merge.parameters]",
                format!(
                    "`{key}` is not a parameter of `{}` (it takes: {all})",
                    method.name()
                ),
            ));
        }
    }
    for m in &cfg.models {
        for key in m.parameters.keys() {
            if !per_model.contains(&key.as_str()) {
                return Err(Error::config(
                    format!("[[merge.models]] {}", m.model),
                    format!(
                        "`{key}` is not a per-model parameter of `{}` (it takes: {})",
                        method.name(),
                        per_model.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Open every model of the config as an adapter.
fn open_adapters(
    cfg: &MergeConfig,
    method: AdapterMethod,
    resolver: &Resolver,
) -> Result<Vec<Adapter>> {
    cfg.model_refs()
        .iter()
        .map(|r| {
            let files = resolver.resolve(r)?;
            if !Adapter::is_adapter(&files) {
                return Err(err(
                    method,
                    format!(
                        "{} is not a PEFT adapter (no adapter_config.json); `{}` merges LoRA \
                         adapters into an adapter — use a model-level method for full models",
                        files.describe(),
                        method.name()
                    ),
                ));
            }
            Adapter::open(&files)
        })
        .collect()
}

fn n_layers(keys: impl Iterator<Item = String>) -> usize {
    keys.filter_map(|k| layer_index(&k))
        .max()
        .map_or(1, |m| m + 1)
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

/// The starter kit's factor average; returns (tensors, adapter config).
fn lora_avg(
    cfg: &MergeConfig,
    adapters: &[Adapter],
) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
    let method = AdapterMethod::LoraAvg;
    let first = &adapters[0];
    let keys: Vec<String> = first.tensor_keys().map(str::to_string).collect();
    let layers = n_layers(keys.iter().cloned());
    let mut out = Vec::with_capacity(keys.len());
    let mut max_rank = 0usize;
    let mut grew = false;
    for key in &keys {
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
            let w = weight_for(cfg, method, i, short, layers)?;
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
        out.push((key.clone(), acc.expect("at least one adapter")));
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
    Ok((out, config))
}

/// Stacked factors of one module over the adapters that adapt it: (B: out × R, A: R × in),
/// with each adapter's weight and scale folded into its A rows.
fn stacked(
    cfg: &MergeConfig,
    method: AdapterMethod,
    adapters: &[Adapter],
    name: &str,
    layers: usize,
) -> Result<(Tensor, Tensor)> {
    let mut bs = Vec::new();
    let mut as_ = Vec::new();
    for (i, a) in adapters.iter().enumerate() {
        let Some(m) = a.modules().get(name) else {
            continue;
        };
        let w = weight_for(cfg, method, i, name, layers)?;
        let s = a.scale(m) * w;
        as_.push(
            a.load_factor_f32(&m.a_key)?
                .affine(s, 0.0)
                .map_err(terr(name))?,
        );
        bs.push(a.load_factor_f32(&m.b_key)?);
    }
    let a = Tensor::cat(&as_, 0).map_err(terr(name))?;
    let b = Tensor::cat(&bs, 1).map_err(terr(name))?;
    Ok((b, a))
}

/// `cat` and `svd`; returns (tensors, adapter config).
fn stack_or_svd(
    cfg: &MergeConfig,
    method: AdapterMethod,
    adapters: &[Adapter],
) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
    let first = &adapters[0];
    for a in adapters {
        if a.saved_modules().next().is_some() {
            return Err(err(
                method,
                format!("{} has modules_to_save (full tensors), which `{}` cannot express as LoRA factors", a.label, method.name()),
            ));
        }
        if a.config.fan_in_fan_out != first.config.fan_in_fan_out {
            return Err(err(method, "the adapters disagree on fan_in_fan_out"));
        }
    }
    // Union of adapted modules, by base weight name.
    let mut modules: BTreeMap<String, (String, bool)> = BTreeMap::new();
    for a in adapters {
        for (name, m) in a.modules() {
            modules
                .entry(name.clone())
                .or_insert((m.module.clone(), m.embedding));
        }
    }
    let layers = n_layers(modules.keys().cloned());
    let svd_rank = match method {
        AdapterMethod::Svd => {
            let r = cfg
                .parameters
                .get("rank")
                .and_then(|v| v.evaluate("", 0.0))
                .unwrap_or(0.0);
            if r < 0.0 || r.fract() != 0.0 {
                return Err(Error::config(
                    "[merge.parameters]",
                    format!("`rank` must be a whole number ≥ 1, got {r}"),
                ));
            }
            let r = r as usize;
            if r == 0 {
                adapters
                    .iter()
                    .flat_map(|a| a.modules().values().map(|m| m.rank))
                    .max()
                    .unwrap_or(1)
            } else {
                r
            }
        }
        _ => 0,
    };
    let mut tensors = Vec::new();
    let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
    for (name, (module, embedding)) in &modules {
        let (b, a) = stacked(cfg, method, adapters, name, layers)?;
        let (b, a) = match method {
            AdapterMethod::Svd => truncated_svd(&b, &a, svd_rank).map_err(terr(name))?,
            _ => (b, a),
        };
        let rank = a.dim(0).map_err(terr(name))?;
        ranks.insert(module.clone(), rank);
        let (ka, kb) = if *embedding {
            (
                format!("{PREFIX}{module}.lora_embedding_A"),
                format!("{PREFIX}{module}.lora_embedding_B"),
            )
        } else {
            (
                format!("{PREFIX}{module}.lora_A.weight"),
                format!("{PREFIX}{module}.lora_B.weight"),
            )
        };
        tensors.push((ka, a));
        tensors.push((kb, b));
    }
    let r = ranks.values().copied().max().unwrap_or(1);
    let mut config = first.raw_config.clone();
    // Scale 1 everywhere: alpha = r, per module where the rank differs.
    config["r"] = r.into();
    config["lora_alpha"] = r.into();
    config["use_rslora"] = false.into();
    let pattern: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|(_, &rk)| rk != r)
        .map(|(m, &rk)| (m.clone(), rk.into()))
        .collect();
    config["rank_pattern"] = pattern.clone().into();
    config["alpha_pattern"] = pattern.into();
    let mut targets: Vec<String> = modules
        .values()
        .map(|(m, _)| m.rsplit('.').next().unwrap_or(m).to_string())
        .collect();
    targets.sort();
    targets.dedup();
    config["target_modules"] = targets.into();
    Ok((tensors, config))
}

/// Row-major f64 copy of a 2-D tensor.
fn to_rows(t: &Tensor) -> candle_core::Result<(usize, usize, Vec<f64>)> {
    let (r, c) = t.dims2()?;
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok((r, c, v))
}

/// Thin QR of an n × k row-major matrix by modified Gram–Schmidt with one re-orthogonalisation
/// pass (accurate to machine precision for the small k of LoRA ranks). Returns (Q n × k, R
/// k × k, both row-major); a dependent column gets a zero Q column and a zero R row.
fn thin_qr(n: usize, k: usize, m: &[f64]) -> (Vec<f64>, Vec<f64>) {
    // columns
    let mut q: Vec<Vec<f64>> = (0..k)
        .map(|j| (0..n).map(|i| m[i * k + j]).collect())
        .collect();
    let mut r = vec![0f64; k * k];
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for j in 0..k {
        let original = dot(&q[j], &q[j]).sqrt();
        for _pass in 0..2 {
            for p in 0..j {
                let c = dot(&q[p], &q[j]);
                r[p * k + j] += c;
                let (head, tail) = q.split_at_mut(j);
                for (x, y) in tail[0].iter_mut().zip(&head[p]) {
                    *x -= c * y;
                }
            }
        }
        let norm = dot(&q[j], &q[j]).sqrt();
        if norm <= 1e-12 * original.max(f64::MIN_POSITIVE) || norm == 0.0 {
            q[j].iter_mut().for_each(|x| *x = 0.0);
        } else {
            r[j * k + j] = norm;
            q[j].iter_mut().for_each(|x| *x /= norm);
        }
    }
    let mut qm = vec![0f64; n * k];
    for (j, col) in q.iter().enumerate() {
        for (i, v) in col.iter().enumerate() {
            qm[i * k + j] = *v;
        }
    }
    (qm, r)
}

/// SVD of a small k × k row-major matrix by one-sided Jacobi: returns (U, σ, V) with U and V
/// row-major k × k and σ in descending order.
pub fn jacobi_svd(k: usize, m: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    // Work on columns of A (A = M), rotating pairs until all columns are orthogonal.
    let mut a: Vec<Vec<f64>> = (0..k)
        .map(|j| (0..k).map(|i| m[i * k + j]).collect())
        .collect();
    let mut v: Vec<Vec<f64>> = (0..k)
        .map(|j| (0..k).map(|i| f64::from(u8::from(i == j))).collect())
        .collect();
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..k {
            for q in p + 1..k {
                let alpha: f64 = a[p].iter().map(|x| x * x).sum();
                let beta: f64 = a[q].iter().map(|x| x * x).sum();
                let gamma: f64 = a[p].iter().zip(&a[q]).map(|(x, y)| x * y).sum();
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for mat in [&mut a, &mut v] {
                    let (lo, hi) = mat.split_at_mut(q);
                    for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                        let (xv, yv) = (*x, *y);
                        *x = c * xv - s * yv;
                        *y = s * xv + c * yv;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let sigma: Vec<f64> = a
        .iter()
        .map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&i, &j| sigma[j].total_cmp(&sigma[i]));
    let mut u = vec![0f64; k * k];
    let mut vv = vec![0f64; k * k];
    let mut s = vec![0f64; k];
    for (new, &old) in order.iter().enumerate() {
        s[new] = sigma[old];
        for i in 0..k {
            u[i * k + new] = if sigma[old] > 0.0 {
                a[old][i] / sigma[old]
            } else {
                0.0
            };
            vv[i * k + new] = v[old][i];
        }
    }
    (u, s, vv)
}

/// The best rank-`rank` factors (B', A') of B·A (B: out × R, A: R × in), padded with zero
/// directions when B·A has lower rank.
fn truncated_svd(b: &Tensor, a: &Tensor, rank: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let (out, k, bm) = to_rows(b)?;
    let (_, inn, am) = to_rows(a)?;
    // Aᵀ as in × k
    let mut at = vec![0f64; inn * k];
    for i in 0..k {
        for j in 0..inn {
            at[j * k + i] = am[i * inn + j];
        }
    }
    let (qb, rb) = thin_qr(out, k, &bm);
    let (qa, ra) = thin_qr(inn, k, &at);
    // core = R_b · R_aᵀ
    let mut core = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..k {
            core[i * k + j] = (0..k).map(|l| rb[i * k + l] * ra[j * k + l]).sum();
        }
    }
    let (u, s, v) = jacobi_svd(k, &core);
    let keep = rank.min(k);
    let mut new_b = vec![0f32; out * rank];
    let mut new_a = vec![0f32; rank * inn];
    for c in 0..keep {
        let root = s[c].sqrt();
        for i in 0..out {
            let x: f64 = (0..k).map(|l| qb[i * k + l] * u[l * k + c]).sum();
            new_b[i * rank + c] = (x * root) as f32;
        }
        for j in 0..inn {
            let y: f64 = (0..k).map(|l| qa[j * k + l] * v[l * k + c]).sum();
            new_a[c * inn + j] = (y * root) as f32;
        }
    }
    Ok((
        Tensor::from_vec(new_b, (out, rank), &Device::Cpu)?,
        Tensor::from_vec(new_a, (rank, inn), &Device::Cpu)?,
    ))
}

/// A one-paragraph plan for `--dry-run`.
pub fn describe(
    cfg: &MergeConfig,
    method: AdapterMethod,
    resolver: &Resolver,
    opts: &MergeOptions,
) -> Result<String> {
    let adapters = open_adapters(cfg, method, resolver)?;
    let mut s = format!(
        "adapter merge method: {} (output: a PEFT LoRA adapter)\n",
        method.name()
    );
    for (i, a) in adapters.iter().enumerate() {
        s.push_str(&format!(
            "model {}: {} (r = {}, {} modules)\n",
            i + 1,
            a.label,
            a.config.r,
            a.modules().len()
        ));
    }
    s.push_str(&format!("write: adapter to {}\n", opts.out.display()));
    Ok(s)
}

/// Run an adapter-level merge: open every model as an adapter, merge, write the adapter.
pub fn run(
    cfg: &MergeConfig,
    method: AdapterMethod,
    resolver: &Resolver,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let start = Instant::now();
    check_parameter_names(cfg, method)?;
    let adapters = open_adapters(cfg, method, resolver)?;
    if adapters.is_empty() {
        return Err(Error::config("merge", "no models to merge"));
    }
    let (tensors, config) = match method {
        AdapterMethod::LoraAvg => lora_avg(cfg, &adapters)?,
        AdapterMethod::Cat | AdapterMethod::Svd => stack_or_svd(cfg, method, &adapters)?,
    };
    let dtype = cfg
        .dtype
        .map_or_else(|| adapters[0].storage_dtype(), |d| d.candle());
    write_adapter(&opts.out, &config, &tensors, dtype, opts.overwrite)?;
    // The config that made it, beside the adapter.
    std::fs::write(opts.out.join("merge-config.toml"), cfg.to_toml())
        .map_err(|e| Error::io(&opts.out, e))?;
    let bytes_written = tensors
        .iter()
        .map(|(_, t)| (t.elem_count() * dtype.size_in_bytes()) as u64)
        .sum();
    Ok(MergeReport {
        out: opts.out.clone(),
        tensors: tensors.len(),
        bytes_written,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_svd_reconstructs() {
        let m = [4.0, 0.0, 1.0, 2.0, 3.0, -1.0, 0.5, 0.0, 2.0];
        let (u, s, v) = jacobi_svd(3, &m);
        assert!(s[0] >= s[1] && s[1] >= s[2]);
        for i in 0..3 {
            for j in 0..3 {
                let x: f64 = (0..3).map(|c| u[i * 3 + c] * s[c] * v[j * 3 + c]).sum();
                assert!((x - m[i * 3 + j]).abs() < 1e-12, "{i},{j}: {x}");
            }
        }
    }

    #[test]
    fn pad_puts_zeros_first() {
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let rows = pad_front(&t, 0, 3).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows, vec![vec![0.0, 0.0], vec![1.0, 2.0], vec![3.0, 4.0]]);
        let cols = pad_front(&t, 1, 3).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(cols, vec![vec![0.0, 1.0, 2.0], vec![0.0, 3.0, 4.0]]);
    }
}
