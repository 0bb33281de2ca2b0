//! `train::trainer::train` end to end on the CPU.
//!
//! - Against TRL 1.16 + PEFT 0.21 (fixtures/train/trl_run, tools/gen_trl_train_fixture.py):
//!   the same rows, options and starting adapter; every logged metric of all six steps and the
//!   final adapter agree within the tolerances stated below.
//! - Exact resume: a run resumed from its step-2 checkpoint (with dropout, shuffling and a
//!   short last accumulation window) ends bit for bit where the uninterrupted run ends.
//! - Options that cannot resume a run are refused, naming the checkpoint.

mod common;

use std::path::Path;

use common::{TrlRun, examples, run, trl_dir, trl_run};
use engine::Device;
use model::Model;
use serde_json::Value;
use testkit::{TempDir, fixtures_dir, read_safetensors_f32};
use train::loss::LossType;
use train::trainer::{Resume, TrainConfig, TrainerState, train};

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Per-metric tolerance (relative to max(1, |TRL|)): the runs differ only by f32 summation
/// order (our packed CPU forward against torch's padded one). Measured worst over the six
/// steps: 1.5e-6 (rewards/margins), 1.2e-6 (grad_norm), 7e-7 (loss).
fn tolerance(name: &str) -> f64 {
    match name {
        "num_tokens" | "epoch" | "step" | "rewards/accuracies" | "mean_token_accuracy" => 0.0,
        "learning_rate" => 1e-12,
        _ => 2e-5,
    }
}

#[test]
fn a_run_matches_trl_and_peft() {
    let out = TempDir::new("trainer-trl");
    let TrlRun {
        json: run_json,
        model_dir,
        config,
    } = trl_run(out.path());
    let model = Model::load(&model_dir, Device::Cpu).unwrap();
    assert_eq!(config.loss.loss_type, vec![LossType::Sigmoid]);
    let data = examples(&model_dir, config.max_length.unwrap());
    assert_eq!(
        data.len(),
        config.per_device_train_batch_size,
        "one batch per step"
    );

    let ours = run(&model, &config, &data, Resume::No);
    let theirs: Vec<&Value> = run_json["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("loss").is_some())
        .collect();
    assert_eq!(ours.len(), theirs.len(), "one log entry per step");
    let mut worst: Vec<(String, f64)> = Vec::new();
    for (step, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        let t = t.as_object().unwrap();
        for (name, want) in t {
            let want = want.as_f64().unwrap();
            let got = o[name]
                .as_f64()
                .unwrap_or_else(|| panic!("step {}: we log no {name}", step + 1));
            let err = (got - want).abs() / want.abs().max(1.0);
            assert!(
                err <= tolerance(name),
                "step {}: {name} = {got}, TRL {want} (relative error {err:.2e})",
                step + 1
            );
            match worst.iter_mut().find(|(n, _)| n == name) {
                Some((_, w)) => *w = w.max(err),
                None => worst.push((name.clone(), err)),
            }
        }
        assert_eq!(
            o.as_object().unwrap().keys().collect::<Vec<_>>(),
            t.keys().collect::<Vec<_>>(),
            "TRL's names in TRL's order"
        );
    }
    println!("worst relative error per metric over six steps: {worst:?}");

    // The final adapters: Adam's steps are lr-sized whatever the gradient's size, so the
    // bound is in units of lr · steps.
    let ours = read_safetensors_f32(&out.path().join("adapter_model.safetensors"));
    let theirs = read_safetensors_f32(&trl_dir().join("final").join("adapter_model.safetensors"));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "the same tensors under PEFT's names"
    );
    let scale = (config.learning_rate * 6.0) as f32;
    let mut worst = 0.0f32;
    for (name, (shape, want)) in &theirs {
        let (got_shape, got) = &ours[name];
        assert_eq!(got_shape, shape, "{name}");
        let err = max_abs(got, want);
        worst = worst.max(err / scale);
        assert!(
            err <= 1e-3 * scale,
            "{name}: max |ours − TRL| = {err:.3e} (lr · steps = {scale:.1e})"
        );
    }
    println!("final adapter: worst |ours − TRL| / (lr · steps) = {worst:.2e}");
    // Measured: 5e-5 · lr · steps. The run moved the adapter far more than the bound: the
    // comparison above is not of two copies of the start.
    let init = read_safetensors_f32(&trl_dir().join("init").join("adapter_model.safetensors"));
    let moved = theirs
        .iter()
        .map(|(n, (_, w))| max_abs(w, &init[n].1))
        .fold(0.0f32, f32::max);
    assert!(
        moved > 100.0 * 1e-3 * scale,
        "training moved the weights by {moved}"
    );

    // Checkpoints at the save steps, each a complete adapter + state.
    for step in [3, 6] {
        let dir = out.path().join(format!("checkpoint-{step}"));
        let state: TrainerState =
            serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap())
                .unwrap();
        assert_eq!(state.global_step, step);
        assert_eq!(state.log_history.len(), step);
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.safetensors",
        ] {
            assert!(dir.join(f).is_file(), "{}", dir.join(f).display());
        }
    }
}

fn resume_config(out: &Path) -> TrainConfig {
    TrainConfig {
        output_dir: out.to_path_buf(),
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        num_train_epochs: 2.0,
        learning_rate: 1e-3,
        warmup_steps: 1.0,
        lr_scheduler_type: "cosine".into(),
        weight_decay: 0.05,
        logging_steps: 1,
        save_steps: 2,
        max_length: Some(40),
        lora_r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.2,
        seed: 11,
        ..TrainConfig::default()
    }
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let model_dir = fixtures_dir().join("models").join("qwen2-tiny");
    let model = Model::load(&model_dir, Device::Cpu).unwrap();
    let data = examples(&model_dir, 40);
    assert_eq!(data.len(), 6);
    // 6 rows, batches of 2, 2 per step: 3 micro-batches an epoch, steps of 2 then 1.
    let whole = TempDir::new("trainer-whole");
    let whole_log = run(&model, &resume_config(whole.path()), &data, Resume::No);
    assert_eq!(whole_log.len(), 4, "2 steps an epoch, 2 epochs");

    let resumed = TempDir::new("trainer-resumed");
    let from = whole.path().join("checkpoint-2");
    let resumed_log = run(
        &model,
        &resume_config(resumed.path()),
        &data,
        Resume::From(from),
    );
    assert_eq!(
        resumed_log,
        whole_log[2..],
        "the same steps 3 and 4, logged the same"
    );
    let a = std::fs::read(whole.path().join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(resumed.path().join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "the final adapters differ");
    let state = |dir: &Path| -> TrainerState {
        let text =
            std::fs::read_to_string(dir.join("checkpoint-4").join("trainer_state.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    assert_eq!(
        state(whole.path()),
        state(resumed.path()),
        "log history and counters"
    );

    // Resume::Latest picks the highest complete checkpoint; a partial one is ignored.
    std::fs::create_dir_all(whole.path().join(".checkpoint-9.partial")).unwrap();
    assert_eq!(
        train::trainer::latest_checkpoint(whole.path()).unwrap(),
        Some(whole.path().join("checkpoint-4"))
    );
}

#[test]
fn a_checkpoint_of_another_run_is_refused() {
    let model_dir = fixtures_dir().join("models").join("qwen2-tiny");
    let model = Model::load(&model_dir, Device::Cpu).unwrap();
    let data = examples(&model_dir, 40);
    let first = TempDir::new("trainer-first");
    let mut config = resume_config(first.path());
    config.max_steps = Some(2);
    run(&model, &config, &data, Resume::No);

    let second = TempDir::new("trainer-second");
    let mut other = resume_config(second.path());
    other.max_steps = Some(2);
    let resume_error = |config: &TrainConfig| {
        let from = Resume::From(first.path().join("checkpoint-2"));
        train(&model, config, &data, None, from, &mut |_| {})
            .unwrap_err()
            .to_string()
    };
    other.seed = 12;
    let err = resume_error(&other);
    assert!(
        err.contains("checkpoint-2") && err.contains("seed"),
        "{err}"
    );

    other.seed = 11;
    other.lora_r = 8;
    let err = resume_error(&other);
    assert!(err.contains("checkpoint-2"), "{err}");
}

#[test]
fn keeping_activations_trains_exactly_as_recomputing_them() {
    let model_dir = fixtures_dir().join("models").join("gemma2-tiny");
    let model = Model::load(&model_dir, Device::Cpu).unwrap();
    let data = examples(&model_dir, 40);
    let adapters: Vec<Vec<u8>> = [true, false]
        .into_iter()
        .map(|checkpointing| {
            let out = TempDir::new("trainer-gc");
            let mut config = resume_config(out.path());
            config.max_steps = Some(2);
            config.gradient_checkpointing = checkpointing;
            run(&model, &config, &data, Resume::No);
            std::fs::read(out.path().join("adapter_model.safetensors")).unwrap()
        })
        .collect();
    assert!(adapters[0] == adapters[1], "the adapters differ");
}
