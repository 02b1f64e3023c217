//! Calibration rows for data-dependent merges, shared by `llm-merging stats` (RegMean) and the
//! layer-wise driver of `regmean_plus`, so both read, tokenize, pad and count them alike:
//! each row's `input` is tokenized as the evaluation prompts it, rows are right-padded into
//! batches, and [`GramSums`] sums XᵀX of every block linear layer's inputs over the real
//! (non-padding) tokens.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use eval_harness::dataset::{self, Example};
use eval_harness::models::linear::InputObserver;
use eval_harness::{EvalOptions, LanguageModel};

/// Rows per forward pass when none is given (`llm-merging stats --batch-size`, and always
/// for `regmean_plus`: the batch size changes speed and memory, not the statistics).
pub const DEFAULT_BATCH_SIZE: usize = 8;

/// The calibration rows: the first `limit` of `data` (an error when there are none).
pub fn rows(data: &Path, limit: Option<usize>) -> Result<Vec<Example>> {
    let ds = dataset::load(data).with_context(|| format!("reading {}", data.display()))?;
    let mut rows = ds.examples;
    rows.truncate(limit.unwrap_or(usize::MAX));
    if rows.is_empty() {
        bail!("{}: no calibration rows", data.display());
    }
    Ok(rows)
}

/// Each row's prompt tokens, as the evaluation tokenizes it with `model`'s tokenizer.
pub fn tokenize(model: &dyn LanguageModel, rows: &[Example], data: &Path) -> Result<Vec<Vec<u32>>> {
    let opts = EvalOptions::default();
    rows.iter()
        .map(|e| {
            let (_, ids) = eval_harness::evaluate::prompt_ids(model, e, &opts)
                .with_context(|| format!("{}: row `{}`", data.display(), e.id))?;
            Ok(ids)
        })
        .collect()
}

/// One batch: the token rows, right-padded to one length, and per position whether it is a
/// real token.
pub type Batch = (Vec<Vec<u32>>, Vec<Vec<bool>>);

/// Weight name → key of its Gram matrix, and key → the matrix.
pub type Grams = (BTreeMap<String, String>, HashMap<String, Tensor>);

/// Rows right-padded with `pad` to the longest of their batch: `(ids, valid)` per batch.
pub fn batches(tokenized: &[Vec<u32>], batch_size: usize, pad: u32) -> Vec<Batch> {
    tokenized
        .chunks(batch_size)
        .map(|batch| {
            let width = batch.iter().map(Vec::len).max().unwrap_or(0);
            let ids = batch
                .iter()
                .map(|r| {
                    (0..width)
                        .map(|j| r.get(j).copied().unwrap_or(pad))
                        .collect()
                })
                .collect();
            let valid = batch
                .iter()
                .map(|r| (0..width).map(|j| j < r.len()).collect())
                .collect();
            (ids, valid)
        })
        .collect()
}

/// Modules that read the same input as another module: k and v read q's. (Stacked gate/up
/// is one layer and arrives as one call.)
fn shares_input_with(module: &str) -> Option<String> {
    ["k_proj", "v_proj"]
        .iter()
        .find_map(|m| module.strip_suffix(m))
        .map(|prefix| format!("{prefix}q_proj"))
}

/// One distinct input: the modules reading it and the sum of XᵀX so far.
type InputSum = (BTreeSet<String>, Option<Tensor>);

/// Sums XᵀX per distinct linear-layer input over the tokens [`GramSums::set_valid`] marks.
#[derive(Default)]
pub struct GramSums {
    /// The batch in flight: per flattened position (row-major `[batch, t]`), a real token?
    valid: Mutex<Vec<bool>>,
    /// First module reading an input → (the modules reading it, the sum so far).
    sums: Mutex<BTreeMap<String, InputSum>>,
}

impl GramSums {
    /// The real tokens of the next batch (`[batch][t]`).
    pub fn set_valid(&self, valid: &[Vec<bool>]) {
        *self.valid.lock().expect("not poisoned") = valid.concat();
    }

    /// The sums so far, emptied: weight name → key of its matrix (the first weight reading
    /// that input), and key → the f32 sum on the CPU.
    pub fn take(&self) -> Result<Grams> {
        let sums = std::mem::take(&mut *self.sums.lock().expect("not poisoned"));
        let mut grams = BTreeMap::new();
        let mut tensors = HashMap::new();
        for (first, (modules, sum)) in sums {
            let key = format!("{first}.weight");
            let sum = sum.with_context(|| format!("no input reached {first}"))?;
            for m in modules {
                grams.insert(format!("{m}.weight"), key.clone());
            }
            tensors.insert(key, sum.to_device(&Device::Cpu)?);
        }
        Ok((grams, tensors))
    }
}

impl InputObserver for GramSums {
    fn observe(&self, modules: &[&str], x: &Tensor) -> eval_harness::Result<()> {
        if let Some(first) = shares_input_with(modules[0]) {
            let mut sums = self.sums.lock().expect("not poisoned");
            let entry = sums.entry(first).or_default();
            entry.0.extend(modules.iter().map(|m| m.to_string()));
            return Ok(());
        }
        let d = x.dim(D::Minus1)?;
        let x = x.reshape(((), d))?;
        let rows: Vec<u32> = {
            let valid = self.valid.lock().expect("not poisoned");
            if valid.len() != x.dim(0)? {
                return Err(eval_harness::Error::Msg(format!(
                    "calibration: {} inputs to {} for a batch of {} positions",
                    x.dim(0)?,
                    modules[0],
                    valid.len()
                )));
            }
            (0..valid.len() as u32)
                .filter(|&i| valid[i as usize])
                .collect()
        };
        let index = Tensor::new(rows.as_slice(), x.device())?;
        let xs = x.index_select(&index, 0)?.to_dtype(DType::F32)?;
        let gram = xs.t()?.matmul(&xs)?;
        let mut sums = self.sums.lock().expect("not poisoned");
        let entry = sums.entry(modules[0].to_string()).or_default();
        entry.0.extend(modules.iter().map(|m| m.to_string()));
        entry.1 = Some(match entry.1.take() {
            Some(sum) => (sum + gram)?,
            None => gram,
        });
        Ok(())
    }
}
