//! `llm-merging`: merge, evaluate, predict and package a competition entry.

mod calibration;
mod convert_cmd;
mod demo_cmd;
mod demo_family;
mod device;
mod entry;
mod eval_cmd;
mod extract_lora_cmd;
mod fetch_data;
mod inspect_cmd;
mod merge_cmd;
mod organizer;
mod package;
mod pipeline;
mod prompting;
mod regmean_plus;
mod report_cmd;
mod rules;
mod run_cmd;
mod search_cmd;
mod stats_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The LLM Merging Competition starter kit: merge expert models, score them locally, package
/// an entry. Without a command, runs the default entry (`submissions/demo`) end to end.
#[derive(Parser)]
#[command(name = "llm-merging", version, about, long_about = None)]
struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Merge models as a merge config (TOML, or mergekit YAML) describes.
    Merge(merge_cmd::MergeArgs),
    /// Evaluate a model on competition files.
    Eval(eval_cmd::EvalArgs),
    /// Predict the test file.
    Predict(eval_cmd::PredictArgs),
    /// Download the official validation and test files into data/ (sha256-checked).
    FetchData(fetch_data::FetchDataArgs),
    /// Check an entry's models against the competition rules (pinned, ≤8B, dated, licence).
    Check(rules::CheckArgs),
    /// Merge → evaluate → predict → package an entry, reusing unchanged stages.
    Run(run_cmd::RunArgs),
    /// Package an entry into dist/<entry>/ (running the stages it needs).
    Package(run_cmd::RunArgs),
    /// Search the entry's recipe ([search] table): merge in memory, evaluate, keep the best,
    /// check it on held-out rows; into search/<entry>/.
    Search(search_cmd::SearchArgs),
    /// Organizers: score a folder of submitted entries on the hidden test set (sharded or
    /// not) and write a leaderboard.
    Score(organizer::ScoreArgs),
    /// Print a mergekit YAML config as the equivalent merge config TOML.
    Convert(convert_cmd::ConvertArgs),
    /// Build the offline demo model family (cached) and print base, experts and merges scored.
    Demo(demo_cmd::DemoArgs),
    /// Task-vector diagnostics of a merge's experts: norms, cosines, sign conflicts and kept
    /// sets per tensor, layer and module kind; findings, inspect.json and SVG heatmaps.
    Inspect(inspect_cmd::InspectArgs),
    /// Write an entry's HTML report (scores against references, timings, heatmaps, examples),
    /// or compare several entries on the same rows.
    Report(report_cmd::ReportArgs),
    /// Input statistics for `regmean`: Gram matrices of the linear layers' inputs on some rows.
    Stats(stats_cmd::StatsArgs),
    /// A PEFT LoRA adapter approximating a fine-tune's difference from its base (truncated SVD
    /// per linear layer; embeddings, lm_head and norms left out), as mergekit-extract-lora.
    ExtractLora(extract_lora_cmd::ExtractLoraArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let demo_search =
        matches!(&cli.command, Some(Command::Search(a)) if search_cmd::is_demo(&a.entry));
    if matches!(cli.command, None | Some(Command::Demo(_))) || demo_search {
        // Before any thread starts: the demo's tiny models train and run fastest on one.
        demo::single_threaded_compute();
    }
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LLM_MERGING_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    let result = match cli.command {
        Some(Command::Merge(args)) => merge_cmd::run(args),
        Some(Command::Eval(args)) => eval_cmd::run_eval(args),
        Some(Command::Predict(args)) => eval_cmd::run_predict(args),
        Some(Command::FetchData(args)) => fetch_data::run(args),
        Some(Command::Check(args)) => rules::run(args),
        Some(Command::Run(args)) | Some(Command::Package(args)) => run_cmd::run(args),
        None => demo_cmd::run_default(std::path::Path::new("submissions/demo")),
        Some(Command::Demo(args)) => demo_cmd::run(&args),
        Some(Command::Convert(args)) => convert_cmd::run(args),
        Some(Command::Score(args)) => organizer::run(args),
        Some(Command::Search(args)) => search_cmd::run(args),
        Some(Command::Inspect(args)) => inspect_cmd::run(args),
        Some(Command::Report(args)) => report_cmd::run(args),
        Some(Command::Stats(args)) => stats_cmd::run(args),
        Some(Command::ExtractLora(args)) => extract_lora_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
