//! A small family of models over one base, in real Hugging Face layouts, for merge tests:
//! the base (the eval goldens' tiny Llama or T5 v1.1 with its real tokenizer), two full
//! fine-tunes and two PEFT LoRA adapters on the attention's q and v projections.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::synthetic::values;

/// `model.safetensors` of a model directory.
pub fn read(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

/// A family written under `dir`: `base/`, `expert1/`, `expert2/`, `adapter1/`, `adapter2/`.
pub struct Family {
    /// Where the models are.
    pub dir: PathBuf,
    /// Encoder-decoder (T5) or decoder (Llama).
    pub t5: bool,
}

impl Family {
    /// Writes `DIR/broken`: a copy of model `from` without the tensor `missing`.
    pub fn broken_copy(&self, from: &str, missing: &str) -> PathBuf {
        let src = self.dir.join(from);
        let mut w = read(&src);
        assert!(w.remove(missing).is_some(), "{from} has no {missing}");
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        let w: Vec<(String, Tensor)> = w.into_iter().collect();
        let out = self.dir.join("broken");
        crate::models::write_checkpoint(&out, &config, &w, 1);
        out
    }

    /// `toml` with `DIR` replaced by the family's directory.
    pub fn config_text(&self, toml: &str) -> String {
        toml.replace("DIR", &self.dir.display().to_string())
    }
}

/// Writes a family under `root/llama` or `root/t5`.
pub fn write(root: &Path, t5: bool) -> Family {
    let dir = root.join(if t5 { "t5" } else { "llama" });
    let base = dir.join("base");
    crate::goldens::write_model(if t5 { "t5_v11" } else { "llama" }, &base);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    let weights = read(&base);
    for which in 1..=2 {
        // A full fine-tune: every tensor moved by its own small perturbation.
        let expert: Vec<(String, Tensor)> = weights
            .iter()
            .map(|(n, t)| {
                let d = values(&format!("expert{which}.{n}"), t.elem_count(), 0.05, 0.0);
                let d = Tensor::from_vec(d, t.shape(), &Device::Cpu).unwrap();
                (n.clone(), (t + d).unwrap())
            })
            .collect();
        let e = dir.join(format!("expert{which}"));
        crate::models::write_checkpoint(&e, &config, &expert, 1);
        crate::tokenizers::copy(&base, &e);
        // A LoRA adapter of rank 2 on the q and v projections.
        let targets: &[&str] = if t5 {
            &["q", "v"]
        } else {
            &["q_proj", "v_proj"]
        };
        let mut factors = Vec::new();
        for (n, t) in &weights {
            let module = n.trim_end_matches(".weight");
            let last = module.rsplit('.').next().unwrap();
            if t.rank() != 2 || !targets.contains(&last) {
                continue;
            }
            let (out, inp) = t.dims2().unwrap();
            for (part, shape) in [("lora_A", [2, inp]), ("lora_B", [out, 2])] {
                let key = format!("base_model.model.{module}.{part}.weight");
                let v = values(
                    &format!("adapter{which}.{key}"),
                    shape[0] * shape[1],
                    0.3,
                    0.0,
                );
                factors.push((key, Tensor::from_vec(v, &shape, &Device::Cpu).unwrap()));
            }
        }
        let adapter_config = serde_json::json!({
            "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": targets,
            "fan_in_fan_out": false, "base_model_name_or_path": base.display().to_string(),
        });
        let a = dir.join(format!("adapter{which}"));
        crate::models::write_peft_adapter(&a, &adapter_config, factors);
    }
    Family { dir, t5 }
}
