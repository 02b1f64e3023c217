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

use super::sparsify::{self, select_ranks, Mask};
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
            // Task vectors in place of the models' chunks, sparsified.
            for (m, mask) in c.models.iter_mut().zip(masks) {
                m.iter_mut().zip(b).for_each(|(m, b)| *m -= b);
                mask.apply(m, c.index, c.first);
            }
            // Combine a block at a time, expert by expert (vectorisable loops).
            let mut scratch = Scratch::new(COMBINE_BLOCK);
            for (bi, o) in out.chunks_mut(COMBINE_BLOCK).enumerate() {
                let span = bi * COMBINE_BLOCK..bi * COMBINE_BLOCK + o.len();
                let deltas: Vec<&[f32]> = c.models.iter().map(|d| &d[span.clone()]).collect();
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
