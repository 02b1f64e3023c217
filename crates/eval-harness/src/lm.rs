//! What evaluation needs from a model, whatever its architecture: the few operations of
//! [`LanguageModel`], implemented by the decoder and by T5. The model does not know the task
//! (as lm-evaluation-harness's `LM` with `loglikelihood` / `generate_until`): multiple choice
//! asks it for the log-probabilities of continuations ([`crate::choices`]), generation for one
//! batched greedy step at a time ([`crate::greedy`]).

use candle_core::Tensor;

use crate::error::Result;
use crate::hf::Tokenizer;
use crate::layer_target::LayerTarget;

/// The two kinds of model the kit evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Decoder-only (Llama, Mistral, Qwen2, Gemma).
    Decoder,
    /// Encoder-decoder (T5, Flan-T5, mT5).
    EncoderDecoder,
}

impl ModelKind {
    /// `decoder` or `encoder-decoder`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Decoder => "decoder",
            ModelKind::EncoderDecoder => "encoder-decoder",
        }
    }
}

/// How a model generates when the caller sets no length.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    /// New tokens per generation.
    pub max_new_tokens: usize,
    /// Generation stops at any of these (kept at the end of the output).
    pub eos_token_ids: Vec<u32>,
}

/// A loaded model and its tokenizer, as evaluation uses them.
///
/// `load` in [`crate::models`] picks the implementation from `config.json`'s `model_type`.
pub trait LanguageModel: Send + Sync {
    /// Which kind of model this is (the starter kit scores choices differently per kind).
    fn kind(&self) -> ModelKind;

    /// The kit's tokenizer of this model.
    fn tokenizer(&self) -> &Tokenizer;

    /// Generation length and stop tokens when the caller sets none.
    fn generation(&self) -> &GenerationDefaults;

    /// Prefills `prompt` into a state once and scores every continuation from it: for each
    /// continuation `c`, `log p(c[j] | prompt, c[..j])` for `j` in `first_scored..c.len()`
    /// (tokens before `first_scored` are context only).
    fn continuation_log_probs(
        &self,
        prompt: &[u32],
        continuations: &[Vec<u32>],
        first_scored: usize,
    ) -> Result<Vec<Vec<f32>>>;

    /// Prefills `prompts` (non-empty) into one decoding state and returns it with the f32
    /// logits `[prompts, vocab]` of every row's first new token.
    fn start_greedy<'a>(
        &'a self,
        prompts: &[Vec<u32>],
    ) -> Result<(Box<dyn GreedyState + 'a>, Tensor)>;

    /// Replaces the weight the checkpoint calls `name` in place (no reload of config or
    /// tokenizer) with `tensor`, given as the checkpoint reader returns it (its storage dtype,
    /// on the CPU), applying exactly what loading applies (dtype and device, norm folds,
    /// transposition, stacking, the tied head following its embedding). `Ok(false)` for
    /// tensors the model does not read; an error naming the tensor for a wrong shape.
    fn set_weight(&mut self, name: &str, tensor: &Tensor) -> Result<bool>;

    /// The weights that [`LanguageModel::set_weight`] also takes in the layer form
    /// ([`crate::models::linear::to_layer_form`]: f32, transposed), without converting or
    /// copying them there. A caller replacing many weights (an in-memory merge) prepares these
    /// on its own threads. None by default.
    fn layer_form_weights(&self) -> Vec<String> {
        Vec::new()
    }

    /// In-place targets for (some of) the weights [`LanguageModel::layer_form_weights`]
    /// names, and for 2-D weights the model keeps as stored in f32 (an untied embedding), by
    /// checkpoint name: a merge writes their values straight into the model's own
    /// buffers ([`LayerTarget`]). `bf16_values`: every value the merge will write is a bf16
    /// value (it stores bf16), which lets layers keep a bf16 copy. None by default.
    ///
    /// # Safety
    /// The targets write through raw pointers into the model. While any of them is alive the
    /// caller must not run the model, must not replace (`set_weight`) any weight of a layer
    /// it has a target for, and must not drop it; concurrent writes must go to distinct
    /// elements; and every weight a target is returned for must be written whole through it
    /// before the model runs again.
    unsafe fn layer_targets(&mut self, bf16_values: bool) -> Vec<(String, LayerTarget)> {
        let _ = bf16_values;
        Vec::new()
    }
}

/// The state of a batch of greedy generations.
pub trait GreedyState {
    /// Appends one token to every row and returns the f32 logits `[rows, vocab]` of the next.
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor>;

    /// Keeps only `rows` (indices into the current rows, in order): finished rows leave.
    fn retain(&mut self, rows: &[usize]) -> Result<()>;
}
