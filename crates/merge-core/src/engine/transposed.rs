//! A streamed tensor assembled straight into the form a model keeps its linear weights in:
//! f32, transposed (see [`super::SinkForm::TransposedF32`]). Each chunk is rounded to the
//! planned dtype (as the writer would store it) and widened back, then written, a tile at a
//! time, into its columns of the `[cols, rows]` buffer, so no encoded copy, join or separate
//! transposition of the whole tensor is needed afterwards.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::DType;

use crate::checkpoint::f32_to_bf16;

/// Rows and columns of a tile transposed in registers/L1 before it is written out: each
/// column of the tile becomes one contiguous run of the destination.
const TILE_ROWS: usize = 32;
const TILE_COLS: usize = 16;

/// One tensor in flight: a `[cols, rows]` f32 buffer, written from many threads (each to its
/// own elements), and how many elements have arrived.
pub(crate) struct TransposedF32 {
    data: Vec<f32>,
    /// `data`'s buffer, for writes through `&self` (the Vec is never resized).
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    dtype: DType,
    written: AtomicUsize,
}

// SAFETY: `ptr` points into `data`, owned by the struct; writers only ever touch the elements
// of their own disjoint source ranges (see `write`), and `into_columns` takes `self` by value.
unsafe impl Send for TransposedF32 {}
// SAFETY: as above: concurrent `write`s go to disjoint elements.
unsafe impl Sync for TransposedF32 {}

impl TransposedF32 {
    /// An empty assembly of a `[rows, cols]` tensor stored as `dtype` (bf16, f16 or f32).
    pub(crate) fn new(rows: usize, cols: usize, dtype: DType) -> Self {
        let mut data = vec![0f32; rows * cols];
        let ptr = data.as_mut_ptr();
        TransposedF32 {
            data,
            ptr,
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
        // Each value as reading it back from the written checkpoint gives (the dtype chosen
        // once here, so the loops below inline the rounding).
        match self.dtype {
            DType::BF16 => self.write_rounded(first, data, |v| {
                f32::from_bits(u32::from(f32_to_bf16(v)) << 16)
            }),
            DType::F16 => self.write_rounded(first, data, |v| half::f16::from_f32(v).to_f32()),
            _ => self.write_rounded(first, data, |v| v),
        }
    }

    /// Element `(r, c)` of the tensor (`[rows, cols]`).
    ///
    /// # Safety
    /// No other thread writes or reads that element meanwhile.
    #[inline]
    unsafe fn put(&self, r: usize, c: usize, v: f32) {
        debug_assert!(r < self.rows && c < self.cols);
        // SAFETY: in bounds (r < rows, c < cols); exclusive by the caller's contract.
        unsafe { *self.ptr.add(c * self.rows + r) = v };
    }

    /// [`Self::write`] with `stored` rounding each value.
    #[inline(always)]
    fn write_rounded(&self, first: usize, data: &[f32], stored: impl Fn(f32) -> f32) {
        let (rows, cols) = (self.rows, self.cols);
        let end = (first + data.len()).min(rows * cols);
        let mut at = first;
        while at < end {
            let (r, c0) = (at / cols, at % cols);
            let src = &data[at - first..];
            if c0 == 0 && end - at >= cols {
                // Whole rows: transposed a tile at a time, each tile column written as one run.
                let nr = ((end - at) / cols).min(TILE_ROWS);
                let mut tile = [[0f32; TILE_ROWS]; TILE_COLS];
                for cb in (0..cols).step_by(TILE_COLS) {
                    let nc = TILE_COLS.min(cols - cb);
                    for i in 0..nr {
                        let row = &src[i * cols + cb..i * cols + cb + nc];
                        for (j, &v) in row.iter().enumerate() {
                            tile[j][i] = stored(v);
                        }
                    }
                    for (j, col) in tile.iter().enumerate().take(nc) {
                        let dst = (cb + j) * rows + r;
                        // SAFETY: elements (r .. r + nr, cb + j) are inside the tensor and in
                        // this call's range, which no other call covers.
                        unsafe {
                            std::ptr::copy_nonoverlapping(col.as_ptr(), self.ptr.add(dst), nr)
                        };
                    }
                }
                at += nr * cols;
            } else {
                // Part of one row.
                let c1 = cols.min(c0 + (end - at));
                for (c, &v) in (c0..c1).zip(src) {
                    // SAFETY: (r, c) is in this call's range, which no other call covers.
                    unsafe { self.put(r, c, stored(v)) };
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
    /// tensor it holds transposed).
    pub(crate) fn into_columns(self) -> (Vec<f32>, usize, usize) {
        (self.data, self.rows, self.cols)
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
            let (columns, r, c) = t.into_columns();
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
