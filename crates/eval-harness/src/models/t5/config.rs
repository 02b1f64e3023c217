//! T5's `config.json`: serde with transformers' `T5Config` defaults.

use serde::Deserialize;

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

/// The `model_type` values this implementation covers.
pub const T5_MODEL_TYPES: [&str; 2] = ["t5", "mt5"];

/// Everything the model needs from `config.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Raw")]
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
    /// Head shares the embedding.
    pub tie_word_embeddings: bool,
    /// The decoder output is scaled by `d_model^-0.5` before the head: transformers 5's
    /// `scale_decoder_outputs` when config.json has it, else exactly when the head is tied
    /// (transformers 4.39, the kit's).
    pub scale_decoder_outputs: bool,
    /// First decoder input (T5: the pad token, 0).
    pub decoder_start_token_id: u32,
    /// End of sequence (T5: `</s>`, 1).
    pub eos_token_id: u32,
    /// Padding id (T5: 0).
    pub pad_token_id: u32,
}

/// `config.json` as written; absent (or null) fields take transformers' defaults.
#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    d_model: Option<usize>,
    d_kv: Option<usize>,
    d_ff: Option<usize>,
    num_layers: Option<usize>,
    num_decoder_layers: Option<usize>,
    num_heads: Option<usize>,
    relative_attention_num_buckets: Option<usize>,
    relative_attention_max_distance: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    feed_forward_proj: Option<String>,
    tie_word_embeddings: Option<bool>,
    scale_decoder_outputs: Option<bool>,
    decoder_start_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
}

impl TryFrom<Raw> for T5Config {
    type Error = String;
    fn try_from(r: Raw) -> Result<Self, String> {
        let model_type = r.model_type.ok_or("no `model_type`")?;
        if !T5_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(format!(
                "model_type `{model_type}` is not an encoder-decoder this kit supports (t5, mt5)"
            ));
        }
        let proj = r.feed_forward_proj.as_deref().unwrap_or("relu");
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
        let num_layers = r.num_layers.unwrap_or(6);
        let tie_word_embeddings = r.tie_word_embeddings.unwrap_or(true);
        let cfg = T5Config {
            vocab_size: r.vocab_size.unwrap_or(32128),
            d_model: r.d_model.unwrap_or(512),
            d_kv: r.d_kv.unwrap_or(64),
            d_ff: r.d_ff.unwrap_or(2048),
            num_layers,
            num_decoder_layers: r.num_decoder_layers.unwrap_or(num_layers),
            num_heads: r.num_heads.unwrap_or(8),
            relative_attention_num_buckets: r.relative_attention_num_buckets.unwrap_or(32),
            relative_attention_max_distance: r.relative_attention_max_distance.unwrap_or(128),
            layer_norm_epsilon: r.layer_norm_epsilon.unwrap_or(1e-6),
            gated,
            activation,
            tie_word_embeddings,
            scale_decoder_outputs: r.scale_decoder_outputs.unwrap_or(tie_word_embeddings),
            decoder_start_token_id: r.decoder_start_token_id.unwrap_or(0),
            eos_token_id: r.eos_token_id.unwrap_or(1),
            pad_token_id: r.pad_token_id.unwrap_or(0),
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

impl T5Config {
    /// Interprets a parsed `config.json`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        Self::deserialize(v).map_err(|e| e.to_string())
    }
}
