//! Merges into memory equal merges to disk read back, bit for bit: tensor-level methods
//! (streamed and whole-tensor, f32 and bf16 output, full and adapter inputs) put every tensor
//! as the written checkpoint holds it; adapter-level methods put exactly what "base + merged
//! adapter" loads for the tensors the adapter changes. Bad input fails before any tensor is put.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use merge_core::adapter::Adapter;
use merge_core::checkpoint::{tensor_bytes, Checkpoint};
use merge_core::engine::{self, merge_in_memory, MergeOptions, MergeSession, TensorSink};
use merge_core::MergeConfig;
use testkit::models::{self, TinyLlama};
use testkit::resolver::offline;

/// Collects what a merge puts, refusing a tensor put twice.
#[derive(Default)]
struct Collect(Mutex<BTreeMap<String, Tensor>>);

impl TensorSink for Collect {
    fn put(&self, name: &str, tensor: Tensor) -> merge_core::Result<()> {
        let old = self.0.lock().unwrap().insert(name.to_string(), tensor);
        assert!(old.is_none(), "`{name}` put twice");
        Ok(())
    }
}

impl Collect {
    fn take(self) -> BTreeMap<String, Tensor> {
        self.0.into_inner().unwrap()
    }
}

/// Big enough that the embedding and head span three streaming chunks (the last partial).
fn shape(dtype: DType) -> TinyLlama {
    TinyLlama {
        vocab: 1100,
        hidden: 128,
        intermediate: 256,
        dtype,
        ..TinyLlama::default()
    }
}

/// base, two experts (bf16 storage, one with an integer buffer every input has) and a LoRA
/// over the base.
fn family() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let s = shape(DType::BF16);
    let ids = Tensor::arange(0i64, 64, &Device::Cpu).unwrap();
    for (name, seed) in [("base", 1), ("a", 2), ("b", 3)] {
        let mut tensors = s.tensors(seed);
        tensors.push(("model.position_ids".into(), ids.clone()));
        models::write_checkpoint(&tmp.path().join(name), &s.config(), &tensors, 2);
    }
    models::write_lora(
        &tmp.path().join("lora"),
        &s,
        &["q_proj", "v_proj"],
        4,
        8.0,
        4,
    );
    models::write_lora(
        &tmp.path().join("lora2"),
        &s,
        &["q_proj", "v_proj"],
        2,
        4.0,
        5,
    );
    tmp
}

fn bytes(t: &Tensor) -> Vec<u8> {
    tensor_bytes(t, t.dtype()).unwrap()
}

/// Merge `toml` to disk and into memory (through `session`); compare every tensor.
fn same_as_disk(dir: &Path, session: &MergeSession, toml: &str) {
    let cfg = MergeConfig::from_toml_str(toml, "t.toml").unwrap();
    let out = tempfile::tempdir_in(dir).unwrap();
    let out = out.path().join("m");
    engine::run(&cfg, &offline(dir), &MergeOptions::new(&out)).unwrap();
    let disk = Checkpoint::open_dir(&out).unwrap();
    let sink = Collect::default();
    let report = merge_in_memory(session, &cfg, &sink).unwrap();
    assert!(report.folded_onto.is_none());
    let got = sink.take();
    assert_eq!(report.tensors, got.len());
    let names: Vec<&str> = disk.names().collect();
    assert_eq!(got.keys().map(String::as_str).collect::<Vec<_>>(), names);
    for name in names {
        let want = disk.load(name).unwrap();
        let t = &got[name];
        assert_eq!((t.dtype(), t.dims()), (want.dtype(), want.dims()), "{name}");
        assert!(t.device().is_cpu());
        assert!(bytes(t) == bytes(&want), "{}: `{name}` differs", cfg.method);
    }
}

/// `[[merge.models]]` entries for a, b and the LoRA, with `density` for methods that take it.
fn models(density: bool) -> String {
    [("a", 0.7, 0.6), ("b", 0.5, 0.4), ("lora", 0.3, 0.5)]
        .iter()
        .map(|(m, w, d)| match density {
            true => format!("[[merge.models]]\nmodel = \"{m}\"\nparameters = {{ weight = {w}, density = {d} }}\n"),
            false => format!("[[merge.models]]\nmodel = \"{m}\"\nparameters = {{ weight = {w} }}\n"),
        })
        .collect()
}

#[test]
fn tensor_methods_put_what_the_disk_merge_writes() {
    let tmp = family();
    let dir = tmp.path();
    let all = format!(
        "[merge]\nmethod = \"ties\"\nbase_model = \"base\"\n{}",
        models(true)
    );
    let session = MergeSession::open(
        &MergeConfig::from_toml_str(&all, "t").unwrap(),
        &offline(dir),
    )
    .unwrap();
    for (method, dtype, extra) in [
        ("linear", "float32", ""),
        ("linear", "bfloat16", ""),
        ("ties", "bfloat16", ""),
        ("ties", "float32", "[merge.parameters]\nlambda = 0.9\n"),
        ("dare_ties", "bfloat16", "seed = 11\n"),
        ("breadcrumbs", "float16", ""),
    ] {
        let toml = format!(
            "[merge]\nmethod = \"{method}\"\nbase_model = \"base\"\ndtype = \"{dtype}\"\n{extra}{}",
            models(method != "linear")
        );
        same_as_disk(dir, &session, &toml);
    }
    // The session keeps each expert's magnitude histogram from the merges above: other
    // densities cut elsewhere, and a subset in another order must find each expert's own.
    for (a, b) in [(0.2, 0.9), (0.95, 0.05)] {
        let toml = format!(
            "[merge]\nmethod = \"ties\"\nbase_model = \"base\"\ndtype = \"bfloat16\"\n\
             [[merge.models]]\nmodel = \"b\"\nparameters = {{ weight = 0.5, density = {b} }}\n\
             [[merge.models]]\nmodel = \"a\"\nparameters = {{ weight = 0.7, density = {a} }}\n"
        );
        same_as_disk(dir, &session, &toml);
    }
    // A whole-tensor method over the same session, with the adapter as the other model.
    for dtype in ["float32", "bfloat16"] {
        let toml = format!(
            "[merge]\nmethod = \"slerp\"\nbase_model = \"base\"\ndtype = \"{dtype}\"\n\
             [merge.parameters]\nt = [0.2, 0.8]\n[[merge.models]]\nmodel = \"lora\"\n"
        );
        same_as_disk(dir, &session, &toml);
    }
}

#[test]
fn lora_avg_folds_onto_the_base_as_loading_base_plus_adapter_does() {
    let tmp = family();
    let dir = tmp.path();
    for dtype in ["float32", "bfloat16"] {
        let toml = format!(
            "[merge]\nmethod = \"lora_avg\"\nbase_model = \"base\"\ndtype = \"{dtype}\"\n\
             [[merge.models]]\nmodel = \"lora\"\nparameters = {{ weight = 0.6 }}\n\
             [[merge.models]]\nmodel = \"lora2\"\nparameters = {{ weight = 0.4 }}\n"
        );
        let cfg = MergeConfig::from_toml_str(&toml, "t.toml").unwrap();
        let out = dir.join(format!("avg-{dtype}"));
        engine::run(&cfg, &offline(dir), &MergeOptions::new(&out)).unwrap();
        let base = Checkpoint::open_dir(dir.join("base")).unwrap();
        let written = Adapter::open_dir(&out).unwrap();

        let session = MergeSession::open(&cfg, &offline(dir)).unwrap();
        let sink = Collect::default();
        let report = merge_in_memory(&session, &cfg, &sink).unwrap();
        let folded = report.folded_onto.expect("an adapter-level method folds");
        assert_eq!(folded.local_dir(), Some(dir.join("base").as_path()));
        let got = sink.take();
        let mut changed: Vec<&str> = written.changed().collect();
        changed.sort();
        assert_eq!(got.keys().map(String::as_str).collect::<Vec<_>>(), changed);
        assert_eq!(report.tensors, changed.len());
        for name in changed {
            let want = written.apply(&base, name, &Device::Cpu).unwrap().unwrap();
            assert_eq!(want.dtype(), DType::F32);
            assert!(
                bytes(&got[name]) == bytes(&want),
                "{dtype}: `{name}` differs"
            );
        }
    }
}

#[test]
fn bad_input_fails_before_anything_is_put() {
    let tmp = family();
    let dir = tmp.path();
    // A tensor missing from one expert, and another with a different shape in a third.
    let s = shape(DType::BF16);
    let mut missing = s.tensors(6);
    missing.retain(|(n, _)| n != "model.norm.weight");
    models::write_checkpoint(&dir.join("missing"), &s.config(), &missing, 1);
    let mut reshaped = s.tensors(7);
    reshaped[1].1 = Tensor::zeros(3, DType::BF16, &Device::Cpu).unwrap();
    let reshaped_name = reshaped[1].0.clone();
    models::write_checkpoint(&dir.join("reshaped"), &s.config(), &reshaped, 1);
    let models = "[[merge.models]]\nmodel = \"a\"\n[[merge.models]]\nmodel = \"missing\"\n\
                  [[merge.models]]\nmodel = \"reshaped\"\n[[merge.models]]\nmodel = \"lora\"\n";
    let open = format!("[merge]\nmethod = \"linear\"\nbase_model = \"base\"\n{models}");
    let session = MergeSession::open(
        &MergeConfig::from_toml_str(&open, "t").unwrap(),
        &offline(dir),
    )
    .unwrap();
    let fails = |toml: &str, needles: &[&str]| {
        let mut cfg: MergeConfig = match MergeConfig::from_toml_str(toml, "t.toml") {
            Ok(cfg) => cfg,
            Err(e) => panic!("{toml}: {e}"),
        };
        if let Some(m) = needles.iter().find_map(|n| n.strip_prefix("method=")) {
            cfg.method = m.to_string();
        }
        let sink = Collect::default();
        let err = merge_in_memory(&session, &cfg, &sink)
            .unwrap_err()
            .to_string();
        for n in needles.iter().filter(|n| !n.starts_with("method=")) {
            assert!(err.contains(n), "`{n}` not in: {err}");
        }
        assert!(!err.contains('\n'), "{err}");
        assert!(sink.take().is_empty(), "{err}: tensors were put");
    };
    let linear = |m: &str, extra: &str| {
        format!("[merge]\nmethod = \"linear\"\n{extra}[[merge.models]]\nmodel = \"a\"\nparameters = {{ weight = 1 }}\n[[merge.models]]\nmodel = \"{m}\"\nparameters = {{ weight = 1 }}\n")
    };
    fails(
        &linear("missing", ""),
        &["model.norm.weight", "is missing in"],
    );
    fails(&linear("reshaped", ""), &[&reshaped_name, "shape"]);
    fails(
        &linear("b", ""),
        &["model `b`", "not opened by this merge session"],
    );
    fails(
        &linear(
            "lora",
            "base_model = \"base\"\n[merge.parameters]\ndensity = 0.5\n",
        ),
        &["`density` is not a parameter of `linear`"],
    );
    fails(
        &linear("lora", ""),
        &["method=nope", "unknown merge method `nope`"],
    );
    let kit = "[merge]\nmethod = \"lora_avg\"\nbase_model = \"base\"\n[[merge.models]]\nmodel = \"lora\"\n\
               parameters = { weight = 0.5 }\n[[merge.models]]\nmodel = \"a\"\nparameters = { weight = 0.5 }\n";
    fails(kit, &["`lora_avg`", "a is not a PEFT adapter"]);
}
