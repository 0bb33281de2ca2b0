//! `prefer run PIPELINE.toml` end to end on a fixture model with tiny settings: every stage
//! leaves its output; a rerun skips what is done, resumes train from its checkpoints, redoes
//! what is older than its input; `--from` reruns; `--dry-run` prints command lines that,
//! pasted into a shell, do the job, and writes nothing; a bad key stops the run before the
//! first stage, naming the file, table and key.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use testkit::{Ran, TempDir, fixture, prefer, run};

/// Three Korean instructions with gold answers.
const DATA: &str = r#"{"instruction": "자동차 보험의 자기부담금이란?", "output": "사고 때 가입자가 직접 내는 금액입니다."}
{"instruction": "실손 보험 청구 서류는?", "output": "진료비 영수증과 세부내역서입니다."}
{"instruction": "보험료 납입을 멈출 수 있나요?", "output": "네, 납입 일시 중지 제도가 있습니다."}
"#;

/// sample (greedy, 4 tokens) → pairs → train (2 steps of 1 pair) → export, on gemma2-tiny.
fn pipeline(train_extra: &str) -> String {
    format!(
        r#"model = "{model}"
workdir = "work"

[sample]
data = "data.jsonl"
template = "korean"
temperature = 0
max_tokens = 4
stop = ["</s>", "<|im_end|>"]

[pairs]
gold = ["train=data.jsonl"]
keep_truncated = true

[train]
max_steps = 2
per_device_train_batch_size = 1
learning_rate = 1e-3
lora_r = 4
lora_alpha = 8
lora_target_modules = ["q_proj", "v_proj", "lm_head"]
save_steps = 2
logging_steps = 1
{train_extra}
[export]
"#,
        model = fixture("models/gemma2-tiny").display()
    )
}

/// A scratch folder holding data.jsonl and pipeline.toml.
fn setup(tag: &str, pipeline_text: &str) -> TempDir {
    let dir = TempDir::new(tag);
    std::fs::write(dir.join("data.jsonl"), DATA).unwrap();
    std::fs::write(dir.join("pipeline.toml"), pipeline_text).unwrap();
    dir
}

/// `prefer run pipeline.toml EXTRA…` in `dir`.
fn prefer_run(dir: &Path, extra: &[&str]) -> Ran {
    run(prefer!()
        .current_dir(dir)
        .args(["run", "pipeline.toml"])
        .args(extra))
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().count()
}

/// Rows of a split of the pairs folder.
fn pair_rows(pairs: &Path, split: &str) -> usize {
    let file = pairs.join(format!("data/{split}-00000-of-00001.parquet"));
    data::ingest::open(&data::ingest::SourceSpec::plain(&file), None)
        .unwrap()
        .rows
        .len()
}

/// The files whose times and bytes tell whether a stage rewrote its output.
struct Outputs {
    samples: PathBuf,
    pairs: PathBuf,
    adapter: PathBuf,
    merged: PathBuf,
}

impl Outputs {
    fn of(work: &Path) -> Outputs {
        Outputs {
            samples: work.join("samples.jsonl"),
            pairs: work.join("pairs/data/train-00000-of-00001.parquet"),
            adapter: work.join("adapter/adapter_model.safetensors"),
            merged: work.join("merged/model.safetensors"),
        }
    }

    fn times(&self) -> [SystemTime; 4] {
        [&self.samples, &self.pairs, &self.adapter, &self.merged].map(|p| modified(p))
    }
}

#[test]
fn runs_every_stage_then_skips_resumes_redoes_and_reruns() {
    let dir = setup("run-all", &pipeline(""));
    let work = dir.join("work");
    let out = Outputs::of(&work);

    // 1. A fresh run: every stage, each reading the last one's output under workdir.
    let first = prefer_run(&dir, &[]).ok();
    for (i, stage) in ["sample", "pairs", "train", "export"].iter().enumerate() {
        assert!(
            first
                .stderr
                .contains(&format!("== [{}/4] {stage}: ", i + 1)),
            "a header per stage: {}",
            first.all()
        );
    }
    assert!(
        first.stderr.contains(
            "prefer train --model {model} --data work/pairs --output-dir work/adapter"
                .replace("{model}", &fixture("models/gemma2-tiny").to_string_lossy())
                .as_str()
        )
    );
    assert!(
        first
            .stderr
            .contains("pipeline.toml: 4 stages run, 0 skipped, in "),
        "{}",
        first.all()
    );
    assert_eq!(lines(&out.samples), 3);
    assert_eq!(pair_rows(&work.join("pairs"), "train"), 3);
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/checkpoint-2/trainer_state.json",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
    ] {
        assert!(work.join(f).is_file(), "{f}: {}", first.all());
    }
    assert_eq!(
        std::fs::read_dir(&work)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect::<std::collections::BTreeSet<_>>(),
        ["adapter", "merged", "pairs", "samples.jsonl"]
            .map(String::from)
            .into(),
        "the outputs and nothing else (no temporaries)"
    );
    let adapter_bytes = std::fs::read(&out.adapter).unwrap();
    let times = out.times();

    // 2. A rerun: sample resumes and finds nothing to do; the rest is skipped, untouched.
    let again = prefer_run(&dir, &[]).ok();
    assert!(again.stderr.contains("nothing to do"), "{}", again.all());
    for line in [
        "== [2/4] pairs: skipped: work/pairs exists ==",
        "== [3/4] train: skipped: work/adapter holds a finished adapter",
        "== [4/4] export: skipped: work/merged exists ==",
        "pipeline.toml: 1 stage run, 3 skipped",
    ] {
        assert!(again.stderr.contains(line), "{line}: {}", again.all());
    }
    assert_eq!(out.times(), times, "a skipped stage rewrites nothing");

    // 3. A train stopped after its last checkpoint (final adapter missing): resumed, not
    //    restarted; export, now older than the adapter, is redone.
    std::fs::remove_file(work.join("adapter/adapter_config.json")).unwrap();
    std::fs::remove_file(&out.adapter).unwrap();
    let resumed = prefer_run(&dir, &[]).ok();
    for line in [
        "== [3/4] train: resumes from the latest checkpoint in work/adapter ==",
        "--save-steps 2 --resume\n",
        "== [4/4] export: older than its input work/adapter: replaces work/merged ==",
        "--out work/merged --overwrite\n",
    ] {
        assert!(resumed.stderr.contains(line), "{line}: {}", resumed.all());
    }
    assert_eq!(std::fs::read(&out.adapter).unwrap(), adapter_bytes);
    assert!(modified(&out.merged) > times[3]);

    // 4. --from train: train starts over (same seed, same adapter), export replaces its
    //    folder; earlier stages are not run.
    let times = out.times();
    let rerun = prefer_run(&dir, &["--from", "train"]).ok();
    for line in [
        "== [1/4] sample: before --from, not run ==",
        "== [2/4] pairs: before --from, not run ==",
        "== [3/4] train: rerun from --from: removes the old adapter and checkpoints in work/adapter, then trains ==",
        "== [4/4] export: rerun from --from: replaces work/merged ==",
    ] {
        assert!(rerun.stderr.contains(line), "{line}: {}", rerun.all());
    }
    assert!(
        !rerun.stderr.contains("resuming at step"),
        "{}",
        rerun.all()
    );
    assert_eq!(std::fs::read(&out.adapter).unwrap(), adapter_bytes);
    let after = out.times();
    assert_eq!(after[..2], times[..2], "sample and pairs untouched");
    assert!(after[2] > times[2] && after[3] > times[3]);

    // 5. New input rows: sample appends one, and everything built from the samples is
    //    redone (make's rule).
    let mut data = DATA.to_string();
    data.push_str(
        r#"{"instruction": "보험 계약을 해지하면?", "output": "해지환급금을 받습니다."}"#,
    );
    data.push('\n');
    std::fs::write(dir.join("data.jsonl"), data).unwrap();
    let grown = prefer_run(&dir, &[]).ok();
    for line in [
        "== [2/4] pairs: older than its input work/samples.jsonl: replaces work/pairs ==",
        "== [3/4] train: older than its input work/pairs: removes the old adapter",
        "== [4/4] export: older than its input work/adapter: replaces work/merged ==",
    ] {
        assert!(grown.stderr.contains(line), "{line}: {}", grown.all());
    }
    assert_eq!(lines(&out.samples), 4);
    assert_eq!(pair_rows(&work.join("pairs"), "train"), 4);
}

#[test]
fn dry_run_prints_command_lines_a_shell_runs_and_writes_nothing() {
    let dir = setup("run-dry", &pipeline(""));
    let dry = prefer_run(&dir, &["--dry-run"]).ok();
    assert_eq!(
        std::fs::read_dir(&*dir).unwrap().count(),
        2,
        "only data.jsonl and pipeline.toml: {}",
        dry.all()
    );
    let commands: Vec<&str> = dry
        .stdout
        .lines()
        .filter(|l| l.starts_with("prefer "))
        .collect();
    let stages: Vec<&str> = commands
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(
        stages,
        ["sample", "pairs", "train", "export"],
        "{}",
        dry.all()
    );
    let script: Vec<&str> = dry
        .stdout
        .lines()
        .filter(|l| !l.starts_with("# "))
        .collect();
    assert_eq!(script[0], "mkdir -p work", "{}", dry.stdout);
    assert_eq!(script[1..], commands[..], "{}", dry.stdout);

    // Pasted into a shell (with `prefer` this build), the lines do the job: the outputs a
    // pipeline run leaves, which a real run then finds done.
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_prefer"));
    for line in &script {
        let script = match line.strip_prefix("prefer ") {
            Some(rest) => format!("\"$PREFER\" {rest}"),
            None => line.to_string(),
        };
        run(Command::new("sh")
            .current_dir(&dir)
            .env("PREFER", &binary)
            .args(["-c", &script]))
        .ok();
    }
    let after = prefer_run(&dir, &[]).ok();
    assert!(
        after
            .stderr
            .contains("pipeline.toml: 1 stage run, 3 skipped"),
        "{}",
        after.all()
    );
}

#[test]
fn an_unknown_key_fails_naming_file_table_and_key_before_any_stage() {
    let dir = setup("run-unknown", &pipeline("max_stepz = 3\n"));
    let failed = prefer_run(&dir, &[]).failed();
    assert!(
        failed
            .stderr
            .contains("pipeline.toml [train]: key `max_stepz`: unexpected argument '--max-stepz'"),
        "{}",
        failed.all()
    );
    assert!(!failed.stderr.contains("Usage:"), "{}", failed.stderr);
    assert!(!dir.join("work").exists(), "nothing ran, not even sample");

    // A value of the wrong type is the command's own parse error, on the key.
    std::fs::write(
        dir.join("pipeline.toml"),
        pipeline("").replace("max_tokens = 4", "max_tokens = \"four\""),
    )
    .unwrap();
    let failed = prefer_run(&dir, &[]).failed();
    assert!(
        failed
            .stderr
            .contains("pipeline.toml [sample]: key `max_tokens`: invalid value 'four'"),
        "{}",
        failed.all()
    );

    // --from must name a stage of the file.
    let text = pipeline("").replace("[export]\n", "");
    std::fs::write(dir.join("pipeline.toml"), text).unwrap();
    let failed = prefer_run(&dir, &["--from", "export"]).failed();
    assert!(
        failed
            .stderr
            .contains("--from export: pipeline.toml has no [export] table"),
        "{}",
        failed.all()
    );
}
