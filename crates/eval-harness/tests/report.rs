//! The evaluation outputs: predictions CSV, scores.json, per-row details and the score table.

use eval_harness::report::{score_table, write_eval_outputs, DatasetOutcome, ExampleOutcome};

fn outcome(id: &str, p: &str) -> ExampleOutcome {
    ExampleOutcome {
        id: id.into(),
        eval_type: "multiple_choice",
        prediction: p.into(),
        target: Some("1".into()),
        choice_scores: Some(vec![-1.0, -0.5]),
        choice_scores_norm: None,
        prediction_norm: None,
        prompt_tokens: 3,
        output_tokens: vec![2, 2],
        seconds: 0.1,
        ..Default::default()
    }
}

#[test]
fn writes_all_outputs() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let r = DatasetOutcome {
        name: "cosmos_qa".into(),
        examples: vec![outcome("0", "1"), outcome("1", "0")],
        scores: [("accuracy".to_string(), 0.5)].into_iter().collect(),
        seconds: 1.0,
    };
    write_eval_outputs(&out, std::slice::from_ref(&r)).unwrap();
    let csv = std::fs::read_to_string(out.join("predictions/cosmos_qa.csv")).unwrap();
    assert_eq!(csv, "id,prediction,dummy_field\n0,1,0\n1,0,0\n");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("scores.json")).unwrap()).unwrap();
    assert_eq!(s["cosmos_qa"]["accuracy"], 0.5);
    let det = std::fs::read_to_string(out.join("details/cosmos_qa.jsonl")).unwrap();
    assert_eq!(det.lines().count(), 2);
    assert!(score_table(std::slice::from_ref(&r)).contains("accuracy=0.5000\n"));
    let mut r = r;
    r.scores.insert("accuracy_stderr".into(), 0.25);
    assert!(score_table(&[r]).contains("accuracy=0.5000±0.2500\n"));
    // Only the outputs remain next to `run`: the temporary directory is gone.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
}
