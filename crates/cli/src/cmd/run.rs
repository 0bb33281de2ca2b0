//! `prefer run PIPELINE.toml`: the whole job — sample → (score) → pairs → (push) → train →
//! export — from one file (docs/run.md).
//!
//! Each stage is the subcommand of the same name, not a copy of it: a stage's TOML table is
//! turned into that command's argv and parsed by the command's own clap `Args`, so every
//! flag, default and check lives in one place, and an unknown key is clap's error (prefixed
//! with the file and table). Stages chain through their outputs: unless a table says
//! otherwise, each reads what the stage before it wrote under `workdir`.
//!
//! Reruns are cheap because every command's output is complete or absent (temp + rename),
//! so the output's presence says the stage is done. A stage is skipped when its output exists
//! and is not older than the outputs it was built from (make's rule); `sample` always runs,
//! because running it again *is* its resume, and `train` resumes from its checkpoints.
//! `--from STAGE` reruns from a stage, `--to STAGE` stops after one, `--dry-run` prints the
//! command lines (and removals) a run would do and does nothing.
//!
//! Modules: `pipeline` reads the file, `argv` turns a table into a command line (and a clap
//! error back into a key), `stages` knows each command (its defaults, outputs and inputs),
//! `outputs` looks at what is on disk and clears a stage's old output.

mod argv;
mod outputs;
mod pipeline;
mod stages;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use pipeline::Pipeline;
use stages::{Plan, Stage, StageRun};

const AFTER_HELP: &str = "\
The file: top-level `model` (the SFT model folder) and `workdir` (where stage outputs go),
then one table per stage, [sample], [score], [pairs], [push], [train], [export], run in that
order. A table's keys are that command's flags with `_` for `-` (max_tokens = 48,
stop = [\"</s>\"], keep_truncated = true); a stage reads the previous stage's output unless
its table names another. See docs/run.md.";

#[derive(clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The pipeline file (TOML).
    #[arg(value_name = "PIPELINE.toml")]
    pipeline: PathBuf,
    /// Rerun from this stage on, even where its output exists (earlier stages are not run).
    #[arg(long, value_enum, value_name = "STAGE")]
    from: Option<Stage>,
    /// Stop after this stage.
    #[arg(long, value_enum, value_name = "STAGE")]
    to: Option<Stage>,
    /// Print the commands a run would execute (and the old outputs it would remove), as lines
    /// a shell runs; run and write nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let pipeline = Pipeline::read(&args.pipeline)?;
    let file = pipeline.file_name();
    for (flag, stage) in [("--from", args.from), ("--to", args.to)] {
        if let Some(stage) = stage
            && !pipeline.has(stage)
        {
            bail!(
                "{flag} {}: {file} has no [{}] table (its stages: {})",
                stage.name(),
                stage.name(),
                pipeline.stage_names()
            );
        }
    }
    if let (Some(from), Some(to)) = (args.from, args.to)
        && from > to
    {
        bail!(
            "--from {} comes after --to {}: stages run in the order {}",
            from.name(),
            to.name(),
            Stage::ORDER.map(Stage::name).join(", ")
        );
    }
    // Every table is parsed by its command before anything runs: a typo in [export] must
    // not surface after hours of sampling.
    let mut runs = stages::resolve(&pipeline)?;
    if args.dry_run {
        println!("# {file}: dry run; nothing is run or written");
        if !pipeline.workdir.is_dir() {
            let dir = pipeline.workdir.to_string_lossy();
            println!("mkdir -p {}", argv::shell_quote(&dir));
        }
    } else {
        std::fs::create_dir_all(&pipeline.workdir)
            .with_context(|| format!("creating the workdir {}", pipeline.workdir.display()))?;
    }

    let total = runs.len();
    let (mut ran, mut skipped) = (0usize, 0usize);
    for i in 0..total {
        let stage = runs[i].stage;
        let label = format!("[{}/{total}] {}", i + 1, stage.name());
        if args.from.is_some_and(|from| stage < from) {
            say(args.dry_run, &format!("{label}: before --from, not run"));
            continue;
        }
        if args.to.is_some_and(|to| stage > to) {
            say(args.dry_run, &format!("{label}: after --to, not run"));
            continue;
        }
        let forced = args.from.is_some_and(|from| stage >= from);
        let plan = stages::plan(&runs, i, forced)?;
        match plan {
            Plan::Skip(reason) => {
                say(args.dry_run, &format!("{label}: skipped: {reason}"));
                skipped += 1;
            }
            Plan::Run(step) => {
                if args.dry_run {
                    println!("# {label}: {}", step.why);
                    for path in &step.remove {
                        println!("rm -r {}", argv::shell_quote(&path.to_string_lossy()));
                    }
                    println!("{}", runs[i].command_line(&step.extra));
                    runs[i].stamp = step.stamp_after_dry_run(runs[i].stamp.clone());
                } else {
                    eprintln!("\n== {label}: {} ==", step.why);
                    eprintln!("{}", runs[i].command_line(&step.extra));
                    let stage_started = Instant::now();
                    for path in &step.remove {
                        outputs::remove(path)?;
                    }
                    execute(&pipeline, &runs[i], &step.extra)?;
                    runs[i].stamp = runs[i].current_stamp()?;
                    eprintln!(
                        "== {label}: done in {} ==",
                        elapsed(stage_started.elapsed())
                    );
                }
                ran += 1;
            }
        }
    }
    let stages = |n: usize| format!("{n} stage{}", if n == 1 { "" } else { "s" });
    if args.dry_run {
        println!("# {file}: {} to run, {skipped} skipped", stages(ran));
    } else {
        eprintln!(
            "\n{file}: {} run, {skipped} skipped, in {}",
            stages(ran),
            elapsed(started.elapsed())
        );
    }
    Ok(())
}

/// Runs one stage's command; on failure says which table and that a rerun continues.
fn execute(pipeline: &Pipeline, run: &StageRun, extra: &[String]) -> Result<()> {
    let file = pipeline.file_name();
    run.execute(extra).with_context(|| {
        format!(
            "{file} [{}] failed (finished stages are kept: fix it and run the same command \
             again to continue)",
            run.stage.name()
        )
    })?;
    run.after_success()?;
    Ok(())
}

/// A status line: a shell comment in a dry run's listing, else a line on stderr (beside the
/// commands' own progress).
fn say(dry_run: bool, line: &str) {
    if dry_run {
        println!("# {line}");
    } else {
        eprintln!("\n== {line} ==");
    }
}

/// `12.3 s`, or `4 min 05 s` past a minute.
fn elapsed(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        let whole = d.as_secs();
        format!("{} min {:02} s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn elapsed_reads_as_seconds_then_minutes() {
        assert_eq!(elapsed(Duration::from_millis(1234)), "1.2 s");
        assert_eq!(elapsed(Duration::from_secs(245)), "4 min 05 s");
    }
}
