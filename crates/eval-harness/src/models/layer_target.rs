//! A merge writing a linear layer's weight in place: [`LayerTarget`] takes the weight's values
//! column by column (as a streamed merge produces them, transposed in tiles) and stores them
//! straight into the layer's own buffers — `Wᵀ` and, when the layer has made it, its panel
//! copy — so a search trial allocates, faults in and copies nothing per weight, and the
//! first small forward after a merge does not repack the panels.

use super::linear::PANEL;

/// One weight's place in a [`super::linear::Lin`] (see the module docs). Made by
/// [`super::linear::Lin::layer_targets`], whose safety contract it lives under: it writes
/// through raw pointers into the layer's buffers.
pub struct LayerTarget {
    /// `Wᵀ`: `[inp, out]`, row-major.
    pub(super) wt: *mut f32,
    /// The panel copy ([`super::linear::pack_panels`]'s layout), when made.
    pub(super) panels: Option<*mut f32>,
    /// The layer's output columns (all stacked parts) and input features.
    pub(super) out: usize,
    pub(super) inp: usize,
    /// This weight's first output column among the stacked parts, and its rows (HF `[rows,
    /// inp]`).
    pub(super) offset: usize,
    pub(super) rows: usize,
}

// SAFETY: the pointers stay valid and unaliased for the target's life by the contract of
// `Lin::layer_targets`; concurrent calls write disjoint elements (the callers' contract).
unsafe impl Send for LayerTarget {}
// SAFETY: as above.
unsafe impl Sync for LayerTarget {}

impl LayerTarget {
    /// The weight's shape as the checkpoint stores it (`[rows, cols]`).
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.inp)
    }

    /// Rows `r0 .. r0 + values.len()` of column `c` of the weight (HF layout `[rows, cols]`).
    /// Calls writing concurrently must cover distinct elements.
    pub fn put_column(&self, c: usize, r0: usize, values: &[f32]) {
        assert!(
            c < self.inp && r0 + values.len() <= self.rows,
            "column {c}, rows {r0}..{} of a [{}, {}] weight",
            r0 + values.len(),
            self.rows,
            self.inp
        );
        // SAFETY: in bounds of `Wᵀ` (asserted above: `c·out + offset + rows ≤ inp·out`);
        // nothing else touches these elements meanwhile (contract).
        unsafe {
            let dst = self.wt.add(c * self.out + self.offset + r0);
            std::ptr::copy_nonoverlapping(values.as_ptr(), dst, values.len());
        }
        if let Some(panels) = self.panels {
            // Output column `offset + r` sits in panel `col / PANEL`, lane `col % PANEL`: a run
            // of rows is contiguous up to the next panel.
            let (mut r, mut rest) = (r0, values);
            while !rest.is_empty() {
                let col = self.offset + r;
                let lane = col % PANEL;
                let n = (PANEL - lane).min(rest.len());
                // SAFETY: panel `col / PANEL` < ⌈out / PANEL⌉ and `c < inp` (asserted above),
                // within the packed buffer; distinct elements by the contract.
                unsafe {
                    let dst = panels.add((col / PANEL * self.inp + c) * PANEL + lane);
                    std::ptr::copy_nonoverlapping(rest.as_ptr(), dst, n);
                }
                r += n;
                rest = &rest[n..];
            }
        }
    }

    /// Columns `c0 .. c0 + values.len()` of row `r` of the weight. Calls writing concurrently
    /// must cover distinct elements.
    pub fn put_row(&self, r: usize, c0: usize, values: &[f32]) {
        assert!(
            r < self.rows && c0 + values.len() <= self.inp,
            "row {r}, columns {c0}..{} of a [{}, {}] weight",
            c0 + values.len(),
            self.rows,
            self.inp
        );
        let col = self.offset + r;
        for (j, &v) in values.iter().enumerate() {
            // SAFETY: `(c0 + j)·out + col < inp·out` (asserted above); distinct elements.
            unsafe { *self.wt.add((c0 + j) * self.out + col) = v };
        }
        if let Some(panels) = self.panels {
            let first = (col / PANEL * self.inp + c0) * PANEL + col % PANEL;
            for (j, &v) in values.iter().enumerate() {
                // SAFETY: within panel `col / PANEL` at input `c0 + j < inp`; distinct.
                unsafe { *panels.add(first + j * PANEL) = v };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::linear::pack_panels;

    /// Three stacked parts whose rows straddle panel boundaries (33 output columns: the last
    /// panel partial), each written once, partly by column runs crossing panels and partly by
    /// row pieces: `Wᵀ` holds every value at its place and the panel copy equals packing it.
    #[test]
    fn column_runs_and_row_pieces_fill_wt_and_its_panels() {
        let (inp, parts) = (7usize, [5usize, 19, 9]);
        let out: usize = parts.iter().sum();
        let mut wt = vec![f32::NAN; inp * out];
        let mut panels = vec![0f32; out.div_ceil(PANEL) * inp * PANEL];
        let value = |part: usize, r: usize, c: usize| (part * 1000 + r * 10 + c) as f32 + 0.5;
        let mut offset = 0;
        for (part, &rows) in parts.iter().enumerate() {
            let t = LayerTarget {
                wt: wt.as_mut_ptr(),
                panels: Some(panels.as_mut_ptr()),
                out,
                inp,
                offset,
                rows,
            };
            assert_eq!(t.shape(), (rows, inp));
            // Rows 0 and 1 by row pieces (columns 0..3 and 3..inp), the rest by column runs of
            // up to 6 rows.
            for r in 0..2.min(rows) {
                let row: Vec<f32> = (0..inp).map(|c| value(part, r, c)).collect();
                t.put_row(r, 0, &row[..3]);
                t.put_row(r, 3, &row[3..]);
            }
            for c in 0..inp {
                let mut r0 = 2;
                while r0 < rows {
                    let n = 6.min(rows - r0);
                    let run: Vec<f32> = (r0..r0 + n).map(|r| value(part, r, c)).collect();
                    t.put_column(c, r0, &run);
                    r0 += n;
                }
            }
            offset += rows;
        }
        let mut offset = 0;
        for (part, &rows) in parts.iter().enumerate() {
            for r in 0..rows {
                for c in 0..inp {
                    assert_eq!(
                        wt[c * out + offset + r],
                        value(part, r, c),
                        "part {part} ({r}, {c})"
                    );
                }
            }
            offset += rows;
        }
        assert_eq!(panels, pack_panels(&wt, inp, out));
    }
}
