//! Write a synthetic Llama checkpoint (random weights, bf16 safetensors, sharded) for
//! benchmarks: TinyLlama-1.1B's shapes by default.
//!
//! ```text
//! cargo run --release -p merge-core --example synth_checkpoint -- OUT_DIR [--expert SEED] [--layers N]
//! ```
//!
//! Without `--expert` it writes the base (weights uniform in ±0.02, from a fixed seed);
//! with `--expert SEED` it writes base + a task vector uniform in ±0.002 drawn from SEED, so
//! task-vector methods see realistic small deltas. Tensors stream through
//! `CheckpointWriter` one at a time, so memory stays at one tensor.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use merge_core::checkpoint::{CheckpointWriter, OutputTensor};
use rayon::prelude::*;

const HIDDEN: usize = 2048;
const INTERMEDIATE: usize = 5632;
const HEADS: usize = 32;
const KV_HEADS: usize = 4;
const VOCAB: usize = 32000;

/// xorshift64*: fast, and good enough for benchmark weights.
fn fill(out: &mut [f32], seed: u64, scale: f32) {
    out.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = (seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
            for v in chunk {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
                // top 24 bits → [-1, 1)
                *v += ((r >> 40) as f32 / 8_388_608.0 - 1.0) * scale;
            }
        });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first().map(PathBuf::from) else {
        eprintln!("usage: synth_checkpoint OUT_DIR [--expert SEED] [--layers N]");
        std::process::exit(2);
    };
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<u64>().expect("a number"))
    };
    let expert = flag("--expert");
    let layers = flag("--layers").unwrap_or(22) as usize;
    let head_dim = HIDDEN / HEADS;
    let kv = KV_HEADS * head_dim;
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![HIDDEN]),
            (format!("{p}.self_attn.q_proj.weight"), vec![HIDDEN, HIDDEN]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, HIDDEN]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, HIDDEN]),
            (format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HIDDEN]),
            (format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]),
            (
                format!("{p}.mlp.gate_proj.weight"),
                vec![INTERMEDIATE, HIDDEN],
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                vec![INTERMEDIATE, HIDDEN],
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![HIDDEN, INTERMEDIATE],
            ),
        ]);
    }
    shapes.push(("model.norm.weight".into(), vec![HIDDEN]));
    shapes.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
    let planned: Vec<OutputTensor> = shapes
        .iter()
        .map(|(n, s)| OutputTensor {
            name: n.clone(),
            shape: s.clone(),
            dtype: DType::BF16,
        })
        .collect();
    let writer =
        CheckpointWriter::create(&out, &planned, 2_000_000_000, true).expect("create output");
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut data = vec![0f32; n];
        fill(&mut data, 0x5EED_0000 + i as u64, 0.02);
        if let Some(seed) = expert {
            fill(&mut data, seed.wrapping_mul(1_000_003) + i as u64, 0.002);
        }
        let t = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu).expect("tensor");
        writer.write(name, &t).expect("write");
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    });
    writer
        .add_file(
            "config.json",
            serde_json::to_string_pretty(&config).unwrap().as_bytes(),
        )
        .expect("config");
    let dir = writer.finish().expect("finish");
    println!("wrote {}", dir.display());
}
