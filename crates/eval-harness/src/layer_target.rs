//! A merge writing a model's weight in place: [`LayerTarget`] takes the weight's values as a
//! streamed merge produces them (whole rows, the ragged ends of a chunk by row pieces) and
//! stores them straight into the model's own buffers — a linear layer's panel copy where the
//! layer has made it (in the panels' form, f32 or bf16; the rows transposed eight lanes at a
//! time in registers), else its `Wᵀ`; an embedding's rows as stored — so a search trial
//! allocates, faults in and copies nothing per weight, and the first small forward after a
//! merge does not repack the panels. The models make them
//! ([`crate::LanguageModel::layer_targets`]).

use merge_core::engine::{put_rows_by_columns, ColumnTarget};

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
    /// The weight as stored, row-major `[rows, inp]` (an embedding, [`LayerTarget::row_major`]);
    /// then `wt` and `panels` are `None`.
    pub(crate) stored: Option<*mut f32>,
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
    /// The target of a `[rows, cols]` f32 weight kept row-major as stored, at `at` (made by
    /// [`crate::models::weights::Weight::layer_target`], under its safety contract).
    pub(crate) fn row_major(at: *mut f32, rows: usize, cols: usize) -> Self {
        LayerTarget {
            wt: None,
            stored: Some(at),
            panels: None,
            panel: 1,
            out: rows,
            inp: cols,
            offset: 0,
            rows,
        }
    }

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
        if let Some(at) = self.stored {
            for (i, &v) in values.iter().enumerate() {
                // SAFETY: `(r0 + i)·inp + c < rows·inp` (asserted above); distinct elements.
                unsafe { *at.add((r0 + i) * self.inp + c) = v };
            }
        }
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
        if let Some(at) = self.stored {
            // SAFETY: `r·inp + c0 + len ≤ rows·inp` (asserted above); distinct elements.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    values.as_ptr(),
                    at.add(r * self.inp + c0),
                    values.len(),
                )
            };
        }
        let col = self.offset + r;
        if let Some(wt) = self.wt {
            for (j, &v) in values.iter().enumerate() {
                // SAFETY: `(c0 + j)·out + col < inp·out` (asserted above); distinct elements.
                unsafe { *wt.add((c0 + j) * self.out + col) = v };
            }
        }
        if let Some(panels) = self.panels {
            let first = (col / self.panel * self.inp + c0) * self.panel + col % self.panel;
            // SAFETY: within panel `col / panel`, one lane, inputs `c0 .. c0 + len ≤ inp`
            // (asserted above); distinct elements by the contract.
            unsafe { put_lanes(panels, first, self.panel, values.len(), 1, values) };
        }
    }

    fn put_rows(&self, r0: usize, cols: usize, rows: &[f32]) {
        let nr = rows.len() / cols.max(1);
        assert!(
            cols == self.inp && nr * cols == rows.len() && r0 + nr <= self.rows,
            "rows {r0}..{} of {cols} columns into a [{}, {}] weight",
            r0 + nr,
            self.rows,
            self.inp
        );
        if let Some(at) = self.stored {
            // SAFETY: rows `r0 .. r0 + nr ≤ rows` of `inp` values (asserted above); distinct.
            unsafe { std::ptr::copy_nonoverlapping(rows.as_ptr(), at.add(r0 * cols), rows.len()) };
            return;
        }
        let (Some(panels), None) = (self.panels, self.wt) else {
            return put_rows_by_columns(self, r0, cols, rows);
        };
        // Row `r` is output column `offset + r`: the rows of one panel at a time, each a lane.
        let mut i = 0;
        while i < nr {
            let col = self.offset + r0 + i;
            let lane = col % self.panel;
            let n = (self.panel - lane).min(nr - i);
            let first = col / self.panel * self.inp * self.panel + lane;
            // SAFETY: lanes `lane .. lane + n ≤ panel` of panel `col / panel` over all `inp`
            // inputs: within the packed buffer; distinct elements by the contract.
            unsafe {
                put_lanes(
                    panels,
                    first,
                    self.panel,
                    self.inp,
                    n,
                    &rows[i * cols..][..n * cols],
                )
            };
            i += n;
        }
    }
}

/// `rows` (`lanes` rows of `inputs` values, row-major) into consecutive lanes of one panel:
/// value `(j, c)` to element `first + c·panel + j`. A bf16 panel takes only bf16 values.
///
/// # Safety
/// Every such element is within the panels, and nothing else writes them meanwhile.
unsafe fn put_lanes(
    panels: PanelsPtr,
    first: usize,
    panel: usize,
    inputs: usize,
    lanes: usize,
    rows: &[f32],
) {
    debug_assert_eq!(rows.len(), inputs * lanes);
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if lanes >= 8 && std::arch::is_x86_feature_detected!("avx2") {
        while j + 8 <= lanes {
            let group = &rows[j * inputs..(j + 8) * inputs];
            // SAFETY: AVX2 detected; lanes `j .. j + 8` are in range (caller's contract).
            unsafe { put_eight_lanes_avx2(panels, first + j, panel, inputs, group) };
            j += 8;
        }
    }
    let mut low = 0;
    for c in 0..inputs {
        for jj in j..lanes {
            // SAFETY: within the panels (caller's contract).
            low |= unsafe { store(panels, first + c * panel + jj, rows[jj * inputs + c]) };
        }
    }
    assert_bf16(low);
}

/// `v` into the panels' element `at`, in their form; returns the low 16 bits a bf16 panel
/// dropped (0 for a bf16 value), for [`assert_bf16`].
///
/// # Safety
/// `at` is within the panels, and nothing else writes it meanwhile.
#[inline(always)]
unsafe fn store(panels: PanelsPtr, at: usize, v: f32) -> u32 {
    // SAFETY: the caller's.
    unsafe {
        match panels {
            PanelsPtr::F32(p) => {
                *p.add(at) = v;
                0
            }
            PanelsPtr::Bf16(p) => {
                *p.add(at) = (v.to_bits() >> 16) as u16;
                v.to_bits() & 0xffff
            }
        }
    }
}

fn assert_bf16(low_bits: u32) {
    assert!(
        low_bits == 0,
        "a value that is not bf16 written into a layer's bf16 panels (the in-place merge said it \
         stores bf16)"
    );
}

/// [`put_lanes`] for eight lanes: eight rows transposed eight inputs at a time in registers,
/// each input's eight lanes stored as one run.
///
/// # Safety
/// AVX2 is available, and as for [`put_lanes`] with `lanes` = 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn put_eight_lanes_avx2(
    panels: PanelsPtr,
    first: usize,
    panel: usize,
    inputs: usize,
    rows: &[f32],
) {
    use std::arch::x86_64::*;
    debug_assert_eq!(rows.len(), 8 * inputs);
    let whole = inputs - inputs % 8;
    let mut low = _mm256_setzero_si256();
    let low_mask = _mm256_set1_epi32(0xffff);
    for c in (0..whole).step_by(8) {
        // SAFETY: row `i` has `inputs` values and `c + 8 ≤ inputs`.
        let r: [__m256; 8] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(rows.as_ptr().add(i * inputs + c)) });
        // 8×8 transpose: `t[k]` holds input `c + k` of the eight rows.
        let a0 = _mm256_unpacklo_ps(r[0], r[1]);
        let a1 = _mm256_unpackhi_ps(r[0], r[1]);
        let a2 = _mm256_unpacklo_ps(r[2], r[3]);
        let a3 = _mm256_unpackhi_ps(r[2], r[3]);
        let a4 = _mm256_unpacklo_ps(r[4], r[5]);
        let a5 = _mm256_unpackhi_ps(r[4], r[5]);
        let a6 = _mm256_unpacklo_ps(r[6], r[7]);
        let a7 = _mm256_unpackhi_ps(r[6], r[7]);
        let b0 = _mm256_shuffle_ps::<0x44>(a0, a2);
        let b1 = _mm256_shuffle_ps::<0xee>(a0, a2);
        let b2 = _mm256_shuffle_ps::<0x44>(a1, a3);
        let b3 = _mm256_shuffle_ps::<0xee>(a1, a3);
        let b4 = _mm256_shuffle_ps::<0x44>(a4, a6);
        let b5 = _mm256_shuffle_ps::<0xee>(a4, a6);
        let b6 = _mm256_shuffle_ps::<0x44>(a5, a7);
        let b7 = _mm256_shuffle_ps::<0xee>(a5, a7);
        let t = [
            _mm256_permute2f128_ps::<0x20>(b0, b4),
            _mm256_permute2f128_ps::<0x20>(b1, b5),
            _mm256_permute2f128_ps::<0x20>(b2, b6),
            _mm256_permute2f128_ps::<0x20>(b3, b7),
            _mm256_permute2f128_ps::<0x31>(b0, b4),
            _mm256_permute2f128_ps::<0x31>(b1, b5),
            _mm256_permute2f128_ps::<0x31>(b2, b6),
            _mm256_permute2f128_ps::<0x31>(b3, b7),
        ];
        for (k, v) in t.into_iter().enumerate() {
            let at = first + (c + k) * panel;
            // SAFETY: eight lanes from `at` are within the panels (caller's contract).
            unsafe {
                match panels {
                    PanelsPtr::F32(p) => _mm256_storeu_ps(p.add(at), v),
                    PanelsPtr::Bf16(p) => {
                        let bits = _mm256_castps_si256(v);
                        low = _mm256_or_si256(low, _mm256_and_si256(bits, low_mask));
                        // The upper halves, packed to eight u16 in the low 128 bits.
                        let high = _mm256_srli_epi32::<16>(bits);
                        let packed =
                            _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(high, high));
                        _mm_storeu_si128(p.add(at).cast(), _mm256_castsi256_si128(packed));
                    }
                }
            }
        }
    }
    let mut lows = [0u32; 8];
    // SAFETY: eight u32 into an eight-element array.
    unsafe { _mm256_storeu_si256(lows.as_mut_ptr().cast(), low) };
    assert_bf16(lows.iter().fold(0, |a, b| a | b));
    // The inputs past the last multiple of eight, one by one.
    let mut tail = 0;
    for c in whole..inputs {
        for j in 0..8 {
            // SAFETY: as above.
            tail |= unsafe { store(panels, first + c * panel + j, rows[j * inputs + c]) };
        }
    }
    assert_bf16(tail);
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
        PanelsPtr::Bf16(_) => {
            let mut low = 0;
            for (j, &v) in values.iter().enumerate() {
                // SAFETY: the caller's.
                low |= unsafe { store(panels, at + j, v) };
            }
            assert_bf16(low);
        }
    }
}
