//! `LanguageModel::set_weight`: a model loaded from checkpoint A with every tensor of
//! checkpoint B set in place computes exactly (bit for bit) what the model loaded from B
//! computes — decoders (Llama, Gemma's norm fold and tied head, Qwen2's biases) and T5 (v1.1
//! gated and untied, original tied and rescaled), in f32 and bf16, B stored in f32 or bf16.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use eval_harness::models::{CheckpointSource, Decoder, T5};
use eval_harness::LanguageModel;
use testkit::goldens::{self, golden};
use testkit::synthetic::{decoder_weights, t5_weights, values};

/// A model directory of golden `name`'s config and tokenizer with `tensors` stored in
/// `storage` dtype.
fn write(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>, storage: DType) {
    let g = golden(name);
    testkit::tokenizers::copy(&goldens::tokenizer(&g), dir);
    let tensors: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_dtype(storage).unwrap()))
        .collect();
    testkit::models::write_checkpoint(dir, &g["config"], &tensors, 1);
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

/// Model A (`a`'s tensors in f32) with every tensor of B (`a` perturbed, stored in `storage`)
/// set computes in `dtype` bit for bit what the model loaded from B computes, which differs
/// from A's.
fn check<M: LanguageModel>(
    name: &str,
    dtype: DType,
    storage: DType,
    a: HashMap<String, Tensor>,
    load: impl Fn(&Path, candle_nn::VarBuilder<'static>) -> eval_harness::Result<M>,
    logits: impl Fn(&M) -> Vec<u32>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let b = perturbed(&a);
    write(&a_dir, name, &a, DType::F32);
    write(&b_dir, name, &b, storage);
    let mut m = load(&a_dir, vb(&a_dir, dtype)).unwrap();
    let before = logits(&m);
    let names: Vec<String> = b.keys().cloned().collect();
    set_all(&mut m, &b_dir, &names);
    let direct = load(&b_dir, vb(&b_dir, dtype)).unwrap();
    let want = logits(&direct);
    assert_ne!(before, want, "{name}: B must differ from A");
    assert!(
        logits(&m) == want,
        "{name} {dtype:?}: logits differ after set_weight"
    );
}

fn check_decoder(name: &str, dtype: DType, storage: DType) {
    let a = decoder_weights(&goldens::config(name), 2);
    check(name, dtype, storage, a, Decoder::load, decoder_logits);
}

fn check_t5(name: &str, dtype: DType, storage: DType) {
    let a = t5_weights(&goldens::config(name), 1);
    check(name, dtype, storage, a, T5::load, t5_logits);
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
    let dir = tmp.path().join("gemma");
    write(
        &dir,
        "gemma",
        &decoder_weights(&goldens::config("gemma"), 2),
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
    let dir = tmp.path().join("t5");
    let weights = t5_weights(&goldens::config("t5_orig"), 1);
    write(&dir, "t5_orig", &weights, DType::F32);
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
