//! Answer extraction on a table of real-looking completions: chain-of-thought endings, bare
//! letters and numbers, "Answer:" lines, markdown, numbers as choices, a choice's text, and
//! completions that name nothing (the caller's log-likelihood fallback).

use prompt::{ExtractedBy, Pools, PromptSettings, Prompter, TaskKind};

fn prompter(extra: &str) -> Prompter {
    let s: PromptSettings = toml::from_str(&format!(
        "[multiple_choice]\nmode = \"generate\"\ntemplate = \"{{input}}\\n{{choices}}\"\n{extra}"
    ))
    .unwrap();
    Prompter::new(&s, Pools::default(), None, "m").unwrap()
}

fn strings(c: &[&str]) -> Vec<String> {
    c.iter().map(|s| s.to_string()).collect()
}

const FRUIT: &[&str] = &["apple", "chair", "it's a door", "none of the above"];

/// What an extraction should give: the choice and how it was found; `None`: the
/// log-likelihood fallback.
type Expected = Option<(usize, ExtractedBy)>;

#[test]
fn default_patterns_on_real_looking_completions() {
    let p = prompter("");
    let t = p.task(TaskKind::MultipleChoice).unwrap();
    let numbers = strings(&["12", "15", "18", "21"]);
    let fruit = strings(FRUIT);
    use ExtractedBy::*;
    let table: &[(&str, &[String], Expected)] = &[
        ("The answer is (B).", &fruit, Some((1, Regex))),
        (
            "Let's think step by step. An apple grows on a tree; a chair is furniture.\nThe answer is (A).",
            &fruit,
            Some((0, Regex)),
        ),
        // The last answer phrase counts: reasoning first, then the answer.
        (
            "At first the answer is (A) seems likely, but no. So the answer is (C)",
            &fruit,
            Some((2, Regex)),
        ),
        ("Answer: C", &fruit, Some((2, Regex))),
        ("**Answer:** D", &fruit, Some((3, Regex))),
        ("answer is: (d)", &fruit, Some((3, Regex))),
        ("The correct answer is B, because chairs are furniture.", &fruit, Some((1, Regex))),
        ("B", &fruit, Some((1, Regex))),
        (" (A).\n", &fruit, Some((0, Regex))),
        ("C. it's a door", &fruit, Some((2, Regex))),
        ("(D) none of the above fits", &fruit, Some((3, Regex))),
        // A label outside the choices names nothing; the text fallback then decides.
        ("The answer is (E): the apple", &fruit, Some((0, ChoiceText))),
        // Lower-case "a" is an article, not a label.
        ("I think the answer is a chair.", &fruit, Some((1, ChoiceText))),
        ("It must be the apple.", &fruit, Some((0, ChoiceText))),
        // Numbers as choices: the captured number is a choice's text.
        ("3 boxes of 5 make 15. The answer is 15.", &numbers, Some((1, Regex))),
        ("Answer: 21", &numbers, Some((3, Regex))),
        // Two choices appear, or none: the log-likelihood decides.
        ("Either the apple or the chair.", &fruit, None),
        ("I cannot tell from the passage.", &fruit, None),
        ("", &fruit, None),
    ];
    for (completion, choices, want) in table {
        assert_eq!(t.extract(completion, choices), *want, "{completion:?}");
    }
}

#[test]
fn numbered_labels_and_custom_patterns() {
    let p = prompter("choice_labels = \"numbers\"\n");
    let t = p.task(TaskKind::MultipleChoice).unwrap();
    let fruit = strings(FRUIT);
    assert_eq!(
        t.extract("The answer is 2.", &fruit),
        Some((1, ExtractedBy::Regex))
    );
    assert_eq!(t.extract("4", &fruit), Some((3, ExtractedBy::Regex)));
    assert_eq!(
        t.extract("The answer is (B)", &fruit),
        None,
        "letters are not labels here"
    );

    let p = prompter("extract = ['Final: \\[(\\w)\\]', 'best option is (\\w+)']\n");
    let t = p.task(TaskKind::MultipleChoice).unwrap();
    assert_eq!(
        t.extract("... Final: [C]", &fruit),
        Some((2, ExtractedBy::Regex))
    );
    assert_eq!(
        t.extract("the best option is apple", &fruit),
        Some((0, ExtractedBy::Regex))
    );
    // Custom patterns replace the defaults: "The answer is (B)" is no longer read.
    assert_eq!(t.extract("The answer is (B)", &fruit), None);
}

#[test]
fn stop_strings_apply_before_extraction() {
    let p = prompter("stop = [\"\\n\\nQuestion:\"]\n");
    let t = p.task(TaskKind::MultipleChoice).unwrap();
    let kept = t.postprocess("The answer is (B).\n\nQuestion: next one. The answer is (A).");
    assert_eq!(kept, "The answer is (B).");
    assert_eq!(
        t.extract(&kept, &strings(FRUIT)),
        Some((1, ExtractedBy::Regex))
    );
}
