//! A merge writing a linear layer's weight in place: [`LayerTarget`] takes the weight's values
//! column by column (as a streamed merge produces them, transposed in tiles) and stores them
//! straight into the layer's own buffers — its panel copy where the layer has made it (in the
//! panels' form, f32 or bf16), else `Wᵀ` — so a search trial allocates, faults in and copies
//! nothing per weight, and the first small forward after a merge does not repack the panels.
//! The model's linear layers make them ([`crate::LanguageModel::layer_targets`]).

use merge_core::engine::ColumnTarget;

/// Where a merge writes a layer's panel copy ([`crate::models::panels::Panels`]), in its form.
#[derive(Clone, Copy)]
pub(crate) enum PanelsPtr {
    F32(*mut f32),
    Bf16(*mut u16),
}

/// One weight's place in a [`crate::models::linear::Lin`] (see the module docs). Made by
/// [`crate::models::linear::Lin::layer_targets`], whose safety contract it lives under: it
/// writes through raw pointers into the layer's buffers.
pub struct LayerTarget {
    /// `Wᵀ`: `[inp, out]`, row-major; written when the layer has no panels.
    pub(crate) wt: Option<*mut f32>,
    /// The panel copy ([`crate::models::panels::Panels`]' layout: `panel`-column panels),
    /// when made. A bf16 copy takes only bf16 values (the layer's contract).
    pub(crate) panels: Option<PanelsPtr>,
    pub(crate) panel: usize,
    /// The layer's output columns (all stacked parts) and input features.
    pub(crate) out: usize,
    pub(crate) inp: usize,
    /// This weight's first output column among the stacked parts, and its rows (HF `[rows,
    /// inp]`).
    pub(crate) offset: usize,
    pub(crate) rows: usize,
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
}

/// A merge's column target: the weight's values (HF layout `[rows, cols]`) go straight into
/// the layer. Calls writing concurrently must cover distinct elements.
impl ColumnTarget for LayerTarget {
    fn put_column(&self, c: usize, r0: usize, values: &[f32]) {
        assert!(
            c < self.inp && r0 + values.len() <= self.rows,
            "column {c}, rows {r0}..{} of a [{}, {}] weight",
            r0 + values.len(),
            self.rows,
            self.inp
        );
        if let Some(wt) = self.wt {
            // SAFETY: in bounds of `Wᵀ` (asserted above: `c·out + offset + rows ≤ inp·out`);
            // nothing else touches these elements meanwhile (contract).
            unsafe {
                let dst = wt.add(c * self.out + self.offset + r0);
                std::ptr::copy_nonoverlapping(values.as_ptr(), dst, values.len());
            }
        }
        if let Some(panels) = self.panels {
            // Output column `offset + r` sits in panel `col / panel`, lane `col % panel`: a run
            // of rows is contiguous up to the next panel.
            let (mut r, mut rest) = (r0, values);
            while !rest.is_empty() {
                let col = self.offset + r;
                let lane = col % self.panel;
                let n = (self.panel - lane).min(rest.len());
                let at = (col / self.panel * self.inp + c) * self.panel + lane;
                // SAFETY: panel `col / panel` < ⌈out / panel⌉ and `c < inp` (asserted above),
                // within the packed buffer; distinct elements by the contract.
                unsafe { put_run(panels, at, &rest[..n]) };
                r += n;
                rest = &rest[n..];
            }
        }
    }

    fn put_row(&self, r: usize, c0: usize, values: &[f32]) {
        assert!(
            r < self.rows && c0 + values.len() <= self.inp,
            "row {r}, columns {c0}..{} of a [{}, {}] weight",
            c0 + values.len(),
            self.rows,
            self.inp
        );
        let col = self.offset + r;
        if let Some(wt) = self.wt {
            for (j, &v) in values.iter().enumerate() {
                // SAFETY: `(c0 + j)·out + col < inp·out` (asserted above); distinct elements.
                unsafe { *wt.add((c0 + j) * self.out + col) = v };
            }
        }
        if let Some(panels) = self.panels {
            let first = (col / self.panel * self.inp + c0) * self.panel + col % self.panel;
            for (j, v) in values.iter().enumerate() {
                // SAFETY: within panel `col / panel` at input `c0 + j < inp`; distinct.
                unsafe { put_run(panels, first + j * self.panel, std::slice::from_ref(v)) };
            }
        }
    }
}

/// `values` into the panels at element `at` onwards.
///
/// # Safety
/// `at + values.len()` is within the panels, and nothing else writes those elements meanwhile.
unsafe fn put_run(panels: PanelsPtr, at: usize, values: &[f32]) {
    match panels {
        PanelsPtr::F32(p) => {
            std::ptr::copy_nonoverlapping(values.as_ptr(), p.add(at), values.len());
        }
        PanelsPtr::Bf16(p) => {
            let mut low = 0;
            for (j, v) in values.iter().enumerate() {
                let bits = v.to_bits();
                low |= bits & 0xffff;
                *p.add(at + j) = (bits >> 16) as u16;
            }
            assert!(
                low == 0,
                "a value that is not bf16 written into a layer's bf16 panels (the in-place merge \
                 said it stores bf16)"
            );
        }
    }
}
