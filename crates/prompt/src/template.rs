//! The kit's own small templates: text with `{name}` placeholders (`{input}`, `{choices}`,
//! `{label}`, ...), `{{` and `}}` for literal braces, as Python's `str.format` writes them.
//! Each key of the `[prompt]` table allows its own placeholders; any other name is an error
//! when the settings are read, not when a row is rendered.

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Field(&'static str),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses `src`, the value of settings key `key`, which may use the placeholders `allowed`.
    pub(crate) fn parse(key: &str, src: &str, allowed: &[&'static str]) -> Result<Template> {
        let bad = |message: String| Error::Setting {
            key: key.to_string(),
            message,
        };
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = src.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let rest = &src[at + 1..];
                    let end = rest.find('}').ok_or_else(|| {
                        bad(format!(
                            "`{{` at character {} is never closed (write `{{{{` for a literal brace)",
                            src[..at].chars().count() + 1
                        ))
                    })?;
                    let name = &rest[..end];
                    let field = allowed.iter().find(|a| **a == name).ok_or_else(|| {
                        Error::UnknownPlaceholder {
                            key: key.to_string(),
                            name: name.to_string(),
                            allowed: allowed
                                .iter()
                                .map(|a| format!("{{{a}}}"))
                                .collect::<Vec<_>>()
                                .join(", "),
                        }
                    })?;
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Field(field));
                    while chars.peek().is_some_and(|p| p.0 <= at + 1 + end) {
                        chars.next();
                    }
                }
                '}' => {
                    return Err(bad(format!(
                        "`}}` at character {} closes nothing (write `}}}}` for a literal brace)",
                        src[..at].chars().count() + 1
                    )))
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Template { pieces })
    }

    /// The text with every placeholder replaced by its value in `values` (empty when absent).
    pub(crate) fn render(&self, values: &[(&str, &str)]) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(f) => {
                    if let Some((_, v)) = values.iter().find(|(k, _)| k == f) {
                        out.push_str(v);
                    }
                }
            }
        }
        out
    }

    /// Whether the template uses placeholder `name`.
    pub(crate) fn uses(&self, name: &str) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Field(f) if *f == name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_literal_braces() {
        let t = Template::parse(
            "k",
            "Q: {input}\n{{json}} {choices}!",
            &["input", "choices"],
        )
        .unwrap();
        assert_eq!(
            t.render(&[("input", "2+2?"), ("choices", "A. 4")]),
            "Q: 2+2?\n{json} A. 4!"
        );
        assert!(t.uses("choices") && t.uses("input") && !t.uses("label"));
        let t = Template::parse("k", "{input}", &["input"]).unwrap();
        assert_eq!(t.render(&[("input", "héllo {x}")]), "héllo {x}");
    }

    #[test]
    fn unknown_and_unbalanced() {
        let e = Template::parse("prompt.generation.template", "{question}", &["input"]);
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.contains("`prompt.generation.template`: unknown placeholder `{question}`"),
            "{msg}"
        );
        assert!(msg.contains("takes {input}"), "{msg}");
        let msg = Template::parse("k", "a {input", &["input"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("never closed"), "{msg}");
        let msg = Template::parse("k", "a } b", &["input"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("closes nothing"), "{msg}");
    }
}
