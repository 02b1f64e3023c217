//! Kept sets across chunks: a tensor of several streaming chunks whose task vectors repeat a
//! few magnitudes, so TIES' threshold splits ties and the cut falls inside one chunk (chunks
//! before it drop every threshold element, chunks after it keep every one). Kept counts,
//! overlaps, sign conflicts and what TIES keeps after its sign election must equal a
//! brute-force computation over the whole tensor (equal magnitudes ranked by position, the
//! earliest dropped).

use candle_core::{Device, Tensor};
use merge_core::MergeConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use testkit::models::{write_checkpoint, TinyLlama};

const EMBED: &str = "model.embed_tokens.weight";
const CHUNK: usize = merge_core::methods::STREAM_CHUNK;

/// Values on a grid of halves (exact in f32, so expert − base is exact and magnitudes tie).
fn halves(rng: &mut ChaCha8Rng, n: usize, lo: i32, hi: i32, nonzero: bool) -> Vec<f32> {
    (0..n)
        .map(|_| loop {
            let v = rng.gen_range(lo..=hi);
            if !nonzero || v != 0 {
                break v as f32 * 0.5;
            }
        })
        .collect()
}

/// TIES' kept set of `d` at density 0.5: the k largest magnitudes, equal ones by position
/// (ascending (magnitude, position); the first n − k dropped).
fn kept(d: &[f32]) -> Vec<bool> {
    let n = d.len();
    let k = ((0.5 * n as f64) as usize).max(1);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| d[a].abs().total_cmp(&d[b].abs()).then(a.cmp(&b)));
    let mut keep = vec![false; n];
    for &i in &order[n - k..] {
        keep[i] = d[i] != 0.0;
    }
    keep
}

#[test]
fn kept_sets_spanning_chunks_match_a_brute_force_count() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let shape = TinyLlama {
        vocab: 25_000,
        ..TinyLlama::default()
    };
    let config = shape.config();
    let base = shape.tensors(1);
    let (rows, cols) = (shape.vocab, shape.hidden);
    let n = rows * cols;
    assert!(n > 3 * CHUNK, "the tensor spans several chunks");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let base_embed = halves(&mut rng, n, -4, 4, false);
    let deltas: Vec<Vec<f32>> = (0..2).map(|_| halves(&mut rng, n, -3, 3, true)).collect();
    let with_embed = |values: Vec<f32>| -> Vec<(String, Tensor)> {
        base.iter()
            .map(|(name, t)| {
                if name == EMBED {
                    let t = Tensor::from_vec(values.clone(), (rows, cols), &Device::Cpu).unwrap();
                    (name.clone(), t)
                } else {
                    (name.clone(), t.clone())
                }
            })
            .collect()
    };
    write_checkpoint(&d.join("base"), &config, &with_embed(base_embed.clone()), 1);
    for (e, delta) in deltas.iter().enumerate() {
        let expert: Vec<f32> = base_embed.iter().zip(delta).map(|(b, x)| b + x).collect();
        write_checkpoint(&d.join(format!("e{e}")), &config, &with_embed(expert), 1);
    }
    let cfg = MergeConfig::from_toml_str(
        "[merge]\nmethod = \"ties\"\nbase_model = \"base\"\n[merge.parameters]\nweight = 1.0\n\
         density = 0.5\n[[merge.models]]\nmodel = \"e0\"\n[[merge.models]]\nmodel = \"e1\"\n",
        "test",
    )
    .unwrap();
    let x = inspect::inspect(&cfg, &testkit::resolver::offline(d), false).unwrap();
    let t = x.tensors.iter().find(|t| t.name == EMBED).unwrap();

    let masks: Vec<Vec<bool>> = deltas.iter().map(|d| kept(d)).collect();
    // The cut splits ties inside a middle chunk: threshold-magnitude elements are dropped in
    // the first chunk and kept in the last.
    let threshold = (0..n)
        .filter(|&i| masks[0][i])
        .map(|i| deltas[0][i].abs())
        .fold(f32::INFINITY, f32::min);
    let at = |range: std::ops::Range<usize>, keep: bool| {
        range
            .into_iter()
            .any(|i| deltas[0][i].abs() == threshold && masks[0][i] == keep)
    };
    assert!(
        at(0..CHUNK, false) && !at(0..CHUNK, true),
        "first chunk drops ties"
    );
    assert!(
        at(n - 1000..n, true) && !at(n - 1000..n, false),
        "last chunk keeps ties"
    );

    let mut total = vec![0f32; n];
    for (delta, mask) in deltas.iter().zip(&masks) {
        for ((t, v), k) in total.iter_mut().zip(delta).zip(mask) {
            *t += if *k { *v } else { 0.0 };
        }
    }
    for e in 0..2 {
        let count = masks[e].iter().filter(|k| **k).count() as u64;
        assert_eq!(t.sums.kept[e], count, "kept by expert {e}");
        let energy: f64 = (0..n)
            .filter(|&i| masks[e][i] && (total[i] >= 0.0) == (deltas[e][i] > 0.0))
            .map(|i| f64::from(deltas[e][i]).powi(2))
            .sum();
        let ours = t.sums.kept_energy[e];
        assert!((ours - energy).abs() <= 1e-9 * energy, "{ours} vs {energy}");
    }
    let both = (0..n).filter(|&i| masks[0][i] && masks[1][i]).count() as u64;
    let conflicts = (0..n)
        .filter(|&i| masks[0][i] && masks[1][i] && (deltas[0][i] > 0.0) != (deltas[1][i] > 0.0))
        .count() as u64;
    assert_eq!(t.sums.both_kept[0][1], both);
    assert_eq!(t.sums.conflicts[0][1], conflicts);
    assert_eq!(t.sums.conflicts[1][0], conflicts);
}
