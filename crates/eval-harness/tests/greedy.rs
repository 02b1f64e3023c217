//! Greedy decoding's building blocks: the first maximum wins ties, and generation rows are
//! batched within a budget of rows and cached tokens.

use eval_harness::greedy::{first_argmax, generation_batches};

#[test]
fn ties_pick_the_first() {
    assert_eq!(first_argmax(&[1.0, 3.0, 3.0]), 1);
    assert_eq!(first_argmax(&[0.0, 0.0]), 0);
    assert_eq!(first_argmax(&[-2.0f32, -1.0]), 1);
}

#[test]
fn generation_batches_bound_rows_and_cached_tokens() {
    let rows = |lens: &[usize]| -> Vec<(usize, Vec<u32>)> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| (i, vec![0; n]))
            .collect()
    };
    let sizes = |g: &[(usize, Vec<u32>)], bs: usize, new: usize| -> Vec<usize> {
        generation_batches(g, bs, new)
            .iter()
            .map(|b| b.len())
            .collect()
    };
    // Short prompts: batches of `batch_size` rows.
    assert_eq!(sizes(&rows(&[100; 70]), 32, 64), vec![32, 32, 6]);
    // Long ones (longest first): 4 × 1024 tokens hold 2 rows of 1936 + 64, or 4 of 900 + 64.
    let g = rows(&[1936, 1936, 1936, 900, 900, 900, 900, 900]);
    assert_eq!(sizes(&g, 4, 64), vec![2, 2, 4]);
    // A row longer than the whole budget still gets a batch.
    assert_eq!(sizes(&rows(&[50_000, 10]), 2, 64), vec![1, 1]);
    // Every row once, in order.
    let all: Vec<usize> = generation_batches(&g, 3, 64)
        .iter()
        .flat_map(|b| b.iter().map(|(i, _)| *i))
        .collect();
    assert_eq!(all, (0..g.len()).collect::<Vec<_>>());
    assert!(generation_batches(&rows(&[]), 8, 64).is_empty());
    assert_eq!(sizes(&rows(&[10, 10]), 0, 64), vec![1, 1]);
}
