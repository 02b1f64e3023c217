//! `regmean`: parity with a float64 torch implementation of the paper's formulas on the tiny
//! fixtures (goldens and statistics made by `scripts/goldens/regmean_goldens.py` with
//! transformers forward hooks), the closed form on hand-sized cases, and bad input (missing
//! statistics, statistics of another architecture, a Gram matrix of the wrong size), each one
//! clear error before anything is written.

use std::path::{Path, PathBuf};

use merge_core::checkpoint::Checkpoint;
use merge_core::engine::{self, MergeOptions};
use merge_core::input_stats::{StatsMeta, GRAMS_FILE, META_FILE};
use merge_core::methods::regmean_solve;
use merge_core::{Error, MergeConfig};
use testkit::compare;
use testkit::resolver::offline;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A regmean config over fixture experts `models` (with the statistics of `stats`, per model;
/// `None`: no `stats` line) and `alpha` (`None`: the default).
fn config(models: &[&str], stats: &[Option<String>], alpha: Option<f64>) -> MergeConfig {
    let mut text = String::from("[merge]\nmethod = \"regmean\"\ndtype = \"float32\"\n");
    if let Some(a) = alpha {
        text.push_str(&format!("[merge.parameters]\nalpha = {a}\n"));
    }
    for (m, s) in models.iter().zip(stats) {
        text.push_str(&format!("[[merge.models]]\nmodel = \"merge/models/{m}\"\n"));
        if let Some(s) = s {
            text.push_str(&format!("stats = \"{s}\"\n"));
        }
    }
    MergeConfig::from_toml_str(&text, "regmean.toml").unwrap()
}

fn fixture_stats(m: &str) -> Option<String> {
    Some(format!("regmean/stats/{m}"))
}

fn merge(cfg: &MergeConfig, out: &Path) -> merge_core::Result<engine::MergeReport> {
    engine::run(cfg, &offline(&fixtures()), &MergeOptions::new(out))
}

#[test]
fn regmean_matches_the_reference_implementation() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("regmean/cases.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 3);
    for case in cases {
        let name = case["case"].as_str().unwrap();
        let models: Vec<&str> = case["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        let stats: Vec<_> = models.iter().map(|m| fixture_stats(m)).collect();
        let cfg = config(&models, &stats, case["alpha"].as_f64());
        let out = tmp.path().join(name);
        merge(&cfg, &out).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours = Checkpoint::open_dir(&out).unwrap();
        let golden_path = fixtures()
            .join("regmean")
            .join(case["golden"].as_str().unwrap());
        let golden = Checkpoint::open_dir(golden_path.parent().unwrap()).unwrap();
        let d = compare::checkpoints(&ours, &golden);
        println!("{name}: max |diff| = {d:e}");
        assert!(d <= 1e-4, "{name}: max |diff| {d:e} above 1e-4");
        // Not the mean: the statistics change the linear weights.
        let q = "model.layers.1.self_attn.q_proj.weight";
        let mean_diff = compare::max_abs_diff(&ours.load(q).unwrap(), &{
            let ts: Vec<_> = models
                .iter()
                .map(|m| {
                    Checkpoint::open_dir(fixtures().join("merge/models").join(m))
                        .unwrap()
                        .load(q)
                        .unwrap()
                })
                .collect();
            (ts.iter()
                .skip(1)
                .fold(ts[0].clone(), |a, b| (a + b).unwrap())
                / models.len() as f64)
                .unwrap()
        });
        assert!(
            mean_diff > 1e-3,
            "{name}: regmean equals the mean ({mean_diff:e})"
        );
    }
}

#[test]
fn closed_form_on_small_cases() {
    // Diagonal statistics (alpha = 0): each input feature's column is the average of the
    // models' columns weighted by that feature's energy: (9·2 + 1·0)/10, (1·0 + 4·4)/5.
    let w = [[2.0f32, 0.0], [0.0, 4.0]];
    let g = [[9.0f32, 3.0, 3.0, 1.0], [1.0, 2.0, 2.0, 4.0]];
    let out = regmean_solve(&[&w[0], &w[1]], &[&g[0], &g[1]], 1, 2, 0.0, "t");
    assert!(
        (out[0] - 1.8).abs() < 1e-6 && (out[1] - 3.2).abs() < 1e-6,
        "{out:?}"
    );
    // Identical models merge to themselves, whatever the statistics.
    let w = [1.0f32, -2.0, 0.5, 3.0, 0.25, -1.0];
    let g1 = [2.0f32, 0.5, 0.0, 0.5, 1.0, 0.2, 0.0, 0.2, 3.0];
    let g2 = [1.0f32, 0.0, 0.3, 0.0, 2.0, 0.0, 0.3, 0.0, 1.0];
    let out = regmean_solve(&[&w, &w], &[&g1, &g2], 2, 3, 0.9, "t");
    assert!(compare::max_abs_diff_f32(&out, &w) < 1e-6, "{out:?}");
    // A feature no model ever sees (a zero row and column): the pseudo-inverse still solves.
    let z = [1.0f32, 0.0, 0.0, 0.0];
    let out = regmean_solve(&[&[1.0, 5.0], &[3.0, 7.0]], &[&z, &z], 1, 2, 0.9, "t");
    assert!((out[0] - 2.0).abs() < 1e-6 && out[1].is_finite(), "{out:?}");
}

/// `run` fails with an error whose text contains every one of `needles`, and writes nothing.
fn fails(cfg: &MergeConfig, needles: &[&str]) -> Error {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let e = merge(cfg, &out).expect_err("bad input must fail");
    let text = e.to_string();
    for n in needles {
        assert!(text.contains(n), "`{n}` not in: {text}");
    }
    assert!(!out.exists(), "{text}: output written");
    e
}

/// A copy of expert `m`'s statistics in a new directory, with `edit` applied to its metadata
/// and the matrices of `grams` (if given) replacing the fixture's of the same name.
fn edited_stats(
    dir: &Path,
    m: &str,
    edit: impl FnOnce(&mut StatsMeta),
    grams: Option<Vec<(String, candle_core::Tensor)>>,
) -> String {
    let src = fixtures().join("regmean/stats").join(m);
    std::fs::create_dir_all(dir).unwrap();
    let mut meta: StatsMeta =
        serde_json::from_str(&std::fs::read_to_string(src.join(META_FILE)).unwrap()).unwrap();
    edit(&mut meta);
    std::fs::write(dir.join(META_FILE), serde_json::to_string(&meta).unwrap()).unwrap();
    match grams {
        None => {
            std::fs::copy(src.join(GRAMS_FILE), dir.join(GRAMS_FILE)).unwrap();
        }
        Some(g) => {
            let mut map =
                candle_core::safetensors::load(src.join(GRAMS_FILE), &candle_core::Device::Cpu)
                    .unwrap();
            map.extend(g);
            candle_core::safetensors::save(&map, dir.join(GRAMS_FILE)).unwrap();
        }
    }
    dir.display().to_string()
}

#[test]
fn missing_statistics_name_the_model() {
    let cfg = config(
        &["expert_a", "expert_b"],
        &[fixture_stats("expert_a"), None],
        None,
    );
    let e = fails(
        &cfg,
        &[
            "regmean",
            "expert_b",
            "stats = \"DIR\"",
            "llm-merging stats",
        ],
    );
    assert!(matches!(e, Error::Method { .. }), "{e:?}");
    // A `stats` directory that is not there.
    let cfg = config(
        &["expert_a", "expert_b"],
        &[
            fixture_stats("expert_a"),
            Some("regmean/stats/nowhere".into()),
        ],
        None,
    );
    let e = fails(&cfg, &["expert_b", "nowhere", "stats.json"]);
    assert!(matches!(e, Error::Statistics { .. }), "{e:?}");
}

#[test]
fn statistics_of_another_architecture_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Another fingerprint (a wider model's statistics).
    let wide = edited_stats(
        &tmp.path().join("wide"),
        "expert_b",
        |m| {
            m.fingerprint
                .insert("hidden_size".into(), serde_json::json!(4096));
            m.model = "meta-llama/Llama-2-7b-hf".into();
        },
        None,
    );
    let cfg = config(
        &["expert_a", "expert_b"],
        &[fixture_stats("expert_a"), Some(wide.clone())],
        None,
    );
    let e = fails(&cfg, &["expert_b", &wide, "another architecture", "4096"]);
    assert!(matches!(e, Error::Statistics { .. }), "{e:?}");

    // The right fingerprint but a matrix whose size is not the weight's input dimension.
    let q = "model.layers.0.self_attn.q_proj.weight";
    let small =
        candle_core::Tensor::eye(8, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let bad = edited_stats(
        &tmp.path().join("bad"),
        "expert_b",
        |_| {},
        Some(vec![(q.to_string(), small)]),
    );
    let cfg = config(
        &["expert_a", "expert_b"],
        &[fixture_stats("expert_a"), Some(bad.clone())],
        None,
    );
    let e = fails(
        &cfg,
        &[
            "expert_b",
            &bad,
            "model.layers.0.self_attn.",
            "[8, 8]",
            "[16, 16]",
        ],
    );
    assert!(matches!(e, Error::Statistics { .. }), "{e:?}");

    // Statistics that lack a weight the other models' have.
    let partial = edited_stats(
        &tmp.path().join("partial"),
        "expert_b",
        |m| {
            m.grams.remove("model.layers.2.mlp.down_proj.weight");
        },
        None,
    );
    let cfg = config(
        &["expert_a", "expert_b"],
        &[fixture_stats("expert_a"), Some(partial.clone())],
        None,
    );
    fails(
        &cfg,
        &["expert_b", &partial, "model.layers.2.mlp.down_proj.weight"],
    );
}

#[test]
fn alpha_outside_zero_one_is_refused() {
    let stats: Vec<_> = ["expert_a", "expert_b"]
        .iter()
        .map(|m| fixture_stats(m))
        .collect();
    let cfg = config(&["expert_a", "expert_b"], &stats, Some(1.5));
    fails(&cfg, &["regmean", "alpha must be in [0, 1]"]);
}
