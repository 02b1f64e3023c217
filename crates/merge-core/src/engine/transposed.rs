//! A streamed tensor assembled straight into the form a model keeps its linear weights in:
//! f32, transposed (see [`super::SinkForm::TransposedF32`]). Each chunk is rounded to the
//! planned dtype (as the writer would store it) and widened back, then scattered into its
//! columns of the `[cols, rows]` buffer, so no encoded copy, join or separate transposition
//! of the whole tensor is needed afterwards.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use candle_core::DType;

use crate::checkpoint::f32_to_bf16;

/// One tensor in flight: a `[cols, rows]` f32 buffer (as bits: written from many threads,
/// each to its own elements) and how many elements have arrived.
pub(crate) struct TransposedF32 {
    data: Vec<AtomicU32>,
    rows: usize,
    cols: usize,
    dtype: DType,
    written: AtomicUsize,
}

impl TransposedF32 {
    /// An empty assembly of a `[rows, cols]` tensor stored as `dtype` (bf16, f16 or f32).
    pub(crate) fn new(rows: usize, cols: usize, dtype: DType) -> Self {
        TransposedF32 {
            data: (0..rows * cols).map(|_| AtomicU32::new(0)).collect(),
            rows,
            cols,
            dtype,
            written: AtomicUsize::new(0),
        }
    }

    /// Whether a tensor stored as `dtype` with `shape` can be assembled this way.
    pub(crate) fn applies(shape: &[usize], dtype: DType) -> bool {
        shape.len() == 2 && matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
    }

    /// The value reading `v` back from the written checkpoint gives.
    #[inline]
    fn stored(&self, v: f32) -> f32 {
        match self.dtype {
            DType::BF16 => f32::from_bits(u32::from(f32_to_bf16(v)) << 16),
            DType::F16 => half::f16::from_f32(v).to_f32(),
            _ => v,
        }
    }

    /// Elements `first ..` (row-major over `[rows, cols]`) of the tensor.
    pub(crate) fn write(&self, first: usize, data: &[f32]) {
        let (rows, cols) = (self.rows, self.cols);
        let end = first + data.len();
        let mut at = first;
        while at < end {
            // One row's segment [c0, c1) at a time: a chunk's consecutive rows fill the same
            // cache lines of each column, which stay cached between them.
            let (r, c0) = (at / cols, at % cols);
            let c1 = cols.min(c0 + (end - at));
            let row = &data[at - first..at - first + (c1 - c0)];
            for (c, &v) in (c0..c1).zip(row) {
                self.data[c * rows + r].store(self.stored(v).to_bits(), Ordering::Relaxed);
            }
            at += c1 - c0;
        }
        self.written.fetch_add(data.len(), Ordering::Relaxed);
    }

    /// Elements written so far.
    pub(crate) fn written(&self) -> usize {
        self.written.load(Ordering::Relaxed)
    }

    /// The `[cols, rows]` f32 buffer (in place: the bits become the floats).
    pub(crate) fn into_columns(self) -> (Vec<f32>, usize, usize) {
        let data = self
            .data
            .into_iter()
            .map(|a| f32::from_bits(a.into_inner()));
        (data.collect(), self.rows, self.cols)
    }
}
