//! Settings checked and compiled into a [`Prompter`]: what evaluation asks for each row (the
//! text to give the model, whether a chat template wrote it), and for each task how to answer
//! (log-likelihood or generation), how long to generate, how to post-process a generation
//! and how to read the answer out of it.

use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::extract::{ExtractedBy, Extractor};
use crate::few_shot::{sample, Pool, Shot};
use crate::postprocess::PostProcess;
use crate::settings::{ChoiceLabels, FewShotStyle, Mode, PromptSettings, TaskPrompt};
use crate::template::Template;

/// The two kinds of competition row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// `eval_type = multiple_choice`.
    MultipleChoice,
    /// `eval_type = generation`.
    Generation,
}

impl TaskKind {
    /// The CSV's spelling, which is also the `[prompt]` sub-table's name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::MultipleChoice => "multiple_choice",
            TaskKind::Generation => "generation",
        }
    }
}

/// A row to prompt.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    /// Row id (demonstrations never include a row with this id).
    pub id: &'a str,
    /// The row's input.
    pub input: &'a str,
    /// Its choices (multiple choice).
    pub choices: &'a [String],
    /// Its kind.
    pub kind: TaskKind,
}

/// The text a model is given for a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The text.
    pub text: String,
    /// A chat template wrote it, special tokens included: tokenize it without adding any.
    /// Otherwise it is tokenized as the raw input is (the model's input tokenizer).
    pub chat: bool,
}

/// The demonstration pools, per kind (empty where `few_shot` is 0).
#[derive(Debug, Clone, Default)]
pub struct Pools {
    /// Multiple-choice demonstrations.
    pub multiple_choice: Pool,
    /// Generation demonstrations.
    pub generation: Pool,
}

/// One kind's compiled prompting.
#[derive(Debug, Clone)]
pub struct Task {
    kind: TaskKind,
    template: Template,
    labels: ChoiceLabels,
    choice_format: Template,
    answer: Template,
    few_shot: usize,
    seed: u64,
    pool: Pool,
    style: FewShotStyle,
    separator: String,
    chat: bool,
    system: Option<String>,
    mode: Mode,
    max_gen_len: Option<usize>,
    extractor: Extractor,
    post: PostProcess,
}

fn setting(key: &str, message: impl Into<String>) -> Error {
    Error::Setting {
        key: key.to_string(),
        message: message.into(),
    }
}

impl Task {
    /// Checks and compiles `[prompt.<kind>]` (everything that needs neither data nor model).
    fn compile(kind: TaskKind, t: &TaskPrompt) -> Result<Task> {
        let mc = kind == TaskKind::MultipleChoice;
        let key = |k: &str| format!("prompt.{}.{k}", kind.as_str());
        if !mc {
            let only_mc = [
                ("mode", t.mode.is_some()),
                ("choice_labels", t.choice_labels.is_some()),
                ("choice_format", t.choice_format.is_some()),
                ("extract", t.extract.is_some()),
            ];
            if let Some((k, _)) = only_mc.iter().find(|(_, set)| *set) {
                return Err(setting(&key(k), "applies to multiple_choice only"));
            }
        }
        if t.max_gen_len == Some(0) {
            return Err(setting(&key("max_gen_len"), "must be at least 1"));
        }
        if t.sentences == Some(0) {
            return Err(setting(&key("sentences"), "must be at least 1"));
        }
        let inputs: &[&'static str] = if mc {
            &["input", "choices"]
        } else {
            &["input"]
        };
        let answers: &[&'static str] = if mc {
            &["answer", "label"]
        } else {
            &["answer"]
        };
        let mode = t.mode.unwrap_or_default();
        let default_answer = if mode == Mode::Generate {
            "The answer is ({label})."
        } else {
            "{answer}"
        };
        let extractor = match &t.extract {
            Some(p) if p.is_empty() => {
                return Err(setting(
                    &key("extract"),
                    "needs at least one regular expression",
                ))
            }
            Some(p) => Extractor::new(&key("extract"), p)?,
            None => Extractor::default_patterns(),
        };
        Ok(Task {
            kind,
            template: Template::parse(
                &key("template"),
                t.template.as_deref().unwrap_or("{input}"),
                inputs,
            )?,
            labels: t.choice_labels.unwrap_or_default(),
            choice_format: Template::parse(
                &key("choice_format"),
                t.choice_format.as_deref().unwrap_or("{label}. {choice}"),
                &["label", "choice"],
            )?,
            answer: Template::parse(
                &key("answer"),
                t.answer.as_deref().unwrap_or(default_answer),
                answers,
            )?,
            few_shot: t.few_shot,
            seed: t.seed,
            pool: Pool::default(),
            style: t.few_shot_style.unwrap_or_default(),
            separator: t
                .few_shot_separator
                .clone()
                .unwrap_or_else(|| "\n\n".into()),
            chat: t.chat,
            system: t.system.clone(),
            mode,
            max_gen_len: t.max_gen_len,
            extractor,
            post: PostProcess {
                stop: t.stop.clone(),
                first_line: t.first_line,
                sentences: t.sentences,
                strip: t.strip,
            },
        })
    }

    /// Multiple choice: answered by log-likelihood or by generation.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Most new tokens per generation, when the task sets it.
    pub fn max_gen_len(&self) -> Option<usize> {
        self.max_gen_len
    }

    /// A generation as kept: stop strings, first line, sentences, strip (as configured).
    pub fn postprocess(&self, completion: &str) -> String {
        self.post.apply(completion)
    }

    /// The choice a (post-processed) generation answers and how it was found; `None`: fall
    /// back to the log-likelihood choice ([`ExtractedBy::Loglik`]).
    pub fn extract(&self, text: &str, choices: &[String]) -> Option<(usize, ExtractedBy)> {
        self.extractor.extract(text, choices, self.labels)
    }

    /// The row's own text: the template around its input and choices.
    fn item_text(&self, id: &str, input: &str, choices: &[String]) -> Result<String> {
        let mut list = String::new();
        if self.template.uses("choices") {
            for (i, c) in choices.iter().enumerate() {
                let label = self.labels.label(i).ok_or_else(|| Error::Row {
                    id: id.to_string(),
                    message: format!(
                        "{} choices: letter labels stop at Z (set choice_labels = \"numbers\")",
                        choices.len()
                    ),
                })?;
                if i > 0 {
                    list.push('\n');
                }
                list += &self
                    .choice_format
                    .render(&[("label", &label), ("choice", c)]);
            }
        }
        Ok(self
            .template
            .render(&[("input", input), ("choices", &list)]))
    }

    /// A demonstration's answer.
    fn answer_text(&self, shot: &Shot) -> Result<String> {
        if self.kind == TaskKind::Generation {
            return Ok(self.answer.render(&[("answer", &shot.target)]));
        }
        let i = shot
            .target
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&i| i < shot.choices.len());
        let i = i.ok_or_else(|| Error::Row {
            id: shot.id.clone(),
            message: format!(
                "demonstration of {}: target `{}` is not the index of one of its {} choices",
                self.pool.origin,
                shot.target,
                shot.choices.len()
            ),
        })?;
        let label = self.labels.label(i).unwrap_or_default();
        Ok(self
            .answer
            .render(&[("answer", &shot.choices[i]), ("label", &label)]))
    }

    /// A demonstration written as one block: its text, a space unless that text ends in
    /// whitespace, its answer.
    fn demo_block(&self, shot: &Shot) -> Result<String> {
        let q = self.item_text(&shot.id, &shot.input, &shot.choices)?;
        let a = self.answer_text(shot)?;
        let joiner = if q.ends_with(char::is_whitespace) {
            ""
        } else {
            " "
        };
        Ok(format!("{q}{joiner}{a}"))
    }

    fn render(&self, item: &Item, chat: Option<&ChatTemplate>) -> Result<Rendered> {
        let shots = sample(&self.pool, self.few_shot, self.seed, item.id, item.input)?;
        let question = self.item_text(item.id, item.input, item.choices)?;
        let block = |question: String| -> Result<String> {
            let mut parts = shots
                .iter()
                .map(|s| self.demo_block(s))
                .collect::<Result<Vec<_>>>()?;
            parts.push(question);
            Ok(parts.join(&self.separator))
        };
        let Some(chat) = chat.filter(|_| self.chat) else {
            let text = block(question)?;
            return Ok(Rendered {
                text: match &self.system {
                    Some(s) => format!("{s}\n\n{text}"),
                    None => text,
                },
                chat: false,
            });
        };
        let mut messages: Vec<Message> = self
            .system
            .iter()
            .map(|s| Message::new("system", s.as_str()))
            .collect();
        if self.style == FewShotStyle::Turns {
            for s in &shots {
                let q = self.item_text(&s.id, &s.input, &s.choices)?;
                messages.push(Message::new("user", q));
                messages.push(Message::new("assistant", self.answer_text(s)?));
            }
            messages.push(Message::new("user", question));
        } else {
            messages.push(Message::new("user", block(question)?));
        }
        let text = chat.render(&messages, true).map_err(|e| Error::Row {
            id: item.id.to_string(),
            message: e.to_string(),
        })?;
        Ok(Rendered { text, chat: true })
    }
}

/// Prompting for one model: the compiled `[prompt]` tables, their demonstration pools and the
/// model's chat template.
///
/// ```
/// use prompt::{Item, Pool, Pools, Prompter, PromptSettings, Shot, TaskKind};
/// let settings: PromptSettings = toml::from_str(r#"
///     [multiple_choice]
///     template = "{input}\n{choices}\nAnswer:"
///     few_shot = 1
/// "#).unwrap();
/// let shot = Shot { id: "s1".into(), input: "2+2?".into(), choices: vec!["3".into(), "4".into()], target: "1".into() };
/// let pools = Pools { multiple_choice: Pool { shots: vec![shot], origin: "shots.csv".into() }, ..Default::default() };
/// let p = Prompter::new(&settings, pools, None, "my-model").unwrap();
/// let choices = ["no".to_string(), "yes".to_string()];
/// let item = Item { id: "q1", input: "Is water wet?", choices: &choices, kind: TaskKind::MultipleChoice };
/// let r = p.render(&item).unwrap().unwrap();
/// assert_eq!(r.text, "2+2?\nA. 3\nB. 4\nAnswer: 4\n\nIs water wet?\nA. no\nB. yes\nAnswer:");
/// assert!(!r.chat);
/// ```
#[derive(Debug)]
pub struct Prompter {
    settings: PromptSettings,
    multiple_choice: Option<Task>,
    generation: Option<Task>,
    chat: Option<ChatTemplate>,
}

impl PromptSettings {
    /// Checks everything that needs neither data nor model: placeholders, regular
    /// expressions (each with a capture group), keys that do not apply to the task, zero
    /// lengths. Errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.compile().map(|_| ())
    }

    fn compile(&self) -> Result<[Option<Task>; 2]> {
        let mc = self.multiple_choice.as_ref();
        let gen = self.generation.as_ref();
        Ok([
            mc.map(|t| Task::compile(TaskKind::MultipleChoice, t))
                .transpose()?,
            gen.map(|t| Task::compile(TaskKind::Generation, t))
                .transpose()?,
        ])
    }

    /// The task settings of `kind`, if the table has them.
    pub fn task(&self, kind: TaskKind) -> Option<&TaskPrompt> {
        match kind {
            TaskKind::MultipleChoice => self.multiple_choice.as_ref(),
            TaskKind::Generation => self.generation.as_ref(),
        }
    }

    /// Whether any task renders with the model's chat template.
    pub fn uses_chat(&self) -> bool {
        [TaskKind::MultipleChoice, TaskKind::Generation]
            .iter()
            .any(|&k| self.task(k).is_some_and(|t| t.chat))
    }
}

impl Prompter {
    /// Compiles `settings` for a model whose chat template is `chat` (`model` names it in
    /// errors), with the demonstration pools: `few_shot` larger than its pool, or `chat =
    /// true` without a template, is an error here, before any model loads.
    pub fn new(
        settings: &PromptSettings,
        pools: Pools,
        chat: Option<ChatTemplate>,
        model: &str,
    ) -> Result<Self> {
        let [mut multiple_choice, mut generation] = settings.compile()?;
        let mut pools = [pools.multiple_choice, pools.generation];
        for (task, pool) in [&mut multiple_choice, &mut generation]
            .into_iter()
            .zip(pools.iter_mut())
        {
            let Some(task) = task else { continue };
            let key = |k: &str| format!("prompt.{}.{k}", task.kind.as_str());
            if task.chat && chat.is_none() {
                return Err(Error::NoChatTemplate {
                    key: key("chat"),
                    model: model.to_string(),
                });
            }
            if task.few_shot > pool.shots.len() {
                return Err(Error::FewShotTooLarge {
                    key: key("few_shot"),
                    few_shot: task.few_shot,
                    available: pool.shots.len(),
                    kind: task.kind.as_str(),
                    pool: pool.origin.clone(),
                });
            }
            if task.few_shot > 0 {
                task.pool = std::mem::take(pool);
                // Every demonstration's answer must be writable (a valid target index).
                for s in &task.pool.shots {
                    task.answer_text(s)?;
                }
            }
        }
        Ok(Prompter {
            settings: settings.clone(),
            multiple_choice,
            generation,
            chat,
        })
    }

    /// The settings this prompter was made from.
    pub fn settings(&self) -> &PromptSettings {
        &self.settings
    }

    /// The model's chat template, when a task uses it.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// The compiled task of `kind`; `None`: rows of that kind are given their raw input.
    pub fn task(&self, kind: TaskKind) -> Option<&Task> {
        match kind {
            TaskKind::MultipleChoice => self.multiple_choice.as_ref(),
            TaskKind::Generation => self.generation.as_ref(),
        }
    }

    /// The text for `item`; `Ok(None)` when its kind has no table (the raw input, as the
    /// starter kit gives it).
    pub fn render(&self, item: &Item) -> Result<Option<Rendered>> {
        self.task(item.kind)
            .map(|t| t.render(item, self.chat.as_ref()))
            .transpose()
    }
}
