//! The task-arithmetic family: every method that adds (sparsified, sign-elected) task vectors
//! to a base. mergekit's "generalized task arithmetic", with its names, parameters and
//! defaults.
//!
//! For each tensor, with base θ₀ and experts θᵢ:
//! 1. δᵢ = θᵢ − θ₀, sparsified per expert (see [`super::sparsify`]) with that expert's
//!    `density` (and `gamma` / `epsilon`); `rescale` restores the kept mass;
//! 2. δᵢ ← wᵢ·δᵢ;
//! 3. consensus (TIES' sign election, methods marked "sum"): per element the majority sign
//!    is sign(Σᵢ δᵢ) (≥ 0 counts as +); only δᵢ with that sign count, and the divisor is the
//!    sum of their weights (1 where none agrees). Without consensus the divisor is Σᵢ wᵢ (1
//!    when |Σ wᵢ| < 1e-8);
//! 4. δ = Σ δᵢ (divided by the divisor when `normalize`), times `lambda`;
//! 5. θ = θ₀ + δ.
//!
//! | method | sparsification | consensus | normalize | rescale | paper |
//! |---|---|---|---|---|---|
//! | `task_arithmetic` | none | none | false | false | Ilharco et al. 2023, arXiv:2212.04089 |
//! | `ties` | magnitude | sum | true | false | Yadav et al. 2023, arXiv:2306.01708 |
//! | `dare_linear` | random | none | false | true | Yu et al. 2024, arXiv:2311.03099 |
//! | `dare_ties` | random | sum | false | true | Yu et al. 2024, arXiv:2311.03099 |
//! | `breadcrumbs` | magnitude outliers | none | false | false | Davari & Belilovsky 2023, arXiv:2312.06795 |
//! | `breadcrumbs_ties` | magnitude outliers | sum | false | false | arXiv:2312.06795 |
//! | `della` | DELLA MagPrune | sum | true | true | Deep et al. 2024, arXiv:2406.11617 |
//! | `della_linear` | DELLA MagPrune | none | false | true | arXiv:2406.11617 |
//!
//! Parameters — global: `normalize`, `rescale` (defaults above), `lambda` = 1.0,
//! `int8_mask` = false (accepted for mergekit configs; it only saves memory there, the
//! result is the same). Per model (or global as a default for all): `weight` (required),
//! `density` = 1.0, `gamma` = 0.01 (breadcrumbs), `epsilon` = 0.15 (della).
//! `task_arithmetic` accepts `density` like mergekit but does not sparsify.
//!
//! Random masks (DARE, DELLA) come from the tensor's seed (the config's `seed` mixed with the
//! tensor name) and the expert's position, so the same config gives byte-identical output.
//!
//! ```toml
//! [merge]
//! method = "ties"
//! base_model = "meta-llama/Meta-Llama-3-8B"
//! [merge.parameters]
//! density = 0.5
//! [[merge.models]]
//! model = "meta-llama/Meta-Llama-3-8B-Instruct"
//! parameters = { weight = 0.6 }
//! [[merge.models]]
//! model = "NousResearch/Hermes-2-Pro-Llama-3-8B"
//! parameters = { weight = 0.4, density = 0.7 }
//! ```

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::sparsify::{self, select_ranks, Kept, Mask};
use super::{
    stream_chunks, ChunkSink, MergeMethod, ParamSpec, Params, Source, StreamInputs, TensorInputs,
    VecSink, STREAM_CHUNK,
};
use crate::tensor::{tensor_like, with_f32_slices};

/// How task vectors are sparsified before they are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsification {
    /// Keep every element.
    None,
    /// Keep the largest magnitudes (TIES).
    Magnitude,
    /// Drop the largest `gamma` share, then the smallest (Model Breadcrumbs).
    MagnitudeOutliers,
    /// Keep at random with probability `density` (DARE).
    Random,
    /// Keep at random with magnitude-ranked probabilities (DELLA).
    DellaMagprune,
}

/// How the experts' task vectors are reconciled per element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consensus {
    /// TIES sign election by summed (weighted) mass.
    Sum,
}

/// One member of the family; see the module docs.
pub struct TaskArithmeticFamily {
    name: &'static str,
    sparsification: Sparsification,
    consensus: Option<Consensus>,
    params: &'static [ParamSpec],
    model_params: &'static [ParamSpec],
}

const fn shared(normalize: bool, rescale: bool) -> [ParamSpec; 4] {
    [
        ParamSpec::flag("int8_mask", false),
        ParamSpec::flag("normalize", normalize),
        ParamSpec::flag("rescale", rescale),
        ParamSpec::optional("lambda", 1.0),
    ]
}

const PER_MODEL: &[ParamSpec] = &[
    ParamSpec::required("weight"),
    ParamSpec::optional("density", 1.0),
];
const PER_MODEL_GAMMA: &[ParamSpec] = &[
    ParamSpec::required("weight"),
    ParamSpec::optional("density", 1.0),
    ParamSpec::optional("gamma", 0.01),
];
const PER_MODEL_EPSILON: &[ParamSpec] = &[
    ParamSpec::required("weight"),
    ParamSpec::optional("density", 1.0),
    ParamSpec::optional("epsilon", 0.15),
];

/// One `pub static` member of the family (a row of the table in the module docs).
macro_rules! member {
    ($doc:literal $static:ident $name:literal $sparsification:ident $consensus:expr,
     normalize $normalize:literal, rescale $rescale:literal, $per_model:ident) => {
        #[doc = $doc]
        pub static $static: TaskArithmeticFamily = TaskArithmeticFamily {
            name: $name,
            sparsification: Sparsification::$sparsification,
            consensus: $consensus,
            params: &shared($normalize, $rescale),
            model_params: $per_model,
        };
    };
}

member!("`task_arithmetic`: θ₀ + λ·Σ wᵢ(θᵢ − θ₀)."
    TASK_ARITHMETIC "task_arithmetic" None None, normalize false, rescale false, PER_MODEL);
member!("`ties`: magnitude pruning, sign election, disjoint mean."
    TIES "ties" Magnitude Some(Consensus::Sum), normalize true, rescale false, PER_MODEL);
member!("`dare_linear`: random drop and rescale, then a weighted sum."
    DARE_LINEAR "dare_linear" Random None, normalize false, rescale true, PER_MODEL);
member!("`dare_ties`: random drop and rescale, then TIES' sign election."
    DARE_TIES "dare_ties" Random Some(Consensus::Sum), normalize false, rescale true, PER_MODEL);
member!("`breadcrumbs`: drop outliers and small values, then a weighted sum."
    BREADCRUMBS "breadcrumbs" MagnitudeOutliers None,
    normalize false, rescale false, PER_MODEL_GAMMA);
member!("`breadcrumbs_ties`: breadcrumbs' pruning with TIES' sign election."
    BREADCRUMBS_TIES "breadcrumbs_ties" MagnitudeOutliers Some(Consensus::Sum),
    normalize false, rescale false, PER_MODEL_GAMMA);
member!("`della`: magnitude-ranked random drop, sign election."
    DELLA "della" DellaMagprune Some(Consensus::Sum),
    normalize true, rescale true, PER_MODEL_EPSILON);
member!("`della_linear`: magnitude-ranked random drop, weighted sum."
    DELLA_LINEAR "della_linear" DellaMagprune None,
    normalize false, rescale true, PER_MODEL_EPSILON);

impl TaskArithmeticFamily {
    /// Each expert's mask over `x`, or `None` where the sparsification needs the whole tensor:
    /// DELLA (ranks per row) always, and, when `streaming`, L1 rescaling after magnitude
    /// selection (the kept mass is known only once every chunk is masked).
    fn masks(&self, x: &StreamInputs, streaming: bool) -> Option<Result<Vec<Mask>>> {
        let n = x.len();
        let rescale = x.flag("rescale");
        let mut masks = Vec::with_capacity(x.models.len());
        let mut select = Vec::new();
        for i in 0..x.models.len() {
            let p = &x.model_params[i];
            let density = p.number("density");
            masks.push(match self.sparsification {
                Sparsification::None => Mask::All,
                _ if density >= 1.0 => Mask::All,
                Sparsification::DellaMagprune => return None,
                Sparsification::Random if density <= 0.0 => Mask::Nothing,
                Sparsification::Random => Mask::Random {
                    density,
                    rescale,
                    seed: sparsify::mix_seed(x.seed, i as u64),
                },
                _ if rescale && streaming => return None,
                // Selection counts in u32.
                _ if n >= u32::MAX as usize && streaming => return None,
                _ if n >= u32::MAX as usize => {
                    let e = format!("tensor `{}` has {n} elements, too many to select", x.name);
                    return Some(Err(candle_core::Error::msg(e)));
                }
                Sparsification::Magnitude if density <= 0.0 => Mask::Nothing,
                Sparsification::Magnitude => {
                    let k = ((density * n as f64) as usize).max(1);
                    Mask::rank_range(n.saturating_sub(k), n, n, i, &mut select)
                }
                Sparsification::MagnitudeOutliers => {
                    let target = (density.max(0.0) * n as f64) as usize;
                    let top = (p.number("gamma").max(0.0) * n as f64) as usize;
                    let bottom = n.saturating_sub(target).saturating_sub(top);
                    Mask::rank_range(bottom, bottom + target, n, i, &mut select)
                }
            });
        }
        if !select.is_empty() {
            match select_ranks(x, &select) {
                Ok(ranks) => Mask::locate(&mut masks, ranks),
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(masks))
    }

    /// The streaming merge, given the masks.
    fn stream(&self, x: &StreamInputs, masks: &[Mask], sink: &dyn ChunkSink) -> Result<()> {
        let k = x.models.len();
        let weights: Vec<f32> = (0..k).map(|i| x.model_param(i, "weight") as f32).collect();
        let combine = Combine::new(self, x.flag("normalize"), x.param("lambda"), &weights);
        let plain = self.sparsification == Sparsification::None && !combine.consensus;
        stream_chunks(x, sink, |mut c, out| {
            let b: &[f32] = c.base.as_deref().expect("requires_base");
            if plain {
                // θ₀ + λ·Σ wᵢ(θᵢ − θ₀), accumulated in the output model by model.
                out.fill(0.0);
                for (m, &w) in c.models.iter().zip(&weights) {
                    for ((o, m), b) in out.iter_mut().zip(m.iter()).zip(b) {
                        *o += (m - b) * w;
                    }
                }
                for (o, b) in out.iter_mut().zip(b) {
                    *o = combine.finish(*b, *o, combine.linear_div);
                }
                return Ok(());
            }
            // Where every mask keeps this chunk by key alone, most of it in one pass over the
            // inputs (`done` elements); the rest as below.
            let kept: Option<Vec<Kept>> = masks.iter().map(|m| m.kept(c.index)).collect();
            let done = kept.as_ref().map_or(0, |kept| {
                let models: Vec<&[f32]> = c.models.iter().map(|m| &**m).collect();
                combine.fused(b, &models, kept, &weights, out)
            });
            let (b, out) = (&b[done..], &mut out[done..]);
            // Task vectors in place of the models' chunks, sparsified.
            for (i, (m, mask)) in c.models.iter_mut().zip(masks).enumerate() {
                let m = &mut m[done..];
                m.iter_mut().zip(b).for_each(|(m, b)| *m -= b);
                match &kept {
                    Some(kept) => kept[i].apply(m),
                    None => mask.apply(m, c.index, c.first),
                }
            }
            // Combine a block at a time, expert by expert (vectorisable loops).
            let mut scratch = Scratch::new(COMBINE_BLOCK.min(out.len()));
            for (bi, o) in out.chunks_mut(COMBINE_BLOCK).enumerate() {
                let span = bi * COMBINE_BLOCK..bi * COMBINE_BLOCK + o.len();
                let deltas: Vec<&[f32]> = c
                    .models
                    .iter()
                    .map(|d| &d[done + span.start..done + span.end])
                    .collect();
                combine.block(&b[span], &deltas, &weights, o, &mut scratch);
            }
            Ok(())
        })
    }
}

/// Elements combined at a time: the scratch buffers stay in the L1/L2 cache.
const COMBINE_BLOCK: usize = 2048;

/// How weighted task vectors become the merged values; shared by the streaming and the
/// whole-tensor paths so both compute the same thing in the same order.
struct Combine {
    /// TIES' sign election (disjoint mean) instead of a plain weighted sum.
    consensus: bool,
    normalize: bool,
    /// Divisor of a normalised plain sum: the sum of the weights (1 when it is ~0).
    linear_div: f32,
    lambda: f32,
}

/// Per-block buffers for [`Combine::block`].
struct Scratch {
    total: Vec<f32>,
    mixed: Vec<f32>,
    div: Vec<f32>,
}

impl Scratch {
    fn new(len: usize) -> Self {
        Scratch {
            total: vec![0.0; len],
            mixed: vec![0.0; len],
            div: vec![0.0; len],
        }
    }
}

impl Combine {
    /// From the method and its `normalize`, `lambda` and per-model `weight` parameters.
    fn new(method: &TaskArithmeticFamily, normalize: bool, lambda: f64, weights: &[f32]) -> Self {
        let sum_w: f32 = weights.iter().sum();
        Combine {
            consensus: method.consensus.is_some(),
            normalize,
            linear_div: if sum_w.abs() < 1e-8 { 1.0 } else { sum_w },
            lambda: lambda as f32,
        }
    }

    /// `base + λ·(mixed / divisor)` (the division only when normalising).
    #[inline]
    fn finish(&self, base: f32, mixed: f32, divisor: f32) -> f32 {
        let mut m = mixed;
        if self.normalize {
            m /= divisor;
        }
        if self.lambda != 1.0 {
            m *= self.lambda;
        }
        base + m
    }

    /// One block: `out = finish(base, mix(wᵢ·deltas[i]))`, experts in order.
    fn block(
        &self,
        base: &[f32],
        deltas: &[&[f32]],
        weights: &[f32],
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let len = out.len();
        let total = &mut scratch.total[..len];
        // Σᵢ wᵢδᵢ, in expert order
        for (t, v) in total.iter_mut().zip(deltas[0]) {
            *t = v * weights[0];
        }
        for (r, &w) in deltas[1..].iter().zip(&weights[1..]) {
            for (t, v) in total.iter_mut().zip(r.iter()) {
                *t += v * w;
            }
        }
        if !self.consensus {
            for ((o, t), b) in out.iter_mut().zip(total.iter()).zip(base) {
                *o = self.finish(*b, *t, self.linear_div);
            }
            return;
        }
        // TIES: only values whose sign agrees with the elected sign count.
        let mixed = &mut scratch.mixed[..len];
        let div = &mut scratch.div[..len];
        mixed.fill(0.0);
        div.fill(0.0);
        for (r, &w) in deltas.iter().zip(weights) {
            for (((v, t), mx), dv) in r
                .iter()
                .zip(total.iter())
                .zip(mixed.iter_mut())
                .zip(div.iter_mut())
            {
                let v = v * w;
                let agree = agrees_with(v, *t);
                // Branch-free: adding +0.0 where the sign disagrees changes nothing (neither
                // sum is ever −0.0: it starts at +0.0 and only nonzero values are added).
                let m = 0u32.wrapping_sub(u32::from(agree));
                *mx += f32::from_bits(v.to_bits() & m);
                *dv += f32::from_bits(w.to_bits() & m);
            }
        }
        for (((o, b), mx), dv) in out.iter_mut().zip(base).zip(mixed.iter()).zip(div.iter()) {
            *o = self.finish(*b, *mx, if *dv == 0.0 { 1.0 } else { *dv });
        }
    }
}

/// Most experts [`Combine::fused`] takes.
const FUSED_MODELS: usize = 8;

impl Combine {
    /// The merged values of a leading part of a chunk straight from the inputs: per element
    /// each task vector `models[i] − base`, kept as `kept[i]` says, then [`Combine::block`]'s
    /// arithmetic in its order — all in registers (AVX2, eight elements at a time), so the
    /// chunk is read once instead of being rewritten as task vectors, masked and combined
    /// pass by pass. Returns how many leading elements of `out` it wrote (0 without AVX2 or
    /// with more than [`FUSED_MODELS`] experts): the same bits the passes give.
    fn fused(
        &self,
        base: &[f32],
        models: &[&[f32]],
        kept: &[Kept],
        weights: &[f32],
        out: &mut [f32],
    ) -> usize {
        #[cfg(target_arch = "x86_64")]
        if (1..=FUSED_MODELS).contains(&models.len()) && std::arch::is_x86_feature_detected!("avx2")
        {
            let n = out.len();
            assert!(base.len() >= n && models.iter().all(|m| m.len() >= n));
            assert!(kept.len() == models.len() && weights.len() == models.len());
            // SAFETY: AVX2 detected; every slice holds at least `out.len()` elements.
            return unsafe { self.fused_avx2(base, models, kept, weights, out) };
        }
        let _ = (base, models, kept, weights, out);
        0
    }

    /// [`Combine::fused`] over the first multiple of eight elements.
    ///
    /// # Safety
    /// AVX2 is available; `models`, `kept` and `weights` have the same length, at most
    /// [`FUSED_MODELS`]; `base` and every model hold at least `out.len()` elements.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fused_avx2(
        &self,
        base: &[f32],
        models: &[&[f32]],
        kept: &[Kept],
        weights: &[f32],
        out: &mut [f32],
    ) -> usize {
        use std::arch::x86_64::*;
        let k = models.len();
        let whole = out.len() - out.len() % 8;
        // Per expert: zeroed whole, kept whole, or kept where lo ≤ key (< hi). Keys are
        // magnitudes' bits, at most 0x7fff_ffff, so the bounds compare as i32.
        let mut none = [false; FUSED_MODELS];
        let mut all = [false; FUSED_MODELS];
        let mut lo = [_mm256_setzero_si256(); FUSED_MODELS];
        let mut hi = [None; FUSED_MODELS];
        for (i, &kept) in kept.iter().enumerate() {
            match kept {
                Kept::All => all[i] = true,
                Kept::Nothing => none[i] = true,
                Kept::Keys { lo: l, .. } if l > 0x7fff_ffff => none[i] = true,
                Kept::Keys { lo: l, hi: h } => {
                    lo[i] = _mm256_set1_epi32(l as i32);
                    hi[i] = h
                        .filter(|&h| h <= 0x7fff_ffff)
                        .map(|h| _mm256_set1_epi32(h as i32));
                }
            }
        }
        let w: [__m256; FUSED_MODELS] =
            std::array::from_fn(|i| _mm256_set1_ps(weights.get(i).copied().unwrap_or(0.0)));
        let zero = _mm256_setzero_ps();
        let one = _mm256_set1_ps(1.0);
        let magnitude = _mm256_set1_epi32(0x7fff_ffff);
        let ones = _mm256_set1_epi32(-1);
        let linear_div = _mm256_set1_ps(self.linear_div);
        let lambda = _mm256_set1_ps(self.lambda);
        let mut d = [zero; FUSED_MODELS];
        for j in (0..whole).step_by(8) {
            // SAFETY: j + 8 <= whole <= every slice's length (caller's contract).
            let b = unsafe { _mm256_loadu_ps(base.as_ptr().add(j)) };
            let mut total = zero;
            for i in 0..k {
                let delta = if none[i] {
                    zero
                } else {
                    // SAFETY: as above.
                    let x = _mm256_sub_ps(unsafe { _mm256_loadu_ps(models[i].as_ptr().add(j)) }, b);
                    if all[i] {
                        x
                    } else {
                        let key = _mm256_and_si256(_mm256_castps_si256(x), magnitude);
                        let mut keep = _mm256_xor_si256(_mm256_cmpgt_epi32(lo[i], key), ones);
                        if let Some(hi) = hi[i] {
                            keep = _mm256_and_si256(keep, _mm256_cmpgt_epi32(hi, key));
                        }
                        _mm256_and_ps(x, _mm256_castsi256_ps(keep))
                    }
                };
                d[i] = delta;
                let v = _mm256_mul_ps(delta, w[i]);
                total = if i == 0 { v } else { _mm256_add_ps(total, v) };
            }
            let merged = if self.consensus {
                let up = _mm256_cmp_ps::<_CMP_GE_OQ>(total, zero);
                let (mut mixed, mut div) = (zero, zero);
                for i in 0..k {
                    let v = _mm256_mul_ps(d[i], w[i]);
                    let agree = _mm256_or_ps(
                        _mm256_and_ps(up, _mm256_cmp_ps::<_CMP_GT_OQ>(v, zero)),
                        _mm256_andnot_ps(up, _mm256_cmp_ps::<_CMP_LT_OQ>(v, zero)),
                    );
                    mixed = _mm256_add_ps(mixed, _mm256_and_ps(v, agree));
                    div = _mm256_add_ps(div, _mm256_and_ps(w[i], agree));
                }
                let div = _mm256_blendv_ps(div, one, _mm256_cmp_ps::<_CMP_EQ_OQ>(div, zero));
                self.finish_avx2(b, mixed, div, lambda)
            } else {
                self.finish_avx2(b, total, linear_div, lambda)
            };
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(j), merged) };
        }
        whole
    }

    /// [`Combine::finish`] on eight elements.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn finish_avx2(
        &self,
        base: std::arch::x86_64::__m256,
        mixed: std::arch::x86_64::__m256,
        divisor: std::arch::x86_64::__m256,
        lambda: std::arch::x86_64::__m256,
    ) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let mut m = mixed;
        if self.normalize {
            m = _mm256_div_ps(m, divisor);
        }
        if self.lambda != 1.0 {
            m = _mm256_mul_ps(m, lambda);
        }
        _mm256_add_ps(base, m)
    }
}

/// TIES's sign election ("sum" consensus): whether `v` has the sign of the elected `total`
/// (+ when `total` ≥ 0). Zero never agrees.
#[inline]
pub(crate) fn agrees_with(v: f32, total: f32) -> bool {
    let up = total >= 0.0;
    (up & (v > 0.0)) | (!up & (v < 0.0))
}

impl MergeMethod for TaskArithmeticFamily {
    fn merge_streaming(&self, x: &StreamInputs, out: &dyn ChunkSink) -> Option<Result<()>> {
        Some(
            self.masks(x, true)?
                .and_then(|masks| self.stream(x, &masks, out)),
        )
    }

    fn name(&self) -> &'static str {
        self.name
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        self.params
    }

    fn model_parameters(&self) -> &'static [ParamSpec] {
        self.model_params
    }

    fn requires_base(&self) -> bool {
        true
    }

    fn task_vector_rule(&self) -> Option<(Sparsification, Option<Consensus>)> {
        Some((self.sparsification, self.consensus))
    }

    fn scratch_tensors(&self, n_models: usize) -> usize {
        if self.sparsification == Sparsification::None {
            1
        } else {
            // one task vector per expert plus the selection keys
            n_models + 1
        }
    }

    fn check_params(
        &self,
        _params: &Params,
        model_params: &[Params],
    ) -> std::result::Result<(), String> {
        if self.sparsification == Sparsification::DellaMagprune {
            for p in model_params {
                let (d, e) = (p.number("density"), p.number("epsilon"));
                if d < 1.0 && d > 0.0 && (d + e >= 1.0 || d - e <= 0.0) {
                    return Err(format!(
                        "epsilon ({e}) must keep density ± epsilon in (0, 1) (density {d})"
                    ));
                }
            }
        }
        Ok(())
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let base = x.base.expect("requires_base");
        let k = x.models.len();
        let weights: Vec<f32> = (0..k).map(|i| x.model_param(i, "weight") as f32).collect();
        let rescale = x.flag("rescale");
        let row_len = match base.dims() {
            [] => 1,
            [n] => *n,
            [_, rest @ ..] => rest.iter().product(),
        };
        let mut all: Vec<&Tensor> = vec![base];
        all.extend(x.models.iter());
        let out = with_f32_slices(&all, |s| {
            let (b, models) = (s[0], &s[1..]);
            // The streaming implementation on these whole tensors, where it applies.
            let sources: Vec<Source> = models.iter().map(|m| Source::F32(m)).collect();
            let stream = x.streaming(Some(Source::F32(b)), &sources);
            if let Some(masks) = self.masks(&stream, true) {
                let sink = VecSink::new(b.len());
                self.stream(&stream, &masks?, &sink)?;
                return Ok(sink.into_inner());
            }
            // Whole task vectors: magnitude selection then L1 rescaling, or DELLA.
            let masks = self.masks(&stream, false).transpose()?;
            let mut deltas: Vec<Vec<f32>> = Vec::with_capacity(k);
            for (i, m) in models.iter().enumerate() {
                let mut d: Vec<f32> = m.par_iter().zip(b.par_iter()).map(|(m, b)| m - b).collect();
                let p = &x.model_params[i];
                match masks.as_ref().map(|m| &m[i]) {
                    // Nothing selected, so nothing to rescale.
                    Some(mask @ (Mask::All | Mask::Nothing)) => mask.apply(&mut d, 0, 0),
                    Some(mask) => {
                        let before = rescale.then(|| sparsify::l1(&d));
                        d.par_chunks_mut(STREAM_CHUNK)
                            .enumerate()
                            .for_each(|(c, d)| mask.apply(d, c, c * STREAM_CHUNK));
                        if let Some(before) = before {
                            sparsify::rescale_l1(&mut d, before);
                        }
                    }
                    None => {
                        let (density, epsilon) = (p.number("density"), p.number("epsilon"));
                        let seed = sparsify::mix_seed(x.seed, i as u64);
                        sparsify::della_magprune(&mut d, row_len, density, epsilon, rescale, seed)
                            .map_err(candle_core::Error::msg)?;
                    }
                }
                deltas.push(d);
            }
            // Combine into the first buffer, a block at a time (each block of it copied first,
            // as it is read while written). Weights are applied here, after sparsification, as
            // mergekit does.
            let combine = Combine::new(self, x.flag("normalize"), x.param("lambda"), &weights);
            let (first, rest) = deltas.split_first_mut().expect("at least one model");
            first
                .par_chunks_mut(COMBINE_BLOCK)
                .enumerate()
                .for_each(|(bi, o)| {
                    let span = bi * COMBINE_BLOCK..bi * COMBINE_BLOCK + o.len();
                    let own = o.to_vec();
                    let deltas: Vec<&[f32]> = std::iter::once(&own[..])
                        .chain(rest.iter().map(|r| &r[span.clone()]))
                        .collect();
                    combine.block(&b[span], &deltas, &weights, o, &mut Scratch::new(own.len()));
                });
            deltas.truncate(1);
            Ok(deltas.pop().expect("one buffer"))
        })?;
        tensor_like(out, base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The passes [`Combine::fused`] stands for: task vectors, masked by `kept`, combined.
    fn by_passes(
        combine: &Combine,
        base: &[f32],
        models: &[Vec<f32>],
        kept: &[Kept],
        weights: &[f32],
    ) -> Vec<f32> {
        let deltas: Vec<Vec<f32>> = models
            .iter()
            .zip(kept)
            .map(|(m, k)| {
                let mut d: Vec<f32> = m.iter().zip(base).map(|(m, b)| m - b).collect();
                k.apply(&mut d);
                d
            })
            .collect();
        let deltas: Vec<&[f32]> = deltas.iter().map(|d| &d[..]).collect();
        let mut out = vec![0.0; base.len()];
        combine.block(
            base,
            &deltas,
            weights,
            &mut out,
            &mut Scratch::new(base.len()),
        );
        out
    }

    /// One pass in registers gives the bits of the passes it replaces: one to three experts,
    /// every kind of `Kept` (bounds at, between and beyond the keys present), consensus or a
    /// plain sum, normalised or not, λ ≠ 1, negative weights, and inputs with equal values,
    /// ±0 and a NaN.
    #[test]
    fn fused_pass_equals_the_passes() {
        let n = 203; // 25 blocks of eight and a tail the passes do
        let value = |seed: u32, i: usize| {
            let x = ((i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 2001;
            (x as f32 - 1000.0) / 256.0
        };
        let mut base: Vec<f32> = (0..n).map(|i| value(1, i)).collect();
        base[7] = -0.0;
        let mut models: Vec<Vec<f32>> = (2..5)
            .map(|s| (0..n).map(|i| value(s, i)).collect())
            .collect();
        models[0][7] = 0.0;
        models[1][9] = base[9];
        models[2][11] = f32::NAN;
        // Opposite task vectors: with equal weights the elected sign's total is exactly +0.
        models[1][13] = 2.0 * base[13] - models[0][13];
        let key = |x: f32| sparsify::mag_key(x);
        let mid = key(1.5);
        let kepts = [
            Kept::All,
            Kept::Nothing,
            Kept::Keys { lo: mid, hi: None },
            Kept::Keys {
                lo: key(0.25),
                hi: Some(mid),
            },
            Kept::Keys {
                lo: 0,
                hi: Some(u32::MAX),
            },
            Kept::Keys {
                lo: 0x8000_0000,
                hi: None,
            },
        ];
        for k in 1..=3 {
            for (consensus, normalize, lambda) in [
                (true, true, 1.0),
                (true, false, 0.7),
                (false, true, 1.0),
                (false, false, 1.3),
            ] {
                for weights in [[0.6, -0.35, 0.9], [0.5; 3]] {
                    let weights: Vec<f32> = weights[..k].to_vec();
                    let combine = Combine {
                        consensus,
                        normalize,
                        linear_div: weights.iter().sum(),
                        lambda,
                    };
                    for a in 0..kepts.len() {
                        let kept: Vec<Kept> =
                            (0..k).map(|i| kepts[(a + 2 * i) % kepts.len()]).collect();
                        let want = by_passes(&combine, &base, &models[..k], &kept, &weights);
                        let refs: Vec<&[f32]> = models[..k].iter().map(|m| &m[..]).collect();
                        let mut got = vec![f32::INFINITY; n];
                        let done = combine.fused(&base, &refs, &kept, &weights, &mut got);
                        // Without AVX2 the fused pass writes nothing: the passes do it all.
                        #[cfg(target_arch = "x86_64")]
                        let avx2 = std::arch::is_x86_feature_detected!("avx2");
                        #[cfg(not(target_arch = "x86_64"))]
                        let avx2 = false;
                        assert_eq!(done, if avx2 { n - n % 8 } else { 0 });
                        assert!(got[done..].iter().all(|v| *v == f32::INFINITY));
                        for i in 0..done {
                            assert_eq!(
                                got[i].to_bits(),
                                want[i].to_bits(),
                                "k {k}, consensus {consensus}, normalize {normalize}, λ {lambda}, \
                             kept {kept:?}, element {i}"
                            );
                        }
                    }
                }
            }
        }
    }
}
