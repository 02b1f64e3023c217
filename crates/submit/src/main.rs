//! `llm-merging`: merge, evaluate, predict and package a competition entry.

mod convert_cmd;
mod merge_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The LLM Merging Competition starter kit: merge expert models, score them locally, package
/// an entry.
#[derive(Parser)]
#[command(name = "llm-merging", version, about, long_about = None)]
struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge models as a merge config (TOML, or mergekit YAML) describes.
    Merge(merge_cmd::MergeArgs),
    /// Print a mergekit YAML config as the equivalent merge config TOML.
    Convert(convert_cmd::ConvertArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Command::Merge(args) => merge_cmd::run(args),
        Command::Convert(args) => convert_cmd::run(args),
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
