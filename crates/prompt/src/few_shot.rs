//! Demonstrations: rows with targets drawn from a pool, seeded per row so a row gets the same
//! demonstrations whatever else is evaluated with it (in `eval`, in `predict`, with `--limit`),
//! and never itself: a pool row with the row's id or the row's input is left out.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// A row that can be shown as a demonstration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shot {
    /// Its id (a row with the same id is never shown to itself).
    pub id: String,
    /// Its input.
    pub input: String,
    /// Its choices (multiple choice).
    pub choices: Vec<String>,
    /// The right choice's index (multiple choice, checked against the choices) or the
    /// reference text (generation).
    pub target: String,
}

/// The rows demonstrations are drawn from, for one `eval_type`.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    /// The rows, in file order (the draw depends on it).
    pub shots: Vec<Shot>,
    /// The file(s) they come from, for messages.
    pub origin: String,
}

/// FNV-1a over the parts, separated: a stable, platform-independent seed.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// `k` demonstrations for the row `(id, input)`, drawn without replacement from the pool rows
/// that are not the row itself, from a generator seeded by `seed`, `id` and `input`.
pub fn sample<'a>(
    pool: &'a Pool,
    k: usize,
    seed: u64,
    id: &str,
    input: &str,
) -> Result<Vec<&'a Shot>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    let eligible: Vec<&Shot> = pool
        .shots
        .iter()
        .filter(|s| s.id != id && s.input != input)
        .collect();
    if eligible.len() < k {
        return Err(Error::Row {
            id: id.to_string(),
            message: format!(
                "few_shot = {k}, but only {} rows of {} remain once the row itself (same id or input) is left out",
                eligible.len(),
                pool.origin
            ),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(stable_hash(&[
        &seed.to_le_bytes(),
        id.as_bytes(),
        input.as_bytes(),
    ]));
    Ok(rand::seq::index::sample(&mut rng, eligible.len(), k)
        .into_iter()
        .map(|i| eligible[i])
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Pool {
        Pool {
            shots: (0..n)
                .map(|i| Shot {
                    id: format!("r{i}"),
                    input: format!("question {i}"),
                    choices: vec!["a".into(), "b".into()],
                    target: (i % 2).to_string(),
                })
                .collect(),
            origin: "pool.csv".into(),
        }
    }

    fn ids(shots: &[&Shot]) -> Vec<String> {
        shots.iter().map(|s| s.id.clone()).collect()
    }

    #[test]
    fn seeded_and_never_the_row_itself() {
        let p = pool(12);
        for row in 0..12 {
            let (id, input) = (format!("r{row}"), format!("question {row}"));
            for seed in 0..20 {
                let a = sample(&p, 5, seed, &id, &input).unwrap();
                assert_eq!(a.len(), 5);
                assert!(a.iter().all(|s| s.id != id && s.input != input));
                let mut distinct = ids(&a);
                distinct.sort();
                distinct.dedup();
                assert_eq!(distinct.len(), 5, "without replacement");
                // The same seed and row: the same demonstrations, in the same order.
                assert_eq!(ids(&a), ids(&sample(&p, 5, seed, &id, &input).unwrap()));
            }
        }
        // Another seed or another row draws differently (not always, but for most).
        let draws: std::collections::BTreeSet<Vec<String>> = (0..20)
            .map(|seed| ids(&sample(&p, 3, seed, "r0", "question 0").unwrap()))
            .collect();
        assert!(draws.len() > 10, "{draws:?}");
        // A row from another file with the same input is also never shown itself.
        let a = sample(&p, 11, 3, "other-id", "question 4").unwrap();
        assert!(a.iter().all(|s| s.input != "question 4"));
    }

    #[test]
    fn too_few_rows_once_the_row_is_left_out() {
        let p = pool(3);
        assert_eq!(sample(&p, 3, 0, "x", "new").unwrap().len(), 3);
        let e = sample(&p, 3, 0, "r1", "question 1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("row `r1`: few_shot = 3, but only 2 rows of pool.csv"),
            "{e}"
        );
        assert!(sample(&p, 0, 0, "r1", "question 1").unwrap().is_empty());
    }
}
