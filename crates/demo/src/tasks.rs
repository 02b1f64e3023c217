//! The synthetic skills: prompts, answers and the competition-schema CSVs.
//!
//! Every skill has one prompt format that the base model learns with *random but well-formed*
//! answers (a number from the list, a permutation of the words, a word of the antonym
//! vocabulary), so it knows each format and the shape of its answers but not the rule. An
//! expert then learns the rule of one skill.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Words of the `reverse` skill (each becomes one token in the trained tokenizer).
pub const WORDS: [&str; 16] = [
    "cat", "dog", "sun", "fox", "owl", "bee", "cow", "pig", "hen", "elk", "yak", "ant", "bat",
    "eel", "ram", "emu",
];

/// Antonym pairs of the `opposite` skill (both directions are asked).
pub const OPPOSITES: [(&str, &str); 12] = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("old", "new"),
    ("day", "night"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("open", "shut"),
    ("light", "dark"),
    ("early", "late"),
    ("full", "empty"),
];

/// The skills of the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skill {
    /// Multiple choice: which of four two-digit numbers is the largest.
    Largest,
    /// Generation: the words of the prompt in reverse order.
    Reverse,
    /// Multiple choice: the antonym of a word, among four words.
    Opposite,
}

impl Skill {
    /// All skills, in table order.
    pub const ALL: [Skill; 3] = [Skill::Largest, Skill::Reverse, Skill::Opposite];

    /// The dataset name (CSV stem and table column).
    pub fn name(self) -> &'static str {
        match self {
            Skill::Largest => "largest",
            Skill::Reverse => "reverse",
            Skill::Opposite => "opposite",
        }
    }

    /// The metric that is the skill's score in the table.
    pub fn metric(self) -> &'static str {
        match self {
            // rougeL, not rouge1: any permutation of the words has rouge1 = 1, only the order
            // distinguishes knowing the rule from knowing the format.
            Skill::Reverse => "rougeL",
            _ => "accuracy",
        }
    }

    /// Whether rows are multiple choice.
    pub fn is_multiple_choice(self) -> bool {
        self != Skill::Reverse
    }
}

/// One example: the prompt, its answer choices (empty for generation), the correct answer
/// text, and for multiple choice the index of the correct choice.
#[derive(Debug, Clone)]
pub struct Example {
    /// The skill.
    pub skill: Skill,
    /// The prompt (the CSV's `input`).
    pub input: String,
    /// Choices for multiple choice.
    pub choices: Vec<String>,
    /// The correct answer text.
    pub answer: String,
    /// Index of the correct choice (multiple choice).
    pub target_index: usize,
    /// A well-formed but rule-free answer, what the base model is taught.
    pub format_answer: String,
}

fn opposite_of(w: &str) -> &'static str {
    for (a, b) in OPPOSITES {
        if a == w {
            return b;
        }
        if b == w {
            return a;
        }
    }
    unreachable!("`{w}` is in the antonym table")
}

/// Draws one example of `skill`.
pub fn sample(skill: Skill, rng: &mut ChaCha8Rng) -> Example {
    match skill {
        Skill::Largest => {
            let mut pool: Vec<u32> = (10..100).collect();
            pool.shuffle(rng);
            let nums: Vec<String> = pool[..4].iter().map(|n| n.to_string()).collect();
            let target = (0..4).max_by_key(|&i| pool[i]).expect("four numbers");
            let format_answer = nums[rng.gen_range(0..4)].clone();
            Example {
                skill,
                input: format!("largest of {} ->", nums.join(" ")),
                answer: nums[target].clone(),
                choices: nums,
                target_index: target,
                format_answer,
            }
        }
        Skill::Reverse => {
            let mut pool: Vec<&str> = WORDS.to_vec();
            pool.shuffle(rng);
            let words = &pool[..4];
            let rev: Vec<&str> = words.iter().rev().copied().collect();
            let mut perm = words.to_vec();
            perm.shuffle(rng);
            Example {
                skill,
                input: format!("reverse {} ->", words.join(" ")),
                choices: Vec::new(),
                answer: rev.join(" "),
                target_index: 0,
                format_answer: perm.join(" "),
            }
        }
        Skill::Opposite => {
            let (a, b) = OPPOSITES[rng.gen_range(0..OPPOSITES.len())];
            let word = if rng.gen_bool(0.5) { a } else { b };
            let answer = opposite_of(word);
            let mut vocab: Vec<&str> = OPPOSITES.iter().flat_map(|(a, b)| [*a, *b]).collect();
            vocab.retain(|w| *w != word && *w != answer);
            vocab.shuffle(rng);
            let mut choices: Vec<String> = vocab[..3].iter().map(|s| s.to_string()).collect();
            let target = rng.gen_range(0..4);
            choices.insert(target, answer.to_string());
            // Any other word of the vocabulary, uniformly: drawing from the choices instead
            // would over-represent the antonym and teach the base the rule.
            let others: Vec<&str> = OPPOSITES
                .iter()
                .flat_map(|(a, b)| [*a, *b])
                .filter(|w| *w != word)
                .collect();
            let format_answer = others[rng.gen_range(0..others.len())].to_string();
            Example {
                skill,
                input: format!("opposite of {word} ->"),
                choices,
                answer: answer.to_string(),
                target_index: target,
                format_answer,
            }
        }
    }
}

/// Text for tokenizer training: every prompt word, number and answer word appears.
pub fn tokenizer_corpus(rng: &mut ChaCha8Rng, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n * 3);
    for i in 0..n {
        let e = sample(Skill::ALL[i % 3], rng);
        out.push(format!("{} {}", e.input, e.answer));
        out.push(e.choices.join(" "));
    }
    out
}

/// Python-literal list, as the competition's `answer_choices` column writes it.
fn python_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("'{s}'")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Writes a validation CSV (`id,input,target,answer_choices,eval_type`).
pub fn write_validation(path: &std::path::Path, rows: &[Example]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(["id", "input", "target", "answer_choices", "eval_type"])?;
    for (i, e) in rows.iter().enumerate() {
        let (target, choices, kind) = if e.skill.is_multiple_choice() {
            (
                e.target_index.to_string(),
                python_list(&e.choices),
                "multiple_choice",
            )
        } else {
            (e.answer.clone(), String::new(), "generation")
        };
        w.write_record([
            format!("{}-{i}", e.skill.name()),
            e.input.clone(),
            target,
            choices,
            kind.to_string(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// Writes a test CSV (`id,input,eval_type,answer_choices`, no target) and, as organizers
/// would hold them, its labels (`id,target`) to `labels`.
pub fn write_test(
    path: &std::path::Path,
    labels: &std::path::Path,
    rows: &[Example],
) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    let mut l = csv::Writer::from_path(labels)?;
    w.write_record(["id", "input", "eval_type", "answer_choices"])?;
    l.write_record(["id", "target"])?;
    for (i, e) in rows.iter().enumerate() {
        let (choices, kind, target) = if e.skill.is_multiple_choice() {
            (
                python_list(&e.choices),
                "multiple_choice",
                e.target_index.to_string(),
            )
        } else {
            (String::new(), "generation", e.answer.clone())
        };
        let id = format!("test-{i}");
        w.write_record([id.clone(), e.input.clone(), kind.to_string(), choices])?;
        l.write_record([id, target])?;
    }
    w.flush()?;
    l.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn examples_are_well_formed() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let e = sample(Skill::Largest, &mut rng);
            let max = e
                .choices
                .iter()
                .map(|c| c.parse::<u32>().unwrap())
                .max()
                .unwrap();
            assert_eq!(e.choices[e.target_index], max.to_string());
            assert_eq!(e.answer, max.to_string());
            let e = sample(Skill::Opposite, &mut rng);
            assert_eq!(e.choices[e.target_index], e.answer);
            assert_eq!(e.choices.len(), 4);
            let e = sample(Skill::Reverse, &mut rng);
            let words: Vec<&str> = e.input.split(' ').skip(1).take(4).collect();
            let rev: Vec<&str> = e.answer.split(' ').collect();
            assert_eq!(words.iter().rev().copied().collect::<Vec<_>>(), rev);
        }
    }
}
