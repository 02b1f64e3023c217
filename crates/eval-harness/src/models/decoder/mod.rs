//! One config-driven decoder-only transformer covering Llama 2/3 (incl. `llama3` rope scaling),
//! TinyLlama, Mistral (sliding window), Qwen2 (q/k/v bias) and Gemma ((1+w) RMSNorm, scaled
//! embeddings, GeGLU, tied head), with the Hugging Face weight names; shaped like
//! candle-transformers' `mistral.rs`.
//!
//! Unlike candle-transformers' models it returns hidden states for every position (the caller
//! projects only the positions it needs onto the vocabulary), takes per-row key padding, and
//! keeps a KV cache that can be computed once for a prompt and then repeated for a batch of
//! continuations. Rotary angles are computed from positions on the fly, so sequences may run
//! past `max_position_embeddings`.

mod blocks;
mod cache;
mod config;
mod layerwise;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::VarBuilder;

pub use cache::KvCache;
pub use config::{Activation, DecoderConfig, Family, RopeScaling};
pub use layerwise::BlockBatch;

use crate::error::{Error, Result};
use crate::hf::tokenizer::{Tokenizer, TokenizerKind};
use crate::lm::{GenerationDefaults, GreedyState, LanguageModel, ModelKind};
use blocks::Block;

use super::attention::Mask;
use super::batch_shape;
use super::linear::{InputObserver, Lin};
use super::vector_math::picked_log_probs;
use super::weights::Weight;
use crate::layer_target::LayerTarget;

/// New tokens per generation for decoder-only models when none is set (the kit's baselines).
pub const DEFAULT_MAX_GEN_LEN: usize = 64;

/// The decoder with its weights and tokenizer loaded.
pub struct Decoder {
    cfg: DecoderConfig,
    tok: Tokenizer,
    generation: GenerationDefaults,
    embed: Weight,
    layers: Vec<Block>,
    norm: Weight,
    lm_head: Lin,
    inv_freq: Tensor,
    device: Device,
    dtype: DType,
}

impl Decoder {
    /// The model in `dir` (`config.json`, tokenizer files) with weights from `vb` (its dtype
    /// and device are the model's).
    pub fn load(dir: &Path, vb: VarBuilder) -> Result<Self> {
        let cfg: DecoderConfig = crate::hf::config(dir)?;
        let eos = cfg.eos_token_ids.first().copied();
        let tok = Tokenizer::from_dir(dir, TokenizerKind::Decoder { eos })?;
        Self::new(cfg, tok, vb)
    }

    /// The model for `cfg` and `tok` with weights from `vb`.
    pub fn new(cfg: DecoderConfig, tok: Tokenizer, vb: VarBuilder) -> Result<Self> {
        tok.check_vocab(cfg.vocab_size);
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let h = cfg.hidden_size;
        let gemma = cfg.family == Family::Gemma;
        let embed = Weight::load(
            &vb,
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            dtype,
            false,
        )?;
        let layers = (0..cfg.num_layers)
            .map(|i| Block::new(&cfg, &vb.pp(format!("model.layers.{i}"))))
            .collect::<Result<_>>()?;
        let lm_head = Lin::head(
            &vb,
            cfg.tie_word_embeddings,
            "model.embed_tokens.weight",
            embed.tensor(),
        )?;
        Ok(Decoder {
            norm: Weight::load(&vb, "model.norm.weight", &[h], dtype, gemma)?,
            inv_freq: Tensor::new(cfg.inv_freq().as_slice(), &device)?,
            generation: GenerationDefaults {
                max_new_tokens: DEFAULT_MAX_GEN_LEN,
                eos_token_ids: vec![tok.eos_id()],
            },
            embed,
            layers,
            lm_head,
            device,
            dtype,
            cfg,
            tok,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Installs `observer` on the linear layers of every block (not the head: its input is
    /// the final hidden state, and it is not merged by input statistics), or removes it.
    pub fn set_observer(&mut self, observer: Option<Arc<dyn InputObserver>>) {
        for layer in &mut self.layers {
            layer.set_observer(observer.clone());
        }
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
        let (b, t) = batch_shape(ids, Some(valid), self.cfg.vocab_size)?;
        let keep = keep.min(t);
        if !cache.is_empty() && cache.batch() != b {
            return Err(Error::Msg(format!(
                "forward: batch of {b} rows on a cache of {} rows",
                cache.batch()
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

        let mut x = self.embed_ids(ids, (b, t))?;
        let (cos, sin) = self.rotary(pos, (b, t))?;

        // Buffers a clone can see are copied (this pass writes every layer), after which they
        // are this cache's own.
        let exclusive = cache.exclusive();
        if !exclusive {
            cache.owner = Default::default();
        }
        let mask = Mask::new(&cache.valid, past, total, self.cfg.sliding_window);

        let last = self.layers.len() - 1;
        for (i, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            // Earlier layers feed every position to the next layer's keys and values; the last
            // one only has to produce the kept positions.
            let q_start = if i == last { t - keep } else { 0 };
            match layer.forward(x, (&cos, &sin), &mask, (kv, exclusive), q_start)? {
                Some(y) => x = y,
                None => return Ok(None),
            }
        }
        Ok(Some(candle_nn::ops::rms_norm(
            &x,
            self.norm.tensor(),
            self.cfg.rms_norm_eps as f32,
        )?))
    }

    /// The input embeddings of `ids` (`[b][t]`): `[b, t, hidden]`.
    fn embed_ids(&self, ids: &[Vec<u32>], (b, t): (usize, usize)) -> Result<Tensor> {
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids_t = Tensor::from_vec(flat, (b, t), &self.device)?;
        let x = candle_nn::Embedding::new(self.embed.tensor().clone(), self.cfg.hidden_size)
            .forward(&ids_t)?;
        Ok(if self.cfg.family == Family::Gemma {
            // transformers multiplies by sqrt(hidden) cast to the activation dtype.
            (x * (self.cfg.hidden_size as f64).sqrt())?
        } else {
            x
        })
    }

    /// Rotary cos and sin `[b, t, head_dim / 2]` for positions `pos` (row-major `[b, t]`).
    fn rotary(&self, pos: Vec<f32>, (b, t): (usize, usize)) -> Result<(Tensor, Tensor)> {
        let pos_t = Tensor::from_vec(pos, (b, t, 1), &self.device)?;
        let freqs = pos_t.broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?;
        let cos = freqs.cos()?.to_dtype(self.dtype)?.contiguous()?;
        let sin = freqs.sin()?.to_dtype(self.dtype)?.contiguous()?;
        Ok((cos, sin))
    }

    /// Projects hidden states (any leading shape, last dim = hidden) to f32 vocabulary logits.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }
}

impl LanguageModel for Decoder {
    fn kind(&self) -> ModelKind {
        ModelKind::Decoder
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    fn generation(&self) -> &GenerationDefaults {
        &self.generation
    }

    /// The prompt runs once; its cache is repeated for all continuations, which run on top of
    /// it in one right-padded pass. Continuation tokens `0..n-1` are the inputs whose logits
    /// score tokens `1..n`; token 0 is scored from the prompt's last position when
    /// `first_scored` is 0 (only then are prompt logits computed at all).
    fn continuation_log_probs(
        &self,
        prompt: &[u32],
        continuations: &[Vec<u32>],
        first_scored: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let mut cache = self.new_cache();
        let keep = usize::from(first_scored == 0);
        let hidden = self.forward_last(
            std::slice::from_ref(&prompt.to_vec()),
            &[vec![true; prompt.len()]],
            &mut cache,
            keep,
        )?;
        let mut out = vec![Vec::new(); continuations.len()];
        if let Some(hidden) = hidden {
            // The prompt's last position predicts each continuation's first token.
            let last = hidden.i((0, 0..1))?;
            let lp = candle_nn::ops::log_softmax(&self.logits(&last)?, D::Minus1)?;
            let lp: Vec<f32> = lp.squeeze(0)?.to_vec1()?;
            for (o, c) in out.iter_mut().zip(continuations) {
                if let Some(&first) = c.first() {
                    o.push(lp[first as usize]);
                }
            }
        }
        let max_len = continuations.iter().map(Vec::len).max().unwrap_or(0);
        if max_len >= 2 {
            let width = max_len - 1;
            let pad = self.tok.pad_id();
            let rows: Vec<Vec<u32>> = continuations
                .iter()
                .map(|c| {
                    (0..width)
                        .map(|j| c.get(j).copied().unwrap_or(pad))
                        .collect()
                })
                .collect();
            let valid: Vec<Vec<bool>> = continuations
                .iter()
                .map(|c| (0..width).map(|j| j < c.len()).collect())
                .collect();
            let mut cache = cache.repeat(continuations.len())?;
            let h = self.forward(&rows, &valid, &mut cache)?;
            // The log-prob of each next token; padding targets point at token 0 and are
            // dropped below.
            let targets: Vec<u32> = continuations
                .iter()
                .flat_map(|c| (0..width).map(move |j| c.get(j + 1).copied().unwrap_or(0)))
                .collect();
            let picked = picked_log_probs(&self.logits(&h)?, &targets)?;
            for ((o, c), row) in out.iter_mut().zip(continuations).zip(picked.chunks(width)) {
                let end = c.len().saturating_sub(1);
                o.extend_from_slice(&row[(first_scored.max(1) - 1).min(end)..end]);
            }
        }
        Ok(out)
    }

    /// Each prompt is prefilled on its own, so no padding is computed (prompts of a batch can
    /// differ several-fold in length); the caches are then left-padded into one batch, which
    /// decodes exactly as a left-padded batched prefill would.
    fn start_greedy<'a>(
        &'a self,
        prompts: &[Vec<u32>],
    ) -> Result<(Box<dyn GreedyState + 'a>, Tensor)> {
        let mut caches = Vec::with_capacity(prompts.len());
        let mut last = Vec::with_capacity(prompts.len());
        for p in prompts {
            let mut cache = self.new_cache();
            // Only the last position's hidden state (and vocabulary projection) is needed.
            let hidden = self
                .forward_last(
                    std::slice::from_ref(p),
                    &[vec![true; p.len()]],
                    &mut cache,
                    1,
                )?
                .ok_or_else(|| Error::Msg("empty prompt".into()))?;
            last.push(hidden.i((.., 0))?);
            caches.push(cache);
        }
        let cache = KvCache::stack_left_padded(&caches)?;
        drop(caches);
        let logits = self.logits(&Tensor::cat(&last, 0)?)?;
        Ok((Box::new(Decoding { model: self, cache }), logits))
    }

    fn layer_form_weights(&self) -> Vec<String> {
        // A tied head's weight is also the embedding, which is kept as stored.
        let head = self.lm_head.layer_form_names();
        let head = head.into_iter().filter(|n| n != self.embed.name());
        let layers = self.layers.iter().flat_map(|l| l.lins());
        layers.flat_map(Lin::layer_form_names).chain(head).collect()
    }

    unsafe fn layer_targets(&mut self, bf16_values: bool) -> Vec<(String, LayerTarget)> {
        // A tied head's weight is also the embedding, which is kept as stored: no target.
        let tied = self
            .lm_head
            .layer_form_names()
            .iter()
            .any(|n| n == self.embed.name());
        let head = (!tied).then_some(&mut self.lm_head);
        let layers = self.layers.iter_mut().flat_map(Block::lins_mut);
        // SAFETY: the caller keeps the contract for the whole model, so for each layer.
        let mut targets: Vec<_> = layers
            .chain(head)
            .flat_map(|l| unsafe { l.layer_targets(bf16_values) })
            .collect();
        // The embedding as stored, unless the head reads it too (a tied head's Wᵀ and panels
        // are made from it when it is set).
        if !tied {
            // SAFETY: as above.
            targets.extend(unsafe { self.embed.layer_target() });
        }
        targets
    }

    fn set_weight(&mut self, name: &str, tensor: &Tensor) -> Result<bool> {
        // The tied head follows the embedding: both read `model.embed_tokens.weight`.
        let embedding = self.embed.set(name, tensor)?;
        if self.lm_head.set(name, tensor)? || embedding || self.norm.set(name, tensor)? {
            return Ok(true);
        }
        for layer in &mut self.layers {
            if layer.set(name, tensor)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// A batch of greedy generations over one left-padded cache.
struct Decoding<'a> {
    model: &'a Decoder,
    cache: KvCache,
}

impl GreedyState for Decoding<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let ids: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
        let h = self
            .model
            .forward(&ids, &vec![vec![true]; ids.len()], &mut self.cache)?;
        self.model.logits(&h.i((.., 0))?)
    }

    fn retain(&mut self, rows: &[usize]) -> Result<()> {
        self.cache.select(rows)
    }
}
