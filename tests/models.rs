//! Tiny Llama-shaped checkpoints and LoRA adapters, made deterministically from a seed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Shape of a tiny Llama.
#[derive(Debug, Clone)]
pub struct TinyLlama {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP size.
    pub intermediate: usize,
    /// Layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Tie the head to the embedding (no `lm_head.weight` stored).
    pub tied: bool,
    /// Storage dtype.
    pub dtype: DType,
}

impl Default for TinyLlama {
    fn default() -> Self {
        TinyLlama {
            vocab: 32,
            hidden: 8,
            intermediate: 16,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            tied: false,
            dtype: DType::F32,
        }
    }
}

impl TinyLlama {
    /// Tensor names and shapes, as transformers' LlamaForCausalLM names them.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        crate::synthetic::decoder_shapes(&self.config())
    }

    /// `config.json` for this shape.
    pub fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": self.tied,
            "torch_dtype": match self.dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
            "bos_token_id": 1,
            "eos_token_id": 2,
        })
    }

    /// Random tensors from `seed` (normal-ish, scale 0.5).
    pub fn tensors(&self, seed: u64) -> Vec<(String, Tensor)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * 0.5).collect();
                let t = Tensor::from_vec(data, shape, &Device::Cpu)
                    .and_then(|t| t.to_dtype(self.dtype))
                    .expect("valid tensor");
                (name, t)
            })
            .collect()
    }

    /// Write the model to `dir` (config.json, model.safetensors or shards + index).
    pub fn write(&self, dir: &Path, seed: u64, shards: usize) -> Vec<(String, Tensor)> {
        let tensors = self.tensors(seed);
        write_checkpoint(dir, &self.config(), &tensors, shards);
        tensors
    }
}

/// Write `tensors` as a checkpoint with `config` into `dir`: one `model.safetensors`, or
/// `shards` files with a `model.safetensors.index.json`.
pub fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &[(String, Tensor)],
    shards: usize,
) {
    std::fs::create_dir_all(dir).expect("create model dir");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    if shards <= 1 {
        save(dir.join("model.safetensors").as_path(), tensors);
        return;
    }
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        save(dir.join(&name).as_path(), chunk);
        for (t, _) in chunk {
            weight_map.insert(t.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

/// Save tensors as one safetensors file.
pub fn save(path: &Path, tensors: &[(String, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, path).expect("save safetensors");
}

/// Write a PEFT LoRA adapter over `base` targeting the modules whose names end in one of
/// `targets`; factors random from `seed`. Returns the adapter's tensors.
pub fn write_lora(
    dir: &Path,
    base: &TinyLlama,
    targets: &[&str],
    rank: usize,
    alpha: f64,
    seed: u64,
) -> Vec<(String, Tensor)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = Vec::new();
    let mut rand = |shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * 0.3).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    };
    for (name, shape) in base.shapes() {
        let module = name.trim_end_matches(".weight");
        if shape.len() == 2 && targets.iter().any(|t| module.ends_with(t)) {
            tensors.push((
                format!("base_model.model.{module}.lora_A.weight"),
                rand(vec![rank, shape[1]]),
            ));
            tensors.push((
                format!("base_model.model.{module}.lora_B.weight"),
                rand(vec![shape[0], rank]),
            ));
        }
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "fan_in_fan_out": false,
        "bias": "none",
        "base_model_name_or_path": null,
    });
    write_peft_adapter(dir, &config, tensors.clone());
    tensors
}

/// Writes a PEFT adapter directory: `adapter_config.json` (`config`) and
/// `adapter_model.safetensors` (`factors`, named as PEFT names them), creating `dir`.
pub fn write_peft_adapter(
    dir: &Path,
    config: &serde_json::Value,
    factors: impl IntoIterator<Item = (String, Tensor)>,
) {
    std::fs::create_dir_all(dir).unwrap();
    let factors: Vec<(String, Tensor)> = factors.into_iter().collect();
    save(&dir.join("adapter_model.safetensors"), &factors);
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
}
