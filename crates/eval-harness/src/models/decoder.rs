//! One config-driven decoder-only transformer covering Llama 2/3 (incl. `llama3` rope scaling),
//! TinyLlama, Mistral (sliding window), Qwen2 (q/k/v bias) and Gemma ((1+w) RMSNorm, scaled
//! embeddings, GeGLU, tied head), with the Hugging Face weight names.
//!
//! Unlike candle-transformers' models it returns hidden states for every position (the caller
//! projects only the positions it needs onto the vocabulary), takes per-row key padding, and
//! keeps a KV cache that can be computed once for a prompt and then repeated for a batch of
//! continuations. Rotary angles are computed from positions on the fly, so sequences may run
//! past `max_position_embeddings`.

use std::path::Path;

use candle_core::{DType, Device, Module, Storage, Tensor, D};
use candle_nn::Embedding;

use super::attention_cpu;
use super::linear::Lin as Linear;
use super::vector_math;

use crate::error::{Error, Result};
use crate::weights::WeightSource;

/// The architectures this decoder implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 1/2/3, TinyLlama, CodeLlama.
    Llama,
    /// Mistral (optionally with a sliding attention window).
    Mistral,
    /// Qwen2 (bias on q/k/v projections).
    Qwen2,
    /// Gemma (scaled embeddings, (1+w) norms, GeGLU, tied head).
    Gemma,
}

/// Rotary embedding frequency adjustments from `rope_scaling`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (linear interpolation).
    Linear(f64),
    /// Llama 3.1 style: low frequencies divided by `factor`, smooth transition in between.
    Llama3 {
        /// Overall scale factor.
        factor: f64,
        /// Wavelength threshold factor for the low frequencies.
        low_freq_factor: f64,
        /// Wavelength threshold factor for the high frequencies.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: f64,
    },
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU MLP).
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
}

/// Everything the decoder needs from `config.json`.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Architecture family (from `model_type`).
    pub family: Family,
    /// Vocabulary rows of the embedding.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency adjustments.
    pub rope_scaling: RopeScaling,
    /// Trained context length (informational: longer inputs still run).
    pub max_position_embeddings: usize,
    /// Each query sees at most this many most recent keys (itself included).
    pub sliding_window: Option<usize>,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// MLP activation.
    pub activation: Activation,
    /// EOS ids from config.json (the tokenizer's EOS is what generation uses).
    pub eos_token_ids: Vec<u32>,
}

fn act_from_name(name: &str) -> Option<Activation> {
    match name {
        "silu" | "swish" => Some(Activation::Silu),
        "gelu" => Some(Activation::Gelu),
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Activation::GeluTanh),
        _ => None,
    }
}

impl DecoderConfig {
    /// Reads a model's `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("invalid JSON: {e}"),
        })?;
        Self::from_json(&v).map_err(|message| Error::Config {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Interprets a parsed `config.json`, applying each family's transformers defaults.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let model_type = v
            .get("model_type")
            .and_then(|x| x.as_str())
            .ok_or("no `model_type`")?;
        let family = match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "gemma" => Family::Gemma,
            other => {
                return Err(format!(
                    "model_type `{other}` is not supported by the decoder (llama, mistral, qwen2, gemma)"
                ))
            }
        };
        let usize_of = |k: &str| -> std::result::Result<usize, String> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| format!("missing or non-integer `{k}`"))
        };
        let opt_usize = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let f64_or = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let bool_of = |k: &str| v.get(k).and_then(|x| x.as_bool());

        let hidden_size = usize_of("hidden_size")?;
        let num_heads = usize_of("num_attention_heads")?;
        let num_kv_heads = opt_usize("num_key_value_heads").unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            ));
        }
        let head_dim = opt_usize("head_dim").unwrap_or(hidden_size / num_heads);
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(serde_json::Value::Null) => RopeScaling::None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|x| x.as_str())
                    .unwrap_or("");
                let g = |k: &str| s.get(k).and_then(|x| x.as_f64());
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => {
                        RopeScaling::Linear(g("factor").ok_or("rope_scaling without factor")?)
                    }
                    "llama3" => RopeScaling::Llama3 {
                        factor: g("factor").ok_or("rope_scaling llama3 without factor")?,
                        low_freq_factor: g("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: g("high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: g("original_max_position_embeddings")
                            .unwrap_or(8192.0),
                    },
                    other => return Err(format!("rope_scaling type `{other}` is not supported")),
                }
            }
        };
        let sliding_window = match family {
            Family::Mistral => opt_usize("sliding_window"),
            Family::Qwen2 if bool_of("use_sliding_window") == Some(true) => {
                opt_usize("sliding_window")
            }
            _ => None,
        };
        let attention_bias = bool_of("attention_bias").unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Gemma => (attention_bias, attention_bias),
            _ => (attention_bias, attention_bias),
        };
        // transformers' per-class defaults for tie_word_embeddings.
        let tie_default = family == Family::Gemma;
        let tie_word_embeddings = bool_of("tie_word_embeddings").unwrap_or(tie_default);
        // Gemma configs carry both names; newer transformers prefer hidden_activation.
        let act_name = v
            .get("hidden_activation")
            .and_then(|x| x.as_str())
            .or_else(|| v.get("hidden_act").and_then(|x| x.as_str()))
            .unwrap_or(if family == Family::Gemma {
                "gelu_pytorch_tanh"
            } else {
                "silu"
            });
        let activation = act_from_name(act_name)
            .ok_or_else(|| format!("activation `{act_name}` is not supported"))?;
        let eos_token_ids = match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        };
        Ok(DecoderConfig {
            family,
            vocab_size: usize_of("vocab_size")?,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_layers: usize_of("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f64_or("rms_norm_eps", 1e-6),
            rope_theta: f64_or("rope_theta", 10000.0),
            rope_scaling,
            max_position_embeddings: opt_usize("max_position_embeddings").unwrap_or(2048),
            sliding_window,
            qkv_bias,
            o_bias,
            tie_word_embeddings,
            activation,
            eos_token_ids,
        })
    }

    /// Inverse RoPE frequencies (length head_dim/2), computed in f32 like transformers.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base = self.rope_theta as f32;
        let mut inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0f32 / base.powf(i as f32 / dim as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear(f) => inv.iter_mut().for_each(|x| *x /= *f as f32),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for x in inv.iter_mut() {
                    let f = *x as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    *x = if wavelen < high_wavelen {
                        f as f32
                    } else if wavelen > low_wavelen {
                        (f / factor) as f32
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * f / factor + smooth * f) as f32
                    };
                }
            }
        }
        inv
    }
}

/// Keys and values of the tokens seen so far, per layer, plus which of them are real tokens.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values `[batch, kv_heads, capacity, head_dim]`, the first `len`
    /// positions filled: new positions are written in place while they fit (copying the whole
    /// cache at every decoding step took a tenth of a long-prompt generation on the CPU).
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per row: whether each cached position is a real (non-padding) token.
    valid: Vec<Vec<bool>>,
    /// Shared by clones: a cache whose buffers another clone can see copies them before
    /// writing instead of writing in place.
    owner: std::sync::Arc<()>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            valid: Vec::new(),
            owner: Default::default(),
        }
    }

    /// Layer `l`'s keys and values, `[batch, kv_heads, len, head_dim]` views.
    fn filled(&self, l: usize) -> Option<Result<(Tensor, Tensor)>> {
        let len = self.len();
        self.layers[l]
            .as_ref()
            .map(|(k, v)| Ok((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?)))
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows in the cache.
    pub fn batch(&self) -> usize {
        self.valid.len()
    }

    /// Whether no clone shares the buffers (so they may be written in place).
    fn exclusive(&self) -> bool {
        std::sync::Arc::strong_count(&self.owner) == 1
    }

    /// A cache of `n` identical rows from a single-row cache: a prompt computed once and shared
    /// by `n` continuations.
    pub fn repeat(&self, n: usize) -> Result<Self> {
        if self.batch() != 1 {
            return Err(Error::Msg(format!(
                "KvCache::repeat needs a single-row cache, this one has {} rows",
                self.batch()
            )));
        }
        let layers = (0..self.layers.len())
            .map(|l| {
                self.filled(l)
                    .map(|kv| -> Result<_> {
                        let (k, v) = kv?;
                        Ok((k.repeat((n, 1, 1, 1))?, v.repeat((n, 1, 1, 1))?))
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            valid: vec![self.valid[0].clone(); n],
            owner: Default::default(),
        })
    }

    /// One cache of `caches.len()` rows from single-row caches of any lengths, each row
    /// left-padded (zero keys and values, marked as padding, so never attended to) to the
    /// longest. Prompts prefilled one by one this way decode together exactly as a left-padded
    /// batch would, without computing the padding.
    pub fn stack_left_padded(caches: &[KvCache]) -> Result<Self> {
        if caches.iter().any(|c| c.batch() != 1) {
            return Err(Error::Msg(
                "KvCache::stack_left_padded needs single-row caches".into(),
            ));
        }
        let Some(first) = caches.first() else {
            return Err(Error::Msg("KvCache::stack_left_padded: no caches".into()));
        };
        let width = caches.iter().map(KvCache::len).max().unwrap_or(0);
        let pad = |t: &Tensor, n: usize| -> Result<Tensor> {
            if n == 0 {
                return Ok(t.clone());
            }
            let (b, h, _, d) = t.dims4()?;
            let z = Tensor::zeros((b, h, n, d), t.dtype(), t.device())?;
            Ok(Tensor::cat(&[&z, t], 2)?)
        };
        let mut layers = Vec::with_capacity(first.layers.len());
        for l in 0..first.layers.len() {
            let mut ks = Vec::with_capacity(caches.len());
            let mut vs = Vec::with_capacity(caches.len());
            for c in caches {
                let Some(kv) = c.filled(l) else {
                    return Err(Error::Msg(
                        "KvCache::stack_left_padded: a cache has no entries".into(),
                    ));
                };
                let (k, v) = kv?;
                let n = width - c.len();
                ks.push(pad(&k, n)?);
                vs.push(pad(&v, n)?);
            }
            layers.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
        }
        let valid = caches
            .iter()
            .map(|c| {
                std::iter::repeat_n(false, width - c.len())
                    .chain(c.valid[0].iter().copied())
                    .collect()
            })
            .collect();
        Ok(KvCache {
            layers,
            valid,
            owner: Default::default(),
        })
    }

    /// Keeps only the given rows (finished sequences leave a generation batch).
    pub fn select(&mut self, rows: &[usize]) -> Result<()> {
        let Some(device) = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.device().clone())
        else {
            return Ok(());
        };
        let idx = Tensor::new(
            rows.iter()
                .map(|&r| r as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            &device,
        )?;
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        self.valid = rows.iter().map(|&r| self.valid[r].clone()).collect();
        self.owner = Default::default();
        Ok(())
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

struct Mlp {
    /// Gate and up projections as one product (outputs side by side: gate, then up).
    gate_up: Linear,
    down: Linear,
}

struct Layer {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

/// The decoder with its weights loaded.
pub struct Decoder {
    cfg: DecoderConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Tensor,
    device: Device,
    dtype: DType,
}

/// Appends `k`, `v` (`[batch, kv_heads, t, head_dim]`) to one layer's cache buffers after the
/// first `past` positions: in place when they fit and `exclusive` (no clone shares them), else
/// into new buffers with room to grow. Returns the buffers (filled up to `past + t`).
fn append_kv(
    slot: &mut Option<(Tensor, Tensor)>,
    past: usize,
    k: &Tensor,
    v: &Tensor,
    exclusive: bool,
) -> Result<(Tensor, Tensor)> {
    let total = past + k.dim(2)?;
    match &mut *slot {
        Some((kb, vb)) if exclusive && kb.dim(2)? >= total => {
            kb.slice_set(&k.contiguous()?, 2, past)?;
            vb.slice_set(&v.contiguous()?, 2, past)?;
        }
        old => {
            let cap = old.as_ref().map_or(Ok(0), |(kb, _)| kb.dim(2))?;
            // The first pass (a prompt) gets exactly its length; growth adds half again.
            let cap = if old.is_none() {
                total
            } else {
                total.max(cap + (cap / 2).max(64))
            };
            let (b, h, _, d) = k.dims4()?;
            let grow = |new: &Tensor, old: Option<&Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, h, cap, d), new.dtype(), new.device())?;
                if let Some(o) = old.filter(|_| past > 0) {
                    buf.slice_set(&o.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
                }
                buf.slice_set(&new.contiguous()?, 2, past)?;
                Ok(buf)
            };
            let kb = grow(k, old.as_ref().map(|(kb, _)| kb))?;
            let vb = grow(v, old.as_ref().map(|(_, vb)| vb))?;
            *old = Some((kb, vb));
        }
    }
    let (kb, vb) = slot.as_ref().expect("just written");
    Ok((kb.clone(), vb.clone()))
}

/// Upper bound on attention-score elements materialised at once (queries are chunked to stay
/// under it, so long prompts do not need O(T²·heads) memory).
const SCORE_BUDGET: usize = 1 << 25;

impl Decoder {
    /// Loads the weights named as in Hugging Face checkpoints, converting to `dtype`.
    pub fn load(
        cfg: DecoderConfig,
        src: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = src.get(name)?;
            if t.dims() != shape {
                return Err(Error::Weights(format!(
                    "tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                    t.dims()
                )));
            }
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        };
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = get(&format!("{name}.weight"), &[out, inp])?;
            let b = if bias {
                Some(get(&format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            Linear::new(w, b)
        };
        // Gemma's RMSNorm multiplies by (1 + w); fold the 1 in once, in f32.
        let norm = |name: &str| -> Result<Tensor> {
            let w = src.get(name)?;
            if w.dims() != [cfg.hidden_size] {
                return Err(Error::Weights(format!(
                    "tensor `{name}` has shape {:?}, expected [{}]",
                    w.dims(),
                    cfg.hidden_size
                )));
            }
            let w = w.to_dtype(DType::F32)?;
            let w = if cfg.family == Family::Gemma {
                (w + 1.0)?
            } else {
                w
            };
            Ok(w.to_dtype(dtype)?.to_device(device)?)
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let embed_w = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                attn: Attention {
                    q: lin(
                        &format!("{p}.self_attn.q_proj"),
                        cfg.num_heads * hd,
                        h,
                        cfg.qkv_bias,
                    )?,
                    k: lin(
                        &format!("{p}.self_attn.k_proj"),
                        cfg.num_kv_heads * hd,
                        h,
                        cfg.qkv_bias,
                    )?,
                    v: lin(
                        &format!("{p}.self_attn.v_proj"),
                        cfg.num_kv_heads * hd,
                        h,
                        cfg.qkv_bias,
                    )?,
                    o: lin(
                        &format!("{p}.self_attn.o_proj"),
                        h,
                        cfg.num_heads * hd,
                        cfg.o_bias,
                    )?,
                },
                post_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_up: Linear::stacked(&[
                        get(
                            &format!("{p}.mlp.gate_proj.weight"),
                            &[cfg.intermediate_size, h],
                        )?,
                        get(
                            &format!("{p}.mlp.up_proj.weight"),
                            &[cfg.intermediate_size, h],
                        )?,
                    ])?,
                    down: lin(
                        &format!("{p}.mlp.down_proj"),
                        h,
                        cfg.intermediate_size,
                        false,
                    )?,
                },
            });
        }
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_w.clone(), None)?
        } else if src.contains("lm_head.weight") {
            lin("lm_head", cfg.vocab_size, h, false)?
        } else {
            return Err(Error::Weights(
                "`lm_head.weight` is missing and config.json has tie_word_embeddings false".into(),
            ));
        };
        let inv_freq = Tensor::new(cfg.inv_freq().as_slice(), device)?;
        Ok(Decoder {
            embed: Embedding::new(embed_w, h),
            layers,
            norm: norm("model.norm.weight")?,
            lm_head,
            inv_freq,
            device: device.clone(),
            dtype,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A fresh cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers)
    }

    /// Runs `ids` (`[batch][t]`, equal lengths) on top of `cache` and returns the final-norm
    /// hidden states `[batch, t, hidden]`. `valid[b][i]` marks real tokens (false = padding: it
    /// is never attended to). Positions count the real tokens before each one, as
    /// transformers' `generate` derives them from the attention mask (left padding then gives
    /// the same positions as no padding); right padding continues the count, as a plain
    /// forward with `arange` positions would.
    pub fn forward(
        &self,
        ids: &[Vec<u32>],
        valid: &[Vec<bool>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let t = ids.first().map_or(0, Vec::len);
        self.forward_last(ids, valid, cache, t)?
            .ok_or_else(|| Error::Msg("forward called with an empty batch".into()))
    }

    /// Like [`Decoder::forward`], but returns hidden states only for the last `keep` positions
    /// (`None` when `keep` is 0). The last layer then computes keys and values for every
    /// position (the cache needs them) but queries, attention output and MLP only for the kept
    /// positions: with a prompt whose logits are not needed that skips most of a layer.
    pub fn forward_last(
        &self,
        ids: &[Vec<u32>],
        valid: &[Vec<bool>],
        cache: &mut KvCache,
        keep: usize,
    ) -> Result<Option<Tensor>> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        let keep = keep.min(t);
        if b == 0 || t == 0 {
            return Err(Error::Msg("forward called with an empty batch".into()));
        }
        if ids.iter().any(|r| r.len() != t)
            || valid.len() != b
            || valid.iter().any(|r| r.len() != t)
        {
            return Err(Error::Msg("forward: ragged ids/valid rows".into()));
        }
        if !cache.is_empty() && cache.batch() != b {
            return Err(Error::Msg(format!(
                "forward: batch of {b} rows on a cache of {} rows",
                cache.batch()
            )));
        }
        if let Some(&bad) = ids
            .iter()
            .flatten()
            .find(|&&i| i as usize >= self.cfg.vocab_size)
        {
            return Err(Error::Msg(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let past = cache.len();
        if cache.valid.is_empty() {
            cache.valid = vec![Vec::new(); b];
        }
        // Positions from the count of real tokens so far.
        let mut pos = Vec::with_capacity(b * t);
        for (row, v) in cache.valid.iter().zip(valid) {
            let mut n = row.iter().filter(|&&x| x).count() as f32;
            for &real in v {
                pos.push(n);
                if real {
                    n += 1.0;
                }
            }
        }
        for (row, v) in cache.valid.iter_mut().zip(valid) {
            row.extend_from_slice(v);
        }
        let total = past + t;

        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids_t = Tensor::from_vec(flat, (b, t), &self.device)?;
        let mut x = self.embed.forward(&ids_t)?;
        if self.cfg.family == Family::Gemma {
            // transformers multiplies by sqrt(hidden) cast to the activation dtype.
            x = (x * (self.cfg.hidden_size as f64).sqrt())?;
        }

        let pos_t = Tensor::from_vec(pos, (b, t, 1), &self.device)?;
        let freqs = pos_t.broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?;
        let cos = freqs.cos()?.to_dtype(self.dtype)?.contiguous()?;
        let sin = freqs.sin()?.to_dtype(self.dtype)?.contiguous()?;

        // Buffers a clone can see are copied (this pass writes every layer), after which they
        // are this cache's own.
        let exclusive = cache.exclusive();
        if !exclusive {
            cache.owner = Default::default();
        }
        let mask = Mask::new(&cache.valid, past, total, self.cfg.sliding_window);

        let last = self.layers.len() - 1;
        for (i, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, self.cfg.rms_norm_eps as f32)?;
            // Earlier layers feed every position to the next layer's keys and values; the last
            // one only has to produce the kept positions.
            let q_start = if i == last { t - keep } else { 0 };
            let a = self.attention(
                &layer.attn,
                &h,
                (&cos, &sin),
                &mask,
                (kv, exclusive),
                q_start,
            )?;
            let Some(a) = a else {
                return Ok(None);
            };
            if q_start > 0 {
                x = x.narrow(1, q_start, keep)?;
            }
            x = (x + a)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, self.cfg.rms_norm_eps as f32)?;
            let y = self.mlp(&layer.mlp, &h)?;
            x = (x + y)?;
        }
        Ok(Some(candle_nn::ops::rms_norm(
            &x,
            &self.norm,
            self.cfg.rms_norm_eps as f32,
        )?))
    }

    /// Projects hidden states (any leading shape, last dim = hidden) to f32 vocabulary logits.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Mask,
        (kv, exclusive): (&mut Option<(Tensor, Tensor)>, bool),
        q_start: usize,
    ) -> Result<Option<Tensor>> {
        let (b, t_all, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let k =
            a.k.forward(x)?
                .reshape((b, t_all, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
        let v =
            a.v.forward(x)?
                .reshape((b, t_all, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        // The cache's buffers, filled up to `total`, and views of the filled part.
        let (kb, vb) = append_kv(kv, mask.past, &k, &v, exclusive)?;
        let (k, v) = (kb.narrow(2, 0, mask.total)?, vb.narrow(2, 0, mask.total)?);
        let t = t_all - q_start;
        if t == 0 {
            return Ok(None);
        }
        let (xq, cq, sq) = if q_start == 0 {
            (x.clone(), cos.clone(), sin.clone())
        } else {
            (
                x.narrow(1, q_start, t)?,
                cos.narrow(1, q_start, t)?.contiguous()?,
                sin.narrow(1, q_start, t)?.contiguous()?,
            )
        };
        let q =
            a.q.forward(&xq)?
                .reshape((b, t, nh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, &cq, &sq)?;
        let tk = k.dim(2)?;
        if let Some(o) = self.attention_fused(&q, (&kb, &vb), mask, q_start)? {
            return Ok(Some(a.o.forward(&o)?));
        }
        // candle's products want the keys and values without the spare capacity between rows.
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let rep = nh / nkv;
        // Transposed view: the matmul reads the column-major layout without a copy.
        let kt = k.transpose(2, 3)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // Queries in chunks so the score matrix stays bounded for long prompts.
        let chunk = (SCORE_BUDGET / (b * nh * tk).max(1)).clamp(1, t);
        let mut outs = Vec::with_capacity(t.div_ceil(chunk));
        let mut start = 0;
        while start < t {
            let len = chunk.min(t - start);
            let qc = q.narrow(2, start, len)?;
            // Grouped-query attention without copying keys: the `rep` query heads sharing a
            // key/value head are stacked along the sequence axis.
            let qg = qc.contiguous()?.reshape((b, nkv, rep * len, hd))?;
            let s = (qg.matmul(&kt)? * scale)?.to_dtype(DType::F32)?;
            let s = s.reshape((b, nkv, rep, len, tk))?;
            let s = match mask.chunk(q_start + start, len, &self.device)? {
                Some(m) => s.broadcast_add(&m)?,
                None => s,
            };
            let p = candle_nn::ops::softmax_last_dim(&s.reshape((b, nkv, rep * len, tk))?)?
                .to_dtype(self.dtype)?;
            let o = p.matmul(&v)?.reshape((b, nh, len, hd))?;
            outs.push(o);
            start += len;
        }
        let o = if outs.len() == 1 {
            outs.pop().unwrap()
        } else {
            Tensor::cat(&outs, 2)?
        };
        let o = o.transpose(1, 2)?.contiguous()?.reshape((b, t, nh * hd))?;
        Ok(Some(a.o.forward(&o)?))
    }
}

impl Decoder {
    /// `down(act(gate(h)) · up(h))`.
    fn mlp(&self, m: &Mlp, h: &Tensor) -> Result<Tensor> {
        let y = m.gate_up.forward(h)?;
        let ff = self.cfg.intermediate_size;
        if self.cfg.activation == Activation::Silu {
            if let Some(a) = vector_math::gated_tensor(&y, ff, vector_math::Gate::Silu)? {
                return m.down.forward(&a);
            }
        }
        let g = y.narrow(D::Minus1, 0, ff)?;
        let g = match self.cfg.activation {
            Activation::Silu => g.silu()?,
            Activation::Gelu => g.gelu_erf()?,
            Activation::GeluTanh => g.gelu()?,
        };
        m.down.forward(&(g * y.narrow(D::Minus1, ff, ff)?)?)
    }

    /// [`attention_cpu::attend`] where it applies (f32 on the CPU): the attention output
    /// `[b, t, heads·head_dim]`, or `None` to compose it from candle operations instead.
    /// `kb`, `vb` are the cache buffers `[b, kv_heads, capacity, head_dim]`, filled up to
    /// `mask.total`.
    fn attention_fused(
        &self,
        q: &Tensor,
        (kb, vb): (&Tensor, &Tensor),
        mask: &Mask,
        q_start: usize,
    ) -> Result<Option<Tensor>> {
        if !self.device.is_cpu() || q.dtype() != DType::F32 {
            return Ok(None);
        }
        let (b, nh, t, hd) = q.dims4()?;
        let q = q.contiguous()?;
        let capacity = kb.dim(2)?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = kb.storage_and_layout();
        let (vs, vl) = vb.storage_and_layout();
        let (Storage::Cpu(qc), Storage::Cpu(kc), Storage::Cpu(vc)) = (&*qs, &*ks, &*vs) else {
            return Ok(None);
        };
        let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) = (
            ql.contiguous_offsets(),
            kl.contiguous_offsets(),
            vl.contiguous_offsets(),
        ) else {
            return Ok(None);
        };
        let args = attention_cpu::CpuAttention {
            q: &qc.as_slice::<f32>()?[q0..q1],
            k: &kc.as_slice::<f32>()?[k0..k1],
            v: &vc.as_slice::<f32>()?[v0..v1],
            batch: b,
            heads: nh,
            kv_heads: self.cfg.num_kv_heads,
            queries: t,
            keys: mask.total,
            head_dim: hd,
            kv_stride: capacity * hd,
            first_query: mask.past + q_start,
            window: mask.window,
            valid: (!mask.all_valid).then_some(mask.valid),
            scale: (1.0 / (hd as f64).sqrt()) as f32,
        };
        Ok(attention_cpu::attend(&args)
            .map(|o| Tensor::from_vec(o, (b, t, nh * hd), &Device::Cpu))
            .transpose()?)
    }
}

/// Additive attention mask pieces: causal, key padding and sliding window.
struct Mask<'a> {
    valid: &'a [Vec<bool>],
    past: usize,
    total: usize,
    window: Option<usize>,
    all_valid: bool,
}

impl<'a> Mask<'a> {
    fn new(valid: &'a [Vec<bool>], past: usize, total: usize, window: Option<usize>) -> Self {
        let all_valid = valid.iter().all(|r| r.iter().all(|&x| x));
        Mask {
            valid,
            past,
            total,
            window,
            all_valid,
        }
    }

    /// Mask for query rows `start..start+len` of this pass, shaped `[b|1, 1, 1, len, total]`,
    /// or `None` when nothing needs masking.
    fn chunk(&self, start: usize, len: usize, device: &Device) -> Result<Option<Tensor>> {
        let last_query = self.past + start + len - 1;
        let window_bites = self.window.is_some_and(|w| last_query >= w);
        // A single newest query with every key real sees everything: no mask.
        if self.all_valid && !window_bites && start + len == self.total - self.past && len == 1 {
            return Ok(None);
        }
        let rows = if self.all_valid { 1 } else { self.valid.len() };
        let mut m = vec![0f32; rows * len * self.total];
        for r in 0..rows {
            for qi in 0..len {
                let abs = self.past + start + qi;
                let base = (r * len + qi) * self.total;
                for j in 0..self.total {
                    let visible = j <= abs
                        && self.window.is_none_or(|w| abs - j < w)
                        && (self.all_valid || self.valid[r][j]);
                    if !visible {
                        m[base + j] = f32::MIN;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(
            m,
            (rows, 1, 1, len, self.total),
            device,
        )?))
    }
}
