//! The answer of a generate-mode multiple-choice row, read from the model's generation: the
//! extraction regular expressions first (a capture group holding a label, or a choice's
//! text), then the choice whose text appears in the generation; when neither decides, the
//! caller scores the choices by log-likelihood. How each answer was found is recorded
//! ([`ExtractedBy`]).

use regex::Regex;

use crate::error::{Error, Result};
use crate::settings::ChoiceLabels;

/// The default extraction patterns, tried in order: "The answer is (B)" / "Answer: B" / "the
/// answer is 3" / "answer: (b)" anywhere (the last such phrase counts: reasoning comes first;
/// a lower-case letter only in parentheses, "the answer is a chair" names no label), a
/// generation that is only a label ("B", "(B).", "3"), and one that starts with a label ("B. 9
/// is larger", "(B) ...").
pub const DEFAULT_PATTERNS: [&str; 3] = [
    r"(?i:\banswer(?:\s+is)?)[\s:*]*(?:\(([A-Za-z])\)|\(?([A-Z]|[0-9]+)\b)",
    r"^\s*\(?([A-Z]|[0-9]+)\)?\s*[.:]?\s*$",
    r"^\s*\(?([A-Z]|[0-9]+)[.):]\s",
];

/// How a multiple-choice answer was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtractedBy {
    /// An extraction pattern's capture group named a choice.
    Regex,
    /// No pattern did; exactly one choice's text appears in the generation.
    ChoiceText,
    /// Neither: the choice with the highest log-likelihood.
    Loglik,
}

impl ExtractedBy {
    /// `regex`, `choice_text` or `loglik`, as details record it.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtractedBy::Regex => "regex",
            ExtractedBy::ChoiceText => "choice_text",
            ExtractedBy::Loglik => "loglik",
        }
    }
}

/// Compiled extraction patterns.
#[derive(Debug, Clone)]
pub(crate) struct Extractor {
    patterns: Vec<Regex>,
}

impl Extractor {
    /// Compiles `patterns` (settings key `key`); each needs a capture group.
    pub(crate) fn new(key: &str, patterns: &[String]) -> Result<Self> {
        let patterns = patterns
            .iter()
            .map(|p| {
                let re = Regex::new(p).map_err(|e| Error::Setting {
                    key: key.to_string(),
                    message: format!("invalid regular expression `{p}`: {e}"),
                })?;
                if re.captures_len() < 2 {
                    return Err(Error::NoCaptureGroup {
                        key: key.to_string(),
                        regex: p.clone(),
                    });
                }
                Ok(re)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Extractor { patterns })
    }

    /// The default patterns.
    pub(crate) fn default_patterns() -> Self {
        let p: Vec<String> = DEFAULT_PATTERNS.iter().map(|s| s.to_string()).collect();
        Self::new("extract", &p).expect("the default patterns compile")
    }

    /// The index of the choice `text` answers, or `None` when the caller must fall back to
    /// the log-likelihood choice.
    pub(crate) fn extract(
        &self,
        text: &str,
        choices: &[String],
        labels: ChoiceLabels,
    ) -> Option<(usize, ExtractedBy)> {
        for re in &self.patterns {
            // The last match that names a choice: reasoning comes before the answer.
            let found = re.captures_iter(text).collect::<Vec<_>>();
            for caps in found.iter().rev() {
                let Some(value) = caps.iter().skip(1).flatten().next() else {
                    continue;
                };
                let value = value.as_str().trim();
                let by_label = labels.index(value, choices.len());
                let by_text = || {
                    choices
                        .iter()
                        .position(|c| !value.is_empty() && c.trim().eq_ignore_ascii_case(value))
                };
                if let Some(i) = by_label.or_else(by_text) {
                    return Some((i, ExtractedBy::Regex));
                }
            }
        }
        choice_in_text(text, choices).map(|i| (i, ExtractedBy::ChoiceText))
    }
}

/// Whether `needle` occurs in `hay` as whole words (no letter or digit on either side).
fn occurs_as_words(hay: &str, needle: &str) -> bool {
    let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    hay.match_indices(needle).any(|(at, m)| {
        !word(hay[..at].chars().next_back()) && !word(hay[at + m.len()..].chars().next())
    })
}

/// The only choice whose text (case-insensitive, as whole words) appears in `text`; a choice
/// contained in another one that appears ("sure" in "not sure") does not count on its own.
fn choice_in_text(text: &str, choices: &[String]) -> Option<usize> {
    let text = text.to_lowercase();
    let lower: Vec<String> = choices.iter().map(|c| c.trim().to_lowercase()).collect();
    let present: Vec<usize> = (0..choices.len())
        .filter(|&i| !lower[i].is_empty() && occurs_as_words(&text, &lower[i]))
        .collect();
    let alone: Vec<usize> = present
        .iter()
        .copied()
        .filter(|&i| {
            !present
                .iter()
                .any(|&j| j != i && lower[j] != lower[i] && lower[j].contains(&lower[i]))
        })
        .collect();
    match alone.as_slice() {
        [i] => Some(*i),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choices(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn regex_needs_a_capture_group() {
        let e = Extractor::new("prompt.multiple_choice.extract", &["answer: [A-D]".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no capture group"), "{e}");
        let e = Extractor::new("k", &["(unclosed".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid regular expression"), "{e}");
    }

    #[test]
    fn choice_text_is_unique_and_whole_words() {
        let c = choices(&["sure", "not sure", "no"]);
        assert_eq!(choice_in_text("I am not sure.", &c), Some(1));
        assert_eq!(choice_in_text("Sure thing", &c), Some(0));
        assert_eq!(choice_in_text("nothing", &c), None, "no is inside nothing");
        assert_eq!(
            choice_in_text("sure, or no", &c),
            None,
            "two choices appear"
        );
        assert_eq!(choice_in_text("13 apples", &choices(&["3", "13"])), Some(1));
    }
}
