//! `[prompt]` for `eval`, `predict` and entries: the settings (an entry's table, or a
//! `--prompt FILE.toml`), the few-shot demonstrations read from competition CSVs, the model's
//! chat template, and every row rendered once — all before any model loads, so a bad prompt
//! fails in a second, not after minutes of loading or merging.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use eval_harness::dataset::{self, Dataset, EvalType};
use prompt::{ChatTemplate, Item, Pool, Pools, PromptSettings, Prompter, Shot, TaskKind};

/// Resamples of the bootstrap standard errors when prompting and none are asked for.
pub const DEFAULT_RESAMPLES: usize = stats::DEFAULT_RESAMPLES;

/// Prompting ready for one model, with what identifies it for stage keys and the manifest.
pub struct Prompting {
    /// The compiled prompts.
    pub prompter: Arc<Prompter>,
    /// The few-shot files demonstrations were drawn from.
    pub few_shot_files: Vec<PathBuf>,
}

/// The `[prompt]` table of a TOML file (a prompt file, or an entry.toml: other tables are
/// ignored), checked.
pub fn read_file(path: &Path) -> Result<PromptSettings> {
    #[derive(serde::Deserialize)]
    struct File {
        prompt: Option<PromptSettings>,
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the prompt file {}", path.display()))?;
    let origin = path.display().to_string();
    let file: File =
        toml::from_str(&text).map_err(|e| merge_core::config::toml_error(&origin, &text, &e))?;
    let settings = file
        .prompt
        .with_context(|| format!("{origin}: no [prompt] table"))?;
    settings.validate().with_context(|| origin.clone())?;
    Ok(settings)
}

fn kind(t: EvalType) -> TaskKind {
    match t {
        EvalType::MultipleChoice => TaskKind::MultipleChoice,
        EvalType::Generation => TaskKind::Generation,
    }
}

/// The rows of `kind` with targets in `files`, as demonstrations.
fn read_pool(kind_of: TaskKind, files: &[PathBuf]) -> Result<Pool> {
    let mut shots = Vec::new();
    for f in files {
        for e in dataset::load(f)?.examples {
            if let (true, Some(target)) = (kind(e.eval_type) == kind_of, e.target) {
                shots.push(Shot {
                    id: e.id,
                    input: e.input,
                    choices: e.answer_choices,
                    target,
                });
            }
        }
    }
    let origin = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>();
    Ok(Pool {
        shots,
        origin: origin.join(", "),
    })
}

/// Prompting for one model: `few_shot_file` through `resolve` (default: `validation`, the
/// validation files), the chat template from the directory `tokenizer_dir` gives (asked only
/// when a task uses chat; `model` names the model in errors), and every row of `rows`
/// rendered once.
pub fn prepare(
    settings: &PromptSettings,
    resolve: impl Fn(&str) -> Result<PathBuf>,
    validation: &[PathBuf],
    tokenizer_dir: impl FnOnce() -> Result<PathBuf>,
    model: &str,
    rows: &[&Dataset],
) -> Result<Prompting> {
    let mut pools = Pools::default();
    let mut few_shot_files = Vec::new();
    for k in [TaskKind::MultipleChoice, TaskKind::Generation] {
        let Some(t) = settings.task(k).filter(|t| t.few_shot > 0) else {
            continue;
        };
        let files = match &t.few_shot_file {
            Some(f) => vec![resolve(f)?],
            None => validation.to_vec(),
        };
        let pool = read_pool(k, &files).with_context(|| {
            format!(
                "reading the demonstrations of `prompt.{}` (few_shot_file, default: the validation files)",
                k.as_str()
            )
        })?;
        match k {
            TaskKind::MultipleChoice => pools.multiple_choice = pool,
            TaskKind::Generation => pools.generation = pool,
        }
        for f in files {
            if !few_shot_files.contains(&f) {
                few_shot_files.push(f);
            }
        }
    }
    let chat = if settings.uses_chat() {
        let dir = tokenizer_dir()?;
        ChatTemplate::from_model_dir(&dir)?
    } else {
        None
    };
    let prompter = Prompter::new(settings, pools, chat, model)?;
    for ds in rows {
        for e in &ds.examples {
            let item = Item {
                id: &e.id,
                input: &e.input,
                choices: &e.answer_choices,
                kind: kind(e.eval_type),
            };
            prompter
                .render(&item)
                .with_context(|| format!("{}:{}", ds.path.display(), e.line))?;
        }
    }
    Ok(Prompting {
        prompter: Arc::new(prompter),
        few_shot_files,
    })
}

/// The standard errors' resamples: as asked (`0`: none), else [`DEFAULT_RESAMPLES`] when
/// prompting and none without (the kit's outputs exactly).
pub fn stderr_resamples(asked: Option<usize>, prompting: bool) -> Option<usize> {
    match asked {
        Some(0) => None,
        Some(n) => Some(n),
        None => prompting.then_some(DEFAULT_RESAMPLES),
    }
}

impl Prompting {
    /// What a stage key adds for prompting: the settings, the few-shot files' contents and
    /// the chat template.
    pub fn key(&self) -> Result<String> {
        let mut k = format!("prompt;{}", toml::to_string(self.prompter.settings())?);
        for f in &self.few_shot_files {
            k += &crate::package::sha256_file(f)?;
        }
        if let Some(t) = self.prompter.chat_template() {
            k += &t.sha256();
        }
        Ok(k)
    }

    /// The manifest's record: the settings, the chat template's sha256, the few-shot files.
    pub fn manifest(&self, workspace: &Path) -> Result<serde_json::Value> {
        let mut files = serde_json::Map::new();
        for f in &self.few_shot_files {
            let name = f.strip_prefix(workspace).unwrap_or(f).display().to_string();
            files.insert(name, crate::package::sha256_file(f)?.into());
        }
        Ok(serde_json::json!({
            "settings": self.prompter.settings(),
            "chat_template_sha256": self.prompter.chat_template().map(|t| t.sha256()),
            "few_shot_files": files,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_prompt_file_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../submissions/prompts");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let s = read_file(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            assert!(s.multiple_choice.is_some() && s.generation.is_some());
            n += 1;
        }
        assert!(n >= 2, "one prompt file per mode expected, found {n}");
    }

    #[test]
    fn standard_errors_come_with_prompting_unless_turned_off() {
        assert_eq!(stderr_resamples(None, false), None);
        assert_eq!(stderr_resamples(None, true), Some(DEFAULT_RESAMPLES));
        assert_eq!(stderr_resamples(Some(0), true), None);
        assert_eq!(stderr_resamples(Some(200), false), Some(200));
    }
}
