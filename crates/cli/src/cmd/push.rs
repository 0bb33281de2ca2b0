//! `prefer push`: upload a folder to the Hugging Face Hub as one commit (docs/push.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use data::hub::{self, PushOptions, RepoType, Token};

#[derive(clap::Args)]
pub struct Args {
    /// The folder to upload (e.g. the output of `prefer pairs`).
    folder: PathBuf,
    /// Target repository: NAMESPACE/NAME.
    #[arg(long)]
    repo: String,
    /// Repository type: dataset, model or space.
    #[arg(long = "type", default_value = "dataset")]
    repo_type: String,
    /// Create the repository private (ignored when it exists).
    #[arg(long)]
    private: bool,
    /// Branch to commit to (created if missing).
    #[arg(long, default_value = "main")]
    revision: String,
    /// Commit message.
    #[arg(long, default_value = "Upload with prefer")]
    message: String,
    /// Hub token (else HF_TOKEN, else the token file under HF_HOME). Never printed.
    #[arg(long)]
    token: Option<String>,
    /// Hub endpoint (else HF_ENDPOINT, else https://huggingface.co).
    #[arg(long)]
    endpoint: Option<String>,
    /// List what would be sent, send nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(args: Args) -> Result<()> {
    let repo_type = RepoType::from_name(&args.repo_type).with_context(|| {
        format!(
            "--type '{}': expected dataset, model or space",
            args.repo_type
        )
    })?;
    hub::validate_repo_id(&args.repo)?;
    let endpoint = args
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()))
        .unwrap_or_else(|| "https://huggingface.co".to_string());
    let files = hub::collect_files(&args.folder)?;
    let total: u64 = files.iter().map(|f| f.entry.size).sum();
    println!(
        "{} {} files ({total} bytes) to {} {} @ {} on {endpoint}",
        if args.dry_run {
            "would upload"
        } else {
            "uploading"
        },
        files.len(),
        repo_type.name(),
        args.repo,
        args.revision
    );
    for f in &files {
        println!(
            "  {}  {} bytes  sha256 {}",
            f.entry.path_in_repo, f.entry.size, f.entry.sha256
        );
    }
    if args.dry_run {
        println!(
            "dry run: nothing sent (the Hub decides per file between a regular and an LFS upload)"
        );
        return Ok(());
    }
    let (token, source) = Token::resolve(args.token.as_deref())?;
    println!("token from {source}");
    let options = PushOptions {
        repo: args.repo.clone(),
        repo_type,
        private: args.private,
        revision: args.revision.clone(),
        endpoint,
        message: args.message.clone(),
    };
    let outcome = hub::push(&files, &options, token, |line| println!("  {line}"))?;
    println!(
        "committed: {} regular, {} LFS uploaded, {} LFS already present, {} ignored{}",
        outcome.regular,
        outcome.lfs_uploaded,
        outcome.lfs_present,
        outcome.ignored,
        outcome
            .commit_url
            .map(|u| format!(" — {u}"))
            .unwrap_or_default()
    );
    Ok(())
}
