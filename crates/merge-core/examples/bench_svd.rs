//! Time one thin SVD with singular vectors (faer, as the SVD merges and extract-lora run it) per
//! matrix shape on random data, in f32 (what the methods use) and, with `--f64`, also f64:
//!
//!     cargo run --release -p merge-core --example bench_svd -- 2048x2048 2048x5632 4096x4096
//!
//! Prints seconds per matrix and the rate against the textbook flop count of a thin SVD with
//! vectors of an m × n matrix (m ≥ n): 4m·n² + 22n³ (Golub & Van Loan, R-SVD).

use std::time::Instant;

use faer::Mat;

fn random(m: usize, n: usize, seed: u64) -> Mat<f64> {
    let mut x = seed;
    Mat::from_fn(m, n, |_, _| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let f64_too = args.iter().any(|a| a == "--f64");
    let shapes: Vec<String> = args.into_iter().filter(|a| a != "--f64").collect();
    let shapes = if shapes.is_empty() {
        vec!["2048x2048".to_string(), "2048x5632".to_string()]
    } else {
        shapes
    };
    println!(
        "threads: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for s in shapes {
        let (m, n) = s.split_once('x').expect("MxN");
        let (m, n): (usize, usize) = (m.parse().unwrap(), n.parse().unwrap());
        let a64 = random(m, n, 7);
        let a32: Mat<f32> = Mat::from_fn(m, n, |i, j| a64[(i, j)] as f32);
        let (big, small) = (m.max(n) as f64, m.min(n) as f64);
        let flops = 4.0 * big * small * small + 22.0 * small * small * small;
        let t = Instant::now();
        let svd = a32.thin_svd().unwrap();
        let f32_s = t.elapsed().as_secs_f64();
        std::hint::black_box(&svd);
        print!(
            "{m}x{n}: {:.0} GFLOP, f32 {f32_s:.2} s ({:.1} GFLOP/s)",
            flops / 1e9,
            flops / f32_s / 1e9
        );
        if f64_too {
            let t = Instant::now();
            let svd = a64.thin_svd().unwrap();
            let f64_s = t.elapsed().as_secs_f64();
            std::hint::black_box(&svd);
            print!(", f64 {f64_s:.2} s ({:.1} GFLOP/s)", flops / f64_s / 1e9);
        }
        println!();
    }
}
