//! What is kept of a generation: cut at the first stop string, then the first non-empty line,
//! then the first N sentences, then surrounding whitespace removed — each step only when asked.

/// The post-processing steps of one task.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PostProcess {
    pub(crate) stop: Vec<String>,
    pub(crate) first_line: bool,
    pub(crate) sentences: Option<usize>,
    pub(crate) strip: bool,
}

/// The byte offset just after the `n`-th sentence end (`.`, `!` or `?` followed by whitespace
/// or the end of the text), or the text's length when it has fewer.
fn sentences_end(s: &str, n: usize) -> usize {
    let mut seen = 0;
    let mut it = s.char_indices().peekable();
    while let Some((at, c)) = it.next() {
        if matches!(c, '.' | '!' | '?') && it.peek().is_none_or(|(_, next)| next.is_whitespace()) {
            seen += 1;
            if seen == n {
                return at + c.len_utf8();
            }
        }
    }
    s.len()
}

impl PostProcess {
    /// `completion` post-processed.
    pub(crate) fn apply(&self, completion: &str) -> String {
        let mut s = completion;
        if let Some(cut) = self.stop.iter().filter_map(|t| s.find(t.as_str())).min() {
            s = &s[..cut];
        }
        if self.first_line {
            s = s.trim_start();
            s = s.split('\n').next().unwrap_or("");
        }
        if let Some(n) = self.sentences {
            s = &s[..sentences_end(s, n)];
        }
        if self.strip {
            s = s.trim();
        }
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_alone_and_together() {
        let text = "\n A cat sat. It slept! Then? left\nSecond line.\n\nQuestion: next";
        assert_eq!(
            PostProcess::default().apply(text),
            text,
            "nothing asked, nothing done"
        );
        let stop = PostProcess {
            stop: vec!["\n\n".into(), "Question:".into()],
            ..Default::default()
        };
        assert_eq!(
            stop.apply(text),
            "\n A cat sat. It slept! Then? left\nSecond line."
        );
        let first = PostProcess {
            first_line: true,
            ..Default::default()
        };
        assert_eq!(first.apply(text), "A cat sat. It slept! Then? left");
        let two = PostProcess {
            sentences: Some(2),
            strip: true,
            ..Default::default()
        };
        assert_eq!(two.apply(text), "A cat sat. It slept!");
        assert_eq!(two.apply("3.5 is a number"), "3.5 is a number");
        let strip = PostProcess {
            strip: true,
            ..Default::default()
        };
        assert_eq!(strip.apply("  x \n"), "x");
    }
}
