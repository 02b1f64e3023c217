//! Executing a plan: every tensor in parallel, streamed a chunk at a time where the method
//! can, else merged whole (on the chosen device), within a memory budget, into an [`Output`].

use std::sync::{Condvar, Mutex};

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::inputs::{InputModel, Inputs};
use super::output::Output;
use super::plan::{MergePlan, PlannedTensor};
use crate::checkpoint::{MappedTensor, OutputTensor};
use crate::error::{Error, Result};
use crate::methods::{ChunkSink, MemoFor, Source, StreamInputs, StreamMemo, TensorInputs};
use crate::tensor::with_f32_slices;

/// How to execute: the memory budget, the device for whole-tensor methods, a progress bar,
/// and the session's memo where the same models are merged again (in memory).
pub(crate) struct Exec<'m> {
    pub max_memory: Option<u64>,
    pub device: Device,
    pub progress: bool,
    pub memo: Option<&'m StreamMemo>,
}

/// A byte budget for tensors in flight, shared by worker threads.
///
/// A thread that already holds part of the budget never waits for more: while it waits
/// for parallel work inside a tensor, rayon may run another tensor's job on it, and that job
/// waiting for budget this very thread holds would never wake. It goes over budget instead
/// (by one tensor at most per nesting level).
pub(crate) struct MemoryBudget {
    free: Mutex<i64>,
    total: u64,
    cv: Condvar,
}

thread_local! {
    /// How many (non-empty) acquisitions this thread holds.
    static HOLDING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl MemoryBudget {
    pub(crate) fn new(max_memory: Option<u64>) -> Self {
        let total = max_memory.unwrap_or_else(|| total_ram().map_or(4 << 30, |r| r / 4));
        MemoryBudget {
            free: Mutex::new(total.min(i64::MAX as u64) as i64),
            total,
            cv: Condvar::new(),
        }
    }

    /// Wait until `n` bytes are free (a request larger than the budget waits for all of it).
    pub(crate) fn acquire(&self, n: u64) -> u64 {
        let n = n.min(self.total);
        let need = n as i64;
        let mut free = self.free.lock().expect("not poisoned");
        if HOLDING.get() == 0 {
            while *free < need {
                free = self.cv.wait(free).expect("not poisoned");
            }
        }
        *free -= need;
        if n > 0 {
            HOLDING.set(HOLDING.get() + 1);
        }
        n
    }

    pub(crate) fn release(&self, n: u64) {
        if n > 0 {
            HOLDING.set(HOLDING.get() - 1);
        }
        *self.free.lock().expect("not poisoned") += n as i64;
        self.cv.notify_all();
    }
}

/// Total RAM from /proc/meminfo (Linux), for the default budget.
fn total_ram() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Seed for one tensor: the config seed mixed with the tensor name (FNV-1a), so the result
/// does not depend on the order tensors are processed in.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Make glibc keep freed large blocks for reuse instead of returning them to the kernel.
///
/// Why: a merge allocates and frees several tensor-sized buffers per tensor (tens to
/// hundreds of MB each). glibc serves blocks above 32 MB with a fresh `mmap` every time, so
/// the kernel zero-fills every page again on first touch and unmaps it on free; profiles of a
/// 1.1B-parameter merge showed page faults and zeroing taking over half of the run. With
/// mmap off and trimming effectively off, the heap keeps the pages of the largest buffers in
/// flight (which the memory budget already bounds) and reuses them. Process-wide and
/// idempotent; a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator tuning parameters; it is safe to call
            // at any time, from any thread.
            unsafe {
                libc::mallopt(libc::M_MMAP_MAX, 0);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        });
    }
}

/// Execute `plan` over `inputs` into `out`.
pub(crate) fn execute(
    plan: &MergePlan,
    inputs: &Inputs,
    out: &dyn Output,
    exec: &Exec,
) -> Result<()> {
    keep_freed_memory();
    let budget = MemoryBudget::new(exec.max_memory);
    let n_inputs = inputs.models.len() as u64 + u64::from(inputs.base.is_some());
    let progress = if exec.progress {
        indicatif::ProgressBar::new(plan.tensors.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "merging {bar:40} {pos}/{len} tensors {elapsed}<{eta}",
        )
        .expect("valid template"),
    );
    // Methods that stream always do, on the CPU, whatever the device: they are bound by reading
    // and writing checkpoints, and on a GPU machine (an H100 with 16 cores, scripts/gpu-check.sh)
    // a linear merge took 7.2 s through the GPU against 2.9 s on the CPU. The device serves the
    // methods that work on whole tensors.
    plan.tensors.par_iter().try_for_each(|p| -> Result<()> {
        let name = p.out.name.as_str();
        let numel = p.out.shape.iter().product::<usize>() as u64;
        let held_out = out.held_bytes(&p.out);
        let result = if p.copy {
            let held = budget.acquire(numel * p.out.dtype.size_in_bytes() as u64 * 2 + held_out);
            let r = inputs
                .reference
                .load(name)
                .and_then(|t| out.write(&p.out, &t));
            budget.release(held);
            r
        } else {
            match merge_streaming(plan, p, inputs, out, &budget, exec.memo)? {
                Streamed::Written => Ok(()),
                Streamed::Declined(loaded) => {
                    // f32 copies of every input plus what the method allocates.
                    let scratch = plan.method.scratch_tensors(inputs.models.len()) as u64;
                    let held = budget.acquire(numel * 4 * (n_inputs + scratch) + held_out);
                    let r = merge_whole(plan, p, inputs, loaded, out, &exec.device);
                    budget.release(held);
                    r
                }
            }
        };
        progress.inc(1);
        result
    })?;
    progress.finish_and_clear();
    Ok(())
}

/// The sink of a streaming method: chunks go to the output as they are finished.
struct StreamSink<'a> {
    out: &'a dyn Output,
    tensor: &'a OutputTensor,
    /// The first write error, reported as itself rather than through the method's error.
    error: Mutex<Option<Error>>,
}

impl ChunkSink for StreamSink<'_> {
    fn write(&self, first: usize, data: &[f32]) -> candle_core::Result<()> {
        self.out.write_range(self.tensor, first, data).map_err(|e| {
            let message = e.to_string();
            self.error.lock().expect("not poisoned").get_or_insert(e);
            candle_core::Error::msg(message)
        })
    }
}

fn method_error(plan: &MergePlan, name: &str, e: impl std::fmt::Display) -> Error {
    Error::method(plan.method.name(), format!("tensor `{name}`: {e}"))
}

/// What [`merge_streaming`] did with a tensor.
enum Streamed {
    /// The method streamed it: the tensor is written.
    Written,
    /// The method handles these parameters only whole. Per input (base first): its f32
    /// tensor on the CPU where it was already loaded for the attempt, so it is not loaded twice.
    Declined(Vec<Option<Tensor>>),
}

/// Merge one tensor with the method's streaming path, when it has one for these parameters:
/// inputs stored in safetensors files are read a chunk at a time from the memory map; the
/// others (adapters applied, `.bin` checkpoints) are loaded whole in f32 first.
fn merge_streaming(
    plan: &MergePlan,
    p: &PlannedTensor,
    inputs: &Inputs,
    out: &dyn Output,
    budget: &MemoryBudget,
    memo: Option<&StreamMemo>,
) -> Result<Streamed> {
    let name = p.out.name.as_str();
    let numel = p.out.shape.iter().product::<usize>() as u64;
    let all: Vec<&InputModel> = inputs.base.iter().chain(&inputs.models).collect();
    let mapped: Vec<Option<MappedTensor>> = all
        .iter()
        .map(|m| match m {
            InputModel::Full(c) => c.mapped(name),
            InputModel::Adapted { .. } => None,
        })
        .collect();
    for m in mapped.iter().flatten() {
        m.prefetch();
    }
    let n_loaded = mapped.iter().filter(|m| m.is_none()).count() as u64;
    let held = budget.acquire(numel * 4 * n_loaded + out.held_bytes(&p.out));
    let result = (|| -> Result<Streamed> {
        let mut loaded = Vec::new();
        for (m, mapped) in all.iter().zip(&mapped) {
            if mapped.is_none() {
                loaded.push(m.load_f32(name, &Device::Cpu)?);
            }
        }
        let loaded_refs: Vec<&Tensor> = loaded.iter().collect();
        let sink = StreamSink {
            out,
            tensor: &p.out,
            error: Mutex::new(None),
        };
        let streamed = with_f32_slices(&loaded_refs, |slices| {
            let mut slices = slices.iter();
            let mut sources: Vec<Source> = mapped
                .iter()
                .map(|m| match m {
                    Some(m) => Source::Mapped(*m),
                    None => Source::F32(slices.next().expect("one per unmapped input")),
                })
                .collect();
            let base = if inputs.base.is_some() {
                Some(sources.remove(0))
            } else {
                None
            };
            let ids: Vec<_> = inputs.models.iter().map(InputModel::identity).collect();
            let x = StreamInputs {
                name,
                shape: &p.out.shape,
                base,
                models: &sources,
                params: &p.params,
                model_params: &p.model_params,
                seed: tensor_seed(plan.seed, name),
                memo: memo
                    .map(|m| MemoFor::new(m, inputs.base.as_ref().map(InputModel::identity), &ids)),
            };
            Ok(plan.method.merge_streaming(&x, &sink))
        })
        .map_err(|e| Error::tensor(name, e))?;
        match streamed {
            None => {
                let mut loaded = loaded.into_iter();
                Ok(Streamed::Declined(
                    mapped
                        .iter()
                        .map(|m| if m.is_none() { loaded.next() } else { None })
                        .collect(),
                ))
            }
            Some(Ok(())) => {
                out.finish(&p.out)?;
                Ok(Streamed::Written)
            }
            Some(Err(e)) => Err(match sink.error.into_inner().expect("not poisoned") {
                Some(io) => io,
                None => method_error(plan, name, e),
            }),
        }
    })();
    budget.release(held);
    result
}

/// Merge one tensor from whole f32 tensors with [`MergeMethod::merge`]; `loaded` holds, per
/// input (base first), the f32 tensor already on the CPU, if any.
fn merge_whole(
    plan: &MergePlan,
    p: &PlannedTensor,
    inputs: &Inputs,
    loaded: Vec<Option<Tensor>>,
    out: &dyn Output,
    device: &Device,
) -> Result<()> {
    let name = p.out.name.as_str();
    let mut tensors = inputs
        .base
        .iter()
        .chain(&inputs.models)
        .zip(loaded)
        .map(|(m, t)| match t {
            Some(t) => t.to_device(device).map_err(|e| Error::tensor(name, e)),
            None => m.load_f32(name, device),
        })
        .collect::<Result<Vec<Tensor>>>()?;
    let base = inputs.base.is_some().then(|| tensors.remove(0));
    let models = tensors;
    let grams = if p.grams {
        Some(mean_grams(plan, name, device)?)
    } else {
        None
    };
    let merged = plan
        .method
        .merge(&TensorInputs {
            name,
            base: base.as_ref(),
            models: &models,
            params: &p.params,
            model_params: &p.model_params,
            seed: tensor_seed(plan.seed, name),
            grams: grams.as_deref(),
        })
        .map_err(|e| method_error(plan, name, e))?;
    drop((base, models, grams));
    if merged.dims() != p.out.shape.as_slice() {
        return Err(method_error(
            plan,
            name,
            format!(
                "produced shape {:?}, expected {:?}",
                merged.dims(),
                p.out.shape
            ),
        ));
    }
    out.write(&p.out, &merged)
}

/// Per model, the Gram matrix of weight `name`'s inputs divided by its token count (the mean
/// over the calibration tokens), on `device`.
fn mean_grams(plan: &MergePlan, name: &str, device: &Device) -> Result<Vec<Tensor>> {
    plan.stats
        .iter()
        .map(|s| {
            let tokens = s.meta.tokens.max(1) as f64;
            let g = s.load(name, device)?;
            (g / tokens).map_err(|e| Error::tensor(name, e))
        })
        .collect()
}
