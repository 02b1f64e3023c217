//! Prompting end to end on tiny fixtures: an entry with `[prompt]` (the model's chat template,
//! few-shot demonstrations, generate-mode multiple choice, post-processed generations) runs
//! eval, predict and package; `eval`/`predict --prompt FILE` give what the entry gave; without
//! `[prompt]` nothing of it appears; bad prompts fail with one error line before any model
//! loads (or is merged).
//!
//! The models are synthetic decoders (testkit::synthetic, the eval goldens' Llama 3 widths)
//! carrying the real Llama 3.1 tokenizer and its chat template, merged linearly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use testkit::cli::{offline, ok, one_error_line};

const VALIDATION_MC: &str = "id,input,target,answer_choices,eval_type
v1,Which is larger: 3 or 9?,1,\"['3', '9']\",multiple_choice
v2,Pick the fruit.,0,\"['apple', 'chair', 'door']\",multiple_choice
v3,Which animal barks?,2,\"['cat', 'fish', 'dog']\",multiple_choice
v4,What colour is the sky on a clear day?,0,\"['blue', 'green']\",multiple_choice
v5,How many legs does a spider have?,1,\"['six', 'eight', 'ten']\",multiple_choice
v6,Which is a vegetable?,1,\"['pear', 'carrot']\",multiple_choice
";
const VALIDATION_GEN: &str = "id,input,target,answer_choices,eval_type
g1,The cat sat on the mat all day long and did not move.,A cat sat on a mat.,,generation
g2,It rained in the city for three days and the streets flooded.,Rain flooded the city.,,generation
g3,The team won the final after extra time.,The team won.,,generation
";
/// `v3` is also a test row (same id and input): eval and predict must give it the same
/// prompt, hence the same prediction.
const TEST: &str = "id,input,answer_choices,eval_type
t1,Which is smaller: 2 or 8?,\"['2', '8']\",multiple_choice
v3,Which animal barks?,\"['cat', 'fish', 'dog']\",multiple_choice
t2,The shop closed early because of the storm.,,generation
";

const PROMPT: &str = r#"[prompt.multiple_choice]
template = "{input}\n{choices}\nThink step by step, then end with \"The answer is (X)\"."
chat = true
system = "You are a careful assistant."
few_shot = 2
mode = "generate"
max_gen_len = 12
stop = ["\n\nQuestion:"]

[prompt.generation]
template = "Summarize in one sentence.\n\n{input}"
chat = true
few_shot = 1
few_shot_style = "block"
first_line = true
strip = true
"#;

struct Setup {
    _tmp: tempfile::TempDir,
    ws: PathBuf,
    models: PathBuf,
}

fn write_model(dir: &Path, tokenizer: &str, scale: f64) {
    let config = testkit::goldens::config("llama3");
    let tokenizer = testkit::tokenizers::dir(tokenizer);
    testkit::synthetic::write_scaled_decoder_dir(dir, &config, &tokenizer, scale);
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
    std::fs::write(ws.join("src/lib.rs"), "// participant code\n").unwrap();
    std::fs::create_dir_all(ws.join("data/validation")).unwrap();
    std::fs::write(ws.join("data/validation/mc.csv"), VALIDATION_MC).unwrap();
    std::fs::write(ws.join("data/validation/gen.csv"), VALIDATION_GEN).unwrap();
    std::fs::write(ws.join("data/test.csv"), TEST).unwrap();
    let models = tmp.path().join("models");
    write_model(&models.join("a"), "llama3_1", 1.0);
    write_model(&models.join("b"), "llama3_1", 0.5);
    // Config and tokenizer only, no weights: a prompt error must come before any loading.
    for (name, tokenizer) in [
        ("noweights-chat", "llama3_1"),
        ("noweights-llama2", "llama2"),
    ] {
        let d = models.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let config = testkit::goldens::config("llama3");
        std::fs::write(d.join("config.json"), config.to_string()).unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(testkit::tokenizers::dir(tokenizer).join(f), d.join(f)).unwrap();
        }
    }
    write_entry(&ws, "chatty", PROMPT);
    Setup {
        _tmp: tmp,
        ws,
        models,
    }
}

fn write_entry(ws: &Path, name: &str, prompt: &str) {
    let entry = ws.join("submissions").join(name);
    std::fs::create_dir_all(&entry).unwrap();
    let text = format!(
        r#"[merge]
method = "linear"
dtype = "float32"
[[merge.models]]
model = "../../../models/a"
parameters = {{ weight = 0.7 }}
[[merge.models]]
model = "../../../models/b"
parameters = {{ weight = 0.3 }}

[eval]
datasets = ["${{DATA_DIR}}/validation/mc.csv", "${{DATA_DIR}}/validation/gen.csv"]
max_gen_len = 8
batch_size = 2
device = "cpu"

{prompt}"#
    );
    std::fs::write(entry.join("entry.toml"), text).unwrap();
}

impl Setup {
    fn run(&self, args: &[&str]) -> Output {
        let mut c = offline(
            Command::new(env!("CARGO_BIN_EXE_llm-merging")),
            self._tmp.path(),
        );
        c.current_dir(&self.ws)
            .env_remove("LLM_MERGING_DATA")
            .args(args)
            .output()
            .unwrap()
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.ws.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    fn json(&self, rel: &str) -> Value {
        serde_json::from_str(&self.read(rel)).unwrap()
    }

    fn details(&self, rel: &str) -> Vec<Value> {
        self.read(rel)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The predictions of a CSV as (id, prediction) pairs.
fn predictions(text: &str) -> Vec<(String, String)> {
    text.lines()
        .skip(1)
        .map(|l| {
            let mut f = l.splitn(2, ',');
            let id = f.next().unwrap().to_string();
            let rest = f.next().unwrap();
            (id, rest.rsplit_once(',').unwrap().0.to_string())
        })
        .collect()
}

#[test]
fn an_entry_with_prompt_runs_eval_predict_and_package() {
    let s = setup();
    let log = ok(&s.run(&["run", "--entry", "submissions/chatty"]));
    let dist = "dist/chatty";
    for f in [
        "submission.csv",
        "scores.json",
        "manifest.json",
        "chatty.tar",
    ] {
        assert!(s.ws.join(dist).join(f).is_file(), "{f} missing\n{log}");
    }
    // The printed table carries standard errors.
    assert!(log.contains("accuracy=") && log.contains('±'), "{log}");

    // Multiple choice: chat prompts with the system message, 2 demonstrations as turns (never
    // the row itself), the raw completion, how the answer was extracted, a valid index.
    let mc = s.details(&format!("{dist}/work/eval/details/mc.jsonl"));
    assert_eq!(mc.len(), 6);
    for (row, input) in mc.iter().zip(VALIDATION_MC.lines().skip(1)) {
        let prompt = row["prompt"].as_str().unwrap();
        assert!(
            prompt.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a careful assistant.<|eot_id|>"),
            "{prompt}"
        );
        assert!(prompt.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
        assert_eq!(
            prompt.matches("<|start_header_id|>user").count(),
            3,
            "{prompt}"
        );
        // Two demonstration answers, then the generation prompt.
        let answers =
            prompt.matches("<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is (");
        assert_eq!(answers.count(), 2, "{prompt}");
        assert_eq!(
            prompt.matches("<|start_header_id|>assistant").count(),
            3,
            "{prompt}"
        );
        let question = input.split(',').nth(1).unwrap();
        assert_eq!(
            prompt.matches(question).count(),
            1,
            "the row shown itself: {prompt}"
        );
        assert!(prompt.contains(&format!("{question}\nA. ")), "{prompt}");
        assert!(row["completion"].is_string(), "{row}");
        let by = row["extracted_by"].as_str().unwrap();
        assert!(["regex", "choice_text", "loglik"].contains(&by), "{row}");
        assert_eq!(row["choice_scores"].is_array(), by == "loglik", "{row}");
        let n = row["output_tokens"][0].as_u64().unwrap();
        assert!(
            (1..=12).contains(&n),
            "max_gen_len 12 of [prompt.multiple_choice]: {row}"
        );
        let p: usize = row["prediction"].as_str().unwrap().parse().unwrap();
        assert!(p < row["choice_scores"].as_array().map_or(3, Vec::len).max(2));
    }
    // Generation: one demonstration in the same user message, the first line kept, stripped.
    let gen = s.details(&format!("{dist}/work/eval/details/gen.jsonl"));
    for row in &gen {
        let prompt = row["prompt"].as_str().unwrap();
        assert_eq!(
            prompt.matches("<|start_header_id|>user").count(),
            1,
            "{prompt}"
        );
        assert_eq!(
            prompt.matches("Summarize in one sentence.").count(),
            2,
            "{prompt}"
        );
        let completion = row["completion"].as_str().unwrap();
        let kept = completion.trim_start().split('\n').next().unwrap().trim();
        assert_eq!(row["prediction"], kept, "{row}");
        assert!(row.get("extracted_by").is_none(), "{row}");
    }

    // Scores with bootstrap standard errors.
    let scores = s.json(&format!("{dist}/scores.json"));
    for (ds, metric) in [("mc", "accuracy"), ("gen", "rouge1"), ("gen", "rougeLsum")] {
        assert!(scores[ds][metric].is_number(), "{scores}");
        let se = scores[ds][format!("{metric}_stderr")].as_f64().unwrap();
        assert!((0.0..=0.5).contains(&se), "{scores}");
    }

    // The manifest records the prompt settings and the chat template's hash.
    let manifest = s.json(&format!("{dist}/manifest.json"));
    let p = &manifest["prompt"];
    assert_eq!(p["settings"]["multiple_choice"]["few_shot"], 2, "{p}");
    assert_eq!(p["settings"]["multiple_choice"]["mode"], "generate", "{p}");
    assert_eq!(p["settings"]["generation"]["first_line"], true, "{p}");
    let template = prompt::ChatTemplate::from_model_dir(&s.models.join("a"))
        .unwrap()
        .unwrap();
    assert_eq!(p["chat_template_sha256"], template.sha256());
    let files: Vec<&String> = p["few_shot_files"].as_object().unwrap().keys().collect();
    assert_eq!(files, ["data/validation/gen.csv", "data/validation/mc.csv"]);

    // Predict used the very prompts of eval: `v3`, in both files, got the same prediction.
    let eval_v3 = predictions(&s.read(&format!("{dist}/work/eval/predictions/mc.csv")))
        .into_iter()
        .find(|(id, _)| id == "v3")
        .unwrap();
    let submission = predictions(&s.read(&format!("{dist}/submission.csv")));
    assert_eq!(
        submission
            .iter()
            .map(|(i, _)| i.as_str())
            .collect::<Vec<_>>(),
        ["t1", "v3", "t2"]
    );
    assert!(
        submission.contains(&eval_v3),
        "{submission:?} vs {eval_v3:?}"
    );

    // A rerun reuses every stage; another seed re-runs eval and predict, not the merge.
    let again = ok(&s.run(&["run", "--entry", "submissions/chatty"]));
    for stage in ["merge", "eval", "predict"] {
        assert!(
            again
                .lines()
                .any(|l| l.starts_with(stage) && l.ends_with("reused")),
            "{stage}: {again}"
        );
    }
    write_entry(
        &s.ws,
        "chatty",
        &PROMPT.replace("few_shot = 2\n", "few_shot = 2\nseed = 9\n"),
    );
    let reseeded = ok(&s.run(&["run", "--entry", "submissions/chatty"]));
    let status = |stage: &str| {
        reseeded
            .lines()
            .find(|l| l.starts_with(stage) && (l.ends_with("reused") || l.ends_with("ran")))
            .map(|l| l.ends_with("ran"))
            .unwrap_or_else(|| panic!("{stage}: {reseeded}"))
    };
    assert!(
        !status("merge") && status("eval") && status("predict"),
        "{reseeded}"
    );

    // `eval --prompt FILE` over the merged model, and with the merge done in memory (the chat
    // template is then the reference model's), give what the entry gave.
    let merged = s.ws.join(dist).join("work/merged");
    let entry = s.ws.join("submissions/chatty/entry.toml");
    let config = s.ws.join("merge.toml");
    let text = std::fs::read_to_string(&entry).unwrap();
    let merge = &text[..text.find("[eval]").unwrap()];
    std::fs::write(&config, merge.replace("../../../models", "../models")).unwrap();
    for (source, path, out) in [
        ("--model", &merged, "cli-eval"),
        ("--merge", &config, "cli-eval-merge"),
    ] {
        let (path, entry) = (path.to_str().unwrap(), entry.to_str().unwrap());
        ok(&s.run(&[
            "eval",
            source,
            path,
            "--prompt",
            entry,
            "--data",
            "data/validation/mc.csv",
            "data/validation/gen.csv",
            "--max-gen-len",
            "8",
            "--batch-size",
            "2",
            "--out",
            out,
        ]));
        for f in ["predictions/mc.csv", "predictions/gen.csv", "scores.json"] {
            assert_eq!(
                s.read(&format!("{out}/{f}")),
                s.read(&format!("{dist}/work/eval/{f}")),
                "{source}: {f}"
            );
        }
    }
    // predict has no validation files by default here: the prompt file names them.
    let file = s.ws.join("predict-prompt.toml");
    let text = std::fs::read_to_string(&entry).unwrap();
    let table = &text[text.find("[prompt.multiple_choice]").unwrap()..];
    let table = table
        .replace(
            "few_shot = 2\n",
            "few_shot = 2\nfew_shot_file = \"data/validation/mc.csv\"\n",
        )
        .replace(
            "few_shot = 1\n",
            "few_shot = 1\nfew_shot_file = \"data/validation/gen.csv\"\n",
        );
    std::fs::write(&file, table).unwrap();
    let sub = s.ws.join("cli-submission.csv");
    ok(&s.run(&[
        "predict",
        "--model",
        merged.to_str().unwrap(),
        "--prompt",
        file.to_str().unwrap(),
        "--data",
        "data/test.csv",
        "--max-gen-len",
        "8",
        "--out",
        sub.to_str().unwrap(),
    ]));
    assert_eq!(
        s.read("cli-submission.csv"),
        s.read(&format!("{dist}/submission.csv"))
    );
}

#[test]
fn without_prompt_nothing_changes() {
    let s = setup();
    let model = s.models.join("a");
    let eval = |out: &str, prompt: Option<&Path>| {
        let mut args = vec![
            "eval".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--data".into(),
            "data/validation/mc.csv".into(),
            "data/validation/gen.csv".into(),
            "--max-gen-len".into(),
            "6".into(),
            "--out".into(),
            out.into(),
        ];
        if let Some(p) = prompt {
            args.extend(["--prompt".to_string(), p.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&s.run(&args))
    };
    let log = eval("plain", None);
    assert!(!log.contains('±'), "{log}");
    assert!(!s.read("plain/scores.json").contains("_stderr"));
    for f in ["details/mc.jsonl", "details/gen.jsonl"] {
        let text = s.read(&format!("plain/{f}"));
        for key in ["\"prompt\"", "\"completion\"", "\"extracted_by\""] {
            assert!(!text.contains(key), "{f}: {key}");
        }
    }
    // The template machinery itself changes nothing: `{input}` alone, no chat, gives the kit's
    // predictions exactly (and adds the prompts and standard errors).
    let identity = s.ws.join("identity.toml");
    std::fs::write(
        &identity,
        "[prompt.multiple_choice]\ntemplate = \"{input}\"\n[prompt.generation]\ntemplate = \"{input}\"\n",
    )
    .unwrap();
    eval("identity", Some(&identity));
    for f in ["predictions/mc.csv", "predictions/gen.csv"] {
        assert_eq!(
            s.read(&format!("identity/{f}")),
            s.read(&format!("plain/{f}")),
            "{f}"
        );
    }
    assert!(s.read("identity/scores.json").contains("accuracy_stderr"));
}

#[test]
fn bad_prompts_fail_with_one_line_before_any_model_loads() {
    let s = setup();
    let eval_with = |model: &str, prompt: &str, needles: &[&str]| {
        let file = s.ws.join("bad.toml");
        std::fs::write(&file, prompt).unwrap();
        let o = s.run(&[
            "eval",
            "--model",
            s.models.join(model).to_str().unwrap(),
            "--prompt",
            file.to_str().unwrap(),
            "--data",
            "data/validation/mc.csv",
            "--out",
            "never",
        ]);
        // The model directories have no weights: loading would fail differently.
        let line = one_error_line(&o, needles);
        assert!(line.contains("bad.toml"), "{line}");
        assert!(!s.ws.join("never").exists());
    };
    eval_with(
        "noweights-chat",
        "[prompt.multiple_choice]\ntemplate = \"{question}\\n{choices}\"\n",
        &["`prompt.multiple_choice.template`: unknown placeholder `{question}`"],
    );
    eval_with(
        "noweights-chat",
        "[prompt.multiple_choice]\nfew_shot = 7\n",
        &[
            "`prompt.multiple_choice.few_shot` = 7",
            "mc.csv has only 6 multiple_choice rows",
        ],
    );
    eval_with(
        "noweights-chat",
        "[prompt.multiple_choice]\nmode = \"generate\"\nextract = ['The answer is [A-D]']\n",
        &["`prompt.multiple_choice.extract`", "has no capture group"],
    );
    eval_with(
        "noweights-llama2",
        "[prompt.generation]\nchat = true\n",
        &[
            "`prompt.generation.chat` = true",
            "noweights-llama2",
            "has no chat template",
        ],
    );
    eval_with(
        "noweights-chat",
        "[prompt.multiple_choice]\nfewshot = 2\n",
        &["bad.toml:2:1", "unknown field `fewshot`"],
    );

    // In an entry: the same errors, before anything is merged.
    let run_entry = |prompt: &str, needles: &[&str]| {
        write_entry(&s.ws, "bad", prompt);
        let line = one_error_line(&s.run(&["run", "--entry", "submissions/bad"]), needles);
        assert!(line.contains("entry.toml"), "{line}");
        assert!(!s.ws.join("dist/bad/work/merged").exists(), "{line}");
    };
    run_entry(
        "[prompt.generation]\ntemplate = \"Summarize {text}\"\n",
        &["`prompt.generation.template`: unknown placeholder `{text}`"],
    );
    run_entry(
        "[prompt.generation]\nfew_shot = 4\n",
        &[
            "`prompt.generation.few_shot` = 4",
            "has only 3 generation rows",
        ],
    );
    run_entry(
        "[prompt.multiple_choice]\nfew_shot = 1\nfew_shot_file = \"/abs/shots.csv\"\n",
        &["few_shot_file", "absolute path"],
    );
}
