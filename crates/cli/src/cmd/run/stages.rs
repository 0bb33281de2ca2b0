//! The stages: which command each one is, the defaults that chain them (each reads what the
//! one before it wrote under `workdir`), what each writes, and whether a run must run it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser};

use super::argv::{clap_error, command_line, table_to_argv};
use super::outputs::{self, Stamp, TrainState};
use super::pipeline::Pipeline;
use crate::cmd;

/// The stages, in the order a pipeline runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Stage {
    Sample,
    Score,
    Pairs,
    Push,
    Train,
    Export,
}

/// A `prefer STAGE` command line parser around each command's own `Args`.
macro_rules! stage_parser {
    ($parser:ident, $module:ident) => {
        #[derive(Parser)]
        #[command(name = stringify!($module), bin_name = concat!("prefer ", stringify!($module)))]
        struct $parser {
            #[command(flatten)]
            args: cmd::$module::Args,
        }
    };
}
stage_parser!(SampleParser, sample);
stage_parser!(ScoreParser, score);
stage_parser!(PairsParser, pairs);
stage_parser!(PushParser, push);
stage_parser!(TrainParser, train);
stage_parser!(ExportParser, export);

impl Stage {
    pub(super) const ORDER: [Stage; 6] = [
        Stage::Sample,
        Stage::Score,
        Stage::Pairs,
        Stage::Push,
        Stage::Train,
        Stage::Export,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Stage::Sample => "sample",
            Stage::Score => "score",
            Stage::Pairs => "pairs",
            Stage::Push => "push",
            Stage::Train => "train",
            Stage::Export => "export",
        }
    }

    pub(super) fn from_name(name: &str) -> Option<Stage> {
        Stage::ORDER.into_iter().find(|s| s.name() == name)
    }

    /// The command's clap definition (what `argv` reads flags off).
    fn command(self) -> clap::Command {
        match self {
            Stage::Sample => SampleParser::command(),
            Stage::Score => ScoreParser::command(),
            Stage::Pairs => PairsParser::command(),
            Stage::Push => PushParser::command(),
            Stage::Train => TrainParser::command(),
            Stage::Export => ExportParser::command(),
        }
    }

    /// Parses `argv` with the command's `Args` and, when `run`, runs the command.
    fn parse_and_maybe_run(self, argv: &[String], place: &str, run: bool) -> Result<()> {
        fn parse<P: Parser>(stage: Stage, argv: &[String], place: &str) -> Result<P> {
            let words = std::iter::once(stage.name().to_string()).chain(argv.iter().cloned());
            P::try_parse_from(words).map_err(|e| clap_error(&e, place))
        }
        match self {
            Stage::Sample => {
                let p: SampleParser = parse(self, argv, place)?;
                if run {
                    cmd::sample::run(p.args)?;
                }
            }
            Stage::Score => {
                let p: ScoreParser = parse(self, argv, place)?;
                if run {
                    cmd::score::run(p.args)?;
                }
            }
            Stage::Pairs => {
                let p: PairsParser = parse(self, argv, place)?;
                if run {
                    cmd::pairs::run(p.args)?;
                }
            }
            Stage::Push => {
                let p: PushParser = parse(self, argv, place)?;
                if run {
                    cmd::push::run(p.args)?;
                }
            }
            Stage::Train => {
                let p: TrainParser = parse(self, argv, place)?;
                if run {
                    cmd::train::run(p.args)?;
                }
            }
            Stage::Export => {
                let p: ExportParser = parse(self, argv, place)?;
                if run {
                    cmd::export::run(p.args)?;
                }
            }
        }
        Ok(())
    }

    /// The key naming what the stage writes, and its default name under `workdir`.
    fn output_key(self) -> Option<(&'static str, &'static str)> {
        match self {
            Stage::Sample => Some(("out", "samples.jsonl")),
            Stage::Score => Some(("out", "chosen-scores.jsonl")),
            Stage::Pairs => Some(("out", "pairs")),
            Stage::Push => None,
            Stage::Train => Some(("output_dir", "adapter")),
            Stage::Export => Some(("out", "merged")),
        }
    }

    /// The keys through which the stage reads an earlier stage's output, and that stage.
    fn input_keys(self) -> &'static [(&'static str, Stage)] {
        match self {
            Stage::Sample | Stage::Score => &[],
            Stage::Pairs => &[("samples", Stage::Sample), ("chosen_logps", Stage::Score)],
            Stage::Push => &[("folder", Stage::Pairs)],
            Stage::Train => &[("data", Stage::Pairs), ("eval_data", Stage::Pairs)],
            Stage::Export => &[("adapter", Stage::Train)],
        }
    }
}

/// What a stage writes, by how its completeness is told.
enum Output {
    /// `prefer sample --out`: JSON Lines appended as rows finish (resumable), or parquet
    /// written when complete (its sidecar resumable).
    Samples(PathBuf),
    /// A file or folder renamed into place when complete (score, pairs, export).
    Whole(PathBuf),
    /// `prefer train --output-dir`: the final adapter (its config written last) beside the
    /// checkpoints.
    Adapter(PathBuf),
    /// A push leaves nothing local: the pipeline records it in `workdir/push.json`.
    Pushed { record: PathBuf, target: PushTarget },
}

/// Where a push went: a later run skips the push when this is recorded.
struct PushTarget {
    folder: String,
    repo: String,
    repo_type: String,
    revision: String,
}

impl PushTarget {
    /// The record's JSON: push's own names for the four.
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "folder": self.folder,
            "repo": self.repo,
            "type": self.repo_type,
            "revision": self.revision,
        })
    }
}

/// One stage of a pipeline, resolved: its table with the defaults filled in, the argv its
/// command parsed, what it writes and reads.
pub(super) struct StageRun {
    pub(super) stage: Stage,
    /// `p.toml [train]`, for messages.
    place: String,
    keys: toml::Table,
    argv: Vec<String>,
    output: Output,
    /// Indexes (into the runs) of the stages whose outputs this one reads.
    inputs: Vec<usize>,
    /// Its output's state now (or, in a dry run, after the stages planned before it).
    pub(super) stamp: Stamp,
}

/// What a run does with a stage.
pub(super) enum Plan {
    /// Not run: why (its output is there and up to date).
    Skip(String),
    Run(Step),
}

/// A stage to run.
pub(super) struct Step {
    /// One line: what the run does and why.
    pub(super) why: String,
    /// Old outputs removed first.
    pub(super) remove: Vec<PathBuf>,
    /// Flags the pipeline adds (`--overwrite` over an old output, `--resume`).
    pub(super) extra: Vec<String>,
    /// The stage continues an existing output and may find nothing left to do (sample).
    continues: bool,
}

impl Step {
    fn new(why: String) -> Step {
        Step {
            why,
            remove: Vec::new(),
            extra: Vec::new(),
            continues: false,
        }
    }

    /// The output's stamp once this step ran, as a dry run assumes it: a continued output
    /// may be unchanged; anything else is rewritten.
    pub(super) fn stamp_after_dry_run(&self, before: Stamp) -> Stamp {
        if self.continues && before != Stamp::Absent {
            before
        } else {
            Stamp::Rewritten
        }
    }
}

/// Every stage of `pipeline`, its defaults filled in and its argv parsed (not run) by its
/// command, so that any table's mistake stops the pipeline before the first stage runs.
pub(super) fn resolve(pipeline: &Pipeline) -> Result<Vec<StageRun>> {
    let file = pipeline.file_name();
    let mut runs: Vec<StageRun> = Vec::with_capacity(pipeline.tables.len());
    for (stage, table) in &pipeline.tables {
        let stage = *stage;
        let place = format!("{file} [{}]", stage.name());
        let mut keys = table.clone();
        fill_defaults(stage, &mut keys, pipeline)?;
        let argv = table_to_argv(&stage.command(), &keys, &place)?;
        stage.parse_and_maybe_run(&argv, &place, false)?;
        let output = match stage.output_key() {
            Some((key, _)) => {
                let path = PathBuf::from(string_key(&keys, key, &place)?.unwrap_or_default());
                match stage {
                    Stage::Sample => Output::Samples(path),
                    Stage::Train => Output::Adapter(path),
                    _ => Output::Whole(path),
                }
            }
            None => Output::Pushed {
                record: pipeline.workdir.join("push.json"),
                target: push_target(&keys, &place)?,
            },
        };
        let mut inputs = Vec::new();
        for (key, producer) in stage.input_keys() {
            let Some(j) = runs.iter().position(|r| r.stage == *producer) else {
                continue;
            };
            let Some(made) = runs[j].output_path() else {
                continue;
            };
            if reads(keys.get(*key), made) && !inputs.contains(&j) {
                inputs.push(j);
            }
        }
        let mut run = StageRun {
            stage,
            place,
            keys,
            argv,
            output,
            inputs,
            stamp: Stamp::Absent,
        };
        run.stamp = run.current_stamp()?;
        runs.push(run);
    }
    Ok(runs)
}

/// The pipeline's defaults for a stage's table, each only where the table has no such key:
/// the top-level model, outputs under `workdir`, and the previous stage's output as input.
fn fill_defaults(stage: Stage, keys: &mut toml::Table, pipeline: &Pipeline) -> Result<()> {
    let text = |s: &str| toml::Value::String(s.to_string());
    let mut set = |key: &str, value: toml::Value| {
        keys.entry(key.to_string()).or_insert(value);
    };
    let model = pipeline.model.as_deref().map(text);
    // Where an earlier stage writes, whether or not this pipeline runs it (its output may be
    // there from another run).
    let made_by =
        |s: Stage| -> Result<String> { Ok(stage_output(pipeline, s)?.unwrap_or_default()) };
    match stage {
        Stage::Sample | Stage::Score | Stage::Train | Stage::Export => {
            if let Some(m) = &model {
                set("model", m.clone());
            }
        }
        Stage::Pairs => {
            // The token budget and `chat` templates need the model's tokenizer.
            if let Some(m) = &model {
                set("tokenizer", m.clone());
            }
        }
        Stage::Push => {}
    }
    if let Some((key, _)) = stage.output_key() {
        set(key, text(&made_by(stage)?));
    }
    match stage {
        Stage::Score => {
            // The chosen side's reference log-probs, tokenized as TRL's DPO does (EOS added).
            set("add_eos", toml::Value::Boolean(true));
        }
        Stage::Pairs => {
            set(
                "samples",
                toml::Value::Array(vec![text(&made_by(Stage::Sample)?)]),
            );
            if pipeline.has(Stage::Score) {
                set("chosen_logps", text(&made_by(Stage::Score)?));
            }
            // The prompts the samples were made from.
            if let Some(template) =
                table_of(pipeline, Stage::Sample).and_then(|t| t.get("template"))
            {
                set("template", template.clone());
            }
        }
        Stage::Push => set("folder", text(&made_by(Stage::Pairs)?)),
        Stage::Train => set("data", text(&made_by(Stage::Pairs)?)),
        Stage::Export => set("adapter", text(&made_by(Stage::Train)?)),
        Stage::Sample => {}
    }
    Ok(())
}

fn table_of(pipeline: &Pipeline, stage: Stage) -> Option<&toml::Table> {
    pipeline
        .tables
        .iter()
        .find(|(s, _)| *s == stage)
        .map(|(_, t)| t)
}

/// Where `stage` writes: its table's output key, else its default name under `workdir`.
fn stage_output(pipeline: &Pipeline, stage: Stage) -> Result<Option<String>> {
    let Some((key, default)) = stage.output_key() else {
        return Ok(None);
    };
    let place = format!("{} [{}]", pipeline.file_name(), stage.name());
    if let Some(table) = table_of(pipeline, stage)
        && let Some(path) = string_key(table, key, &place)?
    {
        return Ok(Some(path));
    }
    Ok(Some(
        pipeline
            .workdir
            .join(default)
            .to_string_lossy()
            .into_owned(),
    ))
}

/// A key that must hold a path: its string, or None when absent.
fn string_key(keys: &toml::Table, key: &str, place: &str) -> Result<Option<String>> {
    match keys.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!(
            "{place}: key `{key}` must be a string (a path), found {}",
            other.type_str()
        ),
    }
}

/// Whether an input key's value (a path, or an array holding it) names `made`.
fn reads(value: Option<&toml::Value>, made: &Path) -> bool {
    match value {
        Some(toml::Value::String(s)) => Path::new(s) == made,
        Some(toml::Value::Array(items)) => items.iter().any(|v| reads(Some(v), made)),
        _ => false,
    }
}

/// A push's destination from its keys (with `prefer push`'s defaults).
fn push_target(keys: &toml::Table, place: &str) -> Result<PushTarget> {
    let get = |key: &str, default: &str| -> Result<String> {
        Ok(string_key(keys, key, place)?.unwrap_or_else(|| default.to_string()))
    };
    Ok(PushTarget {
        folder: get("folder", "")?,
        repo: get("repo", "")?,
        repo_type: get("type", "dataset")?,
        revision: get("revision", "main")?,
    })
}

impl StageRun {
    /// What the stage writes, when that is a path.
    fn output_path(&self) -> Option<&Path> {
        match &self.output {
            Output::Samples(p) | Output::Whole(p) | Output::Adapter(p) => Some(p),
            Output::Pushed { .. } => None,
        }
    }

    /// `prefer STAGE ARGV EXTRA`, as a shell line (tokens hidden).
    pub(super) fn command_line(&self, extra: &[String]) -> String {
        let mut words = vec!["prefer".to_string(), self.stage.name().to_string()];
        words.extend(self.argv.iter().cloned());
        words.extend(extra.iter().cloned());
        command_line(&words)
    }

    /// Runs the stage's command with the pipeline's extra flags.
    pub(super) fn execute(&self, extra: &[String]) -> Result<()> {
        let mut argv = self.argv.clone();
        argv.extend(extra.iter().cloned());
        self.stage.parse_and_maybe_run(&argv, &self.place, true)
    }

    /// What the pipeline keeps of a stage that succeeded: a push's record (a push leaves
    /// nothing else to tell it by). Written to a temporary file and renamed.
    pub(super) fn after_success(&self) -> Result<()> {
        let Output::Pushed { record, target } = &self.output else {
            return Ok(());
        };
        if flag_set(&self.keys, "dry_run") {
            return Ok(());
        }
        let text = serde_json::to_string_pretty(&target.to_json())?;
        let tmp = record.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n")
            .and_then(|()| std::fs::rename(&tmp, record))
            .with_context(|| format!("recording the push in {}", record.display()))
    }

    /// The output's stamp as it is on disk now.
    pub(super) fn current_stamp(&self) -> Result<Stamp> {
        match &self.output {
            Output::Samples(path) | Output::Whole(path) => outputs::stamp(path),
            Output::Adapter(dir) => match outputs::train_state(dir)? {
                TrainState::Empty => Ok(Stamp::Absent),
                _ => outputs::stamp(dir),
            },
            Output::Pushed { record, target } => {
                // An unreadable record is no record: the push runs again.
                let recorded: Option<serde_json::Value> = std::fs::read_to_string(record)
                    .ok()
                    .and_then(|text| serde_json::from_str(&text).ok());
                if recorded == Some(target.to_json()) {
                    outputs::stamp(record)
                } else {
                    Ok(Stamp::Absent)
                }
            }
        }
    }
}

/// Whether `key` is `true` in the table.
fn flag_set(keys: &toml::Table, key: &str) -> bool {
    matches!(keys.get(key), Some(toml::Value::Boolean(true)))
}

/// What to do with stage `i` of `runs`: skip it when its output is there and no input of it
/// is newer (make's rule), unless `forced` (`--from`); else run it, first clearing what
/// would stop its command from rewriting the old output.
pub(super) fn plan(runs: &[StageRun], i: usize, forced: bool) -> Result<Plan> {
    let run = &runs[i];
    let stale = run
        .inputs
        .iter()
        .map(|&j| &runs[j])
        .find(|input| run.stamp.older_than(&input.stamp))
        .map(|input| {
            let made = input
                .output_path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!("older than its input {made}")
        });
    // Why an existing output is redone.
    let redo = match (forced, &stale) {
        (true, _) => Some("rerun from --from".to_string()),
        (false, Some(why)) => Some(why.clone()),
        (false, None) => None,
    };
    Ok(match &run.output {
        Output::Samples(out) => plan_samples(out, forced),
        Output::Whole(out) => {
            if outputs::present(out)? && redo.is_none() {
                return Ok(Plan::Skip(format!("{} exists", out.display())));
            }
            let mut step = Step::new(match &redo {
                Some(why) if out.exists() => format!("{why}: replaces {}", out.display()),
                _ => format!("writes {}", out.display()),
            });
            // pairs and export refuse an existing folder unless told to replace it (once
            // the new one is complete); score's rename replaces its file.
            let replaceable = matches!(run.stage, Stage::Pairs | Stage::Export);
            if replaceable && out.exists() && !flag_set(&run.keys, "overwrite") {
                step.extra.push("--overwrite".into());
            }
            Plan::Run(step)
        }
        Output::Adapter(dir) => {
            let state = outputs::train_state(dir)?;
            match (state, redo) {
                (TrainState::Finished, None) => Plan::Skip(format!(
                    "{} holds a finished adapter (--from train retrains)",
                    dir.display()
                )),
                (TrainState::Checkpoints, None) => {
                    let mut step = Step::new(format!(
                        "resumes from the latest checkpoint in {}",
                        dir.display()
                    ));
                    if !run.keys.contains_key("resume") && !run.keys.contains_key("resume_from") {
                        step.extra.push("--resume".into());
                    }
                    Plan::Run(step)
                }
                (TrainState::Empty, _) => {
                    Plan::Run(Step::new(format!("trains into {}", dir.display())))
                }
                (_, Some(why)) => {
                    outputs::check_train_dir_removable(dir, &run.place)?;
                    let mut step = Step::new(format!(
                        "{why}: removes the old adapter and checkpoints in {}, then trains",
                        dir.display()
                    ));
                    step.remove.push(dir.clone());
                    Plan::Run(step)
                }
            }
        }
        Output::Pushed { record, target } => {
            if run.stamp != Stamp::Absent && redo.is_none() {
                return Ok(Plan::Skip(format!(
                    "{} was pushed to {} (recorded in {})",
                    target.folder,
                    target.repo,
                    record.display()
                )));
            }
            let why = redo.map_or(String::new(), |w| format!("{w}: "));
            Plan::Run(Step::new(format!(
                "{why}uploads {} to {}",
                target.folder, target.repo
            )))
        }
    })
}

/// Sample's rerun is its own resume: an existing JSON Lines output (or a parquet output's
/// sidecar) is continued, keeping every sample already there. A finished parquet file is
/// complete. `--from sample` starts over.
fn plan_samples(out: &Path, forced: bool) -> Plan {
    let parquet = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    let sidecar = parquet.then(|| {
        let mut name = out.as_os_str().to_owned();
        name.push(".partial.jsonl");
        PathBuf::from(name)
    });
    let existing: Vec<PathBuf> = std::iter::once(out.to_path_buf())
        .chain(sidecar.clone())
        .filter(|p| p.exists())
        .collect();
    if forced && !existing.is_empty() {
        let mut step = Step::new(format!(
            "rerun from --from: removes the old samples, then writes {}",
            out.display()
        ));
        step.remove = existing;
        return Plan::Run(step);
    }
    if parquet && out.exists() {
        return Plan::Skip(format!(
            "{} exists (a parquet output is written only when complete)",
            out.display()
        ));
    }
    match existing.first() {
        Some(partial) => Plan::Run(Step {
            continues: true,
            ..Step::new(format!(
                "continues {}: samples already there are kept, missing ones generated",
                partial.display()
            ))
        }),
        None => Plan::Run(Step::new(format!("writes {}", out.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_text(text: &str) -> Result<Vec<StageRun>> {
        resolve(&Pipeline::parse(text, Path::new("p.toml"))?)
    }

    const CHAIN: &str = "model = \"m\"\nworkdir = \"w\"\n\
        [sample]\ndata = \"d.jsonl\"\ntemplate = \"korean\"\nmax_tokens = 8\n\
        [pairs]\ngold = [\"train=d.jsonl\"]\n\
        [train]\nmax_steps = 2\n\
        [export]\n";

    #[test]
    fn each_stage_reads_the_previous_stages_output_by_default() {
        let runs = resolve_text(CHAIN).unwrap();
        let lines: Vec<String> = runs.iter().map(|r| r.command_line(&[])).collect();
        assert_eq!(
            lines,
            [
                "prefer sample --model m --data d.jsonl --out w/samples.jsonl --template korean \
                 --max-tokens 8",
                "prefer pairs --gold train=d.jsonl --samples w/samples.jsonl --out w/pairs \
                 --template korean --tokenizer m",
                "prefer train --model m --data w/pairs --output-dir w/adapter --max-steps 2",
                "prefer export --model m --adapter w/adapter --out w/merged",
            ]
        );
        let inputs: Vec<&[usize]> = runs.iter().map(|r| r.inputs.as_slice()).collect();
        assert_eq!(inputs, [&[][..], &[0], &[1], &[2]]);
    }

    #[test]
    fn a_tables_own_paths_win_and_rewire_what_reads_them() {
        let runs = resolve_text(
            "model = \"m\"\nworkdir = \"w\"\n[sample]\ndata = \"d\"\nout = \"s.parquet\"\n\
             [score]\ndata = \"c.jsonl\"\n[pairs]\ngold = [\"d\"]\nout = \"p\"\n\
             [push]\nrepo = \"me/x\"\n[train]\ndata = \"elsewhere\"\n",
        )
        .unwrap();
        let pairs = runs[2].command_line(&[]);
        for part in [
            "--samples s.parquet --out p ",
            " --chosen-logps w/chosen-scores.jsonl",
        ] {
            assert!(pairs.contains(part), "{part}: {pairs}");
        }
        assert!(runs[1].command_line(&[]).contains("--add-eos"));
        assert!(
            runs[3]
                .command_line(&[])
                .starts_with("prefer push p --repo me/x")
        );
        assert_eq!(runs[2].inputs, [0, 1]);
        assert_eq!(runs[3].inputs, [2]);
        assert!(runs[4].inputs.is_empty(), "train reads another dataset");
    }

    #[test]
    fn a_bad_table_fails_before_anything_runs() {
        let err = |text: &str| resolve_text(text).err().unwrap().to_string();
        let unknown = err(&CHAIN.replace("max_steps = 2", "max_stepz = 2"));
        assert!(
            unknown.starts_with("p.toml [train]: key `max_stepz`: unexpected argument"),
            "{unknown}"
        );
        let missing = err("workdir = \"w\"\n[sample]\ndata = \"d\"\n");
        assert!(
            missing.starts_with("p.toml [sample]: key `model`:") && missing.contains("--model"),
            "{missing}"
        );
        let path = err("model = \"m\"\nworkdir = \"w\"\n[pairs]\ngold = [\"g\"]\nout = 3\n");
        assert!(
            path.contains("p.toml [pairs]: key `out` must be a string"),
            "{path}"
        );
    }

    #[test]
    fn train_resumes_its_checkpoints_and_skips_a_finished_adapter() {
        let dir = testkit::TempDir::new("run-plan-train");
        let text = format!(
            "model = \"m\"\nworkdir = \"{}\"\n[train]\nmax_steps = 2\n",
            dir.display()
        );
        let adapter = dir.join("adapter");
        let plan_of = |forced| {
            let runs = resolve_text(&text).unwrap();
            plan(&runs, 0, forced).unwrap()
        };
        assert!(
            matches!(plan_of(false), Plan::Run(s) if s.extra.is_empty() && s.remove.is_empty())
        );
        std::fs::create_dir_all(adapter.join("checkpoint-1")).unwrap();
        std::fs::write(adapter.join("checkpoint-1/trainer_state.json"), "{}").unwrap();
        assert!(matches!(plan_of(false), Plan::Run(s) if s.extra == ["--resume"]));
        std::fs::write(adapter.join("adapter_config.json"), "{}").unwrap();
        assert!(matches!(plan_of(false), Plan::Skip(_)));
        assert!(matches!(plan_of(true), Plan::Run(s) if s.remove == [adapter.clone()]));
    }

    #[test]
    fn a_push_is_recorded_and_skipped_while_its_target_is_unchanged() {
        let dir = testkit::TempDir::new("run-plan-push");
        let text = |repo: &str, extra: &str| {
            format!(
                "workdir = \"{}\"\n[push]\nrepo = \"{repo}\"\ntoken = \"hf_x\"\n{extra}",
                dir.display()
            )
        };
        let runs_of = |text: String| resolve_text(&text).unwrap();
        let runs = runs_of(text("me/x", ""));
        assert!(
            runs[0]
                .command_line(&[])
                .starts_with(&format!("prefer push {}/pairs --repo me/x", dir.display())),
            "{}",
            runs[0].command_line(&[])
        );
        assert!(runs[0].command_line(&[]).contains("--token '***'"));
        assert!(matches!(plan(&runs, 0, false).unwrap(), Plan::Run(_)));
        // push's own dry run sends nothing: nothing to record.
        runs_of(text("me/x", "dry_run = true\n"))[0]
            .after_success()
            .unwrap();
        assert!(!dir.join("push.json").exists());
        runs[0].after_success().unwrap();
        let recorded = std::fs::read_to_string(dir.join("push.json")).unwrap();
        assert!(
            !recorded.contains("hf_x"),
            "no token in the record: {recorded}"
        );
        let runs = runs_of(text("me/x", ""));
        assert!(matches!(plan(&runs, 0, false).unwrap(), Plan::Skip(_)));
        assert!(matches!(plan(&runs, 0, true).unwrap(), Plan::Run(_)));
        let elsewhere = runs_of(text("me/y", ""));
        assert!(matches!(plan(&elsewhere, 0, false).unwrap(), Plan::Run(_)));
    }
}
