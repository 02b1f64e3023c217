//! Checkpoint and adapter reading beyond the parity fixtures: legacy adapter files, adapter
//! output, embedding and fan-in-fan-out LoRA, tied embeddings, half-precision storage.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use merge_core::adapter::{write_adapter, Adapter};
use merge_core::checkpoint::{Checkpoint, CheckpointWriter, OutputTensor};
use merge_core::engine::{self, MergeOptions};
use merge_core::MergeConfig;
use testkit::compare::{self, max_abs_diff};
use testkit::models::{self, TinyLlama};
use testkit::resolver::offline;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge")
}

/// Merges config `toml` into `out`, models resolved offline from `dir`; returns the output.
fn merge(dir: &Path, toml: &str, out: &Path) -> Checkpoint {
    let cfg = MergeConfig::from_toml_str(toml, "merge.toml").unwrap();
    engine::run(&cfg, &offline(dir), &MergeOptions::new(out)).unwrap();
    Checkpoint::open_dir(out).unwrap()
}

#[test]
fn legacy_adapter_bin_equals_safetensors() {
    let st = Adapter::open_dir(fixtures().join("models/lora_a")).unwrap();
    let bin = Adapter::open_dir(fixtures().join("models/lora_a_bin")).unwrap();
    assert_eq!(st.modules().len(), bin.modules().len());
    assert!(!st.modules().is_empty());
    for name in st.modules().keys() {
        let a = st.delta(name, &Device::Cpu).unwrap().unwrap();
        let b = bin.delta(name, &Device::Cpu).unwrap().unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{name}");
    }
}

#[test]
fn adapter_output_round_trips() {
    let src = Adapter::open_dir(fixtures().join("models/lora_a")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    let mut tensors = Vec::new();
    for m in src.modules().values() {
        tensors.push((m.a_key.clone(), src.factor(&m.a_key).unwrap()));
        tensors.push((m.b_key.clone(), src.factor(&m.b_key).unwrap()));
    }
    write_adapter(&out, &src.raw_config, &tensors, DType::F32, false).unwrap();
    assert!(out.join("adapter_config.json").is_file());
    assert!(out.join("adapter_model.safetensors").is_file());
    let back = Adapter::open_dir(&out).unwrap();
    for name in src.modules().keys() {
        let a = src.delta(name, &Device::Cpu).unwrap().unwrap();
        let b = back.delta(name, &Device::Cpu).unwrap().unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
    }
    // An existing directory is not overwritten without asking.
    assert!(write_adapter(&out, &src.raw_config, &tensors, DType::F32, false).is_err());
}

/// Write an adapter by hand: an embedding LoRA and a fan-in-fan-out (Conv1D-style) LoRA.
#[test]
fn embedding_and_fan_in_fan_out_deltas() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let (vocab, dim, r) = (10usize, 6usize, 2usize);
    let emb_a = Tensor::randn(0f32, 1.0, (r, vocab), &dev).unwrap();
    let emb_b = Tensor::randn(0f32, 1.0, (dim, r), &dev).unwrap();
    let conv_a = Tensor::randn(0f32, 1.0, (r, dim), &dev).unwrap(); // r × in
    let conv_b = Tensor::randn(0f32, 1.0, (4, r), &dev).unwrap(); // out × r
    let dir = tmp.path().join("lora");
    std::fs::create_dir_all(&dir).unwrap();
    models::save(
        &dir.join("adapter_model.safetensors"),
        &[
            (
                "base_model.model.wte.lora_embedding_A".into(),
                emb_a.clone(),
            ),
            (
                "base_model.model.wte.lora_embedding_B".into(),
                emb_b.clone(),
            ),
            (
                "base_model.model.h.0.attn.c_attn.lora_A.weight".into(),
                conv_a.clone(),
            ),
            (
                "base_model.model.h.0.attn.c_attn.lora_B.weight".into(),
                conv_b.clone(),
            ),
        ],
    );
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":2,"lora_alpha":8,"fan_in_fan_out":true,"target_modules":["wte","c_attn"]}"#,
    )
    .unwrap();
    let adapter = Adapter::open_dir(&dir).unwrap();
    let scale = 8.0 / 2.0;
    let emb = adapter.delta("wte.weight", &dev).unwrap().unwrap();
    let expect = (emb_b.matmul(&emb_a).unwrap().t().unwrap() * scale).unwrap();
    assert_eq!(emb.dims(), &[vocab, dim]);
    assert!(max_abs_diff(&emb, &expect) < 1e-5);
    let conv = adapter
        .delta("h.0.attn.c_attn.weight", &dev)
        .unwrap()
        .unwrap();
    let expect = (conv_b.matmul(&conv_a).unwrap().t().unwrap() * scale).unwrap();
    assert_eq!(conv.dims(), &[dim, 4], "Conv1D weights are (in, out)");
    assert!(max_abs_diff(&conv, &expect) < 1e-5);
}

#[test]
fn tied_embeddings_read_the_head_from_the_embedding() {
    let tmp = tempfile::tempdir().unwrap();
    let tied = TinyLlama {
        tied: true,
        ..TinyLlama::default()
    };
    tied.write(&tmp.path().join("a"), 1, 1);
    tied.write(&tmp.path().join("b"), 2, 1);
    let a = Checkpoint::open_dir(tmp.path().join("a")).unwrap();
    assert!(a.tie_word_embeddings());
    assert!(a.contains("lm_head.weight"));
    assert!(!a.names().any(|n| n == "lm_head.weight"));
    let head = a.load_f32("lm_head.weight", &Device::Cpu).unwrap();
    let emb = a
        .load_f32("model.embed_tokens.weight", &Device::Cpu)
        .unwrap();
    assert_eq!(max_abs_diff(&head, &emb), 0.0);

    // Merging tied models keeps them tied: no head is written, the config still says tied.
    let merged = merge(
        tmp.path(),
        "[merge]\nmethod = \"linear\"\n[[merge.models]]\nmodel = \"a\"\nparameters = { weight = 1 }\n[[merge.models]]\nmodel = \"b\"\nparameters = { weight = 1 }\n",
        &tmp.path().join("out"),
    );
    assert!(merged.tie_word_embeddings());
    assert!(!merged.names().any(|n| n == "lm_head.weight"));
    assert_eq!(merged.config().unwrap()["tie_word_embeddings"], true);
}

#[test]
fn half_precision_inputs_merge_in_f32_and_keep_their_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    for (dir, dtype, seed) in [("a", DType::BF16, 1), ("b", DType::F16, 2)] {
        TinyLlama {
            dtype,
            ..TinyLlama::default()
        }
        .write(&tmp.path().join(dir), seed, 1);
    }
    let a = Checkpoint::open_dir(tmp.path().join("a")).unwrap();
    assert_eq!(a.storage_dtype(), DType::BF16);
    let merged = merge(
        tmp.path(),
        "[merge]\nmethod = \"linear\"\n[[merge.models]]\nmodel = \"a\"\nparameters = { weight = 0.5 }\n[[merge.models]]\nmodel = \"b\"\nparameters = { weight = 0.5 }\n",
        &tmp.path().join("out"),
    );
    // Default output dtype: the first model's.
    assert_eq!(merged.storage_dtype(), DType::BF16);
    assert_eq!(merged.config().unwrap()["torch_dtype"], "bfloat16");
    let b = Checkpoint::open_dir(tmp.path().join("b")).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let expect = ((a.load_f32(name, &Device::Cpu).unwrap()
        + b.load_f32(name, &Device::Cpu).unwrap())
    .unwrap()
        * 0.5)
        .unwrap();
    let got = merged.load_f32(name, &Device::Cpu).unwrap();
    assert!(max_abs_diff(&got, &expect) < 4e-3);
}

#[test]
fn adapter_over_its_own_base_path() {
    // base_model_name_or_path "../base" is taken relative to the adapter directory.
    let tmp = tempfile::tempdir().unwrap();
    let merged = merge(
        &fixtures(),
        "[merge]\nmethod = \"linear\"\ndtype = \"float32\"\n[[merge.models]]\nmodel = \"models/lora_a\"\nparameters = { weight = 1 }\n",
        &tmp.path().join("out"),
    );
    let golden = Checkpoint::open_dir(fixtures().join("goldens/peft_lora_a")).unwrap();
    let d = compare::against(&golden, |name| merged.load_f32(name, &Device::Cpu).unwrap());
    assert!(d <= 1e-6, "{d:e}");
}

#[test]
fn a_new_writer_removes_what_dead_writers_left_and_keeps_live_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    // No process has pid 999999999 (Linux pids stop at 2^22); this process is alive.
    let dead = tmp.path().join(".out.partial-999999999-abc");
    let live = tmp
        .path()
        .join(format!(".out.partial-{}-def", std::process::id()));
    let other = tmp.path().join(".other.partial-999999999-abc");
    for d in [&dead, &live, &other] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("model.safetensors"), b"half-written").unwrap();
    }
    let tensors = [OutputTensor {
        name: "w".into(),
        shape: vec![2],
        dtype: DType::F32,
    }];
    let w = CheckpointWriter::create(&target, &tensors, 1 << 20, false).unwrap();
    assert!(!dead.exists(), "a dead writer's directory is removed");
    assert!(live.exists(), "a live writer's directory is kept");
    assert!(other.exists(), "another target's directory is not touched");
    w.write(
        "w",
        &Tensor::new(&[1f32, 2.], &candle_core::Device::Cpu).unwrap(),
    )
    .unwrap();
    assert_eq!(w.finish().unwrap(), target);
    assert!(target.join("model.safetensors").is_file());
}
