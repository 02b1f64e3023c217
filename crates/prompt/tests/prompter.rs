//! What a row becomes: templates, choices lists, demonstrations (seeded, never the row itself),
//! system instructions, chat turns or one block; and the settings errors, each one clear.

use std::collections::BTreeMap;

use prompt::{ChatTemplate, Item, Pool, Pools, PromptSettings, Prompter, Shot, TaskKind};

fn settings(toml_text: &str) -> PromptSettings {
    toml::from_str(toml_text).unwrap()
}

/// A pool of `n` multiple-choice rows `r0..`, each with two choices, the target alternating.
fn mc_pool(n: usize) -> Pool {
    Pool {
        shots: (0..n)
            .map(|i| Shot {
                id: format!("r{i}"),
                input: format!("Q{i}?"),
                choices: vec![format!("no{i}"), format!("yes{i}")],
                target: (i % 2).to_string(),
            })
            .collect(),
        origin: "pool.csv".into(),
    }
}

fn mc_item<'a>(id: &'a str, input: &'a str, choices: &'a [String]) -> Item<'a> {
    Item {
        id,
        input,
        choices,
        kind: TaskKind::MultipleChoice,
    }
}

/// A template that shows the conversation plainly: `[role] content` lines.
fn plain_chat() -> ChatTemplate {
    ChatTemplate::new(
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}[assistant]{% endif %}",
        BTreeMap::from([("bos_token".to_string(), "<s>".to_string())]),
        "test",
    )
    .unwrap()
}

#[test]
fn without_a_table_a_kind_keeps_its_raw_input() {
    let s = settings("[generation]\ntemplate = \"Summarize: {input}\"\n");
    let p = Prompter::new(&s, Pools::default(), None, "m").unwrap();
    let choices = vec!["a".to_string()];
    assert_eq!(p.render(&mc_item("1", "raw", &choices)).unwrap(), None);
    let item = Item {
        id: "2",
        input: "text",
        choices: &[],
        kind: TaskKind::Generation,
    };
    let r = p.render(&item).unwrap().unwrap();
    assert_eq!((r.text.as_str(), r.chat), ("Summarize: text", false));
}

#[test]
fn few_shot_blocks_system_and_numbered_choices() {
    let s = settings(
        "[multiple_choice]\ntemplate = \"{input}\\n{choices}\\nAnswer:\"\nchoice_labels = \"numbers\"\n\
         choice_format = \"({label}) {choice}\"\nfew_shot = 2\nseed = 3\nsystem = \"Be brief.\"\n\
         answer = \"{label}\"\nfew_shot_separator = \"\\n---\\n\"\n",
    );
    let pools = Pools {
        multiple_choice: mc_pool(6),
        ..Default::default()
    };
    let p = Prompter::new(&s, pools, None, "m").unwrap();
    let choices = vec!["x".to_string(), "y".to_string()];
    let text = p
        .render(&mc_item("q", "Which?", &choices))
        .unwrap()
        .unwrap()
        .text;
    let parts: Vec<&str> = text.split("\n---\n").collect();
    assert_eq!(parts.len(), 3, "{text}");
    assert!(parts[0].starts_with("Be brief.\n\nQ"), "{text}");
    // A demonstration: its question, its numbered choices, its answer's label after a space.
    for demo in &parts[..2] {
        let i: usize = demo.trim_start_matches("Be brief.\n\n")[1..2]
            .parse()
            .unwrap();
        let want = format!("Q{i}?\n(1) no{i}\n(2) yes{i}\nAnswer: {}", i % 2 + 1);
        assert!(demo.ends_with(&want), "{demo:?} vs {want:?}");
    }
    assert_eq!(parts[2], "Which?\n(1) x\n(2) y\nAnswer:");
}

#[test]
fn demonstrations_are_seeded_and_never_the_row_itself() {
    let pools = || Pools {
        multiple_choice: mc_pool(8),
        ..Default::default()
    };
    let with_seed = |seed: u64| {
        let s = settings(&format!(
            "[multiple_choice]\ntemplate = \"{{input}}\"\nfew_shot = 3\nseed = {seed}\n"
        ));
        Prompter::new(&s, pools(), None, "m").unwrap()
    };
    let (a, b) = (with_seed(1), with_seed(2));
    let mut differ = 0;
    for row in 0..8 {
        // Rows of the pool itself, as when the validation file is its own few-shot file.
        let (id, input) = (format!("r{row}"), format!("Q{row}?"));
        let choices = vec![format!("no{row}"), format!("yes{row}")];
        let item = mc_item(&id, &input, &choices);
        let text = a.render(&item).unwrap().unwrap().text;
        assert_eq!(text, a.render(&item).unwrap().unwrap().text, "seeded");
        let shown: Vec<&str> = text.split("\n\n").collect();
        assert_eq!(shown.len(), 4);
        assert_eq!(shown[3], input);
        assert!(
            shown[..3].iter().all(|d| !d.starts_with(&input)),
            "row {row} sees itself: {text}"
        );
        differ += usize::from(text != b.render(&item).unwrap().unwrap().text);
    }
    assert!(
        differ >= 6,
        "another seed draws other demonstrations ({differ}/8)"
    );
}

#[test]
fn chat_turns_and_block() {
    let base = "[multiple_choice]\ntemplate = \"{input}\\n{choices}\"\nchat = true\nfew_shot = 1\n\
                system = \"Sys\"\nmode = \"generate\"\n";
    let choices = vec!["x".to_string(), "y".to_string()];
    let render = |extra: &str| {
        let s = settings(&format!("{base}{extra}"));
        let pools = Pools {
            multiple_choice: mc_pool(1),
            ..Default::default()
        };
        let p = Prompter::new(&s, pools, Some(plain_chat()), "m").unwrap();
        p.render(&mc_item("q", "Which?", &choices))
            .unwrap()
            .unwrap()
    };
    let turns = render("");
    assert!(turns.chat);
    assert_eq!(
        turns.text,
        "<s>[system] Sys\n[user] Q0?\nA. no0\nB. yes0\n[assistant] The answer is (A).\n\
         [user] Which?\nA. x\nB. y\n[assistant]"
    );
    let block = render("few_shot_style = \"block\"\n");
    assert_eq!(
        block.text,
        "<s>[system] Sys\n[user] Q0?\nA. no0\nB. yes0 The answer is (A).\n\nWhich?\nA. x\nB. y\n[assistant]"
    );
}

#[test]
fn bad_settings_one_clear_error_each() {
    let err = |toml_text: &str| settings(toml_text).validate().unwrap_err().to_string();
    let e = err("[multiple_choice]\ntemplate = \"{question}\\n{choices}\"\n");
    assert!(
        e.contains("`prompt.multiple_choice.template`: unknown placeholder `{question}`"),
        "{e}"
    );
    let e = err("[generation]\ntemplate = \"{input} {choices}\"\n");
    assert!(
        e.contains("`prompt.generation.template`: unknown placeholder `{choices}`"),
        "{e}"
    );
    let e = err("[multiple_choice]\nmode = \"generate\"\nextract = ['answer: [A-D]']\n");
    assert!(e.contains("`prompt.multiple_choice.extract`"), "{e}");
    assert!(e.contains("`answer: [A-D]` has no capture group"), "{e}");
    let e = err("[generation]\nmode = \"generate\"\n");
    assert!(
        e.contains("`prompt.generation.mode`: applies to multiple_choice only"),
        "{e}"
    );
    let e = err("[generation]\nmax_gen_len = 0\n");
    assert!(
        e.contains("`prompt.generation.max_gen_len`: must be at least 1"),
        "{e}"
    );

    // Those that need the data or the model: when the prompter is made.
    let s = settings("[multiple_choice]\nfew_shot = 5\n");
    let pools = Pools {
        multiple_choice: mc_pool(3),
        ..Default::default()
    };
    let e = Prompter::new(&s, pools, None, "m").unwrap_err().to_string();
    assert_eq!(
        e,
        "`prompt.multiple_choice.few_shot` = 5, but pool.csv has only 3 multiple_choice rows with targets"
    );
    let s = settings("[generation]\nchat = true\n");
    let e = Prompter::new(&s, Pools::default(), None, "models/llama2")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "`prompt.generation.chat` = true, but the model models/llama2 has no chat template"
        ),
        "{e}"
    );
    // A demonstration whose target is not one of its choices.
    let mut pool = mc_pool(2);
    pool.shots[1].target = "7".into();
    let s = settings("[multiple_choice]\nfew_shot = 1\n");
    let pools = Pools {
        multiple_choice: pool,
        ..Default::default()
    };
    let e = Prompter::new(&s, pools, None, "m").unwrap_err().to_string();
    assert!(
        e.contains("row `r1`: demonstration of pool.csv: target `7`"),
        "{e}"
    );
}
