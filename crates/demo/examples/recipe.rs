//! Builds a demo family with recipe overrides and prints its table: `cargo run --release -p
//! demo --example recipe -- DIR '{"expert_lr": 5e-4}'`. A tool for tuning the recipe.

fn main() -> anyhow::Result<()> {
    demo::single_threaded_compute();
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("output dir"));
    let mut recipe = serde_json::to_value(demo::Recipe::default())?;
    if let Some(o) = args.next() {
        let o: serde_json::Value = serde_json::from_str(&o)?;
        for (k, v) in o.as_object().expect("a JSON object") {
            recipe[k] = v.clone();
        }
    }
    let recipe: demo::Recipe = serde_json::from_value(recipe)?;
    demo::ensure(&dir, &recipe)?;
    print!("{}", demo::compare(&dir)?.render());
    Ok(())
}
