//! End-to-end tests of the demo family: trained with fixed seeds, scored by the eval harness,
//! merged by merge-core.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use demo::tasks::Skill;
use demo::{Recipe, Table};

/// The default family, built once and shared with the other test binaries (the CLI test)
/// through the target directory; the stamp's recipe hash decides whether it is current.
/// Tests of this binary run in parallel: the first one builds, the others wait for it.
fn default_family() -> PathBuf {
    static FAMILY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FAMILY
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-family");
            let t = std::time::Instant::now();
            // In a process of its own, so it can compute single-threaded (an environment
            // variable, which this multi-threaded test binary must not set).
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_demo-build"))
                .arg(&dir)
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            eprintln!(
                "{}{out}family {:.1}s",
                String::from_utf8_lossy(&o.stderr),
                t.elapsed().as_secs_f64()
            );
            assert!(o.status.success());
            assert!(demo::cached(&dir, &Recipe::default()).is_some());
            dir
        })
        .clone()
}

fn score(t: &Table, row: &str, skill: Skill) -> f64 {
    let i = Skill::ALL.iter().position(|&k| k == skill).unwrap();
    t.row(row).unwrap_or_else(|| panic!("no row {row}")).scores[i]
}

#[test]
fn experts_learn_their_skill_and_merges_keep_more_than_any_expert() {
    let dir = default_family();
    let table = demo::compare(&dir).unwrap();
    println!("{}", table.render());

    for (expert, skill) in [
        (demo::EXPERT_LARGEST, Skill::Largest),
        (demo::EXPERT_REVERSE, Skill::Reverse),
        (demo::LORA_OPPOSITE, Skill::Opposite),
    ] {
        let own = score(&table, expert, skill);
        let base = score(&table, demo::BASE, skill);
        println!(
            "{expert}: {} {own:.3} vs base {base:.3} (margin {:+.3})",
            skill.name(),
            own - base
        );
        assert!(own >= 0.9, "{expert} scores {own} on its own skill");
        assert!(
            own - base >= 0.3,
            "{expert} beats the base on {} by only {:.3}",
            skill.name(),
            own - base
        );
        // Poor on the others: near the base, far below that skill's own expert.
        for (other_expert, other) in [
            (demo::EXPERT_LARGEST, Skill::Largest),
            (demo::EXPERT_REVERSE, Skill::Reverse),
            (demo::LORA_OPPOSITE, Skill::Opposite),
        ] {
            if other == skill {
                continue;
            }
            let s = score(&table, expert, other);
            let b = score(&table, demo::BASE, other);
            let e = score(&table, other_expert, other);
            assert!(
                s <= b + 0.15 && s <= e - 0.3,
                "{expert} is not poor on {}: {s:.3} (base {b:.3}, its expert {e:.3})",
                other.name()
            );
        }
    }

    let experts = [
        demo::EXPERT_LARGEST,
        demo::EXPERT_REVERSE,
        demo::LORA_OPPOSITE,
    ];
    let best_expert = experts
        .iter()
        .map(|e| table.row(e).unwrap().average())
        .fold(f64::MIN, f64::max);
    for merge in ["merge: ties", "merge: task_arithmetic"] {
        let avg = table.row(merge).unwrap().average();
        println!(
            "{merge}: average {avg:.3} vs best single expert {best_expert:.3} (margin {:+.3})",
            avg - best_expert
        );
        assert!(
            avg > best_expert + 0.05,
            "{merge} averages {avg:.3}, the best expert {best_expert:.3}"
        );
    }

    // Scores are a function of the files: evaluating again from scratch gives the same table.
    std::fs::remove_dir_all(dir.join("compare")).unwrap();
    let again = demo::compare(&dir).unwrap();
    for (a, b) in table.rows.iter().zip(&again.rows) {
        assert_eq!(a.scores, b.scores, "row {}", a.name);
    }
}

#[test]
fn family_is_in_hugging_face_layout() {
    let dir = default_family();
    for m in [demo::BASE, demo::EXPERT_LARGEST, demo::EXPERT_REVERSE] {
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(dir.join(m).join(f).is_file(), "{m}/{f} missing");
        }
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(demo::LORA_OPPOSITE).join("adapter_config.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    let a = merge_core::adapter::Adapter::open_dir(dir.join(demo::LORA_OPPOSITE)).unwrap();
    assert_eq!(a.modules().len(), 2 * 7);
    // The tokenizer round-trips the skills' text.
    let tok =
        tokenizers::Tokenizer::from_file(dir.join(demo::BASE).join("tokenizer.json")).unwrap();
    let ids = tok.encode("reverse cat dog sun fox ->", false).unwrap();
    assert_eq!(
        tok.decode(ids.get_ids(), true).unwrap(),
        "reverse cat dog sun fox ->"
    );
    for k in Skill::ALL {
        let ds = eval_harness::dataset::load(&demo::validation_csv(&dir, k)).unwrap();
        assert_eq!(ds.examples.len(), Recipe::default().validation_rows);
    }
    let test = eval_harness::dataset::load(&demo::test_csv(&dir)).unwrap();
    assert_eq!(test.examples.len(), Recipe::default().test_rows);
    assert!(!test.has_targets());
}

fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() != demo::STAMP {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// A short recipe: the determinism property does not need trained models.
fn short(seed: u64) -> Recipe {
    Recipe {
        seed,
        base_steps: 12,
        expert_steps: 8,
        lora_steps: 8,
        validation_rows: 10,
        test_rows: 9,
        ..Recipe::default()
    }
}

#[test]
fn same_seed_gives_byte_identical_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    demo::build(&a, &short(1)).unwrap();
    demo::build(&b, &short(1)).unwrap();
    demo::build(&c, &short(2)).unwrap();
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    assert!(fa.len() >= 20, "{} files", fa.len());
    for (k, v) in &fa {
        assert!(v == &fb[k], "{} differs between two builds", k.display());
    }
    // Another seed gives other weights: the comparison above can fail.
    let w = Path::new(demo::BASE).join("model.safetensors");
    assert_ne!(fa[&w], fc[&w]);
    // The cache is keyed by the recipe: a matching stamp is reused, another recipe is not.
    assert!(demo::cached(&a, &short(1)).is_some());
    assert!(demo::cached(&a, &short(2)).is_none());
    assert!(!demo::ensure(&a, &short(1)).unwrap());
}
