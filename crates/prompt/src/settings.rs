//! The `[prompt]` table of an entry (or of a `--prompt FILE.toml`): one sub-table per
//! `eval_type`, each saying how a row of that type becomes the model's input and how the
//! model's output becomes a prediction. A type without a sub-table is evaluated as the
//! starter kit does (the raw `input`).
//!
//! ```toml
//! [prompt.multiple_choice]
//! template = "{input}\n{choices}\nThink step by step, then end with \"The answer is (X)\"."
//! chat = true
//! system = "You are a careful assistant."
//! few_shot = 1
//! mode = "generate"
//! max_gen_len = 256
//!
//! [prompt.generation]
//! template = "Summarize in one sentence.\n\n{input}"
//! chat = true
//! first_line = true
//! strip = true
//! ```

use serde::{Deserialize, Serialize};

/// `[prompt]`: prompting per `eval_type`.
///
/// ```
/// let s: prompt::PromptSettings = toml::from_str(r#"
///     [multiple_choice]
///     template = "{input}\n{choices}\nAnswer:"
///     few_shot = 3
/// "#).unwrap();
/// assert_eq!(s.multiple_choice.unwrap().few_shot, 3);
/// assert!(s.generation.is_none());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSettings {
    /// `[prompt.multiple_choice]`: rows with `eval_type = multiple_choice`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiple_choice: Option<TaskPrompt>,
    /// `[prompt.generation]`: rows with `eval_type = generation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<TaskPrompt>,
}

/// How rows of one `eval_type` are prompted. Every key is optional.
///
/// ```
/// let t: prompt::TaskPrompt = toml::from_str(r#"
///     template = "{input}\n{choices}"
///     choice_labels = "numbers"
///     choice_format = "({label}) {choice}"
///     few_shot = 2
///     few_shot_file = "${DATA_DIR}/validation/cosmos_qa.csv"
///     seed = 7
///     chat = true
///     few_shot_style = "block"
///     mode = "generate"
///     extract = ['answer is \(?([0-9]+)']
///     stop = ["\n\n"]
/// "#).unwrap();
/// assert_eq!(t.mode, Some(prompt::Mode::Generate));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskPrompt {
    /// Text around the row: `{input}` is the row's input and, for multiple choice,
    /// `{choices}` its choices as a labelled list (one per line). Default `"{input}"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Multiple choice: how choices are labelled in `{choices}` and read back from
    /// generations: `letters` (A, B, C, ...; the default) or `numbers` (1, 2, 3, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choice_labels: Option<ChoiceLabels>,
    /// Multiple choice: one line of `{choices}`, with `{label}` and `{choice}`. Default
    /// `"{label}. {choice}"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choice_format: Option<String>,
    /// Demonstrations shown before the row (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub few_shot: usize,
    /// A competition CSV with targets to draw demonstrations from (rows of this
    /// `eval_type`). Default: the validation files (`eval --data`, an entry's
    /// `[eval] datasets`). A row is never shown its own demonstration (same id or same
    /// input). Entries: relative to the entry directory or `${DATA_DIR}`-style.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub few_shot_file: Option<String>,
    /// Seed of the demonstration draw (each row draws its own, from this seed and its id
    /// and input, so a row gets the same demonstrations in eval and predict).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub seed: u64,
    /// How demonstrations are written: `turns` (chat: alternating user/assistant
    /// messages; the default) or `block` (all in the final user message). Without chat
    /// they are always one block of text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub few_shot_style: Option<FewShotStyle>,
    /// Between demonstrations (and before the row) in a block. Default `"\n\n"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub few_shot_separator: Option<String>,
    /// A demonstration's answer, with `{answer}` (the target: the right choice's text, or
    /// the reference text) and, for multiple choice, `{label}`. Default `"{answer}"`, and
    /// `"The answer is ({label})."` for generate-mode multiple choice. In a block it follows
    /// the demonstration's text after a space (none when that text ends in whitespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Render the conversation with the model's own chat template (tokenizer_config.json's
    /// `chat_template`), with the generation prompt, tokenized as transformers'
    /// `apply_chat_template(tokenize=True)` does.
    #[serde(default, skip_serializing_if = "is_false")]
    pub chat: bool,
    /// A system instruction: the chat's system message, or, without chat, text before
    /// everything else followed by a blank line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Multiple choice: `loglik` (the choices' log-likelihoods given the prompted text, as
    /// `--scoring` says; the default) or `generate` (greedy generation, then [`extract`]).
    ///
    /// [`extract`]: TaskPrompt::extract
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Most new tokens per generation of this type. Default: the evaluation's `max_gen_len`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gen_len: Option<usize>,
    /// Generate-mode multiple choice: regular expressions tried in order, each with a
    /// capture group holding a label (or a choice's text); the last match that names a
    /// choice wins. Default: [`crate::DEFAULT_PATTERNS`] ("The answer is (B)", "Answer: B",
    /// a bare letter or number). When none matches: the choice whose text appears in the
    /// generation, else the log-likelihood choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extract: Option<Vec<String>>,
    /// Generations are cut at the first of these strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Keep only the first non-empty line of a generation.
    #[serde(default, skip_serializing_if = "is_false")]
    pub first_line: bool,
    /// Keep only the first N sentences of a generation (a sentence ends at `.`, `!` or `?`
    /// followed by whitespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentences: Option<usize>,
    /// Remove leading and trailing whitespace from a generation.
    #[serde(default, skip_serializing_if = "is_false")]
    pub strip: bool,
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}
fn is_zero_u64(x: &u64) -> bool {
    *x == 0
}
fn is_false(x: &bool) -> bool {
    !*x
}

/// How multiple-choice rows are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The choice with the highest log-likelihood given the prompted text.
    #[default]
    Loglik,
    /// Greedy generation, then answer extraction.
    Generate,
}

/// How choices are labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChoiceLabels {
    /// A, B, C, ...
    #[default]
    Letters,
    /// 1, 2, 3, ...
    Numbers,
}

impl ChoiceLabels {
    /// The label of choice `i` (0-based); `None` past Z for letters.
    pub fn label(self, i: usize) -> Option<String> {
        match self {
            ChoiceLabels::Letters => (i < 26).then(|| char::from(b'A' + i as u8).to_string()),
            ChoiceLabels::Numbers => Some((i + 1).to_string()),
        }
    }

    /// The index a label names among `n` choices (`b` is read as `B`).
    pub fn index(self, label: &str, n: usize) -> Option<usize> {
        let label = label.trim();
        let i = match self {
            ChoiceLabels::Letters => {
                let mut c = label.chars();
                match (c.next(), c.next()) {
                    (Some(l), None) if l.is_ascii_alphabetic() => {
                        (l.to_ascii_uppercase() as u8 - b'A') as usize
                    }
                    _ => return None,
                }
            }
            ChoiceLabels::Numbers => label.parse::<usize>().ok()?.checked_sub(1)?,
        };
        (i < n).then_some(i)
    }
}

/// How demonstrations appear in a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FewShotStyle {
    /// Each demonstration a user message and the answer an assistant message.
    #[default]
    Turns,
    /// All demonstrations in the final user message, before the row.
    Block,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip() {
        let l = ChoiceLabels::Letters;
        assert_eq!(l.label(1).as_deref(), Some("B"));
        assert_eq!(l.index("B", 4), Some(1));
        assert_eq!(l.index(" b", 4), Some(1));
        assert_eq!(l.index("E", 4), None);
        assert_eq!(l.index("BB", 4), None);
        assert_eq!(l.label(26), None);
        let n = ChoiceLabels::Numbers;
        assert_eq!(n.label(0).as_deref(), Some("1"));
        assert_eq!(n.index("3", 3), Some(2));
        assert_eq!((n.index("0", 3), n.index("4", 3)), (None, None));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = toml::from_str::<PromptSettings>("[multiple_choice]\nfewshot = 3\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `fewshot`"), "{e}");
        let e =
            toml::from_str::<PromptSettings>("[multiple_choice]\nmode = \"cot\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown variant `cot`"), "{e}");
    }
}
