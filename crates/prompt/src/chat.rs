//! A model's own chat template, rendered as transformers' `apply_chat_template` renders it:
//! minijinja with Jinja2's `trim_blocks` and `lstrip_blocks`, the Python string and dict
//! methods templates call (`.strip()`, `.startswith()`, `.items()`, ... from
//! minijinja-contrib's `pycompat`), `raise_exception`, a `tojson` that writes JSON as transformers' does
//! (Python's separators, no HTML escaping, non-ASCII kept; keys sorted), and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as
//! variables. The rendered text carries the template's own special tokens, so it is tokenized
//! without adding any (`apply_chat_template(tokenize=True)`: the template's BOS, no second).
//!
//! Unlike transformers, `strftime_now` is not defined: templates that print today's date
//! (Llama 3.1's with tools) then fall back to their fixed date, so a prompt is the same on
//! every day and `predict` gives the model exactly what `eval` gave it.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// The special tokens transformers passes to a chat template (its `special_tokens_map`).
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A compiled chat template and the special tokens it may print.
///
/// ```
/// use prompt::{ChatTemplate, Message};
/// let t = ChatTemplate::new(
///     "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}\n{% endfor %}\
///      {% if add_generation_prompt %}<|assistant|>{% endif %}",
///     [("bos_token".to_string(), "<s>".to_string())].into(),
///     "example",
/// ).unwrap();
/// let text = t.render(&[Message::new("user", " Hi ")], true).unwrap();
/// assert_eq!(text, "<s><|user|>Hi\n<|assistant|>");
/// ```
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    special_tokens: BTreeMap<String, String>,
    origin: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("sha256", &self.sha256())
            .finish_non_exhaustive()
    }
}

/// A special token in tokenizer_config.json is a string or an AddedToken object.
fn token_text(v: &serde_json::Value) -> Option<&str> {
    match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

/// Python's `json.dumps(x, ensure_ascii=False)` separators: `", "` and `": "`.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// transformers' `tojson` filter: no HTML escaping, non-ASCII kept, Python's separators, or
/// `indent` spaces per level (positional or `indent=`); object keys come out sorted.
fn tojson(
    value: Value,
    indent: Option<usize>,
    kwargs: Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let indent = match indent {
        Some(n) => Some(n),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    kwargs.assert_all_used()?;
    let err =
        |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string());
    let json = serde_json::to_value(&value).map_err(err)?;
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let f = serde_json::ser::PrettyFormatter::with_indent(&pad);
            json.serialize(&mut serde_json::Serializer::with_formatter(&mut out, f))
        }
        None => json.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out, PythonJson,
        )),
    }
    .map_err(err)?;
    Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
}

/// The most instructions one rendering may run: real templates use a few thousand for a
/// conversation (hundreds per message); a loop bomb runs out in milliseconds.
const FUEL: u64 = 1_000_000;

impl ChatTemplate {
    /// Compiles `source` with the special tokens it may print (`bos_token` → `<s>`, ...);
    /// `origin` names where it came from in messages.
    pub fn new(
        source: impl Into<String>,
        special_tokens: BTreeMap<String, String>,
        origin: impl Into<String>,
    ) -> Result<Self> {
        let source = source.into();
        let origin = origin.into();
        let bad = |e: minijinja::Error| Error::ChatTemplate {
            origin: origin.clone(),
            message: e.to_string(),
        };
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(bad)?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template comes from the model's repository: one that loops without end (nested
        // `range`s) must fail, not hang the run.
        env.set_fuel(Some(FUEL));
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.clone())
            .map_err(bad)?;
        Ok(ChatTemplate {
            source,
            env,
            special_tokens,
            origin,
        })
    }

    /// The chat template of a model directory: `chat_template.jinja` if present, else
    /// tokenizer_config.json's `chat_template` (a string, or a list of named templates of
    /// which `default` is used), with the special tokens tokenizer_config.json names.
    /// `Ok(None)` when the model has none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::File {
                path: config_path.clone(),
                message: format!("invalid JSON: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
            Err(e) => {
                return Err(Error::File {
                    path: config_path,
                    message: e.to_string(),
                })
            }
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, origin) = if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| Error::File {
                path: jinja.clone(),
                message: e.to_string(),
            })?;
            (text, jinja.display().to_string())
        } else {
            let source = match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Array(named)) => {
                    let default = named.iter().find(|t| t["name"] == "default");
                    match default.and_then(|t| t["template"].as_str()) {
                        Some(s) => s.to_string(),
                        None => return Ok(None),
                    }
                }
                _ => return Ok(None),
            };
            (source, config_path.display().to_string())
        };
        let special_tokens = SPECIAL_TOKENS
            .iter()
            .filter_map(|k| Some((k.to_string(), token_text(config.get(*k)?)?.to_string())))
            .collect();
        Self::new(source, special_tokens, origin).map(Some)
    }

    /// Renders a conversation; `add_generation_prompt` appends what opens the assistant's
    /// reply (as transformers does, only where the template implements it).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let bad = |e: minijinja::Error| Error::ChatTemplate {
            origin: self.origin.clone(),
            message: match e.detail() {
                Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
                _ => e.to_string(),
            },
        };
        let mut ctx: BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert(
            "messages".into(),
            Value::from(minijinja::value::Serde(messages)),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let t = self.env.get_template("chat").map_err(bad)?;
        t.render(Value::from(ctx)).map_err(bad)
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The sha256 of the template's text (hex), as the manifest records it.
    pub fn sha256(&self) -> String {
        format!("{:x}", Sha256::digest(self.source.as_bytes()))
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(src: &str) -> ChatTemplate {
        ChatTemplate::new(src, BTreeMap::new(), "test").unwrap()
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let t = template(
            "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}\
             {% endif %}{{ m.content.strip().upper() }}|{{ m.content.startswith(' a') }}{% endfor %}",
        );
        let out = t.render(&[Message::new("user", " ab ")], false).unwrap();
        assert_eq!(out, "AB|True", "booleans print as Python writes them");
        let e = t
            .render(&[Message::new("system", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no system role"), "{e}");
        assert!(e.contains("chat template of test"), "{e}");
    }

    #[test]
    fn tojson_as_python_writes_it() {
        let t = template("{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}");
        let out = t.render(&[Message::new("user", "<é>")], false).unwrap();
        assert_eq!(
            out,
            "[{\"content\": \"<é>\", \"role\": \"user\"}]|{\n  \"content\": \"<é>\",\n  \"role\": \"user\"\n}"
        );
    }

    #[test]
    fn blocks_are_trimmed_as_transformers_configures_jinja() {
        let t = template("{% for m in messages %}\n    {{ m.content }}\n{% endfor %}\n");
        let out = t.render(&[Message::new("user", "a")], false).unwrap();
        assert_eq!(out, "    a\n");
    }

    #[test]
    fn compile_errors_name_the_origin() {
        let e = ChatTemplate::new("{% for %}", BTreeMap::new(), "dir/tokenizer_config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("chat template of dir/tokenizer_config.json:"),
            "{e}"
        );
    }
}
