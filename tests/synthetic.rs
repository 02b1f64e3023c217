//! Deterministic synthetic weights for the evaluation goldens, tests and benchmarks, from plain
//! `config.json` values. Values are generated from the tensor's name and element index with a
//! counter-based generator (FNV-1a seed, SplitMix64 mix) and computed in f32 with exactly
//! representable intermediates, so `scripts/goldens/eval_goldens.py` and `t5_goldens.py`
//! (numpy) produce bit-identical tensors without committing any weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::models::write_checkpoint;

/// FNV-1a 64-bit hash of the tensor name: the stream seed.
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Uniform value in [-1, 1) for element `i` of the stream `seed` (24 random bits, exact in f32).
pub fn unit(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let k = (z >> 40) as f32;
    k * (1.0 / 8_388_608.0) - 1.0
}

/// `n` values `unit * scale + offset`, computed in f32.
pub fn values(name: &str, n: usize, scale: f32, offset: f32) -> Vec<f32> {
    let seed = fnv1a64(name);
    (0..n as u64)
        .map(|i| unit(seed, i) * scale + offset)
        .collect()
}

fn int(config: &Value, key: &str) -> Option<usize> {
    config.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn flag(config: &Value, key: &str) -> Option<bool> {
    config.get(key).and_then(Value::as_bool)
}

/// Every tensor of a decoder (Llama, Mistral, Qwen2 or Gemma `config.json`) with its shape, as
/// transformers names them: the embedding, each layer's norms and projections (q/k/v biases for
/// Qwen2 or `attention_bias`), the final norm, and `lm_head` unless the head is tied.
pub fn decoder_shapes(config: &Value) -> Vec<(String, Vec<usize>)> {
    let need = |k: &str| int(config, k).unwrap_or_else(|| panic!("config.json needs `{k}`"));
    let (vocab, h, ff) = (
        need("vocab_size"),
        need("hidden_size"),
        need("intermediate_size"),
    );
    let heads = need("num_attention_heads");
    let kv_heads = int(config, "num_key_value_heads").unwrap_or(heads);
    let hd = int(config, "head_dim").unwrap_or(h / heads);
    let qwen2 = config["model_type"] == "qwen2";
    let attention_bias = flag(config, "attention_bias").unwrap_or(false);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h])];
    for l in 0..need("num_hidden_layers") {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        for (n, out) in [
            ("q", heads * hd),
            ("k", kv_heads * hd),
            ("v", kv_heads * hd),
        ] {
            v.push((format!("{p}.self_attn.{n}_proj.weight"), vec![out, h]));
            if qwen2 || attention_bias {
                v.push((format!("{p}.self_attn.{n}_proj.bias"), vec![out]));
            }
        }
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, heads * hd]));
        if !qwen2 && attention_bias {
            v.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![ff, h]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![ff, h]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![h, ff]));
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    if !decoder_tied(config) {
        v.push(("lm_head.weight".to_string(), vec![vocab, h]));
    }
    v
}

/// transformers' per-class default: Gemma ties its head, the other families do not.
fn decoder_tied(config: &Value) -> bool {
    flag(config, "tie_word_embeddings").unwrap_or(config["model_type"] == "gemma")
}

/// Multiplies row `eos` of a `[rows, cols]` matrix by 4, so random models do stop.
fn boost(mut t: Vec<f32>, eos: u32, cols: usize) -> Vec<f32> {
    let r = eos as usize * cols;
    t[r..r + cols].iter_mut().for_each(|x| *x *= 4.0);
    t
}

fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches the values")
}

/// Every tensor of [`decoder_shapes`] with synthetic values: norm weights `1 + 0.25u`
/// (`0.25u` for Gemma, whose norm adds the 1), the embedding `u`, projections and biases
/// `0.125u`; the head row of `eos` is multiplied by 4 so random models do stop.
pub fn decoder_weights(config: &Value, eos: u32) -> HashMap<String, Tensor> {
    let norm_offset = if config["model_type"] == "gemma" {
        0.0
    } else {
        1.0
    };
    let tied = decoder_tied(config);
    decoder_shapes(config)
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let v = if name == "model.embed_tokens.weight" {
                let v = values(&name, n, 1.0, 0.0);
                if tied {
                    boost(v, eos, shape[1])
                } else {
                    v
                }
            } else if name == "lm_head.weight" {
                boost(values(&name, n, 0.125, 0.0), eos, shape[1])
            } else if name.ends_with("norm.weight") {
                values(&name, n, 0.25, norm_offset)
            } else {
                values(&name, n, 0.125, 0.0)
            };
            let t = tensor(v, &shape);
            (name, t)
        })
        .collect()
}

/// The id of the EOS token `tokenizer_config.json` names in `tokenizer.json` (an added token
/// or a vocabulary entry).
fn tokenizer_eos(tokenizer_dir: &Path) -> Option<u32> {
    let read = |f: &str| -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(tokenizer_dir.join(f)).ok()?).ok()
    };
    let config = read("tokenizer_config.json")?;
    let eos = match &config["eos_token"] {
        Value::String(s) => s.clone(),
        v => v["content"].as_str()?.to_string(),
    };
    let tok = read("tokenizer.json")?;
    let added = tok["added_tokens"].as_array().into_iter().flatten();
    if let Some(t) = added.into_iter().find(|t| t["content"] == eos.as_str()) {
        return t["id"].as_u64().map(|x| x as u32);
    }
    match &tok["model"]["vocab"] {
        Value::Object(m) => m.get(&eos)?.as_u64().map(|x| x as u32),
        Value::Array(a) => a
            .iter()
            .position(|p| p[0] == eos.as_str())
            .map(|i| i as u32),
        _ => None,
    }
}

/// Writes a loadable decoder directory: `config.json` (the given JSON), `model.safetensors`
/// with [`decoder_weights`] (the EOS row is the tokenizer's EOS, else config.json's), and the
/// tokenizer files copied from `tokenizer_dir`.
pub fn write_decoder_dir(dir: &Path, config: &Value, tokenizer_dir: &Path) {
    crate::tokenizers::copy(tokenizer_dir, dir);
    let eos = tokenizer_eos(tokenizer_dir)
        .or_else(|| int(config, "eos_token_id").map(|x| x as u32))
        .expect("an EOS token in tokenizer_config.json or config.json");
    let tensors: Vec<(String, Tensor)> = decoder_weights(config, eos).into_iter().collect();
    write_checkpoint(dir, config, &tensors, 1);
}

/// A two-layer Llama `config.json` of hidden size 16 (GQA: 2 heads, 1 key/value head), for
/// end-to-end tests that need a real-shaped decoder and nothing more.
pub fn tiny_llama_config() -> Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "vocab_size": 32000,
        "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
        "num_key_value_heads": 1, "hidden_act": "silu", "tie_word_embeddings": false,
        "rope_theta": 10000.0
    })
}

/// [`write_decoder_dir`] with every weight multiplied by `scale`: experts of one family that
/// differ from each other (and from the base, scale 1).
pub fn write_scaled_decoder_dir(dir: &Path, config: &Value, tokenizer_dir: &Path, scale: f64) {
    write_decoder_dir(dir, config, tokenizer_dir);
    let p = dir.join("model.safetensors");
    let tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, (t * scale).unwrap()))
        .collect();
    crate::models::save(&p, &tensors);
}

/// The dimensions of a T5 `config.json`, with transformers' `T5Config` defaults.
struct T5Dims {
    vocab: usize,
    d: usize,
    inner: usize,
    ff: usize,
    layers: usize,
    decoder_layers: usize,
    heads: usize,
    buckets: usize,
    gated: bool,
    tied: bool,
}

impl T5Dims {
    fn of(config: &Value) -> Self {
        let get = |k: &str, d: usize| int(config, k).unwrap_or(d);
        let layers = get("num_layers", 6);
        let heads = get("num_heads", 8);
        let proj = config["feed_forward_proj"].as_str().unwrap_or("relu");
        T5Dims {
            vocab: get("vocab_size", 32128),
            d: get("d_model", 512),
            inner: heads * get("d_kv", 64),
            ff: get("d_ff", 2048),
            layers,
            decoder_layers: get("num_decoder_layers", layers),
            heads,
            buckets: get("relative_attention_num_buckets", 32),
            gated: proj.starts_with("gated-"),
            tied: flag(config, "tie_word_embeddings").unwrap_or(true),
        }
    }
}

/// Every tensor of a T5 `config.json`, with the HF names. Norm weights are `1 + 0.25u`, the
/// shared embedding `u` (`0.25u` when the head is tied), relative position biases `0.5u`,
/// projections and the untied head `0.125u`; the head row of `eos` (the shared row when the
/// head is tied) is multiplied by 4 so random models do stop.
pub fn t5_weights(config: &Value, eos: u32) -> HashMap<String, Tensor> {
    let c = T5Dims::of(config);
    let (d, inner, ff, v) = (c.d, c.inner, c.ff, c.vocab);
    let mut m = HashMap::new();
    // A tied head reads the embedding back: a smaller embedding keeps random models from
    // echoing their input token.
    let shared = values("shared.weight", v * d, if c.tied { 0.25 } else { 1.0 }, 0.0);
    let shared = if c.tied {
        boost(shared, eos, d)
    } else {
        shared
    };
    m.insert("shared.weight".to_string(), tensor(shared, &[v, d]));
    if !c.tied {
        let w = boost(values("lm_head.weight", v * d, 0.125, 0.0), eos, d);
        m.insert("lm_head.weight".to_string(), tensor(w, &[v, d]));
    }
    let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| {
        let n = shape.iter().product();
        let vals = values(&name, n, scale, offset);
        m.insert(name, tensor(vals, shape));
    };
    for (stack, n, decoder) in [
        ("encoder", c.layers, false),
        ("decoder", c.decoder_layers, true),
    ] {
        put(format!("{stack}.final_layer_norm.weight"), &[d], 0.25, 1.0);
        put(
            format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            &[c.buckets, c.heads],
            0.5,
            0.0,
        );
        for l in 0..n {
            let p = format!("{stack}.block.{l}.layer");
            let mut attn = vec![(0, "SelfAttention")];
            if decoder {
                attn.push((1, "EncDecAttention"));
            }
            for (i, a) in attn {
                put(format!("{p}.{i}.layer_norm.weight"), &[d], 0.25, 1.0);
                for x in ["q", "k", "v"] {
                    put(format!("{p}.{i}.{a}.{x}.weight"), &[inner, d], 0.125, 0.0);
                }
                put(format!("{p}.{i}.{a}.o.weight"), &[d, inner], 0.125, 0.0);
            }
            let f = if decoder { 2 } else { 1 };
            put(format!("{p}.{f}.layer_norm.weight"), &[d], 0.25, 1.0);
            let wi: &[&str] = if c.gated { &["wi_0", "wi_1"] } else { &["wi"] };
            for w in wi {
                put(
                    format!("{p}.{f}.DenseReluDense.{w}.weight"),
                    &[ff, d],
                    0.125,
                    0.0,
                );
            }
            put(
                format!("{p}.{f}.DenseReluDense.wo.weight"),
                &[d, ff],
                0.125,
                0.0,
            );
        }
    }
    m
}

/// Writes a loadable T5 directory: `config.json` (the given JSON), `model.safetensors` with
/// [`t5_weights`] (the EOS from `config.json`, default 1), and the tokenizer files copied from
/// `tokenizer_dir`.
pub fn write_t5_dir(dir: &Path, config: &Value, tokenizer_dir: &Path) {
    crate::tokenizers::copy(tokenizer_dir, dir);
    let eos = int(config, "eos_token_id").unwrap_or(1) as u32;
    let tensors: Vec<(String, Tensor)> = t5_weights(config, eos).into_iter().collect();
    write_checkpoint(dir, config, &tensors, 1);
}

/// The factors of a PEFT LoRA adapter of rank `rank` on every `q` and `v` of a T5 (encoder
/// and decoder self attention, decoder cross attention: what `target_modules = ["q", "v"]`
/// adapts, as in lorahub's flan-t5 adapters), named `base_model.model.<module>.lora_A.weight`
/// (`rank × d_model`) and `…lora_B.weight` (`heads·d_kv × rank`), values `0.125u` from the
/// stream `adapter<which>.<key>`. Mirrors `lora_factors` in scripts/goldens/t5_goldens.py.
pub fn t5_qv_lora_factors(config: &Value, which: usize, rank: usize) -> HashMap<String, Tensor> {
    let c = T5Dims::of(config);
    let mut mods = Vec::new();
    for l in 0..c.layers {
        for x in ["q", "v"] {
            mods.push(format!("encoder.block.{l}.layer.0.SelfAttention.{x}"));
        }
    }
    for l in 0..c.decoder_layers {
        for x in ["q", "v"] {
            mods.push(format!("decoder.block.{l}.layer.0.SelfAttention.{x}"));
            mods.push(format!("decoder.block.{l}.layer.1.EncDecAttention.{x}"));
        }
    }
    let mut out = HashMap::new();
    for m in mods {
        for (part, shape) in [("lora_A", [rank, c.d]), ("lora_B", [c.inner, rank])] {
            let key = format!("base_model.model.{m}.{part}.weight");
            let v = values(
                &format!("adapter{which}.{key}"),
                shape[0] * shape[1],
                0.125,
                0.0,
            );
            out.insert(key, tensor(v, &shape));
        }
    }
    out
}

/// The starter kit's `flant5_avg` over the stand-ins of [`t5_qv_lora_factors`]: adapters 1
/// and 2 of rank `rank`, every factor averaged 0.5/0.5.
pub fn t5_averaged_lora_factors(config: &Value, rank: usize) -> HashMap<String, Tensor> {
    let f1 = t5_qv_lora_factors(config, 1, rank);
    let f2 = t5_qv_lora_factors(config, 2, rank);
    f1.iter()
        .map(|(k, a)| {
            let m = ((a * 0.5).unwrap() + (&f2[k] * 0.5).unwrap()).unwrap();
            (k.clone(), m)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_stable() {
        // Pinned values: the Python golden scripts must produce the same.
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        let v = values("x", 3, 1.0, 0.0);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        assert_ne!(v[0], v[1]);
    }
}
