//! `prefer train` end to end on the CPU with a fixture model: what it writes, what it logs,
//! resuming, the data forms it reads, and the errors it gives.

use std::path::Path;

use testkit::{TempDir, fixture, prefer, run};

fn model() -> std::path::PathBuf {
    fixture("models/llama-tiny")
}

fn rows() -> std::path::PathBuf {
    fixture("train/trl_run/rows.jsonl")
}

/// A short run's flags: 4 steps of 2 pairs, a log and a checkpoint every 2 steps.
fn short(out: &Path) -> Vec<String> {
    [
        "train",
        "--model",
        &model().to_string_lossy(),
        "--data",
        &rows().to_string_lossy(),
        "--output-dir",
        &out.to_string_lossy(),
        "--max-steps",
        "4",
        "--per-device-train-batch-size",
        "2",
        "--logging-steps",
        "2",
        "--save-steps",
        "2",
        "--learning-rate",
        "1e-3",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn trains_an_adapter_and_logs_trl_metrics() {
    let out = TempDir::new("cli-train");
    let ran = run(prefer!().args(short(out.path()))).ok();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(out.path().join(f).is_file(), "{f}: {}", ran.all());
    }
    for step in [2, 4] {
        assert!(
            out.path()
                .join(format!("checkpoint-{step}/trainer_state.json"))
                .is_file()
        );
    }
    let logged: Vec<serde_json::Value> = ran
        .stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        logged.len(),
        2,
        "a log line every 2 of 4 steps: {}",
        ran.all()
    );
    for name in [
        "loss",
        "grad_norm",
        "learning_rate",
        "rewards/chosen",
        "rewards/margins",
        "logps/rejected",
        "epoch",
    ] {
        assert!(logged[1][name].is_number(), "{name} missing: {}", logged[1]);
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);

    // A second run into the same folder must not silently start over.
    let again = run(prefer!().args(short(out.path()))).failed();
    assert!(again.stderr.contains("--resume"), "{}", again.all());
}

#[test]
fn a_resumed_run_writes_the_adapter_an_uninterrupted_one_does() {
    let whole = TempDir::new("cli-train-whole");
    run(prefer!().args(short(whole.path()))).ok();
    // A run that died after its step-2 checkpoint.
    let cut = TempDir::new("cli-train-cut");
    let src = whole.path().join("checkpoint-2");
    let dst = cut.path().join("checkpoint-2");
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    let mut args = short(cut.path());
    args.push("--resume".into());
    let ran = run(prefer!().args(args)).ok();
    assert!(ran.stderr.contains("resuming at step 2"), "{}", ran.all());
    let a = std::fs::read(whole.path().join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(cut.path().join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "the resumed run's adapter differs");
}

#[test]
fn reads_a_pairs_folder_with_the_reference_columns_and_evaluates_its_validation_split() {
    let pairs = TempDir::new("cli-train-pairs");
    let data = pairs.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let text = std::fs::read_to_string(rows()).unwrap();
    let renamed: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::json!({
                "question": v["prompt"], "response_j": v["chosen"], "response_k": v["rejected"],
            })
            .to_string()
        })
        .collect();
    std::fs::write(
        data.join("train-00000-of-00001.jsonl"),
        renamed[..4].join("\n") + "\n",
    )
    .unwrap();
    std::fs::write(
        data.join("validation-00000-of-00001.jsonl"),
        renamed[4..].join("\n") + "\n",
    )
    .unwrap();
    let out = TempDir::new("cli-train-pairs-out");
    let mut args = short(out.path());
    let at = args.iter().position(|a| a == "--data").unwrap();
    args[at + 1] = pairs.path().to_string_lossy().into();
    args.extend([
        "--eval-steps".into(),
        "2".into(),
        "--prompt-wrapper".into(),
        "reference".into(),
    ]);
    let ran = run(prefer!().args(args)).ok();
    assert!(ran.stderr.contains("4 of 4 rows kept"), "{}", ran.all());
    assert!(ran.stderr.contains("2 of 2 rows kept"), "{}", ran.all());
    let evals = ran
        .stderr
        .lines()
        .filter(|l| l.contains("\"eval_loss\""))
        .count();
    assert_eq!(evals, 2, "evaluated at steps 2 and 4: {}", ran.all());
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let out = TempDir::new("cli-train-bad");
    // Rows without preference columns.
    let mut args = short(out.path());
    let at = args.iter().position(|a| a == "--data").unwrap();
    args[at + 1] = fixture("data/gold.jsonl").to_string_lossy().into();
    let ran = run(prefer!().args(&args)).failed();
    assert!(
        ran.stderr.contains("gold.jsonl") && ran.stderr.contains("instruction, output"),
        "{}",
        ran.all()
    );
    // A typo in the config file.
    let toml = out.path().join("t.toml");
    std::fs::write(&toml, "betta = 0.2\n").unwrap();
    let mut args = short(out.path());
    args.extend(["--config".into(), toml.to_string_lossy().into()]);
    let ran = run(prefer!().args(&args)).failed();
    assert!(ran.stderr.contains("betta"), "{}", ran.all());
    // A device that does not parse.
    let mut args = short(out.path());
    args.extend(["--device".into(), "gpu0".into()]);
    let ran = run(prefer!().args(&args)).failed();
    assert!(ran.stderr.contains("--device"), "{}", ran.all());
    // Nothing was written by the failed runs.
    assert!(!out.path().join("adapter_model.safetensors").exists());
}
