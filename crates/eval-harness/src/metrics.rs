//! Scores: accuracy and ROUGE exactly as the `rouge_score` package computes them with its
//! defaults (as wrapped by HF `evaluate`): its tokenizer, no stemming, F-measure, and rougeLsum
//! on newline-separated sentences with union-LCS. Aggregation is the plain mean over examples
//! (what `evaluate`'s bootstrap median estimates).

use std::collections::HashMap;

/// ROUGE F-measures of one prediction against one reference.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Rouge {
    /// Unigram overlap.
    pub rouge1: f64,
    /// Bigram overlap.
    pub rouge2: f64,
    /// Longest common subsequence over the whole text.
    pub rouge_l: f64,
    /// Summary-level LCS over newline-separated sentences.
    pub rouge_lsum: f64,
}

impl Rouge {
    /// The four values under the names `evaluate` reports.
    pub fn named(&self) -> [(&'static str, f64); 4] {
        [
            ("rouge1", self.rouge1),
            ("rouge2", self.rouge2),
            ("rougeL", self.rouge_l),
            ("rougeLsum", self.rouge_lsum),
        ]
    }

    /// Plain mean of per-example scores (zeros for no examples).
    pub fn mean(scores: &[Rouge]) -> Rouge {
        if scores.is_empty() {
            return Rouge::default();
        }
        let n = scores.len() as f64;
        let sum = |f: fn(&Rouge) -> f64| scores.iter().map(f).sum::<f64>() / n;
        Rouge {
            rouge1: sum(|r| r.rouge1),
            rouge2: sum(|r| r.rouge2),
            rouge_l: sum(|r| r.rouge_l),
            rouge_lsum: sum(|r| r.rouge_lsum),
        }
    }
}

/// rouge_score's default tokenizer: lowercase, then every run of characters other than ASCII
/// a-z / 0-9 separates tokens (so letters outside ASCII vanish).
pub fn rouge_tokenize(text: &str) -> Vec<String> {
    // Python's str.lower() and Rust's to_lowercase both follow Unicode full case mapping, which
    // matters for the few non-ASCII letters that lowercase to ASCII (Kelvin sign, dotted I).
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Accuracy of string predictions against string targets (exact match after trimming).
pub fn accuracy<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    let (mut hit, mut n) = (0usize, 0usize);
    for (p, t) in pairs {
        n += 1;
        if p.trim() == t.trim() {
            hit += 1;
        }
    }
    if n == 0 {
        0.0
    } else {
        hit as f64 / n as f64
    }
}

fn fmeasure(precision: f64, recall: f64) -> f64 {
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

fn ngrams(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    if tokens.len() >= n {
        for w in tokens.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

fn score_ngrams(target: &[String], prediction: &[String], n: usize) -> f64 {
    let t = ngrams(target, n);
    let p = ngrams(prediction, n);
    let inter: usize = t
        .iter()
        .map(|(g, c)| (*c).min(p.get(g).copied().unwrap_or(0)))
        .sum();
    let tc: usize = t.values().sum();
    let pc: usize = p.values().sum();
    let precision = inter as f64 / pc.max(1) as f64;
    let recall = inter as f64 / tc.max(1) as f64;
    fmeasure(precision, recall)
}

/// LCS dynamic-programming table, (len(a)+1) x (len(b)+1), row-major.
fn lcs_table(a: &[String], b: &[String]) -> Vec<Vec<u32>> {
    let mut t = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            t[i][j] = if a[i - 1] == b[j - 1] {
                t[i - 1][j - 1] + 1
            } else {
                t[i - 1][j].max(t[i][j - 1])
            };
        }
    }
    t
}

fn score_lcs(target: &[String], prediction: &[String]) -> f64 {
    if target.is_empty() || prediction.is_empty() {
        return 0.0;
    }
    let lcs = lcs_table(target, prediction)[target.len()][prediction.len()] as f64;
    fmeasure(lcs / prediction.len() as f64, lcs / target.len() as f64)
}

/// Indices into `r` of one LCS with `c`, backtracked the way rouge_score does (ties move up).
fn lcs_indices(r: &[String], c: &[String]) -> Vec<usize> {
    let t = lcs_table(r, c);
    let (mut i, mut j) = (r.len(), c.len());
    let mut out = Vec::new();
    while i > 0 && j > 0 {
        if r[i - 1] == c[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i][j - 1] > t[i - 1][j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    out.reverse();
    out
}

fn summary_level_lcs(refs: &[Vec<String>], cands: &[Vec<String>]) -> f64 {
    if refs.is_empty() || cands.is_empty() {
        return 0.0;
    }
    let m: usize = refs.iter().map(Vec::len).sum();
    let n: usize = cands.iter().map(Vec::len).sum();
    if m == 0 || n == 0 {
        return 0.0;
    }
    let mut cnt_r: HashMap<&str, i64> = HashMap::new();
    let mut cnt_c: HashMap<&str, i64> = HashMap::new();
    for t in refs.iter().flatten() {
        *cnt_r.entry(t).or_insert(0) += 1;
    }
    for t in cands.iter().flatten() {
        *cnt_c.entry(t).or_insert(0) += 1;
    }
    let mut hits = 0usize;
    for r in refs {
        // Union of the LCS positions of this reference sentence against every candidate one.
        let mut union: Vec<usize> = cands.iter().flat_map(|c| lcs_indices(r, c)).collect();
        union.sort_unstable();
        union.dedup();
        for idx in union {
            let t = r[idx].as_str();
            let (cc, cr) = (
                cnt_c.get(t).copied().unwrap_or(0),
                cnt_r.get(t).copied().unwrap_or(0),
            );
            if cc > 0 && cr > 0 {
                hits += 1;
                *cnt_c.get_mut(t).unwrap() -= 1;
                *cnt_r.get_mut(t).unwrap() -= 1;
            }
        }
    }
    fmeasure(hits as f64 / n as f64, hits as f64 / m as f64)
}

/// ROUGE-1/2/L/Lsum F-measures of `prediction` against `target` (rouge_score defaults).
pub fn rouge(target: &str, prediction: &str) -> Rouge {
    let t = rouge_tokenize(target);
    let p = rouge_tokenize(prediction);
    // rougeLsum: sentences are the non-empty lines (only "\n" separates, as in rouge_score).
    let sents = |s: &str| -> Vec<Vec<String>> {
        s.split('\n')
            .filter(|l| !l.is_empty())
            .map(rouge_tokenize)
            .collect()
    };
    Rouge {
        rouge1: score_ngrams(&t, &p, 1),
        rouge2: score_ngrams(&t, &p, 2),
        rouge_l: score_lcs(&t, &p),
        rouge_lsum: summary_level_lcs(&sents(target), &sents(prediction)),
    }
}
