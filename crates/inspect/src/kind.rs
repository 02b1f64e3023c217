//! Where a tensor sits: its layer (from the name, as merge-core's gradients read it) and its
//! module kind, the groups inspect aggregates over.

use serde::{Deserialize, Serialize};

/// The module kind of a tensor, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Attention projections (query, key, value, output).
    Attention,
    /// The feed-forward block (gate, up, down; T5's DenseReluDense).
    Mlp,
    /// Input and output embeddings (the LM head included).
    Embeddings,
    /// Everything else: norms, biases outside the blocks above, position tables.
    Other,
}

impl Kind {
    /// Every kind, in display order.
    pub const ALL: [Kind; 4] = [Kind::Attention, Kind::Mlp, Kind::Embeddings, Kind::Other];

    /// The kind of tensor `name` (transformers' names for Llama, Mistral, Qwen2, Gemma, GPT-2
    /// and T5). Norms inside a block are `Other`: they are not projections.
    pub fn of(name: &str) -> Kind {
        let lower = name.to_ascii_lowercase();
        let parts: Vec<&str> = lower.split('.').collect();
        let has = |needles: &[&str]| parts.iter().any(|p| needles.contains(p));
        if lower.contains("norm") || parts.iter().any(|p| p.starts_with("ln_")) {
            return Kind::Other;
        }
        if has(&[
            "embed_tokens",
            "wte",
            "wpe",
            "shared",
            "lm_head",
            "embed_out",
            "word_embeddings",
        ]) {
            return Kind::Embeddings;
        }
        if has(&[
            "self_attn",
            "attn",
            "attention",
            "selfattention",
            "encdecattention",
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "c_attn",
            "qkv_proj",
        ]) {
            return Kind::Attention;
        }
        if has(&[
            "mlp",
            "densereludense",
            "feed_forward",
            "ffn",
            "gate_proj",
            "up_proj",
            "down_proj",
            "fc1",
            "fc2",
            "c_fc",
            "gate_up_proj",
        ]) {
            return Kind::Mlp;
        }
        Kind::Other
    }

    /// The name used in JSON, tables and findings.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Attention => "attention",
            Kind::Mlp => "mlp",
            Kind::Embeddings => "embeddings",
            Kind::Other => "other",
        }
    }

    /// The name in a sentence ("MLP weights").
    pub fn prose(self) -> &'static str {
        match self {
            Kind::Attention => "attention",
            Kind::Mlp => "MLP",
            Kind::Embeddings => "embedding",
            Kind::Other => "other",
        }
    }
}

/// The layer index in a tensor name (`model.layers.7.mlp...` → 7), as merge-core reads it.
pub fn layer(name: &str) -> Option<usize> {
    merge_core::params::layer_index(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_of_llama_and_t5_names() {
        for (name, kind) in [
            ("model.layers.3.self_attn.q_proj.weight", Kind::Attention),
            ("model.layers.3.mlp.down_proj.weight", Kind::Mlp),
            ("model.layers.3.input_layernorm.weight", Kind::Other),
            ("model.norm.weight", Kind::Other),
            ("model.embed_tokens.weight", Kind::Embeddings),
            ("lm_head.weight", Kind::Embeddings),
            (
                "encoder.block.0.layer.0.SelfAttention.q.weight",
                Kind::Attention,
            ),
            (
                "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
                Kind::Mlp,
            ),
            ("shared.weight", Kind::Embeddings),
            ("transformer.h.0.attn.c_attn.weight", Kind::Attention),
        ] {
            assert_eq!(Kind::of(name), kind, "{name}");
        }
        assert_eq!(layer("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer("model.embed_tokens.weight"), None);
    }
}
