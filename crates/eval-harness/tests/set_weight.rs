//! `LanguageModel::set_weight`: a model loaded from checkpoint A with every tensor of
//! checkpoint B set in place computes exactly (bit for bit) what the model loaded from B
//! computes — decoders (Llama, Gemma's norm fold and tied head, Qwen2's biases) and T5 (v1.1
//! gated and untied, original tied and rescaled), in f32 and bf16, B stored in f32 or bf16.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use eval_harness::models::{CheckpointSource, Decoder, T5};
use eval_harness::LanguageModel;
use serde_json::Value;
use testkit::synthetic::{decoder_weights, t5_weights, values};

fn goldens() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens")
}

fn golden_config(name: &str) -> Value {
    let text = std::fs::read_to_string(goldens().join(format!("{name}.json"))).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["config"].clone()
}

fn tokenizer_dir(t5: bool) -> PathBuf {
    if t5 {
        return goldens().join("t5-tokenizer");
    }
    let base = std::env::var_os("LLM_MERGING_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tokenizers"));
    let dir = base.join("llama2");
    assert!(
        dir.join("tokenizer.json").is_file(),
        "tokenizer missing at {}: run scripts/fetch-tokenizers.sh first",
        dir.display()
    );
    dir
}

/// A model directory with `tensors` stored in `storage` dtype.
fn write(dir: &Path, config: &Value, t5: bool, tensors: &HashMap<String, Tensor>, storage: DType) {
    let tok = tokenizer_dir(t5);
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), dir.join(f)).unwrap();
    }
    let tensors: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_dtype(storage).unwrap()))
        .collect();
    testkit::models::write_checkpoint(dir, config, &tensors, 1);
}

/// Checkpoint B: A's tensors moved by a name-seeded perturbation.
fn perturbed(a: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    a.iter()
        .map(|(n, t)| {
            let d = values(&format!("B.{n}"), t.elem_count(), 0.25, 0.0);
            let d = Tensor::from_vec(d, t.shape(), &Device::Cpu).unwrap();
            (n.clone(), (t + d).unwrap())
        })
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// Sets every tensor of `b_dir` (as the checkpoint reader returns it) on `m`.
fn set_all(m: &mut dyn LanguageModel, b_dir: &Path, names: &[String]) {
    let src = CheckpointSource::open(b_dir, None).unwrap();
    for n in names {
        let t = src.tensor(n).unwrap();
        assert!(m.set_weight(n, &t).unwrap(), "{n} not taken");
    }
}

fn vb(dir: &Path, dtype: DType) -> candle_nn::VarBuilder<'static> {
    CheckpointSource::open(dir, None)
        .unwrap()
        .into_var_builder(dtype, &Device::Cpu)
}

/// Logits of a prompt (prefill, many rows) and of three decoding steps (few rows: the packed
/// panel kernel on the CPU in f32).
fn decoder_logits(m: &Decoder) -> Vec<u32> {
    let ids: Vec<u32> = (0..40).map(|i| 3 + i * 37 % 900).collect();
    let mut cache = m.new_cache();
    let h = m
        .forward(
            std::slice::from_ref(&ids),
            &[vec![true; ids.len()]],
            &mut cache,
        )
        .unwrap();
    let mut out = bits(&m.logits(&h).unwrap());
    for tok in [5, 17, 300] {
        let h = m.forward(&[vec![tok]], &[vec![true]], &mut cache).unwrap();
        out.extend(bits(&m.logits(&h.i((.., 0)).unwrap()).unwrap()));
    }
    out
}

fn t5_logits(m: &T5) -> Vec<u32> {
    let ids: Vec<u32> = (0..30).map(|i| 3 + i * 37 % 400).collect();
    let enc = m
        .encode(std::slice::from_ref(&ids), &[vec![true; ids.len()]])
        .unwrap();
    let mut cache = m.new_cache(&enc).unwrap();
    let h = m.decode(&[vec![0, 7, 9]], &mut cache).unwrap();
    let mut out = bits(&m.logits(&h).unwrap());
    let h = m.decode(&[vec![11]], &mut cache).unwrap();
    out.extend(bits(&m.logits(&h).unwrap()));
    out
}

fn check_decoder(name: &str, dtype: DType, storage: DType) {
    let config = golden_config(name);
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = decoder_weights(&config, 2);
    let b = perturbed(&a);
    write(&a_dir, &config, false, &a, DType::F32);
    write(&b_dir, &config, false, &b, storage);
    let mut m = Decoder::load(&a_dir, vb(&a_dir, dtype)).unwrap();
    let before = decoder_logits(&m);
    let names: Vec<String> = b.keys().cloned().collect();
    set_all(&mut m, &b_dir, &names);
    let direct = Decoder::load(&b_dir, vb(&b_dir, dtype)).unwrap();
    let want = decoder_logits(&direct);
    assert_ne!(before, want, "{name}: B must differ from A");
    assert!(
        decoder_logits(&m) == want,
        "{name} {dtype:?}: logits differ after set_weight"
    );
}

fn check_t5(name: &str, dtype: DType, storage: DType) {
    let config = golden_config(name);
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = t5_weights(&config, 1);
    let b = perturbed(&a);
    write(&a_dir, &config, true, &a, DType::F32);
    write(&b_dir, &config, true, &b, storage);
    let mut m = T5::load(&a_dir, vb(&a_dir, dtype)).unwrap();
    let before = t5_logits(&m);
    let names: Vec<String> = b.keys().cloned().collect();
    set_all(&mut m, &b_dir, &names);
    let direct = T5::load(&b_dir, vb(&b_dir, dtype)).unwrap();
    let want = t5_logits(&direct);
    assert_ne!(before, want, "{name}: B must differ from A");
    assert!(
        t5_logits(&m) == want,
        "{name} {dtype:?}: logits differ after set_weight"
    );
}

#[test]
fn llama_set_weight_equals_loading() {
    check_decoder("llama", DType::F32, DType::F32);
    check_decoder("llama", DType::F32, DType::BF16);
    check_decoder("llama", DType::BF16, DType::F32);
}

#[test]
fn gemma_set_weight_folds_norms_and_moves_the_tied_head() {
    check_decoder("gemma", DType::F32, DType::F32);
    check_decoder("gemma", DType::BF16, DType::BF16);
}

#[test]
fn qwen2_set_weight_replaces_biases() {
    check_decoder("qwen2", DType::F32, DType::F32);
}

#[test]
fn t5_v11_set_weight_equals_loading() {
    check_t5("t5_v11", DType::F32, DType::F32);
    check_t5("t5_v11", DType::BF16, DType::BF16);
}

#[test]
fn t5_original_set_weight_moves_the_tied_rescaled_head() {
    check_t5("t5_orig", DType::F32, DType::F32);
    check_t5("t5_orig", DType::F32, DType::BF16);
}

#[test]
fn names_the_model_does_not_read_and_wrong_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let config = golden_config("gemma");
    let dir = tmp.path().join("gemma");
    write(
        &dir,
        &config,
        false,
        &decoder_weights(&config, 2),
        DType::F32,
    );
    let mut m = eval_harness::load(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
    // A tied model has no lm_head; extras are not read.
    for extra in [
        "lm_head.weight",
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "x.bias",
    ] {
        assert!(!m.set_weight(extra, &t).unwrap(), "{extra}");
    }
    let e = m
        .set_weight("model.layers.1.mlp.up_proj.weight", &t)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("`model.layers.1.mlp.up_proj.weight` has shape [4, 4]"),
        "{e}"
    );
    let e = m.set_weight("model.norm.weight", &t).unwrap_err();
    assert!(e.to_string().contains("`model.norm.weight`"), "{e}");

    // T5: only the embedding name chosen at load is read.
    let config = golden_config("t5_orig");
    let dir = tmp.path().join("t5");
    write(&dir, &config, true, &t5_weights(&config, 1), DType::F32);
    let mut m = eval_harness::load(&dir, None, DType::F32, &Device::Cpu).unwrap();
    for extra in [
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "lm_head.weight",
    ] {
        assert!(!m.set_weight(extra, &t).unwrap(), "{extra}");
    }
    let e = m.set_weight("shared.weight", &t).unwrap_err();
    assert!(e.to_string().contains("`shared.weight`"), "{e}");
}
