//! `demo-build DIR`: builds the default demo family into DIR unless it is already there (the
//! tests use it to build in a process of its own; users run `llm-merging demo`).

fn main() -> anyhow::Result<()> {
    demo::single_threaded_compute();
    let dir = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("usage: demo-build DIR"))?;
    let built = demo::ensure(&dir, &demo::Recipe::default())?;
    println!("{}", if built { "built" } else { "cached" });
    Ok(())
}
