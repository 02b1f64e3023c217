//! Entries: `submissions/<name>/entry.toml` = a `[merge]` table plus `[eval]` and `[predict]`.
//!
//! ```toml
//! [merge]                      # the merge config schema (see the README)
//! method = "linear"
//! [[merge.models]]
//! model = "TinyLlama/TinyLlama_v1.1"
//! revision = "f67f7cf6a907e567552b946699a9b9b45394fc46"
//! parameters = { weight = 0.8 }
//!
//! [eval]
//! datasets = ["${DATA_DIR}/validation/cosmos_qa.csv", "${DATA_DIR}/validation/xsum.csv"]
//! scoring = "starter-kit"      # or "full"
//! max_gen_len = 64             # unset: 64 (decoders) / generation config (T5)
//! batch_size = 32
//! dtype = "float32"            # auto (bf16 on a GPU, f32 on the CPU) | float32 | bfloat16 | float16
//! device = "auto"              # auto | cpu | cuda (never a device id)
//! references = false           # true: also score the base and each expert, inspect task vectors
//!
//! [predict]
//! test_file = "${DATA_DIR}/test.csv"
//!
//! [prompt.multiple_choice]     # optional: prompting per eval_type (see the prompt crate)
//! template = "{input}\n{choices}\nAnswer with the letter."
//! few_shot = 3
//!
//! [search]                     # optional: `llm-merging search` (see the search crate)
//! trials = 40
//! [[search.space]]
//! parameter = "weight"
//! model = "*"
//! range = [0.2, 1.5]
//! ```
//!
//! The competition forbade absolute paths and device ids in entries: paths are relative to the
//! entry directory, or start from an environment-derived variable — `${DATA_DIR}` (the
//! `LLM_MERGING_DATA` variable, else `data/` of the workspace), `${ENTRY_DIR}`,
//! `${WORKSPACE}` (the repository root) or any `${VAR}` set in the environment.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use merge_core::config::toml_error;
use merge_core::MergeConfig;
use serde::{Deserialize, Serialize};

/// A parsed entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntryFile {
    /// The merge.
    pub merge: MergeConfig,
    /// Local evaluation on the validation sets.
    #[serde(default)]
    pub eval: EvalSettings,
    /// Test-set predictions.
    #[serde(default)]
    pub predict: PredictSettings,
    /// Prompting per `eval_type`, the same for eval and predict; absent: the raw input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<prompt::PromptSettings>,
    /// `llm-merging search`: the space, rows, objective and budget of a recipe search
    /// (optional; `run` and `package` ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<search::SearchSpec>,
}

/// `[eval]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    /// Validation CSVs.
    #[serde(default = "default_datasets")]
    pub datasets: Vec<String>,
    /// `starter-kit` (exact) or `full`.
    #[serde(default = "default_scoring")]
    pub scoring: String,
    /// Most new tokens per generation; unset: 64 for decoders, the model's generation config
    /// for encoder-decoders (the kit's `flant5_avg` sets none: 19 new tokens for flan-t5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gen_len: Option<usize>,
    /// Generation rows decoded together (at most this many rows and this many × 1024 cached
    /// tokens); results do not depend on it.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Compute dtype.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// `auto`, `cpu` or `cuda`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Only the first N rows of each file (quick checks; not for reported scores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Bootstrap standard errors of every metric with N resamples (0: none); default 1000
    /// with `[prompt]`, none without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<usize>,
    /// Also score the base and each expert on the same rows and inspect the task vectors, for
    /// the report (as `run --references`); reused while unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub references: bool,
}

impl Default for EvalSettings {
    fn default() -> Self {
        EvalSettings {
            datasets: default_datasets(),
            scoring: default_scoring(),
            max_gen_len: None,
            batch_size: default_batch_size(),
            dtype: default_dtype(),
            device: default_device(),
            limit: None,
            stderr: None,
            references: false,
        }
    }
}

/// `[predict]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PredictSettings {
    /// The test CSV.
    #[serde(default = "default_test_file")]
    pub test_file: String,
}

impl Default for PredictSettings {
    fn default() -> Self {
        PredictSettings {
            test_file: default_test_file(),
        }
    }
}

fn default_datasets() -> Vec<String> {
    vec![
        "${DATA_DIR}/validation/cosmos_qa.csv".into(),
        "${DATA_DIR}/validation/xsum.csv".into(),
    ]
}
fn default_scoring() -> String {
    "starter-kit".into()
}
fn default_batch_size() -> usize {
    eval_harness::DEFAULT_BATCH_SIZE
}
fn default_dtype() -> String {
    "auto".into()
}
fn default_device() -> String {
    "auto".into()
}
fn default_test_file() -> String {
    "${DATA_DIR}/test.csv".into()
}

/// An entry on disk: its directory, name, text and parsed contents.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The entry directory.
    pub dir: PathBuf,
    /// The entry name (its directory's name).
    pub name: String,
    /// The entry's file: `DIR/entry.toml`, or the single `.toml` file that is the entry.
    pub file_path: PathBuf,
    /// `entry.toml` as written.
    pub text: String,
    /// Parsed.
    pub file: EntryFile,
    /// The workspace root (where `data/` and `dist/` live).
    pub workspace: PathBuf,
}

/// Find the workspace root above `start`: the nearest directory with a `Cargo.toml` that has a
/// `[workspace]`, else the nearest with `.git`, else the current directory.
pub fn workspace_root(start: &Path) -> PathBuf {
    if let Some(dir) = demo::find_workspace(start) {
        return dir;
    }
    let start = std::fs::canonicalize(start).unwrap_or_else(|_| start.to_path_buf());
    for dir in start.ancestors() {
        if dir.join(".git").exists() {
            return dir.to_path_buf();
        }
    }
    std::env::current_dir().unwrap_or_default()
}

impl Entry {
    /// Load `DIR/entry.toml` (DIR may also be a name under `submissions/`).
    pub fn load(dir: &Path) -> Result<Self> {
        // An entry is a directory with entry.toml, or one .toml file (the examples in
        // submissions/examples/ are entries of a [merge] table only); its name is then the
        // file's stem.
        let (dir, path, file_stem) = if dir.is_file() {
            let parent = dir
                .parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
            let stem = dir.file_stem().map(|s| s.to_string_lossy().into_owned());
            (parent, dir.to_path_buf(), stem)
        } else {
            let d = if dir.is_dir() || dir.components().count() > 1 {
                dir.to_path_buf()
            } else {
                Path::new("submissions").join(dir)
            };
            let p = d.join("entry.toml");
            (d, p, None)
        };
        if !dir.is_dir() {
            bail!("entry {}: no such directory", dir.display());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("entry {}: cannot read {}", dir.display(), path.display()))?;
        let origin = path.display().to_string();
        let file: EntryFile = toml::from_str(&text).map_err(|e| toml_error(&origin, &text, &e))?;
        file.merge.validate(&origin)?;
        if let Some(p) = &file.prompt {
            p.validate().with_context(|| origin.clone())?;
        }
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let name = file_stem.unwrap_or_else(|| {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "entry".into())
        });
        let file_path = std::fs::canonicalize(&path).unwrap_or(path);
        let entry = Entry {
            workspace: workspace_root(&dir),
            dir,
            name,
            file_path,
            text,
            file,
        };
        entry.check_portable(&origin)?;
        Ok(entry)
    }

    /// The competition's rules on entries: no absolute paths, no device ids.
    fn check_portable(&self, origin: &str) -> Result<()> {
        let mut paths: Vec<(&str, &str)> =
            vec![("predict.test_file", &self.file.predict.test_file)];
        for d in &self.file.eval.datasets {
            paths.push(("eval.datasets", d));
        }
        if let Some(b) = &self.file.merge.base_model {
            paths.push(("merge.base_model", b));
        }
        let prompt = self.file.prompt.as_ref();
        for t in [
            prompt.and_then(|p| p.multiple_choice.as_ref()),
            prompt.and_then(|p| p.generation.as_ref()),
        ] {
            if let Some(f) = t.and_then(|t| t.few_shot_file.as_deref()) {
                paths.push(("prompt.*.few_shot_file", f));
            }
        }
        for m in &self.file.merge.models {
            paths.push(("merge.models.model", &m.model));
        }
        for (key, p) in paths {
            if p.starts_with('/') || p.starts_with('~') || (p.len() > 1 && p.as_bytes()[1] == b':')
            {
                bail!("{origin}: `{key}` is an absolute path (`{p}`); entries use paths relative to the entry directory or ${{DATA_DIR}}-style variables");
            }
        }
        let device = self.file.eval.device.as_str();
        if !matches!(device, "auto" | "cpu" | "cuda") {
            bail!("{origin}: `eval.device = \"{device}\"`: use auto, cpu or cuda (device ids are not allowed; select GPUs with CUDA_VISIBLE_DEVICES)");
        }
        if self.file.eval.batch_size == 0 {
            bail!("{origin}: `eval.batch_size` must be at least 1");
        }
        if !matches!(self.file.eval.scoring.as_str(), "starter-kit" | "full") {
            bail!("{origin}: `eval.scoring` must be \"starter-kit\" or \"full\"");
        }
        if !matches!(
            self.file.eval.dtype.as_str(),
            "auto" | "float32" | "f32" | "bfloat16" | "bf16" | "float16" | "f16"
        ) {
            bail!("{origin}: `eval.dtype` must be auto, float32, bfloat16 or float16");
        }
        Ok(())
    }

    /// Expand `${VAR}` and make a path relative to the entry absolute.
    pub fn path(&self, p: &str) -> Result<PathBuf> {
        let expanded = expand(p, |var| match var {
            "DATA_DIR" => Some(
                std::env::var("LLM_MERGING_DATA")
                    .ok()
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| self.workspace.join("data").display().to_string()),
            ),
            "ENTRY_DIR" => Some(self.dir.display().to_string()),
            "WORKSPACE" => Some(self.workspace.display().to_string()),
            // The offline demo family's directory (`llm-merging demo`).
            "DEMO_DIR" => demo::demo_dir(Some(&self.workspace))
                .ok()
                .map(|d| d.display().to_string()),
            other => std::env::var(other).ok(),
        })
        .with_context(|| format!("{}: path `{p}`", self.dir.join("entry.toml").display()))?;
        let path = PathBuf::from(expanded);
        Ok(if path.is_absolute() {
            path
        } else {
            self.dir.join(path)
        })
    }

    /// The validation datasets, resolved.
    pub fn datasets(&self) -> Result<Vec<PathBuf>> {
        self.file
            .eval
            .datasets
            .iter()
            .map(|d| self.path(d))
            .collect()
    }

    /// The test file, resolved.
    pub fn test_file(&self) -> Result<PathBuf> {
        self.path(&self.file.predict.test_file)
    }

    /// Where the entry is relative to the workspace: its directory when it is `DIR/entry.toml`,
    /// else its `.toml` file (what `--entry` takes).
    pub fn path_in_workspace(&self) -> String {
        let p = if self
            .file_path
            .file_name()
            .is_some_and(|n| n == "entry.toml")
        {
            &self.dir
        } else {
            &self.file_path
        };
        p.strip_prefix(&self.workspace)
            .unwrap_or(p)
            .display()
            .to_string()
    }

    /// `dist/<entry>/` under the workspace.
    pub fn dist_dir(&self) -> PathBuf {
        self.workspace.join("dist").join(&self.name)
    }
}

/// Replace `${NAME}` (and `$NAME`) with `lookup(NAME)`; an unknown variable is an error.
pub fn expand(s: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, tail) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner
                .find('}')
                .with_context(|| format!("unclosed `${{` in `{s}`"))?;
            (&inner[..end], &inner[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        if name.is_empty() {
            out.push('$');
        } else {
            let value = lookup(name)
                .with_context(|| format!("environment variable `{name}` is not set"))?;
            out.push_str(&value);
        }
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables() {
        let look = |v: &str| (v == "DATA_DIR").then(|| "/d".to_string());
        assert_eq!(expand("${DATA_DIR}/test.csv", look).unwrap(), "/d/test.csv");
        assert_eq!(expand("$DATA_DIR/x", look).unwrap(), "/d/x");
        assert_eq!(expand("plain/x", look).unwrap(), "plain/x");
        assert!(expand("${NOPE}/x", look).is_err());
    }

    fn write_entry(text: &str) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("submissions/mine");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("entry.toml"), text).unwrap();
        (tmp, dir)
    }

    const MERGE: &str = "[merge]\nmethod = \"linear\"\n[[merge.models]]\nmodel = \"a\"\nparameters = { weight = 1 }\n";

    #[test]
    fn defaults_and_paths() {
        let (_tmp, dir) = write_entry(MERGE);
        let e = Entry::load(&dir).unwrap();
        assert_eq!(e.name, "mine");
        assert_eq!(e.file.eval, EvalSettings::default());
        let test = e.test_file().unwrap();
        assert!(test.ends_with("data/test.csv"), "{}", test.display());
    }

    #[test]
    fn rejects_absolute_paths_and_device_ids() {
        let (_t, dir) = write_entry(&format!(
            "{MERGE}[predict]\ntest_file = \"/home/me/test.csv\"\n"
        ));
        let err = Entry::load(&dir).unwrap_err().to_string();
        assert!(err.contains("absolute path"), "{err}");
        let (_t, dir) = write_entry(&format!("{MERGE}[eval]\ndevice = \"cuda:1\"\n"));
        let err = Entry::load(&dir).unwrap_err().to_string();
        assert!(err.contains("device ids are not allowed"), "{err}");
        let (_t, dir) = write_entry(&format!("{MERGE}[eval]\nbatch_size = 0\n"));
        let err = Entry::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("`eval.batch_size` must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn invalid_toml_shows_the_line() {
        let (_t, dir) = write_entry(&format!("{MERGE}[eval]\nbatch_size = \n"));
        let err = format!("{:#}", Entry::load(&dir).unwrap_err());
        assert!(err.contains("entry.toml:7:"), "{err}");
    }

    #[test]
    fn every_shipped_entry_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../submissions");
        let mut n = 0;
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.file_name().is_some_and(|f| f == "entry.toml") {
                    let e = Entry::load(p.parent().unwrap())
                        .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                    assert!(!e.file.merge.models.is_empty());
                    n += 1;
                }
            }
        }
        assert!(n >= 1, "no entries found");
        // Every example config is an entry too (one file, named by its stem).
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../submissions/examples");
        let mut m = 0;
        for e in std::fs::read_dir(examples).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let e = Entry::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                assert_eq!(
                    Some(e.name.as_str()),
                    p.file_stem().and_then(|s| s.to_str())
                );
                m += 1;
            }
        }
        assert!(m >= 15, "one example per method expected, found {m}");
    }
}
