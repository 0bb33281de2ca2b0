//! `prefer`: SFT model + instruction data → DPO-trained LoRA adapter, in one binary.
//!
//! Each subcommand lives in its own module under `cmd/`; this file only parses the command
//! line, sets up logging and turns errors into a message and an exit code.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "prefer",
    version,
    about = "SFT model + instruction data → DPO LoRA adapter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole job from a pipeline file: sample → pairs → train → export (docs/run.md).
    Run(cmd::run::Args),
    /// Log-probs of completions under a model (DPO's reference pass).
    Score(cmd::score::Args),
    /// Completions of prompts from a model (vLLM-style batched generation): the rejected side.
    Sample(cmd::sample::Args),
    /// Preference pairs (chosen = gold, rejected = sample) as a dataset folder.
    Pairs(cmd::pairs::Args),
    /// DPO with LoRA on preference pairs → a PEFT adapter (TRL's DPOTrainer options).
    Train(cmd::train::Args),
    /// Merge a LoRA adapter into its base → a model folder transformers and vLLM load.
    Export(cmd::export::Args),
    /// Upload a folder to the Hugging Face Hub (commit API).
    Push(cmd::push::Args),
    /// Compile every CUDA kernel ahead of time (NVRTC, no GPU needed) into the kernel cache.
    Kernels(cmd::kernels::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PREFER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => cmd::run::run(args),
        Command::Score(args) => cmd::score::run(args),
        Command::Sample(args) => cmd::sample::run(args),
        Command::Pairs(args) => cmd::pairs::run(args),
        Command::Train(args) => cmd::train::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Push(args) => cmd::push::run(args),
        Command::Kernels(args) => cmd::kernels::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
