//! A streamed tensor assembled straight into the form a model keeps its linear weights in:
//! f32, transposed (see [`super::SinkForm::TransposedF32`]). Each chunk is rounded to the
//! planned dtype (as the writer would store it) and widened back, then written, a tile at a
//! time, into its columns of the `[cols, rows]` buffer — or of a sink's [`ColumnTarget`], the
//! evaluated model's own weight buffers — so no encoded copy, join or separate transposition
//! of the whole tensor is needed afterwards.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::DType;

use crate::checkpoint::{f32_to_bf16, round_through_bf16};

thread_local! {
    /// Per-thread buffer of a chunk's whole rows, rounded to the stored dtype.
    static ROUNDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows and columns of a tile transposed in registers/L1 before it is written out: each
/// column of the tile becomes one contiguous run of the destination.
const TILE_ROWS: usize = 32;
const TILE_COLS: usize = 16;

/// A destination that keeps a `[rows, cols]` weight column by column — transposed, the layout
/// a model multiplies `x·Wᵀ` with — and takes a streamed merge's values there directly, from
/// the merge threads ([`super::TensorSink::columns`]). Values arrive as loading the stored
/// tensor gives them, widened to f32; concurrent calls never cover the same element, and
/// together they cover every element once.
pub trait ColumnTarget: Send + Sync {
    /// Rows `r0 .. r0 + values.len()` of column `c`.
    fn put_column(&self, c: usize, r0: usize, values: &[f32]);

    /// Columns `c0 .. c0 + values.len()` of row `r` (the ragged ends of a streamed chunk).
    fn put_row(&self, r: usize, c0: usize, values: &[f32]) {
        for (j, v) in values.iter().enumerate() {
            self.put_column(c0 + j, r, std::slice::from_ref(v));
        }
    }

    /// Whole rows `r0 ..`, row-major with `cols` values each (`rows.len()` is a multiple of
    /// `cols`): the bulk of a streamed chunk. By default transposed a tile at a time into
    /// [`ColumnTarget::put_column`] ([`put_rows_by_columns`]); a target with a layout of its
    /// own overrides it to write that layout straight from the rows.
    fn put_rows(&self, r0: usize, cols: usize, rows: &[f32]) {
        put_rows_by_columns(self, r0, cols, rows);
    }
}

/// [`ColumnTarget::put_rows`] through [`ColumnTarget::put_column`]: the rows transposed a
/// tile at a time, each tile column written as one run.
pub fn put_rows_by_columns<T: ColumnTarget + ?Sized>(
    target: &T,
    r0: usize,
    cols: usize,
    rows: &[f32],
) {
    debug_assert!(cols > 0 && rows.len().is_multiple_of(cols));
    let mut tile = [[0f32; TILE_ROWS]; TILE_COLS];
    for (b, block) in rows.chunks(TILE_ROWS * cols).enumerate() {
        let (r, nr) = (r0 + b * TILE_ROWS, block.len() / cols);
        for cb in (0..cols).step_by(TILE_COLS) {
            let nc = TILE_COLS.min(cols - cb);
            for i in 0..nr {
                for (j, &v) in block[i * cols + cb..i * cols + cb + nc].iter().enumerate() {
                    tile[j][i] = v;
                }
            }
            for (j, col) in tile.iter().enumerate().take(nc) {
                target.put_column(cb + j, r, &col[..nr]);
            }
        }
    }
}

/// A `[cols, rows]` f32 buffer of the assembly's own ([`SinkForm::TransposedF32`]): the
/// columns of the tensor one after another.
///
/// [`SinkForm::TransposedF32`]: super::SinkForm::TransposedF32
struct OwnColumns {
    data: Vec<f32>,
    /// `data`'s buffer, for writes through `&self` (the Vec is never resized).
    ptr: *mut f32,
    rows: usize,
    cols: usize,
}

// SAFETY: `ptr` points into `data`, owned by the struct; writers only ever touch the elements
// of their own disjoint ranges (the `ColumnTarget` contract), and the buffer is only taken out
// by value.
unsafe impl Send for OwnColumns {}
// SAFETY: as above: concurrent writes go to disjoint elements.
unsafe impl Sync for OwnColumns {}

impl ColumnTarget for OwnColumns {
    fn put_column(&self, c: usize, r0: usize, values: &[f32]) {
        assert!(c < self.cols && r0 + values.len() <= self.rows);
        // SAFETY: in bounds (asserted); no other call writes these elements.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                self.ptr.add(c * self.rows + r0),
                values.len(),
            )
        };
    }

    fn put_row(&self, r: usize, c0: usize, values: &[f32]) {
        assert!(r < self.rows && c0 + values.len() <= self.cols);
        for (j, &v) in values.iter().enumerate() {
            // SAFETY: in bounds (asserted); no other call writes this element.
            unsafe { *self.ptr.add((c0 + j) * self.rows + r) = v };
        }
    }
}

/// Where an assembly's values go.
enum Target {
    Own(OwnColumns),
    External(Arc<dyn ColumnTarget>),
}

/// One tensor in flight: its values, rounded, written column by column into its own buffer or
/// a sink's [`ColumnTarget`] from many threads (each to its own elements), and how many
/// elements have arrived.
pub(crate) struct TransposedF32 {
    target: Target,
    rows: usize,
    cols: usize,
    dtype: DType,
    written: AtomicUsize,
}

impl TransposedF32 {
    /// An empty assembly of a `[rows, cols]` tensor stored as `dtype` (bf16, f16 or f32), in a
    /// buffer of its own.
    pub(crate) fn new(rows: usize, cols: usize, dtype: DType) -> Self {
        let mut data = vec![0f32; rows * cols];
        let ptr = data.as_mut_ptr();
        let own = OwnColumns {
            data,
            ptr,
            rows,
            cols,
        };
        Self::with_target(Target::Own(own), rows, cols, dtype)
    }

    /// An assembly of a `[rows, cols]` tensor stored as `dtype` written into `target`.
    pub(crate) fn into_target(
        target: Arc<dyn ColumnTarget>,
        rows: usize,
        cols: usize,
        dtype: DType,
    ) -> Self {
        Self::with_target(Target::External(target), rows, cols, dtype)
    }

    fn with_target(target: Target, rows: usize, cols: usize, dtype: DType) -> Self {
        TransposedF32 {
            target,
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

    /// Elements `first ..` (row-major over `[rows, cols]`) of the tensor. Concurrent calls
    /// must cover disjoint ranges (the engine's contract for an output's `write_range`).
    pub(crate) fn write(&self, first: usize, data: &[f32]) {
        match &self.target {
            Target::Own(t) => self.write_to(t, first, data),
            Target::External(t) => self.write_to(&**t, first, data),
        }
    }

    /// [`Self::write`] into `target` (the dtype chosen once here, so the loops below inline
    /// the rounding: each value as reading it back from the written checkpoint gives).
    fn write_to<T: ColumnTarget + ?Sized>(&self, target: &T, first: usize, data: &[f32]) {
        match self.dtype {
            DType::BF16 => self.write_rounded(target, first, data, |v| {
                f32::from_bits(u32::from(f32_to_bf16(v)) << 16)
            }),
            DType::F16 => {
                self.write_rounded(target, first, data, |v| half::f16::from_f32(v).to_f32())
            }
            _ => self.write_rounded(target, first, data, |v| v),
        }
    }

    /// [`Self::write`] with `stored` rounding each value.
    #[inline(always)]
    fn write_rounded<T: ColumnTarget + ?Sized>(
        &self,
        target: &T,
        first: usize,
        data: &[f32],
        stored: impl Fn(f32) -> f32,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        let end = (first + data.len()).min(rows * cols);
        let mut at = first;
        let mut part = [0f32; TILE_COLS * TILE_ROWS];
        while at < end {
            let (r, c0) = (at / cols, at % cols);
            let src = &data[at - first..];
            if c0 == 0 && end - at >= cols {
                // Every whole row of the range at once, rounded into this thread's scratch
                // (f32 values are stored as they are).
                let n = (end - at) / cols * cols;
                if self.dtype == DType::F32 {
                    target.put_rows(r, cols, &src[..n]);
                } else {
                    ROUNDED.with_borrow_mut(|scratch| {
                        scratch.resize(n, 0.0);
                        if self.dtype == DType::BF16 {
                            // `stored`'s rounding, eight values at a time.
                            round_through_bf16(&src[..n], scratch);
                        } else {
                            scratch
                                .iter_mut()
                                .zip(src)
                                .for_each(|(o, &v)| *o = stored(v));
                        }
                        target.put_rows(r, cols, scratch);
                    });
                }
                at += n;
            } else {
                // Part of one row, a piece at a time.
                let c1 = cols.min(c0 + (end - at));
                for (p, piece) in src[..c1 - c0].chunks(part.len()).enumerate() {
                    for (o, &v) in part.iter_mut().zip(piece) {
                        *o = stored(v);
                    }
                    target.put_row(r, c0 + p * part.len(), &part[..piece.len()]);
                }
                at += c1 - c0;
            }
        }
        self.written.fetch_add(end - first, Ordering::Relaxed);
    }

    /// Elements written so far.
    pub(crate) fn written(&self) -> usize {
        self.written.load(Ordering::Relaxed)
    }

    /// The `[cols, rows]` f32 buffer, with its row and column counts (`rows`, `cols` of the
    /// tensor it holds transposed); `None` for an assembly written into a sink's target.
    pub(crate) fn into_columns(self) -> Option<(Vec<f32>, usize, usize)> {
        match self.target {
            Target::Own(t) => Some((t.data, t.rows, t.cols)),
            Target::External(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges that start and end mid-row, span many tiles of rows, and cover one row exactly,
    /// written from several threads: every element lands once, transposed and rounded.
    #[test]
    fn scattered_ranges_assemble_the_rounded_transpose() {
        let (rows, cols) = (75, 19);
        let n = rows * cols;
        let values: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.37).sin() * 3.1 + 1e-3)
            .collect();
        let cuts = [0, 5, 19, 38, 39, 40, 700, 701, 1330, n];
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let t = TransposedF32::new(rows, cols, dtype);
            std::thread::scope(|s| {
                for w in cuts.windows(2) {
                    let t = &t;
                    let range = &values[w[0]..w[1]];
                    s.spawn(move || t.write(w[0], range));
                }
            });
            assert_eq!(t.written(), n);
            let (columns, r, c) = t.into_columns().expect("its own buffer");
            assert_eq!((r, c), (rows, cols));
            for i in 0..rows {
                for j in 0..cols {
                    let v = values[i * cols + j];
                    let want = match dtype {
                        DType::BF16 => half::bf16::from_f32(v).to_f32(),
                        DType::F16 => half::f16::from_f32(v).to_f32(),
                        _ => v,
                    };
                    assert_eq!(
                        columns[j * rows + i].to_bits(),
                        want.to_bits(),
                        "{dtype:?} ({i}, {j})"
                    );
                }
            }
        }
    }
}
