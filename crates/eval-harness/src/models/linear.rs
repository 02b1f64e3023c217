//! Linear layers with weights stored transposed (`[in, out]`, contiguous): candle's CPU matmul
//! runs measurably faster on a contiguous right-hand side than on the transposed view of HF's
//! `[out, in]` layout (about 15% on prompt-sized inputs on the development machine).
//!
//! Inputs of a few rows (decoding batches, choice tokens) on the CPU in f32 go through
//! [`Panels::matmul`] over a second copy of the weights packed in 16-column panels, made the
//! first time such an input comes (see [`super::panels`]). The copy costs up to the weights'
//! memory again (half that for bf16 values), which only CPU f32 evaluation pays.
//!
//! A merge writing a layer in place ([`Lin::layer_targets`]) writes only the panels where they
//! are made — the form the small inputs of a search trial read — and `Wᵀ` is restored from them
//! when an input of more rows first needs it.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{CpuStorage, DType, Device, Storage, Tensor, WithDType};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::panels::{Panels, PANEL, SMALL_ROWS};
use super::weights::{fetch, full_name, prepare, storage_ptr};
use crate::error::Result;
use crate::layer_target::LayerTarget;

/// Sees every input of the linear layers it is installed on (`llm-merging stats` sums Gram
/// matrices with one). None is installed by default: evaluation pays one `Option` check per
/// layer call.
pub trait InputObserver: Send + Sync {
    /// `x` (`[.., in]`, as the layer gets it) is the input of the checkpoint modules `modules`
    /// (`model.layers.0.self_attn.q_proj`; stacked gate/up: both).
    fn observe(&self, modules: &[&str], x: &Tensor) -> Result<()>;
}

/// `y = x·W^T + b` with `W^T` kept contiguous, over one or more checkpoint modules whose
/// outputs sit side by side (stacked q/k/v or gate/up: one product instead of several).
pub struct Lin {
    /// Per part: the checkpoint module name (`….q_proj`) and its output rows.
    parts: Vec<(String, usize)>,
    wt: Tensor,
    bias: Option<Tensor>,
    inp: usize,
    out: usize,
    dtype: DType,
    device: Device,
    /// `W^T` in [`PANEL`]-column panels for [`Panels::matmul`]; `None` inside where the
    /// weights are not f32 on the CPU. Made on first use, dropped when a weight is replaced.
    panels: OnceLock<Option<Panels>>,
    /// `wt` is behind the panels: an in-place merge wrote only those; restored from them
    /// (under this lock) before `wt` is next read.
    wt_stale: Mutex<bool>,
    observer: Option<Arc<dyn InputObserver>>,
}

impl Lin {
    /// Reads the modules `parts` (`(name, output rows)` under `vb`'s prefix; HF `[out, in]`
    /// weights, `[out]` biases when `bias`) as one layer in `vb`'s dtype and device.
    pub fn load(vb: &VarBuilder, parts: &[(&str, usize)], inp: usize, bias: bool) -> Result<Self> {
        let named = parts
            .iter()
            .map(|&(p, rows)| (full_name(vb, p), rows))
            .collect();
        let mut lin = Lin::empty(named, inp, bias, vb.dtype(), vb.device())?;
        for (i, &(p, _)) in parts.iter().enumerate() {
            lin.set_part(i, &fetch(vb, &format!("{p}.weight"), vb.dtype())?, false)?;
            if bias {
                lin.set_part(i, &fetch(vb, &format!("{p}.bias"), vb.dtype())?, true)?;
            }
        }
        Ok(lin)
    }

    /// The output head: `lm_head` from `vb`, or when `tied` the embedding `w` (`[vocab,
    /// hidden]`, as the model holds it) that the checkpoint calls `name` — replacing that
    /// tensor then replaces both.
    pub fn head(vb: &VarBuilder, tied: bool, name: &str, w: &Tensor) -> Result<Self> {
        let (rows, inp) = w.dims2()?;
        if !tied {
            if !vb.contains_tensor("lm_head.weight") {
                return Err(crate::error::Error::Weights(
                    "`lm_head.weight` is missing and config.json has tie_word_embeddings false"
                        .into(),
                ));
            }
            return Lin::load(vb, &[("lm_head", rows)], inp, false);
        }
        let module = name.trim_end_matches(".weight").to_string();
        let mut lin = Lin::empty(vec![(module, rows)], inp, false, w.dtype(), w.device())?;
        lin.set_part(0, w, false)?;
        Ok(lin)
    }

    fn empty(
        parts: Vec<(String, usize)>,
        inp: usize,
        bias: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let out = parts.iter().map(|(_, rows)| rows).sum();
        Ok(Lin {
            wt: Tensor::zeros((inp, out), dtype, device)?,
            bias: bias
                .then(|| Tensor::zeros(out, dtype, device))
                .transpose()?,
            parts,
            inp,
            out,
            dtype,
            device: device.clone(),
            panels: OnceLock::new(),
            wt_stale: Mutex::new(false),
            observer: None,
        })
    }

    /// The checkpoint names of the weights (not biases) this layer keeps transposed in f32 on
    /// the CPU, which [`Lin::set`] takes in [`to_layer_form`] without a copy; none on other
    /// dtypes or devices.
    pub fn layer_form_names(&self) -> Vec<String> {
        if self.dtype != DType::F32 || !self.device.is_cpu() {
            return Vec::new();
        }
        self.parts
            .iter()
            .map(|(p, _)| format!("{p}.weight"))
            .collect()
    }

    /// In-place targets for this layer's weights (not biases), by checkpoint name, where it
    /// keeps them in f32 on the CPU (none otherwise): a merge writes each weight's values
    /// through its target straight into the layer (see [`LayerTarget`]) — into the panel copy
    /// alone where it is made (`Wᵀ` is restored from it when next needed), else into `Wᵀ`.
    /// `bf16_values`: every value the merge writes is a bf16 value (it stores bf16); panels
    /// kept in bf16 take only those, so without it they are dropped here (and made again, in
    /// f32, when next needed).
    ///
    /// # Safety
    /// The targets write through raw pointers into this layer's buffers. While any of them is
    /// alive the caller must not run the layer, replace any of its weights or biases, or drop
    /// it; and concurrent writes must go to distinct elements.
    pub unsafe fn layer_targets(&mut self, bf16_values: bool) -> Vec<(String, LayerTarget)> {
        if self.dtype != DType::F32 || !self.device.is_cpu() || self.inp == 0 || self.out == 0 {
            return Vec::new();
        }
        if matches!(self.panels.get(), Some(Some(p)) if p.is_bf16() && !bf16_values) {
            self.restore_wt();
            self.panels = OnceLock::new();
        }
        let panels = match self.panels.get_mut() {
            Some(Some(p)) => Some(p.ptr()),
            _ => None,
        };
        let wt = match panels {
            Some(_) => {
                // Every weight of the layer is written (a merge writes each tensor once), so
                // the panels end up whole and `wt` behind them.
                *self.wt_stale.get_mut().unwrap_or_else(|e| e.into_inner()) = true;
                None
            }
            None => match storage_ptr(&self.wt) {
                Some(wt) => Some(wt),
                None => return Vec::new(),
            },
        };
        let mut offset = 0;
        let mut targets = Vec::with_capacity(self.parts.len());
        for (name, rows) in &self.parts {
            targets.push((
                format!("{name}.weight"),
                LayerTarget {
                    wt,
                    stored: None,
                    panels,
                    panel: PANEL,
                    out: self.out,
                    inp: self.inp,
                    offset,
                    rows: *rows,
                },
            ));
            offset += rows;
        }
        targets
    }

    /// Brings `wt` up to date with the panels when an in-place merge wrote only those.
    fn restore_wt(&self) {
        let mut stale = self.wt_stale.lock().unwrap_or_else(|e| e.into_inner());
        if !*stale {
            return;
        }
        let (Some(Some(panels)), Some(wt)) = (self.panels.get(), storage_ptr(&self.wt)) else {
            unreachable!("`wt` falls behind only panels of an f32 CPU layer");
        };
        // SAFETY: `wt` is this layer's own contiguous `inp·out` buffer; no target is alive
        // (the contract of `layer_targets`) and no other reader runs while it is stale (they
        // all come through here, serialised by the lock).
        let wt = unsafe { std::slice::from_raw_parts_mut(wt, self.inp * self.out) };
        panels.unpack(wt, self.inp, self.out);
        *stale = false;
    }

    /// Installs (or with `None` removes) an observer of this layer's inputs.
    pub fn set_observer(&mut self, observer: Option<Arc<dyn InputObserver>>) {
        self.observer = observer;
    }

    /// Replaces the weight or bias `name` when it is one of this layer's; `Ok(false)` otherwise.
    pub fn set(&mut self, name: &str, t: &Tensor) -> Result<bool> {
        let (module, is_bias) = match (name.strip_suffix(".weight"), name.strip_suffix(".bias")) {
            (Some(m), _) => (m, false),
            (_, Some(m)) if self.bias.is_some() => (m, true),
            _ => return Ok(false),
        };
        match self.parts.iter().position(|(p, _)| p == module) {
            Some(i) => self.set_part(i, t, is_bias).map(|()| true),
            None => Ok(false),
        }
    }

    /// Writes part `i`'s weight (HF `[rows, in]`, transposed here) or bias into the layer, in
    /// place among stacked parts, and drops the panel copy.
    fn set_part(&mut self, i: usize, t: &Tensor, is_bias: bool) -> Result<()> {
        // The other parts' weights may be only in the panels, which are dropped below.
        self.restore_wt();
        let (name, rows) = &self.parts[i];
        let offset: usize = self.parts[..i].iter().map(|(_, r)| r).sum();
        let whole = self.parts.len() == 1;
        if is_bias {
            let b = prepare(
                &format!("{name}.bias"),
                t,
                &[*rows],
                self.dtype,
                &self.device,
                false,
            )?;
            match &mut self.bias {
                Some(dst) if !whole => dst.slice_set(&b, 0, offset)?,
                dst => *dst = Some(b),
            }
        } else {
            let w = prepare(
                &format!("{name}.weight"),
                t,
                &[*rows, self.inp],
                self.dtype,
                &self.device,
                false,
            )?;
            let wt = transposed(&w)?;
            if whole {
                self.wt = wt;
            } else {
                self.wt.slice_set(&wt, 1, offset)?;
            }
        }
        self.panels = OnceLock::new();
        Ok(())
    }

    /// Applies the layer to `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(o) = &self.observer {
            let modules: Vec<&str> = self.parts.iter().map(|(m, _)| m.as_str()).collect();
            o.observe(&modules, x)?;
        }
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, self.inp))?;
        let y = match self.small(&x2, rows)? {
            Some(y) => y,
            None => {
                self.restore_wt();
                x2.matmul(&self.wt)?
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out;
        Ok(y.reshape(out_dims)?)
    }

    /// [`Panels::matmul`] where it applies: f32 on the CPU, at most [`SMALL_ROWS`] rows.
    fn small(&self, x: &Tensor, rows: usize) -> Result<Option<Tensor>> {
        if rows == 0 || rows > SMALL_ROWS || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Ok(None);
        }
        let Some(panels) = self.panels.get_or_init(|| self.pack().ok().flatten()) else {
            return Ok(None);
        };
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        Ok(panels
            .matmul(&xs, rows, self.inp, self.out)
            .map(|y| Tensor::from_vec(y, (rows, self.out), &Device::Cpu))
            .transpose()?)
    }

    /// The panel copy of `W^T`, or `None` where it is not f32 on the CPU. (`wt` is current:
    /// it falls behind only panels that exist.)
    fn pack(&self) -> Result<Option<Panels>> {
        if self.inp == 0 || self.out == 0 {
            return Ok(None);
        }
        with_cpu_f32(&self.wt, |wt| Panels::pack(wt, self.inp, self.out))
    }
}

/// `w` (`[rows, cols]`) transposed into a new contiguous tensor. On the CPU in f32 in parallel
/// square blocks: candle's strided copy walks the source column by column on one thread and
/// took a fifth of a model's load time.
fn transposed(w: &Tensor) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    match with_cpu_f32(w, |src| transpose_to_f32(src, rows, cols))? {
        Some(dst) => Ok(Tensor::from_vec(dst, (cols, rows), w.device())?),
        None => Ok(w.t()?.contiguous()?),
    }
}

/// A CPU weight `w` (`[rows, cols]`, stored as bf16, f16 or f32) in the form [`Lin`] keeps it
/// in f32: the transposed view of a new contiguous `[cols, rows]` f32 tensor, which
/// [`Lin::set`] then takes without converting or copying anything. Widening to f32 is exact,
/// so the layer ends up bit for bit as if it had been given `w` itself. This lets a caller that
/// replaces weights from many threads (an in-memory merge) do the work there; `None` for
/// other dtypes, devices or non-contiguous tensors.
pub fn to_layer_form(w: &Tensor) -> Result<Option<Tensor>> {
    let (rows, cols) = w.dims2()?;
    let (storage, layout) = w.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let dst = match cpu {
        CpuStorage::F32(s) => transpose_to_f32(&s[start..end], rows, cols),
        CpuStorage::BF16(s) => transpose_to_f32(&s[start..end], rows, cols),
        CpuStorage::F16(s) => transpose_to_f32(&s[start..end], rows, cols),
        _ => return Ok(None),
    };
    Ok(Some(
        Tensor::from_vec(dst, (cols, rows), &Device::Cpu)?.t()?,
    ))
}

/// `src` (`[rows, cols]`, row-major, any float type) transposed and widened into a new
/// `[cols, rows]` f32 buffer, in parallel: each task writes B rows of the result from B
/// columns of every source row.
fn transpose_to_f32<T: WithDType>(src: &[T], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut dst = vec![0f32; rows * cols];
    dst.par_chunks_mut((B * rows).max(1))
        .enumerate()
        .for_each(|(cb, out)| {
            let c0 = cb * B;
            let cn = out.len() / rows.max(1);
            for r in 0..rows {
                for (c, &x) in src[r * cols + c0..r * cols + c0 + cn].iter().enumerate() {
                    out[c * rows + r] = x.to_f64() as f32;
                }
            }
        });
    dst
}

/// `f` on the elements of `t` where it is a contiguous f32 tensor on the CPU (borrowed, not
/// copied); `None` otherwise.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    if t.dtype() != DType::F32 {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    Ok(Some(f(&cpu.as_slice::<f32>()?[start..end])))
}

#[cfg(test)]
mod tests {
    use super::*;

    use merge_core::engine::ColumnTarget;

    use crate::layer_target::PanelsPtr;

    /// Three stacked parts ([`PARTS`]) whose rows straddle panel boundaries (33 output columns:
    /// the last panel partial), each written once through a target into `wt` and `panels`,
    /// partly by column runs crossing panels and partly by row pieces; `value(part, r, c)` is
    /// the weight's value.
    fn fill(
        wt: Option<*mut f32>,
        panels: Option<PanelsPtr>,
        value: impl Fn(usize, usize, usize) -> f32,
    ) {
        let out: usize = PARTS.iter().sum();
        let target = |offset, rows| LayerTarget {
            wt,
            stored: None,
            panels,
            panel: PANEL,
            out,
            inp: INP,
            offset,
            rows,
        };
        let inp = INP;
        let mut offset = 0;
        for (part, &rows) in PARTS.iter().enumerate() {
            let t = target(offset, rows);
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
    }

    const INP: usize = 7;
    const PARTS: [usize; 3] = [5, 19, 9];

    /// `Wᵀ` as [`fill`] should leave it.
    fn expected_wt(value: impl Fn(usize, usize, usize) -> f32) -> Vec<f32> {
        let out: usize = PARTS.iter().sum();
        let mut wt = vec![0f32; INP * out];
        let mut offset = 0;
        for (part, &rows) in PARTS.iter().enumerate() {
            for r in 0..rows {
                for c in 0..INP {
                    wt[c * out + offset + r] = value(part, r, c);
                }
            }
            offset += rows;
        }
        wt
    }

    /// Written into `Wᵀ` and f32 panels: `Wᵀ` holds every value at its place and the panel
    /// copy equals packing it.
    #[test]
    fn column_runs_and_row_pieces_fill_wt_and_its_panels() {
        let out: usize = PARTS.iter().sum();
        let value = |part: usize, r: usize, c: usize| (part * 1000 + r * 10 + c) as f32 + 0.5;
        let mut wt = vec![f32::NAN; INP * out];
        let mut panels = vec![0f32; out.div_ceil(PANEL) * INP * PANEL];
        let (w, p) = (wt.as_mut_ptr(), panels.as_mut_ptr());
        fill(Some(w), Some(PanelsPtr::F32(p)), value);
        let want = expected_wt(value);
        assert_eq!(wt, want);
        let Panels::F32(packed) = Panels::pack(&want, INP, out) else {
            panic!("the values are not bf16: f32 panels");
        };
        assert_eq!(panels, packed);
    }

    /// bf16 values written into bf16 panels alone: they equal packing `Wᵀ` (which packs them
    /// as bf16), and unpack to it.
    #[test]
    fn bf16_values_fill_bf16_panels() {
        let out: usize = PARTS.iter().sum();
        // Distinct bf16 values: consecutive bf16 bit patterns from 1.0.
        let value = |part: usize, r: usize, c: usize| {
            f32::from_bits(0x3f80_0000 + ((((part * 32 + r) * 8 + c) as u32) << 16))
        };
        let want = expected_wt(value);
        let mut panels = Panels::pack(&vec![0f32; INP * out], INP, out);
        fill(None, Some(panels.ptr()), value);
        let (Panels::Bf16(got), Panels::Bf16(packed)) = (&panels, Panels::pack(&want, INP, out))
        else {
            panic!("bf16 values: bf16 panels");
        };
        assert_eq!(got, &packed);
        let mut back = vec![f32::NAN; INP * out];
        panels.unpack(&mut back, INP, out);
        assert_eq!(back, want);
    }

    /// Whole rows (`put_rows`, blocks of 1 to 11 rows) into panels alone, f32 and bf16: the
    /// panels equal packing `Wᵀ`. 19 inputs: eight-input register transposes and a tail;
    /// parts straddling panels: lane groups of eight and ragged ones.
    #[test]
    fn whole_rows_fill_panels_alone() {
        const INPUTS: usize = 19;
        let out: usize = PARTS.iter().sum();
        for bf16 in [false, true] {
            let value = |part: usize, r: usize, c: usize| {
                let i = ((part * 32 + r) * INPUTS + c) as u32;
                if bf16 {
                    f32::from_bits(0x3f80_0000 + (i << 16))
                } else {
                    i as f32 + 0.25
                }
            };
            let mut wt = vec![0f32; INPUTS * out];
            let mut offset = 0;
            for (part, &rows) in PARTS.iter().enumerate() {
                for r in 0..rows {
                    for c in 0..INPUTS {
                        wt[c * out + offset + r] = value(part, r, c);
                    }
                }
                offset += rows;
            }
            let mut panels = Panels::pack(&vec![0f32; INPUTS * out], INPUTS, out);
            if !bf16 {
                panels = Panels::F32(vec![0f32; out.div_ceil(PANEL) * INPUTS * PANEL]);
            }
            let ptr = panels.ptr();
            let mut offset = 0;
            for (part, &rows) in PARTS.iter().enumerate() {
                let t = LayerTarget {
                    wt: None,
                    stored: None,
                    panels: Some(ptr),
                    panel: PANEL,
                    out,
                    inp: INPUTS,
                    offset,
                    rows,
                };
                let (mut r0, mut n) = (0, 1);
                while r0 < rows {
                    let n_here = n.min(rows - r0);
                    let block: Vec<f32> = (r0..r0 + n_here)
                        .flat_map(|r| (0..INPUTS).map(move |c| value(part, r, c)))
                        .collect();
                    t.put_rows(r0, INPUTS, &block);
                    r0 += n_here;
                    n = if n <= 3 { 11 } else { n - 3 };
                }
                offset += rows;
            }
            let packed = Panels::pack(&wt, INPUTS, out);
            match (&panels, &packed) {
                (Panels::F32(got), Panels::F32(want)) => assert_eq!(got, want),
                (Panels::Bf16(got), Panels::Bf16(want)) => assert_eq!(got, want),
                _ => panic!("bf16 {bf16}: the panels' forms differ"),
            }
        }
    }
}
