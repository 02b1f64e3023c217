//! Our merge config format: TOML with one `[merge]` table (see [`super`] for the schema).

use std::path::Path;

use super::{MergeConfig, MergeFile};
use crate::error::{Error, Result};

/// Read a TOML merge config file (schema checks only).
pub fn read(path: &Path) -> Result<MergeConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, &path.display().to_string())
}

/// Parse TOML text (schema checks only); `origin` names the text in errors (a file path).
pub fn parse(text: &str, origin: &str) -> Result<MergeConfig> {
    let file: MergeFile = ::toml::from_str(text).map_err(|e| toml_error(origin, text, &e))?;
    file.merge.check_schema(origin)?;
    Ok(file.merge)
}

/// One-line TOML error: `origin:line:column: message`.
pub fn toml_error(origin: &str, text: &str, err: &::toml::de::Error) -> Error {
    let message = err.message().trim().replace('\n', " ");
    match err.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            Error::config(format!("{origin}:{line}:{col}"), message)
        }
        None => Error::config(origin, message),
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OutDType, ParamValue};

    const SAMPLE: &str = r#"
[merge]
method = "linear"
base_model = "org/base"
dtype = "bfloat16"
[merge.parameters]
normalize = true
lambda = [0.0, 1.0]
[[merge.models]]
model = "org/a"
revision = "0123"
[merge.models.parameters]
weight = [{ filter = "self_attn", value = 0.3 }, { value = [0.0, 1.0] }]
[[merge.models]]
model = "org/b"
[merge.models.parameters]
weight = 1
"#;

    #[test]
    fn parses_the_documented_schema_and_round_trips() {
        let c = parse(SAMPLE, "x.toml").unwrap();
        assert_eq!(c.method, "linear");
        assert_eq!(c.dtype, Some(OutDType::Bfloat16));
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.models[1].parameters["weight"], ParamValue::Number(1.0));
        assert!(
            matches!(&c.models[0].parameters["weight"], ParamValue::Filtered(f) if f.len() == 2)
        );
        assert_eq!(c.parameters["normalize"], ParamValue::Bool(true));
        assert_eq!(parse(&c.to_toml(), "y.toml").unwrap(), c);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = "[merge]\nmethod = \"linear\"\nwieght = 1\n[[merge.models]]\nmodel = \"a\"\n";
        let err = parse(text, "c.toml").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:3:1:"), "{err}");
        assert!(err.contains("wieght"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
