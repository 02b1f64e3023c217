//! How a competition row becomes the text a model is given, and how a generation becomes a
//! prediction: the `[prompt]` table of an entry ([`PromptSettings`]), compiled into a
//! [`Prompter`] for one model.
//!
//! - [`template`](TaskPrompt::template): text around the row with `{input}` and, for multiple
//!   choice, `{choices}` (a lettered or numbered list);
//! - few-shot demonstrations ([`few_shot`]): `k` rows with targets drawn with a seed from a
//!   pool, never the row itself;
//! - chat templates ([`ChatTemplate`]): the model's own `chat_template`, rendered with
//!   minijinja as transformers' `apply_chat_template` renders it, with
//!   `add_generation_prompt`;
//! - generate-mode multiple choice: answer extraction ([`ExtractedBy`]: a regular expression's
//!   capture group, else the choice whose text appears, else the log-likelihood choice) and
//!   generation post-processing (stop strings, first line, first N sentences, strip).
//!
//! The crate knows neither models nor files of the competition schema: evaluation
//! (eval-harness) asks a [`Prompter`] for each row's text and tokenizes it, and the binary
//! reads the few-shot files into [`Pool`]s.
//!
//! ```
//! use prompt::{ExtractedBy, Pools, Prompter, PromptSettings, TaskKind};
//! let settings: PromptSettings = toml::from_str(r#"
//!     [multiple_choice]
//!     template = "{input}\n{choices}\nThink step by step."
//!     mode = "generate"
//! "#).unwrap();
//! settings.validate().unwrap();
//! let p = Prompter::new(&settings, Pools::default(), None, "my-model").unwrap();
//! let task = p.task(TaskKind::MultipleChoice).unwrap();
//! let choices = ["3".to_string(), "9".to_string()];
//! let got = task.extract("9 is more than 3, so the answer is (B).", &choices);
//! assert_eq!(got, Some((1, ExtractedBy::Regex)));
//! ```

mod chat;
mod error;
mod extract;
pub mod few_shot;
mod postprocess;
mod prompter;
mod settings;
mod template;

pub use chat::{ChatTemplate, Message};
pub use error::{Error, Result};
pub use extract::{ExtractedBy, DEFAULT_PATTERNS};
pub use few_shot::{Pool, Shot};
pub use prompter::{Item, Pools, Prompter, Rendered, Task, TaskKind};
pub use settings::{ChoiceLabels, FewShotStyle, Mode, PromptSettings, TaskPrompt};
