//! T5 / Flan-T5 (encoder-decoder) on candle, from `config.json`, with the Hugging Face weight
//! names. Covers T5 v1.1 / Flan-T5 (`feed_forward_proj = "gated-gelu"`: gated tanh-GELU MLP,
//! untied head) and the original T5 (`relu`, head tied to the shared embedding with the
//! `d_model^-0.5` rescale), and mT5 (same layout).
//!
//! The encoder runs once per batch of inputs and returns hidden states plus the key-padding
//! mask. The decoder runs on top of a [`T5Cache`] that holds the cross-attention keys and
//! values (computed once from the encoder output) and the self-attention KV cache, so
//! multiple-choice scoring can share one encoder pass across all choices and generation
//! advances one token per step. Hidden states come back for every position; [`T5::logits`]
//! projects whichever positions the caller needs.
//!
//! Attention follows transformers' `T5Attention`: no 1/√d scaling (T5 folds it into the
//! initialisation), a learned relative position bias computed by the first block of each
//! stack and shared by all blocks (bidirectional buckets in the encoder, causal in the
//! decoder), none in cross attention, softmax in f32.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Embedding;

use super::linear::Lin;
use super::vector_math;

use crate::error::{Error, Result};
use crate::weights::WeightSource;

/// The feed-forward activation (`feed_forward_proj`'s last part).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5Activation {
    /// ReLU (original T5).
    Relu,
    /// tanh-approximated GELU (`gated-gelu` maps to transformers' `gelu_new`).
    GeluNew,
    /// Exact (erf) GELU (a non-gated `gelu`).
    Gelu,
    /// SiLU (`gated-silu`).
    Silu,
}

/// Everything the model needs from `config.json`.
#[derive(Debug, Clone)]
pub struct T5Config {
    /// Vocabulary rows of the shared embedding and the head.
    pub vocab_size: usize,
    /// Model width.
    pub d_model: usize,
    /// Per-head width.
    pub d_kv: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Encoder blocks.
    pub num_layers: usize,
    /// Decoder blocks.
    pub num_decoder_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Relative position buckets.
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which all positions share the last bucket.
    pub relative_attention_max_distance: usize,
    /// RMS norm epsilon.
    pub layer_norm_epsilon: f64,
    /// Two input projections multiplied (`gated-*`) instead of one.
    pub gated: bool,
    /// Feed-forward activation.
    pub activation: T5Activation,
    /// Head shares the embedding (and the decoder output is scaled by `d_model^-0.5`).
    pub tie_word_embeddings: bool,
    /// First decoder input (T5: the pad token, 0).
    pub decoder_start_token_id: u32,
    /// End of sequence (T5: `</s>`, 1).
    pub eos_token_id: u32,
    /// Padding id (T5: 0).
    pub pad_token_id: u32,
}

/// The `model_type` values this implementation covers.
pub const T5_MODEL_TYPES: [&str; 2] = ["t5", "mt5"];

impl T5Config {
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

    /// Interprets a parsed `config.json` with transformers' `T5Config` defaults.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let model_type = v
            .get("model_type")
            .and_then(|x| x.as_str())
            .ok_or("no `model_type`")?;
        if !T5_MODEL_TYPES.contains(&model_type) {
            return Err(format!(
                "model_type `{model_type}` is not an encoder-decoder this kit supports (t5, mt5)"
            ));
        }
        let usize_or = |k: &str, d: usize| -> std::result::Result<usize, String> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(d),
                Some(x) => x
                    .as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| format!("`{k}` is not a non-negative integer")),
            }
        };
        let u32_or = |k: &str, d: u32| -> std::result::Result<u32, String> {
            usize_or(k, d as usize).map(|x| x as u32)
        };
        let proj = v
            .get("feed_forward_proj")
            .and_then(|x| x.as_str())
            .unwrap_or("relu");
        // transformers: act = last '-' part, gated when the first part is "gated"; the
        // special case "gated-gelu" means the tanh approximation (gelu_new).
        let parts: Vec<&str> = proj.split('-').collect();
        let gated = parts.len() > 1 && parts[0] == "gated";
        if parts.len() > 2 || (parts.len() == 2 && !gated) {
            return Err(format!(
                "feed_forward_proj `{proj}` is not `<act>` or `gated-<act>`"
            ));
        }
        let activation = match (proj, parts[parts.len() - 1]) {
            ("gated-gelu", _) => T5Activation::GeluNew,
            (_, "relu") => T5Activation::Relu,
            (_, "gelu") => T5Activation::Gelu,
            (_, "gelu_new") => T5Activation::GeluNew,
            (_, "silu") | (_, "swish") => T5Activation::Silu,
            (_, other) => {
                return Err(format!(
                    "feed-forward activation `{other}` is not supported"
                ))
            }
        };
        let num_layers = usize_or("num_layers", 6)?;
        let d_model = usize_or("d_model", 512)?;
        let num_heads = usize_or("num_heads", 8)?;
        let cfg = T5Config {
            vocab_size: usize_or("vocab_size", 32128)?,
            d_model,
            d_kv: usize_or("d_kv", 64)?,
            d_ff: usize_or("d_ff", 2048)?,
            num_layers,
            num_decoder_layers: usize_or("num_decoder_layers", num_layers)?,
            num_heads,
            relative_attention_num_buckets: usize_or("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: usize_or("relative_attention_max_distance", 128)?,
            layer_norm_epsilon: v
                .get("layer_norm_epsilon")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6),
            gated,
            activation,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(true),
            decoder_start_token_id: u32_or("decoder_start_token_id", 0)?,
            eos_token_id: u32_or("eos_token_id", 1)?,
            pad_token_id: u32_or("pad_token_id", 0)?,
        };
        if cfg.num_layers == 0 || cfg.num_decoder_layers == 0 || cfg.num_heads == 0 {
            return Err("num_layers, num_decoder_layers and num_heads must be positive".into());
        }
        if cfg.relative_attention_num_buckets < 4 {
            return Err("relative_attention_num_buckets must be at least 4".into());
        }
        Ok(cfg)
    }
}

/// transformers' `T5Attention._relative_position_bucket` for one relative position
/// (`key - query`). The logarithmic part is computed in f32 in the same order of operations
/// as torch does on float32 tensors, so bucket boundaries agree.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut buckets = 0usize;
    let mut num_buckets = num_buckets;
    let rp = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            buckets += num_buckets;
        }
        relative_position.unsigned_abs() as usize
    } else {
        (-relative_position.min(0)) as usize
    };
    let max_exact = num_buckets / 2;
    if rp < max_exact {
        return buckets + rp;
    }
    let ratio = (rp as f32) / (max_exact as f32);
    // Python computes math.log(max_distance / max_exact) in f64; torch casts it to f32.
    let denom = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let scaled = ratio.ln() / denom * ((num_buckets - max_exact) as f32);
    let large = (max_exact + scaled as usize).min(num_buckets - 1);
    buckets + large
}

/// Self attention: queries, keys and values in one product (`[q | k | v]` outputs).
struct SelfAttention {
    qkv: Lin,
    o: Lin,
}

/// Cross attention: queries from the decoder, keys and values (`[k | v]`) from the encoder.
struct CrossAttention {
    q: Lin,
    kv: Lin,
    o: Lin,
}

enum FeedForward {
    Plain {
        wi: Lin,
        wo: Lin,
    },
    /// `wi` holds `[wi_0 | wi_1]`: the activated half and the linear half in one product.
    Gated {
        wi: Lin,
        wo: Lin,
    },
}

struct Block {
    self_norm: Tensor,
    self_attn: SelfAttention,
    /// Decoder blocks only.
    cross: Option<(Tensor, CrossAttention)>,
    ff_norm: Tensor,
    ff: FeedForward,
}

struct Stack {
    blocks: Vec<Block>,
    final_norm: Tensor,
    /// `[num_buckets, num_heads]`, f32.
    rel_bias: Tensor,
    bidirectional: bool,
}

/// The encoder's result for a batch of inputs.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// Final-norm hidden states `[batch, len, d_model]`.
    pub hidden: Tensor,
    /// Per row: which positions are real tokens (false = padding).
    pub valid: Vec<Vec<bool>>,
}

/// Decoder state: cross-attention keys/values per block and the self-attention KV cache.
#[derive(Debug, Clone)]
pub struct T5Cache {
    /// Per block: cross-attention keys and values `[rows, heads, enc_len, d_kv]`; `rows` is
    /// either the decoder batch or 1 (one encoder output shared by every decoder row).
    cross: Vec<(Tensor, Tensor)>,
    /// Additive encoder key-padding mask `[rows, 1, 1, enc_len]` (f32), `None` when no
    /// encoder position is padding.
    cross_mask: Option<Tensor>,
    /// Per block: self-attention keys and values `[batch, heads, len, d_kv]`.
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    /// Decoder positions seen so far.
    len: usize,
}

impl T5Cache {
    /// Decoder positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first decoder step.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows of the encoder output the cross attention reads (1 when shared).
    pub fn encoder_rows(&self) -> usize {
        self.cross.first().map_or(0, |(k, _)| k.dim(0).unwrap_or(0))
    }

    /// Keeps only the given decoder rows (finished sequences leave a generation batch).
    pub fn select(&mut self, rows: &[usize]) -> Result<()> {
        let Some((k0, _)) = self.cross.first() else {
            return Ok(());
        };
        let idx = Tensor::new(
            rows.iter()
                .map(|&r| r as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            k0.device(),
        )?;
        if k0.dim(0)? > 1 {
            for (k, v) in self.cross.iter_mut() {
                *k = k.index_select(&idx, 0)?;
                *v = v.index_select(&idx, 0)?;
            }
            if let Some(m) = &mut self.cross_mask {
                *m = m.index_select(&idx, 0)?;
            }
        }
        for (k, v) in self.self_kv.iter_mut().flatten() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        Ok(())
    }
}

/// A T5 model with its weights loaded.
pub struct T5 {
    cfg: T5Config,
    shared: Embedding,
    encoder: Stack,
    decoder: Stack,
    lm_head: Lin,
    device: Device,
    dtype: DType,
}

/// Mask value for excluded keys (transformers uses the dtype's minimum; we add in f32).
const NEG: f32 = f32::MIN;

impl T5 {
    /// Loads the weights named as in Hugging Face T5 checkpoints, converting to `dtype`.
    pub fn load(
        cfg: T5Config,
        src: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let get = |name: &str, shape: &[usize], dt: DType| -> Result<Tensor> {
            let t = src.get(name)?;
            if t.dims() != shape {
                return Err(Error::Weights(format!(
                    "tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                    t.dims()
                )));
            }
            Ok(t.to_dtype(dt)?.to_device(device)?)
        };
        let lin = |name: &str, out: usize, inp: usize| -> Result<Lin> {
            Lin::new(get(&format!("{name}.weight"), &[out, inp], dtype)?, None)
        };
        let (d, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
        let weight = |name: &str, out: usize, inp: usize| -> Result<Tensor> {
            get(&format!("{name}.weight"), &[out, inp], dtype)
        };
        let self_attn = |p: &str| -> Result<SelfAttention> {
            Ok(SelfAttention {
                qkv: Lin::stacked(&[
                    weight(&format!("{p}.q"), inner, d)?,
                    weight(&format!("{p}.k"), inner, d)?,
                    weight(&format!("{p}.v"), inner, d)?,
                ])?,
                o: lin(&format!("{p}.o"), d, inner)?,
            })
        };
        let cross_attn = |p: &str| -> Result<CrossAttention> {
            Ok(CrossAttention {
                q: lin(&format!("{p}.q"), inner, d)?,
                kv: Lin::stacked(&[
                    weight(&format!("{p}.k"), inner, d)?,
                    weight(&format!("{p}.v"), inner, d)?,
                ])?,
                o: lin(&format!("{p}.o"), d, inner)?,
            })
        };
        let feed_forward = |p: &str| -> Result<FeedForward> {
            Ok(if cfg.gated {
                FeedForward::Gated {
                    wi: Lin::stacked(&[
                        weight(&format!("{p}.wi_0"), ff, d)?,
                        weight(&format!("{p}.wi_1"), ff, d)?,
                    ])?,
                    wo: lin(&format!("{p}.wo"), d, ff)?,
                }
            } else {
                FeedForward::Plain {
                    wi: lin(&format!("{p}.wi"), ff, d)?,
                    wo: lin(&format!("{p}.wo"), d, ff)?,
                }
            })
        };
        let stack = |prefix: &str, n: usize, decoder: bool| -> Result<Stack> {
            let mut blocks = Vec::with_capacity(n);
            for i in 0..n {
                let p = format!("{prefix}.block.{i}.layer");
                let ff_layer = if decoder { 2 } else { 1 };
                blocks.push(Block {
                    self_norm: get(&format!("{p}.0.layer_norm.weight"), &[d], dtype)?,
                    self_attn: self_attn(&format!("{p}.0.SelfAttention"))?,
                    cross: if decoder {
                        Some((
                            get(&format!("{p}.1.layer_norm.weight"), &[d], dtype)?,
                            cross_attn(&format!("{p}.1.EncDecAttention"))?,
                        ))
                    } else {
                        None
                    },
                    ff_norm: get(&format!("{p}.{ff_layer}.layer_norm.weight"), &[d], dtype)?,
                    ff: feed_forward(&format!("{p}.{ff_layer}.DenseReluDense"))?,
                });
            }
            Ok(Stack {
                blocks,
                final_norm: get(&format!("{prefix}.final_layer_norm.weight"), &[d], dtype)?,
                // The bias is tiny and added to f32 scores: keep it in f32.
                rel_bias: get(
                    &format!(
                        "{prefix}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
                    ),
                    &[cfg.relative_attention_num_buckets, cfg.num_heads],
                    DType::F32,
                )?,
                bidirectional: !decoder,
            })
        };
        // The three embedding names are one tied matrix; safetensors conversions that drop
        // duplicates may keep any one of them.
        let shared_name = [
            "shared.weight",
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
        ]
        .into_iter()
        .find(|n| src.contains(n))
        .unwrap_or("shared.weight");
        let shared_w = get(shared_name, &[cfg.vocab_size, d], dtype)?;
        let lm_head = if cfg.tie_word_embeddings {
            Lin::new(shared_w.clone(), None)?
        } else if src.contains("lm_head.weight") {
            lin("lm_head", cfg.vocab_size, d)?
        } else {
            return Err(Error::Weights(
                "`lm_head.weight` is missing and config.json has tie_word_embeddings false".into(),
            ));
        };
        Ok(T5 {
            encoder: stack("encoder", cfg.num_layers, false)?,
            decoder: stack("decoder", cfg.num_decoder_layers, true)?,
            shared: Embedding::new(shared_w, d),
            lm_head,
            device: device.clone(),
            dtype,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &T5Config {
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

    fn check_ids(&self, ids: &[Vec<u32>]) -> Result<(usize, usize)> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        if b == 0 || t == 0 {
            return Err(Error::Msg("T5 called with an empty batch".into()));
        }
        if ids.iter().any(|r| r.len() != t) {
            return Err(Error::Msg("T5: ragged id rows".into()));
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
        Ok((b, t))
    }

    fn embed(&self, ids: &[Vec<u32>], b: usize, t: usize) -> Result<Tensor> {
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids_t = Tensor::from_vec(flat, (b, t), &self.device)?;
        Ok(self.shared.forward(&ids_t)?)
    }

    /// Relative position bias `[1, heads, q_len, k_len]` (f32) for queries at positions
    /// `q_start..q_start+q_len` and keys `0..k_len`; in the decoder it includes the causal
    /// mask.
    fn position_bias(
        &self,
        stack: &Stack,
        q_start: usize,
        q_len: usize,
        k_len: usize,
    ) -> Result<Tensor> {
        let mut idx = Vec::with_capacity(q_len * k_len);
        for i in q_start..q_start + q_len {
            for j in 0..k_len {
                idx.push(relative_position_bucket(
                    j as i64 - i as i64,
                    stack.bidirectional,
                    self.cfg.relative_attention_num_buckets,
                    self.cfg.relative_attention_max_distance,
                ) as u32);
            }
        }
        let idx = Tensor::from_vec(idx, q_len * k_len, &self.device)?;
        let bias = stack
            .rel_bias
            .index_select(&idx, 0)?
            .reshape((q_len, k_len, self.cfg.num_heads))?
            .permute((2, 0, 1))?
            .contiguous()?;
        let bias = if stack.bidirectional {
            bias
        } else {
            let mut m = vec![0f32; q_len * k_len];
            for (qi, i) in (q_start..q_start + q_len).enumerate() {
                for j in i + 1..k_len {
                    m[qi * k_len + j] = NEG;
                }
            }
            bias.broadcast_add(&Tensor::from_vec(m, (1, q_len, k_len), &self.device)?)?
        };
        Ok(bias.unsqueeze(0)?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            x,
            w,
            self.cfg.layer_norm_epsilon as f32,
        )?)
    }

    /// transformers clamps T5's residual stream in float16 (where it overflows); it uses
    /// ±(max − 1000) once any value is infinite and ±max otherwise, which only differ for
    /// values within 1000 of the limit, so we clamp to ±(max − 1000) unconditionally.
    fn clamp_f16(&self, x: Tensor) -> Result<Tensor> {
        if self.dtype != DType::F16 {
            return Ok(x);
        }
        // 65504 is the largest finite float16.
        let limit = 65504.0 - 1000.0;
        Ok(x.clamp(-limit, limit)?)
    }

    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        Ok(x.reshape((b, t, self.cfg.num_heads, self.cfg.d_kv))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// softmax(q·kᵀ + bias)·v for `q [b, h, t, dk]`, `k, v [b, h, s, dk]` and an additive f32
    /// bias broadcastable to `[b, h, t, s]`; returns `[b, t, h·dk]`.
    /// `[b, t, N·h·dk]` (N projections side by side) as N contiguous `[b, h, t, dk]` tensors,
    /// with one copy.
    fn split_heads<const N: usize>(&self, x: &Tensor) -> Result<[Tensor; N]> {
        let (b, t, _) = x.dims3()?;
        let all = x
            .reshape((b, t, N, self.cfg.num_heads, self.cfg.d_kv))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let mut out = Vec::with_capacity(N);
        for i in 0..N {
            out.push(all.get(i)?);
        }
        out.try_into()
            .map_err(|_| Error::Msg("split_heads: wrong number of parts".into()))
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, h, t, dk) = q.dims4()?;
        let s = q.matmul(&k.transpose(2, 3)?)?.to_dtype(DType::F32)?;
        let s = match bias {
            Some(m) => s.broadcast_add(m)?,
            None => s,
        };
        let p = softmax_last_dim(&s)?.to_dtype(self.dtype)?;
        let o = p.matmul(v)?;
        Ok(o.transpose(1, 2)?.contiguous()?.reshape((b, t, h * dk))?)
    }

    fn feed_forward(&self, ff: &FeedForward, x: &Tensor) -> Result<Tensor> {
        let act = |x: Tensor| -> Result<Tensor> {
            Ok(match self.cfg.activation {
                T5Activation::Relu => x.relu()?,
                T5Activation::GeluNew => x.gelu()?,
                T5Activation::Gelu => x.gelu_erf()?,
                T5Activation::Silu => x.silu()?,
            })
        };
        Ok(match ff {
            FeedForward::Plain { wi, wo } => wo.forward(&act(wi.forward(x)?)?)?,
            FeedForward::Gated { wi, wo } => {
                let y = wi.forward(x)?;
                let ff = self.cfg.d_ff;
                if self.cfg.activation == T5Activation::GeluNew {
                    if let Some(h) = vector_math::gated_tensor(&y, ff, vector_math::Gate::GeluTanh)?
                    {
                        return wo.forward(&h);
                    }
                }
                let gate = act(y.narrow(D::Minus1, 0, ff)?)?;
                wo.forward(&(gate * y.narrow(D::Minus1, ff, ff)?)?)?
            }
        })
    }

    /// Runs the encoder on right-padded rows `ids` (`valid[b][i]` false = padding, never
    /// attended to).
    pub fn encode(&self, ids: &[Vec<u32>], valid: &[Vec<bool>]) -> Result<EncoderOutput> {
        let (b, t) = self.check_ids(ids)?;
        if valid.len() != b || valid.iter().any(|r| r.len() != t) {
            return Err(Error::Msg(
                "T5 encode: ids and valid rows differ in shape".into(),
            ));
        }
        let mut x = self.embed(ids, b, t)?;
        let mut bias = self.position_bias(&self.encoder, 0, t, t)?;
        if let Some(m) = key_mask(valid, &self.device)? {
            bias = bias.broadcast_add(&m)?;
        }
        for blk in &self.encoder.blocks {
            let h = self.rms_norm(&x, &blk.self_norm)?;
            let a = &blk.self_attn;
            let [q, k, v] = self.split_heads::<3>(&a.qkv.forward(&h)?)?;
            x = self.clamp_f16((x + a.o.forward(&self.attend(&q, &k, &v, Some(&bias))?)?)?)?;
            let h = self.rms_norm(&x, &blk.ff_norm)?;
            x = self.clamp_f16((&x + self.feed_forward(&blk.ff, &h)?)?)?;
        }
        Ok(EncoderOutput {
            hidden: self.rms_norm(&x, &self.encoder.final_norm)?,
            valid: valid.to_vec(),
        })
    }

    /// A decoder cache over `enc`: the cross-attention keys and values of every decoder block.
    /// An encoder output of one row may serve any number of decoder rows (the choices of one
    /// example); otherwise decoder rows correspond to encoder rows.
    pub fn new_cache(&self, enc: &EncoderOutput) -> Result<T5Cache> {
        let cross = self
            .decoder
            .blocks
            .iter()
            .map(|blk| -> Result<_> {
                let (_, a) = blk
                    .cross
                    .as_ref()
                    .expect("decoder blocks have cross attention");
                let [k, v] = self.split_heads::<2>(&a.kv.forward(&enc.hidden)?)?;
                Ok((k, v))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(T5Cache {
            cross,
            cross_mask: key_mask(&enc.valid, &self.device)?,
            self_kv: vec![None; self.decoder.blocks.len()],
            len: 0,
        })
    }

    /// Runs decoder inputs `ids` (`[batch][t]`, equal lengths, no padding: every row is at the
    /// same position) on top of `cache`; returns final-norm hidden states `[batch, t, d_model]`.
    pub fn decode(&self, ids: &[Vec<u32>], cache: &mut T5Cache) -> Result<Tensor> {
        let (b, t) = self.check_ids(ids)?;
        let enc_rows = cache.encoder_rows();
        if enc_rows != 1 && enc_rows != b {
            return Err(Error::Msg(format!(
                "T5 decode: {b} decoder rows over an encoder output of {enc_rows} rows"
            )));
        }
        if let Some((k, _)) = cache.self_kv.iter().flatten().next() {
            if k.dim(0)? != b {
                return Err(Error::Msg(format!(
                    "T5 decode: batch of {b} rows on a cache of {} rows",
                    k.dim(0)?
                )));
            }
        }
        let past = cache.len;
        let total = past + t;
        let mut x = self.embed(ids, b, t)?;
        let bias = self.position_bias(&self.decoder, past, t, total)?;
        let (h_n, dk) = (self.cfg.num_heads, self.cfg.d_kv);
        for (i, blk) in self.decoder.blocks.iter().enumerate() {
            let h = self.rms_norm(&x, &blk.self_norm)?;
            let a = &blk.self_attn;
            let [q, k, v] = self.split_heads::<3>(&a.qkv.forward(&h)?)?;
            let (k, v) = match cache.self_kv[i].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            let o = self.attend(&q, &k, &v, Some(&bias))?;
            cache.self_kv[i] = Some((k, v));
            x = self.clamp_f16((x + a.o.forward(&o)?)?)?;

            let (norm, ca) = blk
                .cross
                .as_ref()
                .expect("decoder blocks have cross attention");
            let h = self.rms_norm(&x, norm)?;
            let q = self.heads(&ca.q.forward(&h)?)?;
            let (ck, cv) = &cache.cross[i];
            let o = if enc_rows == 1 && b > 1 {
                // One encoder output shared by every row: fold the rows into the query axis
                // ([1, h, b·t, dk]) instead of copying keys and values b times.
                let qf = q
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((1, h_n, b * t, dk))?;
                // Query index bi·t + ti, so [1, b·t, h·dk] is already [b, t, h·dk] in memory.
                self.attend(&qf, ck, cv, cache.cross_mask.as_ref())?
                    .reshape((b, t, h_n * dk))?
            } else {
                self.attend(&q, ck, cv, cache.cross_mask.as_ref())?
            };
            x = self.clamp_f16((x + ca.o.forward(&o)?)?)?;

            let h = self.rms_norm(&x, &blk.ff_norm)?;
            x = self.clamp_f16((&x + self.feed_forward(&blk.ff, &h)?)?)?;
        }
        cache.len = total;
        self.rms_norm(&x, &self.decoder.final_norm)
    }

    /// Projects decoder hidden states (any leading shape) to f32 vocabulary logits, with the
    /// `d_model^-0.5` rescale of tied-head (original) T5.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = if self.cfg.tie_word_embeddings {
            (hidden * (self.cfg.d_model as f64).powf(-0.5))?
        } else {
            hidden.clone()
        };
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// Log-softmax over the vocabulary of [`T5::logits`].
    pub fn log_probs(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(
            &self.logits(hidden)?,
            D::Minus1,
        )?)
    }
}

/// Additive key-padding mask `[rows, 1, 1, len]` (f32), or `None` when nothing is padding.
fn key_mask(valid: &[Vec<bool>], device: &Device) -> Result<Option<Tensor>> {
    if valid.iter().all(|r| r.iter().all(|&x| x)) {
        return Ok(None);
    }
    let len = valid.first().map_or(0, Vec::len);
    let m: Vec<f32> = valid
        .iter()
        .flat_map(|r| r.iter().map(|&x| if x { 0.0 } else { NEG }))
        .collect();
    Ok(Some(Tensor::from_vec(m, (valid.len(), 1, 1, len), device)?))
}

/// Softmax over the last dimension: [`vector_math::softmax_rows`] on the CPU in f32, else
/// candle's.
fn softmax_last_dim(s: &Tensor) -> Result<Tensor> {
    if s.device().is_cpu() && s.dtype() == DType::F32 {
        let cols = s.dim(D::Minus1)?;
        let mut v: Vec<f32> = s.flatten_all()?.to_vec1()?;
        if vector_math::softmax_rows(&mut v, cols) {
            return Ok(Tensor::from_vec(v, s.shape(), s.device())?);
        }
    }
    Ok(candle_nn::ops::softmax_last_dim(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_the_t5_rule() {
        // Bidirectional, 32 buckets, max distance 128: 16 per direction, 8 exact.
        let b = |rp| relative_position_bucket(rp, true, 32, 128);
        assert_eq!(b(0), 0);
        assert_eq!(b(-7), 7);
        assert_eq!(b(7), 16 + 7);
        assert_eq!(b(-8), 8);
        assert_eq!(b(-1000), 15);
        assert_eq!(b(1000), 31);
        // Causal: future keys are bucket 0, past distances use all 32 buckets.
        let c = |rp| relative_position_bucket(rp, false, 32, 128);
        assert_eq!(c(5), 0);
        assert_eq!(c(-15), 15);
        assert_eq!(c(-16), 16);
        assert_eq!(c(-10_000), 31);
    }

    #[test]
    fn config_defaults_and_variants() {
        let v1 = T5Config::from_json(&serde_json::json!({
            "model_type": "t5", "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false
        }))
        .unwrap();
        assert!(v1.gated && !v1.tie_word_embeddings);
        assert_eq!(v1.activation, T5Activation::GeluNew);
        let orig = T5Config::from_json(&serde_json::json!({"model_type": "t5"})).unwrap();
        assert!(!orig.gated && orig.tie_word_embeddings);
        assert_eq!(orig.activation, T5Activation::Relu);
        assert_eq!(orig.num_decoder_layers, orig.num_layers);
        let e = T5Config::from_json(&serde_json::json!({"model_type": "llama"})).unwrap_err();
        assert!(e.contains("llama"), "{e}");
        let e = T5Config::from_json(&serde_json::json!({
            "model_type": "t5", "feed_forward_proj": "gated-tanhish"
        }))
        .unwrap_err();
        assert!(e.contains("tanhish"), "{e}");
    }
}
