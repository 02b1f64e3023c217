//! A trainable Llama decoder, written from differentiable candle ops only.
//!
//! candle_nn's fused `rms_norm`, `rope` and `softmax_last_dim` kernels have no backward pass,
//! so this file spells them out from basic ops (the same formulas as the fused kernels). It
//! computes what eval-harness's decoder computes for the same weights — RMSNorm, rotate-half
//! RoPE on absolute positions, causal attention, SiLU-gated MLP, untied head — which a test
//! checks on a saved checkpoint, so the scores the harness reports reflect the training.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Shape of the tiny model (written to `config.json` as a Llama config).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TinyConfig {
    /// Vocabulary rows (the trained tokenizer's size).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_layers: usize,
    /// Attention heads (no grouped-query attention).
    pub num_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// BOS id.
    pub bos_id: u32,
    /// EOS id.
    pub eos_id: u32,
}

impl TinyConfig {
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// The Hugging Face `config.json` of this model.
    pub fn hf_config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 64,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "tie_word_embeddings": false,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "torch_dtype": "float32",
            "transformers_version": "4.39.0",
        })
    }

    /// Every weight's Hugging Face name and shape, in checkpoint order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                out.push((format!("{p}.self_attn.{m}.weight"), vec![h, h]));
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        out.push(("lm_head.weight".to_string(), vec![v, h]));
        out
    }

    /// Names of the linear modules a LoRA adapter targets (PEFT module names).
    pub fn lora_modules(&self) -> Vec<String> {
        let mut out = Vec::new();
        for l in 0..self.num_layers {
            for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                out.push(format!("model.layers.{l}.self_attn.{m}"));
            }
            for m in ["gate_proj", "up_proj", "down_proj"] {
                out.push(format!("model.layers.{l}.mlp.{m}"));
            }
        }
        out
    }
}

/// Uniform values in [-a, a) from the recipe's generator.
pub(crate) fn uniform(rng: &mut ChaCha8Rng, n: usize, a: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-a..a)).collect()
}

/// Fresh weights: norms at 1, embeddings U(±0.5), projections U(±1/√fan_in) like PyTorch's
/// default `nn.Linear` init.
pub fn init_weights(cfg: &TinyConfig, rng: &mut ChaCha8Rng) -> candle_core::Result<Params> {
    let mut map = BTreeMap::new();
    for (name, shape) in cfg.tensor_shapes() {
        let n: usize = shape.iter().product();
        let data = if shape.len() == 1 {
            vec![1f32; n]
        } else if name == "model.embed_tokens.weight" {
            uniform(rng, n, 0.5)
        } else {
            uniform(rng, n, 1.0 / (shape[1] as f32).sqrt())
        };
        map.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(map)
}

/// Weights by Hugging Face name.
pub type Params = BTreeMap<String, Tensor>;

/// LoRA factors of one module: `A` `[r, in]` and `B` `[out, r]`, ΔW = scale·B·A (PEFT's rule).
pub struct LoraFactors {
    /// Down projection.
    pub a: Var,
    /// Up projection.
    pub b: Var,
}

/// A LoRA adapter being trained.
pub struct LoraSet {
    /// Rank.
    pub r: usize,
    /// PEFT's `lora_alpha`.
    pub alpha: f64,
    /// Factors by module name.
    pub modules: BTreeMap<String, LoraFactors>,
}

impl LoraSet {
    /// PEFT's initialisation: A uniform (kaiming-style bound 1/√in), B zero, so training starts
    /// from the base model exactly.
    pub fn init(
        cfg: &TinyConfig,
        params: &Params,
        r: usize,
        alpha: f64,
        rng: &mut ChaCha8Rng,
    ) -> candle_core::Result<Self> {
        let mut modules = BTreeMap::new();
        for m in cfg.lora_modules() {
            let (out, inp) = params[&format!("{m}.weight")].dims2()?;
            let a = Tensor::from_vec(
                uniform(rng, r * inp, 1.0 / (inp as f32).sqrt()),
                (r, inp),
                &Device::Cpu,
            )?;
            let b = Tensor::zeros((out, r), DType::F32, &Device::Cpu)?;
            modules.insert(
                m,
                LoraFactors {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                },
            );
        }
        Ok(LoraSet { r, alpha, modules })
    }

    fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// The trainable variables.
    pub fn vars(&self) -> Vec<Var> {
        self.modules
            .values()
            .flat_map(|f| [f.a.clone(), f.b.clone()])
            .collect()
    }
}

fn linear(
    params: &Params,
    lora: Option<&LoraSet>,
    module: &str,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let w = &params[&format!("{module}.weight")];
    // One 2-D product over all positions: much cheaper (forward and backward) than a
    // broadcast batched product over a weight repeated per row.
    let (b, t, inp) = x.dims3()?;
    let x = x.reshape((b * t, inp))?;
    let y = x.matmul(&w.t()?)?;
    let y = match lora.and_then(|l| l.modules.get(module).map(|f| (l, f))) {
        Some((l, f)) => {
            let d = x
                .matmul(&f.a.as_tensor().t()?)?
                .matmul(&f.b.as_tensor().t()?)?;
            (y + (d * l.scale())?)?
        }
        None => y,
    };
    let out = y.dim(1)?;
    y.reshape((b, t, out))
}

/// RMSNorm from basic ops: x / √(mean(x²) + eps) · w (the fused kernel's formula).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let h = x.dim(D::Minus1)?;
    let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / h as f64)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Rotate-half RoPE (transformers' Llama, candle's `rope`) from basic ops; `cos`/`sin` are
/// `[t, head_dim/2]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
}

/// Logits `[b, t, vocab]` for token ids `[b, t]` at positions 0..t (right padding only, so
/// padding never precedes a real token and the causal mask suffices).
pub fn forward(
    cfg: &TinyConfig,
    params: &Params,
    lora: Option<&LoraSet>,
    ids: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let (h, nh, hd) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim());
    let dev = ids.device();
    let emb = &params["model.embed_tokens.weight"];
    let mut x = emb
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, h))?;
    // The harness computes inverse frequencies in f32 and angles as f32 position × inv_freq.
    let inv: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1.0f32 / (cfg.rope_theta as f32).powf(i as f32 / hd as f32))
        .collect();
    let mut angles = Vec::with_capacity(t * hd / 2);
    for p in 0..t {
        angles.extend(inv.iter().map(|f| p as f32 * f));
    }
    let angles = Tensor::from_vec(angles, (t, hd / 2), dev)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let mut mask = vec![0f32; t * t];
    for i in 0..t {
        for j in i + 1..t {
            mask[i * t + j] = -1e9;
        }
    }
    let mask = Tensor::from_vec(mask, (t, t), dev)?;
    let scale = 1.0 / (hd as f64).sqrt();
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let hn = rms_norm(
            &x,
            &params[&format!("{p}.input_layernorm.weight")],
            cfg.rms_norm_eps,
        )?;
        let heads = |m: &str| -> candle_core::Result<Tensor> {
            linear(params, lora, &format!("{p}.self_attn.{m}"), &hn)?
                .reshape((b, t, nh, hd))?
                .transpose(1, 2)
        };
        let q = rope(&heads("q_proj")?, &cos, &sin)?;
        let k = rope(&heads("k_proj")?, &cos, &sin)?;
        let v = heads("v_proj")?.contiguous()?;
        let s = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
        let pr = candle_nn::ops::softmax(&s, D::Minus1)?;
        let o = pr
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h))?;
        x = (x + linear(params, lora, &format!("{p}.self_attn.o_proj"), &o)?)?;
        let hn = rms_norm(
            &x,
            &params[&format!("{p}.post_attention_layernorm.weight")],
            cfg.rms_norm_eps,
        )?;
        let g = linear(params, lora, &format!("{p}.mlp.gate_proj"), &hn)?.silu()?;
        let u = linear(params, lora, &format!("{p}.mlp.up_proj"), &hn)?;
        x = (x + linear(params, lora, &format!("{p}.mlp.down_proj"), &(g * u)?)?)?;
    }
    let x = rms_norm(&x, &params["model.norm.weight"], cfg.rms_norm_eps)?;
    x.reshape((b * t, h))?
        .matmul(&params["lm_head.weight"].t()?)?
        .reshape((b, t, cfg.vocab_size))
}

/// A training batch: sequences right-padded to one length, with the positions whose next
/// token is scored.
pub struct Batch {
    /// Input ids `[b, t]`.
    pub inputs: Tensor,
    /// Next-token targets `[b·t]`.
    pub targets: Tensor,
    /// 1 where the target is scored, else 0, `[b·t]`.
    pub weights: Tensor,
    /// Scored targets.
    pub count: f64,
}

impl Batch {
    /// `seqs[i]` are full token sequences; `scored_from[i]` is the first index of `seqs[i]`
    /// whose prediction is trained (earlier tokens are context only).
    pub fn new(seqs: &[Vec<u32>], scored_from: &[usize], pad: u32) -> candle_core::Result<Self> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(1) - 1;
        let b = seqs.len();
        let (mut inp, mut tgt, mut w) = (
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
        );
        let mut count = 0.0;
        for (s, &from) in seqs.iter().zip(scored_from) {
            for j in 0..t {
                inp.push(s.get(j).copied().unwrap_or(pad));
                tgt.push(s.get(j + 1).copied().unwrap_or(pad));
                let scored = j + 1 < s.len() && j + 1 >= from;
                w.push(if scored { 1f32 } else { 0.0 });
                if scored {
                    count += 1.0;
                }
            }
        }
        let dev = Device::Cpu;
        Ok(Batch {
            inputs: Tensor::from_vec(inp, (b, t), &dev)?,
            targets: Tensor::from_vec(tgt, b * t, &dev)?,
            weights: Tensor::from_vec(w, b * t, &dev)?,
            count,
        })
    }

    /// Mean cross-entropy over the scored targets.
    pub fn loss(
        &self,
        cfg: &TinyConfig,
        params: &Params,
        lora: Option<&LoraSet>,
    ) -> candle_core::Result<Tensor> {
        let logits = forward(cfg, params, lora, &self.inputs)?;
        let (b, t, v) = logits.dims3()?;
        let lp = candle_nn::ops::log_softmax(&logits.reshape((b * t, v))?, D::Minus1)?;
        let picked = lp.gather(&self.targets.unsqueeze(1)?, 1)?.squeeze(1)?;
        let total = (picked * &self.weights)?.sum_all()?;
        total.affine(-1.0 / self.count.max(1.0), 0.0)
    }
}
