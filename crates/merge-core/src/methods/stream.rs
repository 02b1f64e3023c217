//! Streaming: methods that read their inputs a chunk at a time, straight from the checkpoint
//! files, and hand each finished chunk of output to the writer. No tensor-sized buffer is
//! allocated, so memory stays at a few chunks per thread whatever the tensor's size, and
//! every tensor (the embedding too) splits over all cores.
//!
//! A method opts in by implementing [`super::MergeMethod::merge_streaming`]; for an
//! elementwise method that is one call to [`stream_chunks`] with a kernel that fills one
//! output chunk from the matching input chunks (see `linear.rs`). Methods that need whole
//! tensors keep [`super::MergeMethod::merge`] only.

use std::any::Any;
use std::cell::Cell;
use std::sync::{Arc, Mutex};

use candle_core::Result;
use rayon::prelude::*;

use super::memo::MemoFor;
use super::Params;
use crate::checkpoint::MappedTensor;

/// Elements per chunk (256 KB of f32): large enough that per-chunk overhead vanishes, small
/// enough that a chunk's buffers stay in cache between reading and writing. A multiple of the sparsifiers' random
/// and selection chunks, so chunked results equal whole-tensor ones.
pub const STREAM_CHUNK: usize = 1 << 16;

/// Where one input tensor is read from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// Stored in a memory-mapped safetensors file (any float dtype, converted on reading).
    Mapped(MappedTensor<'a>),
    /// Already in memory as f32 (adapters applied, `.bin` checkpoints, tests).
    F32(&'a [f32]),
}

impl Source<'_> {
    /// Elements `first .. first + out.len()` (flattened, row-major) as f32.
    pub fn read(&self, first: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Source::Mapped(m) => m.read_f32(first, out).map_err(candle_core::Error::msg),
            Source::F32(s) => {
                out.copy_from_slice(&s[first..first + out.len()]);
                Ok(())
            }
        }
    }
}

/// Where a streaming method puts finished output: `write(first, data)` stores elements
/// `first .. first + data.len()` of the flattened output tensor. Called from many threads
/// at once, for disjoint ranges.
pub trait ChunkSink: Sync {
    /// Store one range of the output.
    fn write(&self, first: usize, data: &[f32]) -> Result<()>;
}

/// A sink that collects the output in memory (for [`super::MergeMethod::merge`]
/// implemented on top of streaming).
pub struct VecSink(Mutex<Vec<f32>>);

impl VecSink {
    /// A zeroed output of `n` elements.
    pub fn new(n: usize) -> Self {
        VecSink(Mutex::new(vec![0.0; n]))
    }

    /// The collected output.
    pub fn into_inner(self) -> Vec<f32> {
        self.0.into_inner().expect("not poisoned")
    }
}

impl ChunkSink for VecSink {
    fn write(&self, first: usize, data: &[f32]) -> Result<()> {
        self.0.lock().expect("not poisoned")[first..first + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// What a streaming method gets for one tensor.
pub struct StreamInputs<'a> {
    /// Output tensor name.
    pub name: &'a str,
    /// Shape of every input and of the output.
    pub shape: &'a [usize],
    /// The base model's tensor, when the config names a base.
    pub base: Option<Source<'a>>,
    /// The input models' tensors, in config order.
    pub models: &'a [Source<'a>],
    /// Global parameters.
    pub params: &'a Params,
    /// Per-model parameters, in config order.
    pub model_params: &'a [Params],
    /// Seed for this tensor (the config seed mixed with the tensor name).
    pub seed: u64,
    /// The session's store of values computed from these inputs alone, when the merge runs in
    /// a session that merges the same models again (a search); see [`Self::recall`].
    pub memo: Option<MemoFor<'a>>,
}

impl StreamInputs<'_> {
    /// The value of kind `what` that an earlier merge of this session computed for this
    /// tensor from the base and model `model` alone ([`Self::keep`]), if any. Only for values
    /// that depend on nothing else (not on parameters).
    pub fn recall<T: Any + Send + Sync>(&self, what: &'static str, model: usize) -> Option<Arc<T>> {
        let m = self.memo?;
        m.memo.get(&m.key(what, self.name, model))
    }

    /// Keep `value` (computed from the base and model `model` alone) for later merges of this
    /// session; a no-op outside one.
    pub fn keep<T: Any + Send + Sync>(&self, what: &'static str, model: usize, value: Arc<T>) {
        if let Some(m) = self.memo {
            m.memo.insert(m.key(what, self.name, model), value);
        }
    }

    /// Number of elements of the tensor.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of chunks of [`STREAM_CHUNK`] elements (the last may be shorter).
    pub fn n_chunks(&self) -> usize {
        self.len().div_ceil(STREAM_CHUNK)
    }

    /// A global number parameter (declared by the method, so always present).
    pub fn param(&self, name: &str) -> f64 {
        self.params.number(name)
    }

    /// A global flag parameter (declared by the method, so always present).
    pub fn flag(&self, name: &str) -> bool {
        self.params.flag(name)
    }

    /// A per-model number parameter of model `i`.
    pub fn model_param(&self, i: usize, name: &str) -> f64 {
        self.model_params[i].number(name)
    }
}

/// One chunk of every input, as f32, in buffers the kernel may overwrite.
pub struct Chunk<'b> {
    /// Chunk number (0, 1, …).
    pub index: usize,
    /// Index of the chunk's first element in the flattened tensor.
    pub first: usize,
    /// The base's elements, when there is a base.
    pub base: Option<&'b mut [f32]>,
    /// Each model's elements, in config order.
    pub models: Vec<&'b mut [f32]>,
}

thread_local! {
    /// Per-thread chunk buffers, reused from chunk to chunk and tensor to tensor.
    static BUFFERS: Cell<Vec<Vec<f32>>> = const { Cell::new(Vec::new()) };
}

/// Run `f` on chunk `index` of every input, read into this thread's reused buffers (plus one
/// more buffer of the chunk's length for output).
fn with_chunk<R>(
    x: &StreamInputs,
    index: usize,
    f: impl FnOnce(Chunk, &mut [f32]) -> Result<R>,
) -> Result<R> {
    let first = index * STREAM_CHUNK;
    let len = STREAM_CHUNK.min(x.len() - first);
    let n_in = x.models.len() + usize::from(x.base.is_some());
    // Taken out of the thread-local for the duration, so nothing (not even a rayon job run
    // by this thread meanwhile) can see the buffers in use; put back afterwards.
    let mut bufs = BUFFERS.with(|b| b.take());
    if bufs.len() < n_in + 1 {
        bufs.resize_with(n_in + 1, Vec::new);
    }
    for b in bufs.iter_mut() {
        if b.len() < len {
            b.resize(len, 0.0);
        }
    }
    let result = (|| {
        let (out, inputs) = bufs.split_first_mut().expect("one buffer at least");
        let mut inputs = inputs.iter_mut();
        let base = match x.base {
            Some(s) => {
                let buf = &mut inputs.next().expect("sized above")[..len];
                s.read(first, buf)?;
                Some(buf)
            }
            None => None,
        };
        let mut models = Vec::with_capacity(x.models.len());
        for (s, buf) in x.models.iter().zip(inputs) {
            let buf = &mut buf[..len];
            s.read(first, buf)?;
            models.push(buf);
        }
        f(
            Chunk {
                index,
                first,
                base,
                models,
            },
            &mut out[..len],
        )
    })();
    BUFFERS.with(|b| b.set(bufs));
    result
}

/// Read every chunk of the inputs (in parallel) and map it with `f`; the results in chunk
/// order. For methods that need a statistic of the whole tensor (a magnitude threshold)
/// before they stream the output.
pub fn map_chunks<T: Send>(x: &StreamInputs, f: impl Fn(Chunk) -> T + Sync) -> Result<Vec<T>> {
    (0..x.n_chunks())
        .into_par_iter()
        .map(|i| with_chunk(x, i, |c, _| Ok(f(c))))
        .collect()
}

/// Read every chunk of the inputs (in parallel) and fold them into one value: `fold` adds a
/// chunk to an accumulator started by `identity`, `reduce` merges two accumulators.
pub fn fold_chunks<T: Send>(
    x: &StreamInputs,
    identity: impl Fn() -> T + Sync + Send,
    fold: impl Fn(T, Chunk) -> T + Sync + Send,
    reduce: impl Fn(T, T) -> T + Sync + Send,
) -> Result<T> {
    (0..x.n_chunks())
        .into_par_iter()
        .try_fold(&identity, |acc, i| {
            with_chunk(x, i, |c, _| Ok(fold(acc, c)))
        })
        .try_reduce(&identity, |a, b| Ok(reduce(a, b)))
}

/// Stream the output: for every chunk (in parallel), `kernel` fills the output chunk from
/// the input chunk, which then goes to `sink`. The kernel runs on one thread per chunk (it
/// must not start parallel work itself).
pub fn stream_chunks(
    x: &StreamInputs,
    sink: &dyn ChunkSink,
    kernel: impl Fn(Chunk, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    (0..x.n_chunks()).into_par_iter().try_for_each(|i| {
        with_chunk(x, i, |c, out| {
            let first = c.first;
            kernel(c, out)?;
            sink.write(first, out)
        })
    })
}
