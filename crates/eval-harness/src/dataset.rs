//! The competition CSV schema: `id,input,target,answer_choices,eval_type` (the test file has no
//! `target`). `answer_choices` is a Python list literal stored in a string (`"['A', 'B']"`), empty
//! or `None` for generation rows.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// What kind of task a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalType {
    /// Pick one of `answer_choices`; the prediction is the chosen index.
    MultipleChoice,
    /// Free text generation scored with ROUGE.
    Generation,
}

impl EvalType {
    /// The spelling used in the CSV.
    pub fn as_str(self) -> &'static str {
        match self {
            EvalType::MultipleChoice => "multiple_choice",
            EvalType::Generation => "generation",
        }
    }
}

/// One row of a competition file.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The row id, kept as text exactly as in the file (it is echoed into predictions).
    pub id: String,
    /// The prompt.
    pub input: String,
    /// The reference: a choice index as a string for multiple choice, a summary for generation.
    /// `None` in the test file.
    pub target: Option<String>,
    /// The parsed choices; empty for generation rows.
    pub answer_choices: Vec<String>,
    /// Task kind.
    pub eval_type: EvalType,
    /// 1-based line where the record starts, for error messages downstream.
    pub line: u64,
}

/// A loaded competition file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// File stem (`cosmos_qa` for `data/validation/cosmos_qa.csv`): the name used in outputs.
    pub name: String,
    /// Where it was read from.
    pub path: PathBuf,
    /// Rows in file order.
    pub examples: Vec<Example>,
}

impl Dataset {
    /// True when every row has a target, so scores can be computed.
    pub fn has_targets(&self) -> bool {
        self.examples.iter().all(|e| e.target.is_some())
    }
}

/// A problem with a competition file, located by file, line and column (1-based; column is the
/// CSV field number, plus a character offset inside the field where that helps).
#[derive(Debug, thiserror::Error)]
pub struct DatasetError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line (0 when the whole file is at fault, e.g. it cannot be opened).
    pub line: u64,
    /// 1-based column (field number), 0 when not applicable.
    pub column: usize,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for DatasetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
            if self.column > 0 {
                write!(f, ":{}", self.column)?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

const REQUIRED: [&str; 4] = ["id", "input", "answer_choices", "eval_type"];

/// Reads and validates a competition CSV file.
pub fn load(path: &Path) -> Result<Dataset, DatasetError> {
    let err = |line: u64, column: usize, message: String| DatasetError {
        path: path.to_path_buf(),
        line,
        column,
        message,
    };
    let file = std::fs::File::open(path)
        .map_err(|e| err(0, 0, format!("cannot open the data file: {e}")))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(file);
    let headers = reader
        .headers()
        .map_err(|e| err(1, 0, format!("cannot read the CSV header: {e}")))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    for name in REQUIRED {
        if col(name).is_none() {
            return Err(err(
                1,
                0,
                format!(
                    "missing column `{name}` (header is `{}`; expected id,input,[target,]answer_choices,eval_type)",
                    headers.iter().collect::<Vec<_>>().join(",")
                ),
            ));
        }
    }
    let (c_id, c_input, c_choices, c_type) = (
        col("id").unwrap(),
        col("input").unwrap(),
        col("answer_choices").unwrap(),
        col("eval_type").unwrap(),
    );
    let c_target = col("target");
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".to_string());

    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut examples = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            err(line, 0, format!("malformed CSV: {e}"))
        })?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let field = |c: usize| record.get(c).unwrap_or("");
        let id = field(c_id).to_string();
        if id.trim().is_empty() {
            return Err(err(line, c_id + 1, "empty `id`".to_string()));
        }
        if let Some(first) = seen.insert(id.clone(), line) {
            return Err(err(
                line,
                c_id + 1,
                format!("duplicate id `{id}` (first seen on line {first})"),
            ));
        }
        let eval_type = match field(c_type).trim() {
            "multiple_choice" => EvalType::MultipleChoice,
            "generation" => EvalType::Generation,
            other => {
                return Err(err(
                    line,
                    c_type + 1,
                    format!(
                        "unknown eval_type `{other}` (expected `multiple_choice` or `generation`)"
                    ),
                ))
            }
        };
        let answer_choices = parse_python_list(field(c_choices)).map_err(|e| {
            err(
                line,
                c_choices + 1,
                format!(
                    "unparsable answer_choices at character {} of the field: {} (expected a Python list of strings such as ['A', 'B'])",
                    e.offset + 1,
                    e.message
                ),
            )
        })?;
        let target = c_target.map(|c| field(c).to_string());
        if eval_type == EvalType::MultipleChoice {
            if answer_choices.is_empty() {
                return Err(err(
                    line,
                    c_choices + 1,
                    "multiple_choice row without answer_choices".to_string(),
                ));
            }
            if let Some(t) = &target {
                match t.trim().parse::<usize>() {
                    Ok(i) if i < answer_choices.len() => {}
                    _ => {
                        return Err(err(
                            line,
                            c_target.unwrap() + 1,
                            format!(
                                "target `{t}` is not an index into the {} answer_choices",
                                answer_choices.len()
                            ),
                        ))
                    }
                }
            }
        }
        examples.push(Example {
            id,
            input: field(c_input).to_string(),
            target,
            answer_choices,
            eval_type,
            line,
        });
    }
    Ok(Dataset {
        name,
        path: path.to_path_buf(),
        examples,
    })
}

/// Where and why a Python list literal failed to parse (offset in characters).
#[derive(Debug, Clone, PartialEq)]
pub struct LiteralError {
    /// 0-based character offset in the field.
    pub offset: usize,
    /// Description.
    pub message: String,
}

/// Parses a Python list-of-strings literal as `ast.literal_eval` would: single, double and
/// triple quotes, raw/unicode prefixes, backslash escapes, adjacent literal concatenation and a
/// trailing comma. An empty field or `None` is no choices.
pub fn parse_python_list(text: &str) -> Result<Vec<String>, LiteralError> {
    let chars: Vec<char> = text.chars().collect();
    let mut p = Parser { c: &chars, i: 0 };
    p.skip_ws();
    if p.i == chars.len() {
        return Ok(Vec::new());
    }
    if p.rest_starts_with("None") {
        p.i += 4;
        p.skip_ws();
        return if p.i == chars.len() {
            Ok(Vec::new())
        } else {
            Err(p.error("unexpected text after None"))
        };
    }
    let close = match p.peek() {
        Some('[') => ']',
        Some('(') => ')',
        _ => return Err(p.error("expected `[`")),
    };
    p.i += 1;
    let mut items = Vec::new();
    loop {
        p.skip_ws();
        match p.peek() {
            Some(c) if c == close => {
                p.i += 1;
                break;
            }
            None => return Err(p.error(&format!("unterminated list (missing `{close}`)"))),
            _ => {}
        }
        let mut item = p.string()?;
        // Adjacent literals concatenate: 'a' 'b' == 'ab'.
        loop {
            p.skip_ws();
            match p.peek() {
                Some('\'' | '"' | 'r' | 'R' | 'u' | 'U') => item.push_str(&p.string()?),
                _ => break,
            }
        }
        items.push(item);
        match p.peek() {
            Some(',') => p.i += 1,
            Some(c) if c == close => {}
            None => return Err(p.error(&format!("unterminated list (missing `{close}`)"))),
            Some(c) => return Err(p.error(&format!("expected `,` or `{close}`, found `{c}`"))),
        }
    }
    p.skip_ws();
    if p.i != chars.len() {
        return Err(p.error("unexpected text after the list"));
    }
    Ok(items)
}

struct Parser<'a> {
    c: &'a [char],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.c.get(self.i).copied()
    }
    fn at(&self, k: usize) -> Option<char> {
        self.c.get(self.i + k).copied()
    }
    fn rest_starts_with(&self, s: &str) -> bool {
        s.chars().enumerate().all(|(k, ch)| self.at(k) == Some(ch))
    }
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(c) if c.is_whitespace()) {
            self.i += 1;
        }
    }
    fn error(&self, message: &str) -> LiteralError {
        LiteralError {
            offset: self.i,
            message: message.to_string(),
        }
    }

    /// One string literal with optional prefix.
    fn string(&mut self) -> Result<String, LiteralError> {
        let start = self.i;
        let mut raw = false;
        while let Some(c) = self.peek() {
            match c {
                'r' | 'R' => raw = true,
                'u' | 'U' => {}
                _ => break,
            }
            self.i += 1;
            if self.i - start > 2 {
                break;
            }
        }
        let quote = match self.peek() {
            Some(q @ ('\'' | '"')) => q,
            Some(c) => {
                self.i = start;
                return Err(self.error(&format!("expected a quoted string, found `{c}`")));
            }
            None => return Err(self.error("expected a quoted string, found the end")),
        };
        let triple = self.at(1) == Some(quote) && self.at(2) == Some(quote);
        let open = self.i;
        self.i += if triple { 3 } else { 1 };
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                self.i = open;
                return Err(self.error("unterminated string"));
            };
            if c == quote {
                if !triple {
                    self.i += 1;
                    return Ok(out);
                }
                if self.at(1) == Some(quote) && self.at(2) == Some(quote) {
                    self.i += 3;
                    return Ok(out);
                }
            }
            if c == '\n' && !triple {
                return Err(self.error("newline inside a single-quoted string"));
            }
            if c != '\\' {
                out.push(c);
                self.i += 1;
                continue;
            }
            let Some(e) = self.at(1) else {
                self.i = open;
                return Err(self.error("unterminated string"));
            };
            if raw {
                // Raw strings keep the backslash; it still protects the next quote.
                out.push('\\');
                out.push(e);
                self.i += 2;
                continue;
            }
            self.i += 2;
            match e {
                '\n' => {}
                '\\' => out.push('\\'),
                '\'' => out.push('\''),
                '"' => out.push('"'),
                'a' => out.push('\x07'),
                'b' => out.push('\x08'),
                'f' => out.push('\x0c'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'v' => out.push('\x0b'),
                'x' => out.push(self.hex(2)?),
                'u' => out.push(self.hex(4)?),
                'U' => out.push(self.hex(8)?),
                '0'..='7' => {
                    let mut v = e.to_digit(8).unwrap();
                    for _ in 0..2 {
                        match self.peek().and_then(|c| c.to_digit(8)) {
                            Some(d) => {
                                v = v * 8 + d;
                                self.i += 1;
                            }
                            None => break,
                        }
                    }
                    out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                }
                // Python keeps unknown escapes verbatim.
                other => {
                    out.push('\\');
                    out.push(other);
                }
            }
        }
    }

    fn hex(&mut self, n: usize) -> Result<char, LiteralError> {
        let mut v: u32 = 0;
        for _ in 0..n {
            let d = self.peek().and_then(|c| c.to_digit(16)).ok_or_else(|| {
                self.error(&format!("truncated \\x/\\u escape (need {n} hex digits)"))
            })?;
            v = v
                .checked_mul(16)
                .and_then(|v| v.checked_add(d))
                .unwrap_or(u32::MAX);
            self.i += 1;
        }
        char::from_u32(v).ok_or_else(|| self.error("escape is not a valid code point"))
    }
}
