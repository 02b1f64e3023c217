//! Deterministic synthetic weights for tests and benchmarks. Values are generated from the
//! tensor's name and element index with a counter-based generator (FNV-1a seed, SplitMix64
//! mix) and computed in f32 with exactly representable intermediates, so
//! `scripts/goldens/eval_goldens.py` (numpy) produces bit-identical tensors without committing
//! any weights.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::models::decoder::{DecoderConfig, Family};

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

/// Every tensor of a decoder with `cfg`'s shapes, with the HF names. Norm weights are
/// `1 + 0.25u` (`0.25u` for Gemma, whose norm adds the 1), embeddings `u`, projections and
/// biases `0.125u`; the head row of `eos` is multiplied by 4 so random models do stop.
pub fn decoder_weights(cfg: &DecoderConfig, eos: u32) -> Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let mut m = HashMap::new();
    let (h, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let norm_offset = if cfg.family == Family::Gemma {
        0.0
    } else {
        1.0
    };
    let boost = |t: Vec<f32>, cols: usize| -> Vec<f32> {
        let mut t = t;
        let r = eos as usize * cols;
        t[r..r + cols].iter_mut().for_each(|x| *x *= 4.0);
        t
    };
    let emb = values("model.embed_tokens.weight", cfg.vocab_size * h, 1.0, 0.0);
    let emb = if cfg.tie_word_embeddings {
        boost(emb, h)
    } else {
        emb
    };
    put_raw(
        &mut m,
        "model.embed_tokens.weight",
        emb,
        &[cfg.vocab_size, h],
    )?;
    if !cfg.tie_word_embeddings {
        let w = boost(values("lm_head.weight", cfg.vocab_size * h, 0.125, 0.0), h);
        put_raw(&mut m, "lm_head.weight", w, &[cfg.vocab_size, h])?;
    }
    let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| -> Result<()> {
        let n = shape.iter().product();
        let v = values(&name, n, scale, offset);
        m.insert(name, Tensor::from_vec(v, shape, &dev)?);
        Ok(())
    };
    put("model.norm.weight".into(), &[h], 0.25, norm_offset)?;
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        put(
            format!("{p}.input_layernorm.weight"),
            &[h],
            0.25,
            norm_offset,
        )?;
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            0.25,
            norm_offset,
        )?;
        for (n, out) in [
            ("q", cfg.num_heads * hd),
            ("k", cfg.num_kv_heads * hd),
            ("v", cfg.num_kv_heads * hd),
        ] {
            put(
                format!("{p}.self_attn.{n}_proj.weight"),
                &[out, h],
                0.125,
                0.0,
            )?;
            if cfg.qkv_bias {
                put(format!("{p}.self_attn.{n}_proj.bias"), &[out], 0.125, 0.0)?;
            }
        }
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, cfg.num_heads * hd],
            0.125,
            0.0,
        )?;
        if cfg.o_bias {
            put(format!("{p}.self_attn.o_proj.bias"), &[h], 0.125, 0.0)?;
        }
        put(format!("{p}.mlp.gate_proj.weight"), &[i, h], 0.125, 0.0)?;
        put(format!("{p}.mlp.up_proj.weight"), &[i, h], 0.125, 0.0)?;
        put(format!("{p}.mlp.down_proj.weight"), &[h, i], 0.125, 0.0)?;
    }
    Ok(m)
}

/// Writes a loadable model directory: `config.json` (the given JSON), `model.safetensors` with
/// [`decoder_weights`], and the tokenizer files copied from `tokenizer_dir`.
pub fn write_model_dir(
    dir: &std::path::Path,
    config: &serde_json::Value,
    tokenizer_dir: &std::path::Path,
) -> Result<()> {
    use crate::error::Error;
    let cfg = DecoderConfig::from_json(config).map_err(Error::Msg)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = tokenizer_dir.join(f);
        std::fs::copy(&src, dir.join(f)).map_err(|e| Error::io(&src, e))?;
    }
    let tok = crate::tokenize::EvalTokenizer::from_dir(dir, None)?;
    let w = decoder_weights(&cfg, tok.eos_id())?;
    candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Msg(e.to_string()))?;
    let p = dir.join("config.json");
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    Ok(())
}

fn put_raw(
    m: &mut HashMap<String, Tensor>,
    name: &str,
    v: Vec<f32>,
    shape: &[usize],
) -> Result<()> {
    m.insert(name.to_string(), Tensor::from_vec(v, shape, &Device::Cpu)?);
    Ok(())
}

/// Every tensor of a T5 with `cfg`'s shapes, with the HF names. Norm weights are `1 + 0.25u`,
/// the shared embedding `u` (`0.25u` when the head is tied), relative position biases `0.5u`, projections and the untied head
/// `0.125u`; the head row of `eos` (the shared row when the head is tied) is multiplied by 4 so
/// random models do stop.
pub fn t5_weights(cfg: &crate::models::T5Config, eos: u32) -> Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let mut m = HashMap::new();
    let (d, inner, ff, v) = (
        cfg.d_model,
        cfg.num_heads * cfg.d_kv,
        cfg.d_ff,
        cfg.vocab_size,
    );
    let boost = |mut t: Vec<f32>| -> Vec<f32> {
        let r = eos as usize * d;
        t[r..r + d].iter_mut().for_each(|x| *x *= 4.0);
        t
    };
    // A tied head reads the embedding back: a smaller embedding keeps random models from
    // echoing their input token.
    let scale = if cfg.tie_word_embeddings { 0.25 } else { 1.0 };
    let shared = values("shared.weight", v * d, scale, 0.0);
    let shared = if cfg.tie_word_embeddings {
        boost(shared)
    } else {
        shared
    };
    put_raw(&mut m, "shared.weight", shared, &[v, d])?;
    if !cfg.tie_word_embeddings {
        let w = boost(values("lm_head.weight", v * d, 0.125, 0.0));
        put_raw(&mut m, "lm_head.weight", w, &[v, d])?;
    }
    let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| -> Result<()> {
        let n = shape.iter().product();
        let vals = values(&name, n, scale, offset);
        m.insert(name, Tensor::from_vec(vals, shape, &dev)?);
        Ok(())
    };
    for (stack, n, decoder) in [
        ("encoder", cfg.num_layers, false),
        ("decoder", cfg.num_decoder_layers, true),
    ] {
        put(format!("{stack}.final_layer_norm.weight"), &[d], 0.25, 1.0)?;
        put(
            format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            &[cfg.relative_attention_num_buckets, cfg.num_heads],
            0.5,
            0.0,
        )?;
        for l in 0..n {
            let p = format!("{stack}.block.{l}.layer");
            let mut attn = vec![(0, "SelfAttention")];
            if decoder {
                attn.push((1, "EncDecAttention"));
            }
            for (i, a) in attn {
                put(format!("{p}.{i}.layer_norm.weight"), &[d], 0.25, 1.0)?;
                for x in ["q", "k", "v"] {
                    put(format!("{p}.{i}.{a}.{x}.weight"), &[inner, d], 0.125, 0.0)?;
                }
                put(format!("{p}.{i}.{a}.o.weight"), &[d, inner], 0.125, 0.0)?;
            }
            let f = if decoder { 2 } else { 1 };
            put(format!("{p}.{f}.layer_norm.weight"), &[d], 0.25, 1.0)?;
            let wi: &[&str] = if cfg.gated {
                &["wi_0", "wi_1"]
            } else {
                &["wi"]
            };
            for w in wi {
                put(
                    format!("{p}.{f}.DenseReluDense.{w}.weight"),
                    &[ff, d],
                    0.125,
                    0.0,
                )?;
            }
            put(
                format!("{p}.{f}.DenseReluDense.wo.weight"),
                &[d, ff],
                0.125,
                0.0,
            )?;
        }
    }
    Ok(m)
}

/// Writes a loadable T5 model directory: `config.json` (the given JSON), `model.safetensors`
/// with [`t5_weights`] (the EOS from `config.json`), and the tokenizer files copied from
/// `tokenizer_dir`.
pub fn write_t5_model_dir(
    dir: &std::path::Path,
    config: &serde_json::Value,
    tokenizer_dir: &std::path::Path,
) -> Result<()> {
    use crate::error::Error;
    let cfg = crate::models::T5Config::from_json(config).map_err(Error::Msg)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = tokenizer_dir.join(f);
        std::fs::copy(&src, dir.join(f)).map_err(|e| Error::io(&src, e))?;
    }
    let w = t5_weights(&cfg, cfg.eos_token_id)?;
    candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Msg(e.to_string()))?;
    let p = dir.join("config.json");
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    Ok(())
}

/// The factors of a PEFT LoRA adapter of rank `rank` on every `q` and `v` of a T5 (encoder
/// and decoder self attention, decoder cross attention: what `target_modules = ["q", "v"]`
/// adapts, as in lorahub's flan-t5 adapters), named `base_model.model.<module>.lora_A.weight`
/// (`rank × d_model`) and `…lora_B.weight` (`heads·d_kv × rank`), values `0.125u` from the
/// stream `adapter<which>.<key>`. Mirrors `lora_factors` in scripts/goldens/t5_goldens.py.
pub fn t5_qv_lora_factors(
    cfg: &crate::models::T5Config,
    which: usize,
    rank: usize,
) -> Result<HashMap<String, Tensor>> {
    let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
    let mut mods = Vec::new();
    for l in 0..cfg.num_layers {
        for x in ["q", "v"] {
            mods.push(format!("encoder.block.{l}.layer.0.SelfAttention.{x}"));
        }
    }
    for l in 0..cfg.num_decoder_layers {
        for x in ["q", "v"] {
            mods.push(format!("decoder.block.{l}.layer.0.SelfAttention.{x}"));
            mods.push(format!("decoder.block.{l}.layer.1.EncDecAttention.{x}"));
        }
    }
    let mut out = HashMap::new();
    for m in mods {
        for (part, shape) in [("lora_A", [rank, d]), ("lora_B", [inner, rank])] {
            let key = format!("base_model.model.{m}.{part}.weight");
            let v = values(
                &format!("adapter{which}.{key}"),
                shape[0] * shape[1],
                0.125,
                0.0,
            );
            put_raw(&mut out, &key, v, &shape)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_stable() {
        // Pinned values: the Python golden script must produce the same.
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        let v = values("x", 3, 1.0, 0.0);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        assert_ne!(v[0], v[1]);
    }
}
