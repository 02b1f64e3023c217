//! Merges evaluated in memory: a model whose weights come from a merge that is never written
//! to disk. A [`MergedModel`] opens a merge's inputs once, loads the model (config, tokenizer
//! and the reference model's weights), and each [`MergedModel::merge`] re-merges — with other
//! parameters or another method over the same models — replacing the weights in place. This is
//! what a search calls in a loop; `llm-merging eval --merge` calls it once.
//!
//! Every merged tensor reaches [`LanguageModel::set_weight`] with the values reading the written
//! checkpoint would give it, so scores and predictions equal merge-then-evaluate bit for bit.
//! The weights the model keeps in another form (linear layers: f32, transposed) are written by
//! the merge threads. Where the model offers in-place targets ([`LanguageModel::layer_targets`]:
//! f32 on the CPU) a streamed merge scatters each finished chunk, rounded, straight into the
//! layer's own `Wᵀ` or panel copy, or an untied embedding's rows
//! ([`merge_core::engine::ColumnTarget`]), so a trial allocates and copies nothing per weight
//! and the next forward repacks nothing; elsewhere chunks are
//! assembled into the layer form ([`merge_core::engine::SinkForm::TransposedF32`]) or a tensor
//! merged whole is converted as it is finished ([`crate::models::linear::to_layer_form`]), and
//! the one thread that writes the model only swaps them in.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use eval_harness::merged::MergedModel;
//! use merge_core::config::ParamValue;
//! use merge_core::source::Resolver;
//! use merge_core::MergeConfig;
//!
//! let mut cfg = MergeConfig::from_file("ties.toml".as_ref())?;
//! let mut m = MergedModel::open(&cfg, &Resolver::from_env(), DType::F32, &Device::Cpu)?;
//! let ds = eval_harness::dataset::load("data/validation/cosmos_qa.csv".as_ref())?;
//! for density in [0.3, 0.5, 0.7] {
//!     cfg.parameters.insert("density".into(), ParamValue::Number(density));
//!     m.merge(&cfg)?;
//!     let r = eval_harness::evaluate(m.model(), &ds, &Default::default())?;
//!     println!("density {density}: {:?}", r.scores);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{mpsc, Arc};

use candle_core::{DType, Device, Tensor};
use merge_core::checkpoint::Checkpoint;
use merge_core::engine::{
    merge_in_memory, ColumnTarget, InMemoryReport, MergeSession, SinkForm, TensorSink,
};
use merge_core::source::Resolver;
use merge_core::MergeConfig;

use crate::error::{Error, Result};
use crate::lm::LanguageModel;
use crate::models::linear::to_layer_form;

/// A model evaluated from merges done in memory (see the module docs).
pub struct MergedModel {
    session: MergeSession,
    model: Box<dyn LanguageModel>,
    /// The merges run here; the model's weights are written by this thread meanwhile. Its own
    /// pool, so merge workers waiting for the writer never hold up the threads the writer's
    /// weight preparation (transposition) runs on.
    pool: rayon::ThreadPool,
    /// The model the weights were loaded from; adapter-level merges change only some tensors,
    /// and the rest must be this base's.
    reference: Checkpoint,
    /// Tensors that may differ from the reference's: every tensor after a tensor-level merge,
    /// the ones it changed after an adapter-level merge.
    dirty: Dirty,
}

enum Dirty {
    All,
    Some(BTreeSet<String>),
}

/// Merged tensors in flight to the writer: a few per merge thread.
const QUEUED_PER_THREAD: usize = 2;

impl MergedModel {
    /// Opens every model `cfg` names once, loads the merge's reference model (config,
    /// tokenizer, weights) in `dtype` on `device`, then merges `cfg` into it.
    pub fn open(
        cfg: &MergeConfig,
        resolver: &Resolver,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let session = MergeSession::open(cfg, resolver)?;
        let reference = session.inputs(cfg)?.reference.files().clone();
        let model = crate::models::load(&reference.model_dir()?, None, dtype, device)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("merge-{i}"))
            .build()
            .map_err(|e| Error::Msg(format!("cannot start the merge threads: {e}")))?;
        let mut m = MergedModel {
            session,
            model,
            pool,
            reference: Checkpoint::open(&reference)?,
            dirty: Dirty::Some(BTreeSet::new()),
        };
        m.merge(cfg)?;
        Ok(m)
    }

    /// Whether later merges read their inputs from the mapped pages ([`MergeSession::read_mapped`]):
    /// for a caller that merges many times, as a search does.
    pub fn read_mapped(&self, on: bool) {
        self.session.read_mapped(on);
    }

    /// Merges `cfg` (the models this one was opened with; any method and parameters) into
    /// the model's weights, in place.
    pub fn merge(&mut self, cfg: &MergeConfig) -> Result<InMemoryReport> {
        let threads = self.pool.current_num_threads();
        let (tx, rx) = mpsc::sync_channel::<Handed>(threads * QUEUED_PER_THREAD);
        let layer_form = self.model.layer_form_weights().into_iter().collect();
        let bf16 = self.session.stored_dtype(cfg)? == Some(DType::BF16);
        // SAFETY: the targets live in `sink`, which the merging thread owns and drops before
        // the scope below ends; until then this thread replaces (`set_weight`) only tensors
        // handed over the channel, which never have a target (`Queue::put` writes those
        // through it), and does not run the model.
        let targets = unsafe { self.model.layer_targets(bf16) };
        let targets = targets
            .into_iter()
            .map(|(name, t)| (name, Arc::new(t) as Arc<dyn ColumnTarget>))
            .collect();
        let sink = Queue {
            tx,
            layer_form,
            targets,
        };
        let (session, pool, model) = (&self.session, &self.pool, &mut self.model);
        let mut put = BTreeSet::new();
        let mut failed = None;
        let report = std::thread::scope(|s| {
            let merging = s.spawn(move || {
                let sink = sink;
                pool.install(|| merge_in_memory(session, cfg, &sink))
            });
            for handed in rx.iter() {
                let name = match handed {
                    Handed::Tensor(name, tensor) => {
                        if let Err(e) = model.set_weight(&name, &tensor) {
                            // Dropping the receiver fails the merge's next put, which stops it.
                            failed = Some(e);
                            break;
                        }
                        name
                    }
                    Handed::Written(name) => name,
                };
                put.insert(name);
            }
            drop(rx);
            merging.join().expect("the merge thread does not panic")
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let report = report?;
        // An adapter-level merge changes only some tensors: every other one must be the base's
        // again, whatever an earlier merge left there.
        let dirty = if report.folded_onto.is_some() {
            let stale: Vec<String> = match &self.dirty {
                Dirty::All => self.reference.names().map(str::to_string).collect(),
                Dirty::Some(names) => names.iter().cloned().collect(),
            };
            for name in stale.iter().filter(|n| !put.contains(*n)) {
                let t = self.reference.load(name)?;
                self.model.set_weight(name, &t)?;
            }
            Dirty::Some(put)
        } else {
            Dirty::All
        };
        self.dirty = dirty;
        Ok(report)
    }

    /// The model, with the last merge's weights.
    pub fn model(&self) -> &dyn LanguageModel {
        &*self.model
    }
}

/// What the merge hands the writer: a tensor to set, or the name of one it wrote in place.
enum Handed {
    Tensor(String, Tensor),
    Written(String),
}

/// The merge's side of the hand-over: the weights the model has in-place targets for are
/// written through them on the merge's threads; every other merged tensor is queued for the
/// writer, in the layer form where the model takes that (converted here too).
struct Queue {
    tx: mpsc::SyncSender<Handed>,
    layer_form: HashSet<String>,
    targets: HashMap<String, Arc<dyn ColumnTarget>>,
}

impl Queue {
    fn send(&self, name: &str, handed: Handed) -> merge_core::Result<()> {
        self.tx.send(handed).map_err(|_| merge_core::Error::Sink {
            tensor: name.to_string(),
            source: "the model stopped taking weights".into(),
        })
    }
}

impl TensorSink for Queue {
    fn columns(&self, name: &str) -> Option<Arc<dyn ColumnTarget>> {
        self.targets.get(name).cloned()
    }

    fn written(&self, name: &str) -> merge_core::Result<()> {
        self.send(name, Handed::Written(name.to_string()))
    }

    fn form(&self, name: &str) -> SinkForm {
        // Streamed weights are assembled in the layer form by the merge itself.
        if self.layer_form.contains(name) {
            SinkForm::TransposedF32
        } else {
            SinkForm::Stored
        }
    }

    fn put(&self, name: &str, tensor: Tensor) -> merge_core::Result<()> {
        let err = |e: crate::error::Error| merge_core::Error::Sink {
            tensor: name.to_string(),
            source: e.to_string().into(),
        };
        if let Some(target) = self.targets.get(name) {
            // Merged whole (or folded) but with a place in the model: written through it, row
            // by row, as a stream would have.
            let rows: Vec<Vec<f32>> = tensor
                .to_dtype(DType::F32)
                .and_then(|t| t.to_vec2())
                .map_err(|e| err(e.into()))?;
            for (r, row) in rows.iter().enumerate() {
                target.put_row(r, 0, row);
            }
            return self.send(name, Handed::Written(name.to_string()));
        }
        // Tensors merged whole (and adapter folds) arrive as stored: converted here. Those
        // already in the layer form (streamed) are not contiguous, and pass unchanged.
        let tensor = if self.layer_form.contains(name) {
            to_layer_form(&tensor).map_err(err)?.unwrap_or(tensor)
        } else {
            tensor
        };
        self.send(name, Handed::Tensor(name.to_string(), tensor))
    }
}
