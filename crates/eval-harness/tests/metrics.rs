//! ROUGE (rouge_score's tokenizer and simple values) and accuracy; the parity with rouge_score
//! on many cases is in goldens.rs.

use eval_harness::metrics::{accuracy, rouge, rouge_tokenize};

#[test]
fn tokenizer_matches_rouge_score() {
    assert_eq!(
        rouge_tokenize("Hello, World! It's 2024—café"),
        ["hello", "world", "it", "s", "2024", "caf"]
    );
    assert!(rouge_tokenize("…  ").is_empty());
}

#[test]
fn simple_values() {
    let r = rouge("the cat sat on the mat", "the cat sat");
    assert!((r.rouge1 - 2.0 * 1.0 * 0.5 / 1.5).abs() < 1e-12);
    assert_eq!(rouge("a", "").rouge1, 0.0);
    assert_eq!(rouge("", "").rouge_lsum, 0.0);
    assert_eq!(accuracy([("1", "1"), ("0", "2")]), 0.5);
}
