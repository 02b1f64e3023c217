//! One tensor's task vectors as sources of chunks: each expert's δ = expert − base for elements
//! `first .. first + len`, read straight from the checkpoint files (or computed from a LoRA
//! adapter's factors), so no tensor-sized buffer exists for full experts or adapters.
//!
//! A LoRA expert's ΔW = scale · L · R (L = B, R = A; transposed for embeddings and
//! `fan_in_fan_out`: L = Aᵀ, R = Bᵀ) is never formed: a chunk's elements are rank-r dot
//! products of L's rows and R's columns, and its squared norm and its inner products with
//! other adapters come from r × r Gram matrices (‖LR‖² = Σ (LᵀL) ∘ (RRᵀ)), O(r²(m+n)) instead
//! of O(r·m·n).

use candle_core::{Device, Tensor};
use merge_core::checkpoint::{Checkpoint, MappedTensor};

use crate::error::{Error, Result};
use crate::experts::{Expert, ExpertModel};

/// A stored tensor readable a range of elements at a time, as f32.
pub(crate) enum Stored<'a> {
    /// In a memory-mapped safetensors file.
    Mapped(MappedTensor<'a>),
    /// Loaded whole (PyTorch `.bin` checkpoints, non-mappable dtypes).
    Owned(Vec<f32>),
}

impl<'a> Stored<'a> {
    pub(crate) fn open(c: &'a Checkpoint, name: &str) -> Result<Self> {
        if let Some(m) = c.mapped(name) {
            return Ok(Stored::Mapped(m));
        }
        let t = c.load_f32(name, &Device::Cpu)?;
        Ok(Stored::Owned(to_vec(&t, name)?))
    }

    fn read(&self, name: &str, first: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Stored::Mapped(m) => m.read_f32(first, out).map_err(|e| Error::tensor(name, e)),
            Stored::Owned(v) => {
                out.copy_from_slice(&v[first..first + out.len()]);
                Ok(())
            }
        }
    }
}

fn to_vec(t: &Tensor, name: &str) -> Result<Vec<f32>> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| Error::tensor(name, e))
}

/// ΔW = scale · L · R, with L rows × rank and R rank × cols (row-major).
pub(crate) struct LowRank {
    left: Vec<f32>,
    right: Vec<f32>,
    rank: usize,
    cols: usize,
    scale: f32,
}

impl LowRank {
    /// Elements `first .. first + out.len()` of the flattened ΔW: for each row segment, the
    /// rank-r combination of R's rows, then the scale (ΔW's order: (B·A)·scale).
    fn fill(&self, first: usize, out: &mut [f32]) {
        let (r, cols) = (self.rank, self.cols);
        let mut idx = first;
        let mut done = 0;
        while done < out.len() {
            let (row, c0) = (idx / cols, idx % cols);
            let width = (cols - c0).min(out.len() - done);
            let seg = &mut out[done..done + width];
            seg.fill(0.0);
            for k in 0..r {
                let a = self.left[row * r + k];
                let start = k * cols + c0;
                for (s, x) in seg.iter_mut().zip(&self.right[start..start + width]) {
                    *s += a * x;
                }
            }
            for s in seg.iter_mut() {
                *s *= self.scale;
            }
            idx += width;
            done += width;
        }
    }

    /// ⟨self, other⟩ = s₁s₂ Σ (L₁ᵀL₂) ∘ (R₁R₂ᵀ), in f64 (the squared norm for `other = self`).
    pub(crate) fn inner(&self, other: &LowRank) -> f64 {
        let (r1, r2) = (self.rank, other.rank);
        let rows = self.left.len() / r1;
        let cols = self.cols;
        let mut gl = vec![0f64; r1 * r2];
        for i in 0..rows {
            let (a, b) = (
                &self.left[i * r1..(i + 1) * r1],
                &other.left[i * r2..(i + 1) * r2],
            );
            for k in 0..r1 {
                for l in 0..r2 {
                    gl[k * r2 + l] += f64::from(a[k]) * f64::from(b[l]);
                }
            }
        }
        let mut total = 0f64;
        for k in 0..r1 {
            let a = &self.right[k * cols..(k + 1) * cols];
            for l in 0..r2 {
                let b = &other.right[l * cols..(l + 1) * cols];
                let gr: f64 = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| f64::from(*x) * f64::from(*y))
                    .sum();
                total += gl[k * r2 + l] * gr;
            }
        }
        total * f64::from(self.scale) * f64::from(other.scale)
    }
}

/// One expert's task vector of one tensor.
pub(crate) enum TaskVector<'a> {
    /// A full expert: its stored tensor, minus the base's.
    Difference(Stored<'a>),
    /// An adapter's `modules_to_save` replacement, minus the base's tensor.
    Replacement(Vec<f32>),
    /// An adapted module: ΔW from the factors.
    LowRank(LowRank),
    /// A tensor the adapter leaves alone.
    Zero,
}

impl<'a> TaskVector<'a> {
    /// `expert`'s task vector of tensor `name`.
    pub(crate) fn open(expert: &'a Expert, name: &str) -> Result<Self> {
        match &expert.model {
            ExpertModel::Full(c) => Ok(TaskVector::Difference(Stored::open(c, name)?)),
            ExpertModel::Lora(adapter) => {
                if let Some(t) = adapter.replacement(name, &Device::Cpu)? {
                    return Ok(TaskVector::Replacement(to_vec(&t, name)?));
                }
                let Some(m) = adapter.modules().get(name) else {
                    return Ok(TaskVector::Zero);
                };
                let a = adapter.load_factor_f32(&m.a_key)?;
                let b = adapter.load_factor_f32(&m.b_key)?;
                let transposed = m.embedding || adapter.config.fan_in_fan_out;
                let (left, right) = if transposed {
                    (a.t(), b.t())
                } else {
                    (Ok(b), Ok(a))
                };
                let (left, right) = left
                    .and_then(|l| Ok((l.contiguous()?, right?.contiguous()?)))
                    .map_err(|e| Error::tensor(name, e))?;
                let cols = right.dims()[1];
                Ok(TaskVector::LowRank(LowRank {
                    left: to_vec(&left, name)?,
                    right: to_vec(&right, name)?,
                    rank: m.rank,
                    cols,
                    scale: adapter.scale(m) as f32,
                }))
            }
        }
    }

    /// The low-rank form, when there is one.
    pub(crate) fn low_rank(&self) -> Option<&LowRank> {
        match self {
            TaskVector::LowRank(l) => Some(l),
            _ => None,
        }
    }

    /// Whether every element is zero without reading anything.
    pub(crate) fn is_zero(&self) -> bool {
        matches!(self, TaskVector::Zero)
    }
}

/// The base's and every expert's task vector of one tensor.
pub(crate) struct TensorVectors<'a> {
    pub name: &'a str,
    /// Number of elements.
    pub n: usize,
    pub base: Stored<'a>,
    pub experts: Vec<TaskVector<'a>>,
}

/// Reused per-worker buffers: the base's chunk, each expert's task-vector chunk, and scratch
/// for the kept masks and the elected signs.
pub(crate) struct Chunk {
    pub index: usize,
    pub base: Vec<f32>,
    pub deltas: Vec<Vec<f32>>,
    pub masks: Vec<Vec<bool>>,
    pub total: Vec<f32>,
    /// One expert's kept elements that agree with the elected sign (pass 4's scratch).
    pub elected: Vec<bool>,
}

impl Chunk {
    pub(crate) fn new(experts: usize) -> Self {
        Chunk {
            index: 0,
            base: Vec::new(),
            deltas: vec![Vec::new(); experts],
            masks: vec![Vec::new(); experts],
            total: Vec::new(),
            elected: Vec::new(),
        }
    }
}

/// Elements per chunk: merge-core's streaming chunk.
pub(crate) const CHUNK: usize = merge_core::methods::STREAM_CHUNK;

impl TensorVectors<'_> {
    pub(crate) fn n_chunks(&self) -> usize {
        self.n.div_ceil(CHUNK)
    }

    /// Whether computing a task vector reads the base (full experts and replacements do;
    /// ΔW from factors does not).
    pub(crate) fn task_vectors_read_base(&self) -> bool {
        self.experts
            .iter()
            .any(|t| matches!(t, TaskVector::Difference(_) | TaskVector::Replacement(_)))
    }

    /// Reads chunk `index` of every task vector into `c`, and of the base when `with_base`
    /// (always when a task vector needs it; otherwise `c.base` is left empty).
    pub(crate) fn read(&self, index: usize, c: &mut Chunk, with_base: bool) -> Result<()> {
        let first = index * CHUNK;
        let len = CHUNK.min(self.n - first);
        c.index = index;
        if with_base || self.task_vectors_read_base() {
            c.base.resize(len, 0.0);
            self.base.read(self.name, first, &mut c.base)?;
        } else {
            c.base.clear();
        }
        for (tv, d) in self.experts.iter().zip(c.deltas.iter_mut()) {
            d.resize(len, 0.0);
            match tv {
                TaskVector::Difference(s) => {
                    s.read(self.name, first, d)?;
                    d.iter_mut().zip(&c.base).for_each(|(d, b)| *d -= b);
                }
                TaskVector::Replacement(v) => {
                    let v = &v[first..first + len];
                    d.iter_mut()
                        .zip(v.iter().zip(&c.base))
                        .for_each(|(d, (v, b))| *d = v - b);
                }
                TaskVector::LowRank(l) => l.fill(first, d),
                TaskVector::Zero => d.fill(0.0),
            }
        }
        Ok(())
    }
}
