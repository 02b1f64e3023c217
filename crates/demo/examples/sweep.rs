//! Scores merge settings on the built demo family: `cargo run --release -p demo --example
//! sweep -- DEMO_DIR 'method|params' ...` (params as TOML lines joined by `;`). A tool for
//! tuning the reference merges of the demo table.

fn main() -> anyhow::Result<()> {
    demo::single_threaded_compute();
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("demo dir"));
    for spec in args {
        let (method, params) = spec.split_once('|').expect("method|params");
        let toml = demo::compare::merge_config_toml(
            &dir,
            method,
            &format!("[merge.parameters]\n{}\n", params.replace(';', "\n")),
        );
        let out = tempfile::tempdir()?;
        demo::compare::run_merge(&toml, &out.path().join("m"))?;
        let m = eval_harness::load(
            &out.path().join("m"),
            None,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?;
        let s = demo::compare::score_model(&dir, &*m)?;
        let avg = s.iter().sum::<f64>() / s.len() as f64;
        println!("{spec:<60} {s:.3?} avg {avg:.3}");
    }
    Ok(())
}
