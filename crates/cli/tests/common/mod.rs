//! What the `prefer sample` test binaries (sample, sample_parquet) share: the command, the
//! workloads their resume and Ctrl-C tests run, and the interrupt itself.
//!
//! Each binary compiles this module on its own (`mod common;`) and uses a subset of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::{Ran, TempDir, prefer, run};

pub fn model_dir(name: &str) -> PathBuf {
    testkit::fixture("models").join(name)
}

/// One JSON value per line.
pub fn write_lines(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// `prefer sample --model MODEL --data DATA --out OUT EXTRA…`.
pub fn command(model: &Path, data: impl AsRef<OsStr>, out: &Path, extra: &[&str]) -> Command {
    let mut c = prefer!();
    c.arg("sample")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra);
    c
}

pub fn prefer_sample(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Ran {
    run(&mut command(model, data, out, extra))
}

/// The resume tests' flags: sampled (T 0.9, top_p 0.9), n 2, 15 tokens, on mistral-tiny over
/// [`write_resume_prompts`].
pub const RESUME_ARGS: [&str; 8] = [
    "--temperature",
    "0.9",
    "--top-p",
    "0.9",
    "--n",
    "2",
    "--max-tokens",
    "15",
];

/// Six Korean prompts.
pub fn write_resume_prompts(data: &Path) {
    let rows: Vec<Value> = (0..6)
        .map(|i| json!({"prompt": format!("질문 {i}: 다음 달 보험료는?")}))
        .collect();
    write_lines(data, &rows);
}

/// What a kill -9 leaves of `lines`: the first three whole and half of the fourth's bytes
/// (maybe inside a character).
pub fn torn_after_three(lines: &[&str]) -> Vec<u8> {
    let mut bytes = format!("{}\n{}\n{}\n", lines[0], lines[1], lines[2]).into_bytes();
    bytes.extend_from_slice(&lines[3].as_bytes()[..lines[3].len() / 2]);
    bytes
}

/// The Ctrl-C tests' flags: greedy, 400 tokens each, two sequences at a time (long enough to
/// interrupt), on llama-tiny over [`write_interrupt_prompts`].
pub const INTERRUPT_ARGS: [&str; 7] = [
    "--temperature",
    "0",
    "--ignore-eos",
    "--max-tokens",
    "400",
    "--max-num-seqs",
    "2",
];

/// 24 prompts of token ids.
pub fn write_interrupt_prompts(data: &Path) {
    let rows: Vec<Value> = (0..24)
        .map(|i| json!({"prompt_ids": [2, 10 + i, 20, 30]}))
        .collect();
    write_lines(data, &rows);
}

/// Starts `cmd`, waits until `watch` holds `rows` lines, sends SIGINT and returns the run
/// (which must have failed).
pub fn interrupt_after_rows(cmd: &mut Command, watch: &Path, rows: usize) -> Ran {
    let child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(watch).map_or(0, |t| t.lines().count()) < rows {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no rows appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    Ran::from_output(format!("{cmd:?}"), child.wait_with_output().unwrap()).failed()
}

/// The contract with `prefer pairs`: a gold CSV without ids (three Korean rows) is sampled
/// into `samples_name` (its extension picks the format) with the Korean template, then
/// paired with `--join id`. Returns the folder (kept alive), the samples file and the pairs
/// written as JSON Lines, one value per pair.
pub fn sample_then_pair(tag: &str, samples_name: &str) -> (TempDir, PathBuf, Vec<Value>) {
    let model = model_dir("llama-tiny");
    let dir = TempDir::new(tag);
    let gold = dir.join("train.csv");
    std::fs::write(
        &gold,
        "instruction,output\n보험료는?,월 3만원입니다.\n해지 환급금은?,없습니다.\n수도는?,서울입니다.\n",
    )
    .unwrap();
    let samples = dir.join(samples_name);
    prefer_sample(
        &model,
        &gold,
        &samples,
        &["--template", "korean", "--max-tokens", "6", "--seed", "5"],
    )
    .ok();
    let out = dir.join("pairs");
    run(prefer!()
        .args(["pairs", "--gold"])
        .arg(&gold)
        .arg("--samples")
        .arg(&samples)
        .arg("--out")
        .arg(&out)
        .args(["--join", "id", "--keep-truncated", "--format", "jsonl"]))
    .ok();
    let pairs = std::fs::read_to_string(out.join("data/train-00000-of-00001.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (dir, samples, pairs)
}
