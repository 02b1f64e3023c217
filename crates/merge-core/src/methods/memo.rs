//! Values a streaming method computes from a tensor's inputs alone, kept between the merges
//! of one session so a search's next trial does not compute them again (TIES' magnitude
//! histograms: they depend on the base and the expert, not on `density` or the weights).
//!
//! A [`StreamMemo`] lives as long as the session that opened the models; a method reaches it
//! through [`super::StreamInputs::recall`] and [`super::StreamInputs::keep`], keyed by what
//! the value is, the tensor, and the identities of the inputs it was computed from. Merges to
//! disk run without one (each is the only merge of its inputs).

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The identity of one input model within a session (the same model opened once has one).
pub type InputId = (usize, usize);

/// (what, tensor, base, model) → value.
type Key = (&'static str, String, Option<InputId>, InputId);

/// A session's kept values (see the module docs). Memory: what the methods keep; TIES keeps
/// 256 KB per tensor and expert (Llama-2-7B, 3 experts: 0.2 GB).
#[derive(Default)]
pub struct StreamMemo {
    values: Mutex<HashMap<Key, Arc<dyn Any + Send + Sync>>>,
}

impl StreamMemo {
    pub(crate) fn get<T: Any + Send + Sync>(&self, key: &Key) -> Option<Arc<T>> {
        let values = self.values.lock().expect("not poisoned");
        values.get(key).cloned()?.downcast::<T>().ok()
    }

    pub(crate) fn insert<T: Any + Send + Sync>(&self, key: Key, value: Arc<T>) {
        self.values.lock().expect("not poisoned").insert(key, value);
    }
}

/// A memo with the identities of one tensor's inputs (base first when there is one), as a
/// [`super::StreamInputs`] carries it.
#[derive(Clone, Copy)]
pub struct MemoFor<'a> {
    pub(crate) memo: &'a StreamMemo,
    pub(crate) base: Option<InputId>,
    pub(crate) models: &'a [InputId],
}

impl<'a> MemoFor<'a> {
    /// `memo` for inputs with these identities.
    pub fn new(memo: &'a StreamMemo, base: Option<InputId>, models: &'a [InputId]) -> Self {
        MemoFor { memo, base, models }
    }

    pub(crate) fn key(&self, what: &'static str, tensor: &str, model: usize) -> Key {
        (what, tensor.to_string(), self.base, self.models[model])
    }
}
