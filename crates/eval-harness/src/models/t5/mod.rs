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
//!
//! The starter kit's rules (docs/starter-kit-semantics.md, "Encoder-decoder models"): choices
//! are scored on every token given the encoder output (labels = the choice's ids with EOS,
//! decoder inputs = labels shifted right behind the start token); generation starts from the
//! decoder start token and, without `max_gen_len`, runs as long as the model's generation
//! config says (`max_new_tokens`, or `max_length` 20 counting the start token).

mod blocks;
mod config;

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::VarBuilder;

pub use config::{T5Activation, T5Config, T5_MODEL_TYPES};

use crate::error::{Error, Result};
use crate::hf::tokenizer::{Tokenizer, TokenizerKind};
use crate::hf::GenerationConfig;
use crate::lm::{GenerationDefaults, GreedyState, LanguageModel, ModelKind};
use blocks::Stack;

use super::attention::{padding_mask, weigh_values, MASKED};
use super::batch_shape;
use super::linear::Lin;
use super::vector_math::picked_log_probs;
use super::weights::Weight;

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
    /// Rows of the encoder output the cross attention reads (1 when shared).
    fn encoder_rows(&self) -> usize {
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

/// A T5 model with its weights, tokenizer and generation settings loaded.
pub struct T5 {
    cfg: T5Config,
    tok: Tokenizer,
    generation: GenerationDefaults,
    decoder_start: u32,
    shared: Weight,
    encoder: Stack,
    decoder: Stack,
    lm_head: Lin,
    device: Device,
    dtype: DType,
}

impl T5 {
    /// The model in `dir` (`config.json`, tokenizer files, `generation_config.json`) with
    /// weights from `vb` (its dtype and device are the model's).
    pub fn load(dir: &Path, vb: VarBuilder) -> Result<Self> {
        let cfg: T5Config = crate::hf::config(dir)?;
        let kind = TokenizerKind::EncoderDecoder {
            eos: cfg.eos_token_id,
            pad: cfg.pad_token_id,
        };
        let tok = Tokenizer::from_dir(dir, kind)?;
        let generation = GenerationConfig::from_dir(dir)?;
        Self::new(cfg, tok, &generation, vb)
    }

    /// The model for `cfg`, `tok` and `generation` with weights from `vb`.
    pub fn new(
        cfg: T5Config,
        tok: Tokenizer,
        generation: &GenerationConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        tok.check_vocab(cfg.vocab_size);
        // The three embedding names are one tied matrix; safetensors conversions that drop
        // duplicates may keep any one of them.
        let shared_name = [
            "shared.weight",
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
        ]
        .into_iter()
        .find(|n| vb.contains_tensor(n))
        .unwrap_or("shared.weight");
        let (d, dtype) = (cfg.d_model, vb.dtype());
        let shared = Weight::load(&vb, shared_name, &[cfg.vocab_size, d], dtype, false)?;
        let lm_head = Lin::head(&vb, cfg.tie_word_embeddings, shared_name, shared.tensor())?;
        Ok(T5 {
            encoder: Stack::new(&cfg, &vb.pp("encoder"), false)?,
            decoder: Stack::new(&cfg, &vb.pp("decoder"), true)?,
            generation: GenerationDefaults {
                max_new_tokens: generation.new_tokens(),
                eos_token_ids: generation
                    .eos_token_ids
                    .clone()
                    .unwrap_or_else(|| vec![cfg.eos_token_id]),
            },
            decoder_start: generation
                .decoder_start_token_id
                .unwrap_or(cfg.decoder_start_token_id),
            shared,
            lm_head,
            device: vb.device().clone(),
            dtype,
            cfg,
            tok,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    fn embed(&self, ids: &[Vec<u32>], b: usize, t: usize) -> Result<Tensor> {
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids_t = Tensor::from_vec(flat, (b, t), &self.device)?;
        Ok(
            candle_nn::Embedding::new(self.shared.tensor().clone(), self.cfg.d_model)
                .forward(&ids_t)?,
        )
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
            .tensor()
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
                    m[qi * k_len + j] = MASKED;
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

    /// softmax(q·kᵀ + bias)·v for `q [b, h, t, dk]`, `k, v [b, h, s, dk]` and an additive f32
    /// bias broadcastable to `[b, h, t, s]`; returns `[b, t, h·dk]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, h, t, dk) = q.dims4()?;
        let s = q.matmul(&k.transpose(2, 3)?)?.to_dtype(DType::F32)?;
        let s = match bias {
            Some(m) => s.broadcast_add(m)?,
            None => s,
        };
        let o = weigh_values(&s, v, self.dtype)?;
        Ok(o.transpose(1, 2)?.contiguous()?.reshape((b, t, h * dk))?)
    }

    /// Runs the encoder on right-padded rows `ids` (`valid[b][i]` false = padding, never
    /// attended to).
    pub fn encode(&self, ids: &[Vec<u32>], valid: &[Vec<bool>]) -> Result<EncoderOutput> {
        let (b, t) = batch_shape(ids, Some(valid), self.cfg.vocab_size)?;
        let mut x = self.embed(ids, b, t)?;
        let mut bias = self.position_bias(&self.encoder, 0, t, t)?;
        if let Some(m) = padding_mask(valid, &self.device)? {
            bias = bias.broadcast_add(&m)?;
        }
        for blk in &self.encoder.blocks {
            let h = self.rms_norm(&x, blk.self_norm.tensor())?;
            let a = &blk.self_attn;
            let [q, k, v] = self.split_heads::<3>(&a.qkv.forward(&h)?)?;
            x = self.clamp_f16((x + a.o.forward(&self.attend(&q, &k, &v, Some(&bias))?)?)?)?;
            let h = self.rms_norm(&x, blk.ff_norm.tensor())?;
            x = self.clamp_f16((&x + blk.ff.forward(&h)?)?)?;
        }
        Ok(EncoderOutput {
            hidden: self.rms_norm(&x, self.encoder.final_norm.tensor())?,
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
            cross_mask: padding_mask(&enc.valid, &self.device)?,
            self_kv: vec![None; self.decoder.blocks.len()],
            len: 0,
        })
    }

    /// Runs decoder inputs `ids` (`[batch][t]`, equal lengths, no padding: every row is at the
    /// same position) on top of `cache`; returns final-norm hidden states `[batch, t, d_model]`.
    pub fn decode(&self, ids: &[Vec<u32>], cache: &mut T5Cache) -> Result<Tensor> {
        let (b, t) = batch_shape(ids, None, self.cfg.vocab_size)?;
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
            let h = self.rms_norm(&x, blk.self_norm.tensor())?;
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
            let h = self.rms_norm(&x, norm.tensor())?;
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

            let h = self.rms_norm(&x, blk.ff_norm.tensor())?;
            x = self.clamp_f16((&x + blk.ff.forward(&h)?)?)?;
        }
        cache.len = total;
        self.rms_norm(&x, self.decoder.final_norm.tensor())
    }

    /// Projects decoder hidden states (any leading shape) to f32 vocabulary logits, with the
    /// `d_model^-0.5` rescale of tied-head (original) T5 (see
    /// [`T5Config::scale_decoder_outputs`]).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = if self.cfg.scale_decoder_outputs {
            (hidden * (self.cfg.d_model as f64).powf(-0.5))?
        } else {
            hidden.clone()
        };
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }
}

impl LanguageModel for T5 {
    fn kind(&self) -> ModelKind {
        ModelKind::EncoderDecoder
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    fn generation(&self) -> &GenerationDefaults {
        &self.generation
    }

    /// The encoder runs once; every continuation's decoder inputs (the continuation shifted
    /// right behind the start token, shorter ones padded with 0) run in one decoder pass.
    fn continuation_log_probs(
        &self,
        prompt: &[u32],
        continuations: &[Vec<u32>],
        first_scored: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let enc = self.encode(&[prompt.to_vec()], &[vec![true; prompt.len()]])?;
        let width = continuations.iter().map(Vec::len).max().unwrap_or(0);
        if width == 0 {
            return Ok(vec![Vec::new(); continuations.len()]);
        }
        // Labels padded with 0; decoder inputs = labels shifted right behind the start token.
        let labels: Vec<Vec<u32>> = continuations
            .iter()
            .map(|c| (0..width).map(|j| c.get(j).copied().unwrap_or(0)).collect())
            .collect();
        let inputs: Vec<Vec<u32>> = labels
            .iter()
            .map(|l| {
                std::iter::once(self.decoder_start)
                    .chain(l[..width - 1].iter().copied())
                    .collect()
            })
            .collect();
        let mut cache = self.new_cache(&enc)?;
        let h = self.decode(&inputs, &mut cache)?;
        let targets: Vec<u32> = labels.into_iter().flatten().collect();
        let picked = picked_log_probs(&self.logits(&h)?, &targets)?;
        Ok(continuations
            .iter()
            .zip(picked.chunks(width))
            .map(|(c, row)| row[first_scored.min(c.len())..c.len()].to_vec())
            .collect())
    }

    /// The prompts run right-padded through one encoder pass; decoding starts from the
    /// decoder start token.
    fn start_greedy<'a>(
        &'a self,
        prompts: &[Vec<u32>],
    ) -> Result<(Box<dyn GreedyState + 'a>, Tensor)> {
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if width == 0 {
            return Err(Error::Msg("an input tokenizes to no tokens".into()));
        }
        let pad = self.tok.pad_id();
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                p.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, width - p.len()))
                    .collect()
            })
            .collect();
        let valid: Vec<Vec<bool>> = prompts
            .iter()
            .map(|p| (0..width).map(|j| j < p.len()).collect())
            .collect();
        let enc = self.encode(&rows, &valid)?;
        let mut state = Decoding {
            model: self,
            cache: self.new_cache(&enc)?,
        };
        let logits = state.step(&vec![self.decoder_start; prompts.len()])?;
        Ok((Box::new(state), logits))
    }

    fn layer_form_weights(&self) -> Vec<String> {
        // A tied head's weight is also the embedding, which is kept as stored.
        let head = self.lm_head.layer_form_names();
        let head = head.into_iter().filter(|n| n != self.shared.name());
        let stacks = self.encoder.lins().chain(self.decoder.lins());
        stacks.flat_map(Lin::layer_form_names).chain(head).collect()
    }

    fn set_weight(&mut self, name: &str, tensor: &Tensor) -> Result<bool> {
        // A tied head follows the embedding it was loaded from.
        let embedding = self.shared.set(name, tensor)?;
        Ok(self.lm_head.set(name, tensor)?
            || embedding
            || self.encoder.set(name, tensor)?
            || self.decoder.set(name, tensor)?)
    }
}

/// A batch of greedy generations over one encoder output.
struct Decoding<'a> {
    model: &'a T5,
    cache: T5Cache,
}

impl GreedyState for Decoding<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let ids: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
        let h = self.model.decode(&ids, &mut self.cache)?;
        self.model.logits(&h.i((.., 0))?)
    }

    fn retain(&mut self, rows: &[usize]) -> Result<()> {
        self.cache.select(rows)
    }
}
