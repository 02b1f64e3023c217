//! What can go wrong when prompt settings are checked or a row is rendered. Settings errors
//! name the key (`prompt.multiple_choice.template`); the caller adds the file.

use std::path::PathBuf;

/// A prompting error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A template names a placeholder its key does not offer.
    #[error("`{key}`: unknown placeholder `{{{name}}}` (this key takes {allowed}; write `{{{{` and `}}}}` for literal braces)")]
    UnknownPlaceholder {
        /// The settings key (`prompt.generation.template`).
        key: String,
        /// The placeholder as written, without braces.
        name: String,
        /// The placeholders the key takes, for the message.
        allowed: String,
    },
    /// A regular expression for answer extraction has no capture group.
    #[error("`{key}`: the regular expression `{regex}` has no capture group; put the answer in parentheses, e.g. `answer: ([A-D])`")]
    NoCaptureGroup {
        /// The settings key.
        key: String,
        /// The expression.
        regex: String,
    },
    /// `few_shot` asks for more demonstrations than the few-shot file has.
    #[error("`{key}` = {few_shot}, but {pool} has only {available} {kind} rows with targets")]
    FewShotTooLarge {
        /// The settings key.
        key: String,
        /// Demonstrations asked for.
        few_shot: usize,
        /// Rows of the right kind with targets.
        available: usize,
        /// `multiple_choice` or `generation`.
        kind: &'static str,
        /// The few-shot file(s).
        pool: String,
    },
    /// `chat = true` for a model whose tokenizer has no chat template.
    #[error("`{key}` = true, but the model {model} has no chat template (no `chat_template` in its tokenizer_config.json, no chat_template.jinja); use an instruction-tuned model's tokenizer or set chat = false")]
    NoChatTemplate {
        /// The settings key.
        key: String,
        /// The model, as the caller names it.
        model: String,
    },
    /// Any other invalid setting (a bad regex, a key that does not apply to the task, ...).
    #[error("`{key}`: {message}")]
    Setting {
        /// The settings key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A chat template that does not compile or fails to render.
    #[error("chat template of {origin}: {message}")]
    ChatTemplate {
        /// Where the template came from.
        origin: String,
        /// minijinja's message (a template's own `raise_exception` text included).
        message: String,
    },
    /// A row that cannot be prompted (too few demonstrations left once it is excluded, too
    /// many choices for letter labels, ...).
    #[error("row `{id}`: {message}")]
    Row {
        /// The row id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// A file that cannot be read.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
