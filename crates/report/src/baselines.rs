//! The official baselines' published validation numbers (docs/competition.md): rows the
//! report shows beside an entry evaluated on the same datasets.

/// A published row: its name, and (dataset, metric, value) triples.
pub struct Published {
    /// The row's name.
    pub name: &'static str,
    /// Where the numbers come from.
    pub source: &'static str,
    /// (dataset file stem, metric, value).
    pub values: &'static [(&'static str, &'static str, f64)],
}

/// The published baselines. Only `llama_avg` has published numbers.
pub const PUBLISHED: &[Published] = &[Published {
    name: "published: llama_avg (official kit)",
    source: "the official starter kit's Llama-2-7B LoRA average (0.8/0.2)",
    values: &[
        ("cosmos_qa", "accuracy", 0.234),
        ("xsum", "rouge1", 0.123),
        ("xsum", "rouge2", 0.023),
        ("xsum", "rougeL", 0.093),
        ("xsum", "rougeLsum", 0.102),
    ],
}];

impl Published {
    /// The value for `dataset` / `metric`, if published.
    pub fn value(&self, dataset: &str, metric: &str) -> Option<f64> {
        self.values
            .iter()
            .find(|(d, m, _)| *d == dataset && *m == metric)
            .map(|x| x.2)
    }
}
