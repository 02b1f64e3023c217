//! Merges evaluated in memory: a model whose weights come from a merge that is never written
//! to disk. A [`MergedModel`] opens a merge's inputs once, loads the model (config, tokenizer
//! and the reference model's weights), and each [`MergedModel::merge`] re-merges — with other
//! parameters or another method over the same models — replacing the weights in place. This is
//! what a search calls in a loop; `llm-merging eval --merge` calls it once.
//!
//! Every merged tensor reaches [`LanguageModel::set_weight`] with the values reading the written
//! checkpoint would give it, so scores and predictions equal merge-then-evaluate bit for bit.
//! The weights the model keeps in another form (linear layers: f32, transposed) are put in that
//! form by the merge threads: a streamed merge scatters each finished chunk straight into it
//! ([`merge_core::engine::SinkForm::TransposedF32`]), a tensor merged whole is converted as it
//! is finished ([`crate::models::linear::to_layer_form`]); so the one thread that writes the
//! model only swaps them in.
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

use std::collections::{BTreeSet, HashSet};
use std::sync::mpsc;

use candle_core::{DType, Device, Tensor};
use merge_core::checkpoint::Checkpoint;
use merge_core::engine::{merge_in_memory, InMemoryReport, MergeSession, SinkForm, TensorSink};
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

    /// Merges `cfg` (the models this one was opened with; any method and parameters) into
    /// the model's weights, in place.
    pub fn merge(&mut self, cfg: &MergeConfig) -> Result<InMemoryReport> {
        let threads = self.pool.current_num_threads();
        let (tx, rx) = mpsc::sync_channel::<(String, Tensor)>(threads * QUEUED_PER_THREAD);
        let layer_form = self.model.layer_form_weights().into_iter().collect();
        let sink = Queue { tx, layer_form };
        let (session, pool, model) = (&self.session, &self.pool, &mut self.model);
        let mut put = BTreeSet::new();
        let mut failed = None;
        let report = std::thread::scope(|s| {
            let merging = s.spawn(move || {
                let sink = sink;
                pool.install(|| merge_in_memory(session, cfg, &sink))
            });
            for (name, tensor) in rx.iter() {
                if let Err(e) = model.set_weight(&name, &tensor) {
                    // Dropping the receiver fails the merge's next put, which stops it.
                    failed = Some(e);
                    break;
                }
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

/// The merge's side of the hand-over: each merged tensor queued for the writer, in the layer
/// form where the model takes that (converted here, on the merge's threads).
struct Queue {
    tx: mpsc::SyncSender<(String, Tensor)>,
    layer_form: HashSet<String>,
}

impl TensorSink for Queue {
    fn form(&self, name: &str) -> SinkForm {
        // Streamed weights are assembled in the layer form by the merge itself.
        if self.layer_form.contains(name) {
            SinkForm::TransposedF32
        } else {
            SinkForm::Stored
        }
    }

    fn put(&self, name: &str, tensor: Tensor) -> merge_core::Result<()> {
        // Tensors merged whole (and adapter folds) arrive as stored: converted here. Those
        // already in the layer form (streamed) are not contiguous, and pass unchanged.
        let tensor = if self.layer_form.contains(name) {
            to_layer_form(&tensor)
                .map_err(|e| merge_core::Error::Sink {
                    tensor: name.to_string(),
                    source: e.to_string().into(),
                })?
                .unwrap_or(tensor)
        } else {
            tensor
        };
        self.tx
            .send((name.to_string(), tensor))
            .map_err(|_| merge_core::Error::Sink {
                tensor: name.to_string(),
                source: "the model stopped taking weights".into(),
            })
    }
}
