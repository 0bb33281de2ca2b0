//! The TRL reference run (fixtures/train/trl_run, tools/gen_trl_train_fixture.py) as the
//! trainer tests read it: its rows, examples and options. Shared by trainer.rs (CPU) and
//! cuda_trainer.rs (GPU).
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

use model::{Model, Tokenizer};
use serde_json::Value;
use testkit::fixtures_dir;
use train::examples::{DpoExample, ExampleConfig, PreferenceRow, Truncation, build_examples};
use train::trainer::{Event, Resume, TrainConfig, train};

pub struct TrlRun {
    pub json: Value,
    pub model_dir: PathBuf,
    pub config: TrainConfig,
}

/// TRL's run: its log, the model folder and our options for the same run, writing to `out`.
pub fn trl_run(out: &Path) -> TrlRun {
    let run_json: Value =
        serde_json::from_str(&std::fs::read_to_string(trl_dir().join("run.json")).unwrap())
            .unwrap();
    let model_dir = fixtures_dir()
        .join("models")
        .join(run_json["model"].as_str().unwrap());
    let c = &run_json["config"];
    let lora = &run_json["lora"];
    let mut config = TrainConfig {
        output_dir: out.to_path_buf(),
        learning_rate: c["learning_rate"].as_f64().unwrap(),
        lr_scheduler_type: c["lr_scheduler_type"].as_str().unwrap().into(),
        warmup_steps: c["warmup_steps"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
        max_steps: Some(c["max_steps"].as_u64().unwrap() as usize),
        logging_steps: c["logging_steps"].as_u64().unwrap() as usize,
        max_grad_norm: c["max_grad_norm"].as_f64().unwrap(),
        max_length: Some(c["max_length"].as_u64().unwrap() as usize),
        seed: c["seed"].as_u64().unwrap(),
        per_device_train_batch_size: c["per_device_train_batch_size"].as_u64().unwrap() as usize,
        gradient_accumulation_steps: c["gradient_accumulation_steps"].as_u64().unwrap() as usize,
        save_steps: 3,
        lora_r: lora["r"].as_u64().unwrap() as usize,
        lora_alpha: lora["lora_alpha"].as_f64().unwrap() as f32,
        lora_dropout: lora["lora_dropout"].as_f64().unwrap() as f32,
        lora_target_modules: lora["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect(),
        init_adapter: Some(trl_dir().join("init")),
        ..TrainConfig::default()
    };
    config.loss.beta = c["beta"].as_f64().unwrap();
    TrlRun {
        json: run_json,
        model_dir,
        config,
    }
}

pub fn trl_dir() -> PathBuf {
    fixtures_dir().join("train").join("trl_run")
}

pub fn rows() -> Vec<PreferenceRow> {
    std::fs::read_to_string(trl_dir().join("rows.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            PreferenceRow {
                prompt: v["prompt"].as_str().unwrap().into(),
                chosen: v["chosen"].as_str().unwrap().into(),
                rejected: v["rejected"].as_str().unwrap().into(),
            }
        })
        .collect()
}

pub fn examples(model_dir: &Path, max_length: usize) -> Vec<DpoExample> {
    let tok = Tokenizer::load(model_dir).unwrap();
    let config = ExampleConfig {
        max_length: Some(max_length),
        truncation: Truncation::KeepStart,
        max_prompt_length: None,
        wrapper: None,
    };
    build_examples(&tok, &rows(), &config).unwrap().examples
}

/// Runs to the end, collecting the logged entries.
pub fn run(model: &Model, config: &TrainConfig, data: &[DpoExample], resume: Resume) -> Vec<Value> {
    let mut logged = Vec::new();
    train(model, config, data, None, resume, &mut |e| {
        if let Event::Logged(entry) = e {
            logged.push(Value::Object(entry.clone()));
        }
    })
    .unwrap();
    logged
}
