//! Merge a config into memory a few times over one session, the way a search does, and report
//! the time per merge and what was put (for measuring time and peak memory of the in-memory
//! path, e.g. under `/usr/bin/time -v`).
//!
//! ```text
//! cargo run --release -p merge-core --example merge_in_memory -- CONFIG [REPEATS]
//! ```
//!
//! The sink counts bytes and drops every tensor, so peak memory is the engine's own: the
//! tensors in flight and the streaming buffers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use merge_core::engine::{merge_in_memory, MergeSession, TensorSink};
use merge_core::source::Resolver;
use merge_core::MergeConfig;

/// Counts what it is given and keeps nothing.
#[derive(Default)]
struct Count(AtomicU64);

impl TensorSink for Count {
    fn put(&self, _name: &str, tensor: Tensor) -> merge_core::Result<()> {
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        self.0.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn main() -> merge_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: merge_in_memory CONFIG [REPEATS]");
        std::process::exit(2);
    };
    let repeats: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(3);
    let cfg = MergeConfig::from_file(path.as_ref())?;
    let start = Instant::now();
    let session = MergeSession::open(&cfg, &Resolver::from_env())?;
    println!("opened in {:.2}s", start.elapsed().as_secs_f64());
    for i in 0..repeats {
        let sink = Count::default();
        let report = merge_in_memory(&session, &cfg, &sink)?;
        println!(
            "merge {}: {} tensors, {:.2} GB put, {:.2}s",
            i + 1,
            report.tensors,
            sink.0.load(Ordering::Relaxed) as f64 / 1e9,
            report.seconds
        );
    }
    Ok(())
}
