//! Linear layers with weights stored transposed (`[in, out]`, contiguous): candle's CPU matmul
//! runs measurably faster on a contiguous right-hand side than on the transposed view of HF's
//! `[out, in]` layout (about 15% on prompt-sized inputs on the development machine).
//!
//! Inputs of a few rows (decoding batches, choice tokens) on the CPU in f32 go through
//! [`panel_matmul`] over a second copy of the weights packed in 16-column panels, made the
//! first time such an input comes: candle's gemm repacks the weights on every call and runs far
//! below the memory bandwidth for so few rows (a quarter of the panel kernel's speed at 16 rows
//! on the development machine). The copy doubles the weights' memory, which only CPU f32
//! evaluation pays.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, DType, Device, Storage, Tensor, WithDType};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::weights::{fetch, full_name, prepare};
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
    /// `W^T` in [`PANEL`]-column panels for [`panel_matmul`]; `None` inside where the weights
    /// are not f32 on the CPU. Made on first use, dropped when a weight is replaced.
    panels: OnceLock<Option<Vec<f32>>>,
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
    /// through its target straight into `Wᵀ` and, when made, the panel copy (see
    /// [`LayerTarget`]).
    ///
    /// # Safety
    /// The targets write through raw pointers into this layer's buffers. While any of them is
    /// alive the caller must not run the layer, replace any of its weights or biases, or drop
    /// it; and concurrent writes must go to distinct elements.
    pub unsafe fn layer_targets(&mut self) -> Vec<(String, LayerTarget)> {
        if self.dtype != DType::F32 || !self.device.is_cpu() || self.inp == 0 || self.out == 0 {
            return Vec::new();
        }
        let Some(wt) = storage_ptr(&self.wt) else {
            return Vec::new();
        };
        let panels = match self.panels.get_mut() {
            Some(Some(p)) => Some(p.as_mut_ptr()),
            _ => None,
        };
        let mut offset = 0;
        let mut targets = Vec::with_capacity(self.parts.len());
        for (name, rows) in &self.parts {
            targets.push((
                format!("{name}.weight"),
                LayerTarget {
                    wt,
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
            None => x2.matmul(&self.wt)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out;
        Ok(y.reshape(out_dims)?)
    }

    /// [`panel_matmul`] where it applies: f32 on the CPU, at most [`SMALL_ROWS`] rows.
    fn small(&self, x: &Tensor, rows: usize) -> Result<Option<Tensor>> {
        if rows == 0 || rows > SMALL_ROWS || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Ok(None);
        }
        let Some(panels) = self.panels.get_or_init(|| self.pack().ok().flatten()) else {
            return Ok(None);
        };
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        Ok(panel_matmul(&xs, panels, rows, self.inp, self.out)
            .map(|y| Tensor::from_vec(y, (rows, self.out), &Device::Cpu))
            .transpose()?)
    }

    /// The panel copy of `W^T`, or `None` where it is not f32 on the CPU.
    fn pack(&self) -> Result<Option<Vec<f32>>> {
        if self.inp == 0 || self.out == 0 {
            return Ok(None);
        }
        with_cpu_f32(&self.wt, |wt| pack_panels(wt, self.inp, self.out))
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

/// A pointer to the elements of `t` (a contiguous f32 CPU tensor of `inp·out` elements, else
/// `None`), taken under its storage's write lock so that writing through it later — while
/// nothing else uses the tensor — is a write the storage allows.
fn storage_ptr(t: &Tensor) -> Option<*mut f32> {
    struct Ptr(std::cell::Cell<Option<*mut f32>>);
    impl candle_core::InplaceOp1 for Ptr {
        fn name(&self) -> &'static str {
            "storage-pointer"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &candle_core::Layout) -> candle_core::Result<()> {
            if let (CpuStorage::F32(v), Some((start, end))) = (s, l.contiguous_offsets()) {
                self.0.set(Some(v[start..end].as_mut_ptr()));
            }
            Ok(())
        }
    }
    let p = Ptr(std::cell::Cell::new(None));
    if t.dtype() != DType::F32 || !t.device().is_cpu() || !t.is_contiguous() {
        return None;
    }
    t.inplace_op1(&p).ok()?;
    p.0.get()
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

/// Rows up to which [`panel_matmul`] is used instead of candle's gemm.
pub const SMALL_ROWS: usize = 32;

/// Columns per panel: two AVX registers.
const PANEL: usize = 16;
/// Most rows of `x` per register tile (6 rows × 16 columns = 12 accumulators).
const ROW_TILE: usize = 6;

/// `W^T` (`[k, n]`, row-major) rearranged as `[n/16][k][16]` (the last panel zero-filled past
/// `n`): each panel is one contiguous stream for [`panel_matmul`].
pub fn pack_panels(wt: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert_eq!(wt.len(), k * n);
    if k == 0 {
        return Vec::new();
    }
    let mut packed = vec![0f32; n.div_ceil(PANEL) * k * PANEL];
    packed
        .par_chunks_mut(k * PANEL)
        .enumerate()
        .for_each(|(p, panel)| {
            let (c0, c1) = (p * PANEL, ((p + 1) * PANEL).min(n));
            for (kk, dst) in panel.chunks_exact_mut(PANEL).enumerate() {
                dst[..c1 - c0].copy_from_slice(&wt[kk * n + c0..kk * n + c1]);
            }
        });
    packed
}

/// `y = x·W^T` for a few rows of `x` (`[m, k]`, row-major) against `W^T` packed by
/// [`pack_panels`], on AVX2+FMA x86-64: `None` where those instructions are missing. Each panel
/// streams from memory once and then feeds every row tile from cache; the accumulators stay in
/// registers over all of `k`. Every output element is summed over the input features in order
/// with fused multiply-adds, whatever `m` is, so a row's result does not depend on the batch
/// it is in.
pub fn panel_matmul(x: &[f32], packed: &[f32], m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            assert_eq!(x.len(), m * k);
            assert_eq!(packed.len(), n.div_ceil(PANEL) * k * PANEL);
            if m == 0 || n == 0 {
                return Some(Vec::new());
            }
            // `x` transposed (`[k, m]`) so the values broadcast at one step are adjacent.
            let mut xt = vec![0f32; k * m];
            for (r, row) in x.chunks_exact(k.max(1)).enumerate() {
                for (kk, &v) in row.iter().enumerate() {
                    xt[kk * m + r] = v;
                }
            }
            // Output panel by panel (`[n/16][m][16]`), each written by one task.
            let mut yp = vec![0f32; n.div_ceil(PANEL) * m * PANEL];
            let per_task = n
                .div_ceil(PANEL)
                .div_ceil(rayon::current_num_threads().max(1));
            yp.par_chunks_mut(per_task.max(1) * m * PANEL)
                .enumerate()
                .for_each(|(t, out)| {
                    for (i, y) in out.chunks_exact_mut(m * PANEL).enumerate() {
                        let p = t * per_task + i;
                        let w = &packed[p * k * PANEL..(p + 1) * k * PANEL];
                        // SAFETY: AVX2 and FMA were detected above; `w` is one whole panel
                        // (`k·16`), `y` one panel's output (`m·16`) and `xt` is `k·m` long.
                        unsafe { panel_rows(&xt, w, y, m, k) };
                    }
                });
            let mut y = vec![0f32; m * n];
            for (p, panel) in yp.chunks_exact(m * PANEL).enumerate() {
                let (c0, c1) = (p * PANEL, ((p + 1) * PANEL).min(n));
                for (r, row) in panel.chunks_exact(PANEL).enumerate() {
                    y[r * n + c0..r * n + c1].copy_from_slice(&row[..c1 - c0]);
                }
            }
            return Some(y);
        }
    }
    let _ = (x, packed, m, k, n);
    None
}

/// One panel's output (`[m][16]`) for all rows, in near-equal tiles of up to [`ROW_TILE`] rows
/// (16 rows: 6 + 5 + 5).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xt.len() >= k·m`, `w.len() == k·16`, `y.len() == m·16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_rows(xt: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize) {
    let tiles = m.div_ceil(ROW_TILE);
    let mut r0 = 0;
    for t in 0..tiles {
        let rows = m / tiles + usize::from(t < m % tiles);
        let out = &mut y[r0 * PANEL..(r0 + rows) * PANEL];
        // SAFETY: this function's contract, with `out` exactly `rows` output rows at `r0`.
        match rows {
            6 => tile::<6>(xt, w, out, m, k, r0),
            5 => tile::<5>(xt, w, out, m, k, r0),
            4 => tile::<4>(xt, w, out, m, k, r0),
            3 => tile::<3>(xt, w, out, m, k, r0),
            2 => tile::<2>(xt, w, out, m, k, r0),
            _ => tile::<1>(xt, w, out, m, k, r0),
        }
        r0 += rows;
    }
}

/// `y[0..R][0..16] = x[r0..r0+R, ..] · panel`, the sums in registers over all `k`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `w.len() == k·16`, `y.len() == R·16` and `xt` (`[k, m]`)
/// holds columns `r0..r0+R` (the loads read `xt[kk·m + r0 + i]` and `w` through raw pointers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize>(
    xt: &[f32],
    w: &[f32],
    y: &mut [f32],
    m: usize,
    k: usize,
    r0: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(w.len() == k * PANEL && y.len() == R * PANEL && xt.len() >= k * m);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut xp = xt.as_ptr().add(r0);
    let mut wp = w.as_ptr();
    for _ in 0..k {
        let (w0, w1) = (_mm256_loadu_ps(wp), _mm256_loadu_ps(wp.add(8)));
        for (i, a) in acc.iter_mut().enumerate() {
            let xb = _mm256_broadcast_ss(&*xp.add(i));
            a[0] = _mm256_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm256_fmadd_ps(xb, w1, a[1]);
        }
        xp = xp.add(m);
        wp = wp.add(PANEL);
    }
    for (i, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(y.as_mut_ptr().add(i * PANEL), a[0]);
        _mm256_storeu_ps(y.as_mut_ptr().add(i * PANEL + 8), a[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                panel: PANEL,
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
