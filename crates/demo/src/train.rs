//! Building the family: tokenizer, base, experts, LoRA expert, data; then the stamp.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use merge_core::checkpoint::{CheckpointWriter, OutputTensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[cfg(test)]
use crate::model::uniform;
use crate::model::{init_weights, Batch, LoraSet, Params, TinyConfig};
use crate::tasks::{self, Example, Skill};
use crate::tokenizer;
use crate::{Recipe, Stamp, BASE, EXPERT_LARGEST, EXPERT_REVERSE, LORA_OPPOSITE, STAMP};

/// Independent random streams of one recipe, one per purpose, so that changing how much one
/// phase draws does not shift another phase's data.
fn stream(recipe: &Recipe, id: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(recipe.seed);
    r.set_stream(id);
    r
}

struct Tok {
    tok: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
}

impl Tok {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tok
            .encode(text, false)
            .map_err(|e| anyhow!("{e}"))?
            .get_ids()
            .to_vec())
    }

    /// `[BOS] input answer [EOS]`, tokenized exactly as the eval harness tokenizes a prompt
    /// (input tokenizer: BOS + text) and its answer (target tokenizer: text + EOS), and the
    /// index of the first answer token.
    fn sequence(&self, input: &str, answer: &str) -> Result<(Vec<u32>, usize)> {
        let mut s = vec![self.bos];
        s.extend(self.encode(input)?);
        let from = s.len();
        s.extend(self.encode(answer)?);
        s.push(self.eos);
        Ok((s, from))
    }
}

/// What a training phase optimises.
enum Phase<'a> {
    /// Every weight.
    Full(&'a mut Params),
    /// Only the adapter; the base weights are constants.
    Lora(&'a Params, &'a LoraSet),
}

/// AdamW with 5% linear warm-up and cosine decay to a tenth of the peak rate. Returns the mean
/// loss of the last tenth of the steps.
#[allow(clippy::too_many_arguments)]
fn train(
    cfg: &TinyConfig,
    phase: Phase<'_>,
    steps: usize,
    lr: f64,
    batch_size: usize,
    rng: &mut ChaCha8Rng,
    tok: &Tok,
    mut draw: impl FnMut(&mut ChaCha8Rng) -> (Example, bool),
) -> Result<f64> {
    let (params, lora, vars): (Params, Option<&LoraSet>, Vec<Var>) = match phase {
        Phase::Full(p) => {
            // Turn every weight into a variable; the map shares their storage, so the
            // optimiser's in-place updates are what the next forward reads.
            let mut vars = Vec::new();
            for t in p.values_mut() {
                let v = Var::from_tensor(t)?;
                *t = v.as_tensor().clone();
                vars.push(v);
            }
            (p.clone(), None, vars)
        }
        Phase::Lora(p, l) => (p.clone(), Some(l), l.vars()),
    };
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let warmup = (steps / 20).max(1);
    let mut tail = Vec::new();
    for step in 0..steps {
        let rate = if step < warmup {
            lr * (step + 1) as f64 / warmup as f64
        } else {
            let p = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
            lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
        };
        opt.set_learning_rate(rate);
        let mut seqs = Vec::with_capacity(batch_size);
        let mut from = Vec::with_capacity(batch_size);
        for _ in 0..batch_size {
            let (e, answers_only) = draw(rng);
            let answer = if answers_only {
                &e.answer
            } else {
                &e.format_answer
            };
            let (s, f) = tok.sequence(&e.input, answer)?;
            seqs.push(s);
            // The base learns the whole format (prompt too); experts only their answers.
            from.push(if answers_only { f } else { 1 });
        }
        let batch = Batch::new(&seqs, &from, tok.eos)?;
        let loss = batch.loss(cfg, &params, lora)?;
        opt.backward_step(&loss)?;
        if step >= steps - steps / 10 - 1 {
            tail.push(loss.to_scalar::<f32>()? as f64);
        }
    }
    Ok(tail.iter().sum::<f64>() / tail.len().max(1) as f64)
}

/// A deep copy (fresh storage, not variables): the next phase trains its own weights.
fn snapshot(p: &Params) -> Result<Params> {
    p.iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                Tensor::from_vec(t.flatten_all()?.to_vec1::<f32>()?, t.dims(), &Device::Cpu)?,
            ))
        })
        .collect()
}

fn write_model(
    dir: &Path,
    cfg: &TinyConfig,
    params: &Params,
    side: &[(&str, String)],
) -> Result<()> {
    let shapes = cfg.tensor_shapes();
    let planned: Vec<OutputTensor> = shapes
        .iter()
        .map(|(n, s)| OutputTensor {
            name: n.clone(),
            shape: s.clone(),
            dtype: DType::F32,
        })
        .collect();
    let w = CheckpointWriter::create(dir, &planned, u64::MAX, false)?;
    for (n, _) in &shapes {
        w.write(n, &params[n])?;
    }
    for (name, text) in side {
        w.add_file(name, text.as_bytes())?;
    }
    w.finish()?;
    Ok(())
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).expect("serialisable") + "\n"
}

/// Trains the whole family into `dir` (replacing what is there), logging each phase through
/// `log`. Deterministic: the same recipe gives byte-identical files.
pub fn build(dir: &Path, recipe: &Recipe) -> Result<()> {
    build_with_log(dir, recipe, &|m| eprintln!("demo: {m}"))
}

/// [`build`] with a caller-chosen log sink.
pub fn build_with_log(dir: &Path, recipe: &Recipe, log: &dyn Fn(&str)) -> Result<()> {
    let start = Instant::now();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("{}", parent.display()))?;
    // Built beside its final place and renamed at the end: an interrupted build leaves no
    // half-written family behind that a later run could mistake for a finished one.
    let tmp = tempfile::Builder::new()
        .prefix(".demo.partial-")
        .tempdir_in(parent)?;
    let out = tmp.path();

    let corpus = tasks::tokenizer_corpus(&mut stream(recipe, 1), 3000);
    let trained = tokenizer::train(&corpus, recipe.vocab_size)?;
    let id = |t: &str| {
        trained
            .token_to_id(t)
            .ok_or_else(|| anyhow!("special token {t} missing"))
    };
    let tok = Tok {
        bos: id(tokenizer::BOS)?,
        eos: id(tokenizer::EOS)?,
        tok: trained.clone(),
    };
    let tok_json = trained
        .to_string(true)
        .map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
    let cfg = TinyConfig {
        vocab_size: trained.get_vocab_size(true),
        hidden_size: recipe.hidden_size,
        intermediate_size: recipe.intermediate_size,
        num_layers: recipe.num_layers,
        num_heads: recipe.num_heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        bos_id: tok.bos,
        eos_id: tok.eos,
    };
    log(&format!(
        "tokenizer: {} tokens; model: {} layers × {} wide",
        cfg.vocab_size, cfg.num_layers, cfg.hidden_size
    ));
    let side = [
        ("config.json", pretty(&cfg.hf_config())),
        ("tokenizer.json", tok_json),
        (
            "tokenizer_config.json",
            pretty(&tokenizer::tokenizer_config()),
        ),
        (
            "generation_config.json",
            pretty(&serde_json::json!({
                "bos_token_id": tok.bos,
                "eos_token_id": tok.eos,
                "do_sample": false,
                "transformers_version": "4.39.0",
            })),
        ),
    ];

    // Base: every format, rule-free answers.
    let t = Instant::now();
    let mut base = init_weights(&cfg, &mut stream(recipe, 2))?;
    let loss = train(
        &cfg,
        Phase::Full(&mut base),
        recipe.base_steps,
        recipe.base_lr,
        recipe.batch_size,
        &mut stream(recipe, 3),
        &tok,
        |r| {
            let skill = Skill::ALL[rand::Rng::gen_range(r, 0..3)];
            (tasks::sample(skill, r), false)
        },
    )?;
    let base = snapshot(&base)?;
    write_model(&out.join(BASE), &cfg, &base, &side)?;
    log(&format!(
        "base: {} steps, loss {loss:.3}, {:.1}s",
        recipe.base_steps,
        t.elapsed().as_secs_f64()
    ));

    // Full fine-tunes, one skill each, from the base.
    for (name, skill, s) in [
        (EXPERT_LARGEST, Skill::Largest, 4),
        (EXPERT_REVERSE, Skill::Reverse, 5),
    ] {
        let t = Instant::now();
        let mut p = snapshot(&base)?;
        let loss = train(
            &cfg,
            Phase::Full(&mut p),
            recipe.expert_steps,
            recipe.expert_lr,
            recipe.batch_size,
            &mut stream(recipe, s),
            &tok,
            |r| (tasks::sample(skill, r), true),
        )?;
        write_model(&out.join(name), &cfg, &snapshot(&p)?, &side)?;
        log(&format!(
            "{name} expert: {} steps, loss {loss:.3}, {:.1}s",
            recipe.expert_steps,
            t.elapsed().as_secs_f64()
        ));
    }

    // LoRA expert.
    let t = Instant::now();
    let lora = LoraSet::init(
        &cfg,
        &base,
        recipe.lora_rank,
        recipe.lora_alpha,
        &mut stream(recipe, 6),
    )?;
    let loss = train(
        &cfg,
        Phase::Lora(&base, &lora),
        recipe.lora_steps,
        recipe.lora_lr,
        recipe.batch_size,
        &mut stream(recipe, 7),
        &tok,
        |r| (tasks::sample(Skill::Opposite, r), true),
    )?;
    write_lora(&out.join(LORA_OPPOSITE), &lora)?;
    log(&format!(
        "{LORA_OPPOSITE} (rank {}): {} steps, loss {loss:.3}, {:.1}s",
        recipe.lora_rank,
        recipe.lora_steps,
        t.elapsed().as_secs_f64()
    ));

    // Data, from streams of their own (disjoint from every training stream).
    let val = out.join("data").join("validation");
    std::fs::create_dir_all(&val)?;
    for (i, skill) in Skill::ALL.into_iter().enumerate() {
        let mut r = stream(recipe, 100 + i as u64);
        let rows: Vec<Example> = (0..recipe.validation_rows)
            .map(|_| tasks::sample(skill, &mut r))
            .collect();
        tasks::write_validation(&crate::validation_csv(out, skill), &rows)?;
    }
    let mut r = stream(recipe, 200);
    let rows: Vec<Example> = (0..recipe.test_rows)
        .map(|i| tasks::sample(Skill::ALL[i % 3], &mut r))
        .collect();
    tasks::write_test(&crate::test_csv(out), &crate::test_labels_csv(out), &rows)?;

    let stamp = Stamp {
        hash: recipe.hash(),
        recipe: recipe.clone(),
        seconds: start.elapsed().as_secs_f64(),
    };
    std::fs::write(out.join(STAMP), serde_json::to_string_pretty(&stamp)?)?;
    let built = tmp.keep();
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::rename(&built, dir)
        .with_context(|| format!("moving the family to {}", dir.display()))?;
    log(&format!(
        "family built in {:.1}s at {}",
        stamp.seconds,
        dir.display()
    ));
    Ok(())
}

/// Writes the adapter in PEFT's layout: `adapter_config.json` and `adapter_model.safetensors`
/// with `base_model.model.<module>.lora_{A,B}.weight` keys.
fn write_lora(dir: &Path, lora: &LoraSet) -> Result<()> {
    let mut tensors = Vec::new();
    let mut targets = std::collections::BTreeSet::new();
    for (m, f) in &lora.modules {
        targets.insert(m.rsplit('.').next().unwrap_or(m).to_string());
        let copy = |v: &Var| -> Result<Tensor> {
            let t = v.as_tensor();
            Ok(Tensor::from_vec(
                t.flatten_all()?.to_vec1::<f32>()?,
                t.dims(),
                &Device::Cpu,
            )?)
        };
        tensors.push((format!("base_model.model.{m}.lora_A.weight"), copy(&f.a)?));
        tensors.push((format!("base_model.model.{m}.lora_B.weight"), copy(&f.b)?));
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": format!("demo:{BASE}"),
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets.into_iter().collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "modules_to_save": null,
        "inference_mode": true,
    });
    merge_core::adapter::write_adapter(dir, &config, &tensors, DType::F32, false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;
    use eval_harness::models::{CheckpointSource, Decoder};

    fn tiny() -> TinyConfig {
        TinyConfig {
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            bos_id: 1,
            eos_id: 2,
        }
    }

    /// Hidden states → logits of the harness's decoder for one unpadded row.
    fn harness_logits(dir: &Path, adapter: Option<&Path>, ids: &[u32]) -> Vec<Vec<f32>> {
        let vb = CheckpointSource::open(dir, adapter)
            .unwrap()
            .into_var_builder(DType::F32, &Device::Cpu);
        let d = Decoder::load(dir, vb).unwrap();
        let mut cache = d.new_cache();
        let h = d
            .forward(&[ids.to_vec()], &[vec![true; ids.len()]], &mut cache)
            .unwrap();
        d.logits(&h).unwrap().i(0).unwrap().to_vec2().unwrap()
    }

    fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The training forward and the eval harness's decoder compute the same logits for the
    /// same weights, with and without a LoRA adapter (which the harness folds into the
    /// weights, PEFT's way): what training optimises is what evaluation measures.
    #[test]
    fn training_forward_matches_the_harness() {
        let cfg = tiny();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let params = init_weights(&cfg, &mut rng).unwrap();
        // Norm weights away from 1 so a wrong norm formula shows.
        let mut params = params;
        for (n, t) in params.iter_mut() {
            if n.ends_with("norm.weight") {
                *t = (t.clone() * 1.3).unwrap();
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        // The harness loads a model directory with its tokenizer; any will do here.
        let tok = crate::tokenizer::train(&["a b c".to_string()], cfg.vocab_size).unwrap();
        let side = [
            ("config.json", pretty(&cfg.hf_config())),
            ("tokenizer.json", tok.to_string(false).unwrap()),
            (
                "tokenizer_config.json",
                pretty(&crate::tokenizer::tokenizer_config()),
            ),
        ];
        write_model(&dir, &cfg, &params, &side).unwrap();
        let ids: Vec<u32> = vec![1, 5, 9, 33, 12, 7, 7, 20, 3, 39, 2];
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let ours: Vec<Vec<f32>> = crate::model::forward(&cfg, &params, None, &input)
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let theirs = harness_logits(&dir, None, &ids);
        let d = max_diff(&ours, &theirs);
        assert!(d < 1e-4, "full model: max |diff| {d}");

        let lora = LoraSet::init(&cfg, &params, 4, 8.0, &mut rng).unwrap();
        for f in lora.modules.values() {
            let (o, r) = f.b.as_tensor().dims2().unwrap();
            let b = Tensor::from_vec(uniform(&mut rng, o * r, 0.3), (o, r), &Device::Cpu).unwrap();
            f.b.set(&b).unwrap();
        }
        let adapter = tmp.path().join("adapter");
        write_lora(&adapter, &lora).unwrap();
        let ours: Vec<Vec<f32>> = crate::model::forward(&cfg, &params, Some(&lora), &input)
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let theirs = harness_logits(&dir, Some(&adapter), &ids);
        let d = max_diff(&ours, &theirs);
        assert!(d < 1e-4, "with LoRA: max |diff| {d}");
        // The adapter changes the logits: the comparison above is not vacuous.
        let plain = harness_logits(&dir, None, &ids);
        assert!(max_diff(&plain, &theirs) > 1e-2);
    }
}
