//! The decoder's `config.json`: serde with transformers' defaults, then each family's own
//! (`tie_word_embeddings` and the activation default per class, Qwen2's q/k/v bias, which
//! families read `sliding_window`).

use serde::Deserialize;

use crate::hf::TokenIds;

/// The architectures this decoder implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
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

impl TryFrom<String> for Family {
    type Error = String;
    fn try_from(model_type: String) -> Result<Self, String> {
        match model_type.as_str() {
            "llama" => Ok(Family::Llama),
            "mistral" => Ok(Family::Mistral),
            "qwen2" => Ok(Family::Qwen2),
            "gemma" => Ok(Family::Gemma),
            other => Err(format!(
                "model_type `{other}` is not supported by the decoder (llama, mistral, qwen2, gemma)"
            )),
        }
    }
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
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Raw")]
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

/// `config.json` as written, with transformers' family-independent defaults.
#[derive(Deserialize)]
struct Raw {
    model_type: Family,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    rope_scaling: Option<RawRopeScaling>,
    #[serde(default = "default_max_position_embeddings")]
    max_position_embeddings: usize,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    /// Gemma configs carry both names; newer transformers prefer this one.
    hidden_activation: Option<String>,
    eos_token_id: Option<TokenIds>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}

#[derive(Deserialize)]
struct RawRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

impl TryFrom<RawRopeScaling> for RopeScaling {
    type Error = String;
    fn try_from(s: RawRopeScaling) -> Result<Self, String> {
        match s.rope_type.or(s.kind).as_deref().unwrap_or("") {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear(
                s.factor.ok_or("rope_scaling without factor")?,
            )),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: s.factor.ok_or("rope_scaling llama3 without factor")?,
                low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: s
                    .original_max_position_embeddings
                    .unwrap_or(8192.0),
            }),
            other => Err(format!("rope_scaling type `{other}` is not supported")),
        }
    }
}

impl TryFrom<Raw> for DecoderConfig {
    type Error = String;
    fn try_from(r: Raw) -> Result<Self, String> {
        let family = r.model_type;
        let num_heads = r.num_attention_heads;
        let num_kv_heads = r.num_key_value_heads.unwrap_or(num_heads);
        if r.num_hidden_layers == 0 || num_heads == 0 {
            return Err("num_hidden_layers and num_attention_heads must be positive".into());
        }
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            ));
        }
        let sliding_window = match family {
            Family::Mistral => r.sliding_window,
            Family::Qwen2 if r.use_sliding_window == Some(true) => r.sliding_window,
            _ => None,
        };
        let attention_bias = r.attention_bias.unwrap_or(false);
        let gemma = family == Family::Gemma;
        let act_name = r
            .hidden_activation
            .or(r.hidden_act)
            .unwrap_or_else(|| if gemma { "gelu_pytorch_tanh" } else { "silu" }.into());
        let activation = match act_name.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            _ => return Err(format!("activation `{act_name}` is not supported")),
        };
        Ok(DecoderConfig {
            family,
            vocab_size: r.vocab_size,
            hidden_size: r.hidden_size,
            intermediate_size: r.intermediate_size,
            num_layers: r.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim: r.head_dim.unwrap_or(r.hidden_size / num_heads),
            rms_norm_eps: r.rms_norm_eps,
            rope_theta: r.rope_theta,
            rope_scaling: match r.rope_scaling {
                None => RopeScaling::None,
                Some(s) => s.try_into()?,
            },
            max_position_embeddings: r.max_position_embeddings,
            sliding_window,
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family != Family::Qwen2 && attention_bias,
            // transformers' per-class default.
            tie_word_embeddings: r.tie_word_embeddings.unwrap_or(gemma),
            activation,
            eos_token_ids: r.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
        })
    }
}

impl DecoderConfig {
    /// Interprets a parsed `config.json`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        Self::deserialize(v).map_err(|e| e.to_string())
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
