//! `prefer score` end to end: the built binary on the fixture models.
//!
//! Good runs are checked against HF (the fixture's text rows: completion log-probs within
//! 1e-4 per token) and against the library (ids rows: the same log-probs as
//! `Model::completion_stats`, which packing may change only by f32 rounding, < 1e-5); bad
//! inputs must exit non-zero with a message naming the problem and leave no output file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};
use testkit::{TempDir, f64s, fixtures_dir};

/// A copy of a fixture model we may break.
fn model_copy(name: &str, tag: &str) -> TempDir {
    let src = fixtures_dir().join("models").join(name);
    let dst = TempDir::new(tag);
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
    }
    dst
}

fn write_rows(dir: &Path, rows: &[String]) -> PathBuf {
    let path = dir.join("rows.jsonl");
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    path
}

fn prefer_score(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prefer"))
        .arg("score")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn read_output(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn text_rows_match_hf() {
    for name in ["llama-tiny", "gemma2-tiny", "qwen2-tiny"] {
        let reference: Value = serde_json::from_str(
            &std::fs::read_to_string(
                fixtures_dir()
                    .join("reference")
                    .join(format!("{name}.json")),
            )
            .unwrap(),
        )
        .unwrap();
        let model = fixtures_dir().join("models").join(name);
        for add_eos in [false, true] {
            let cases: Vec<&Value> = reference["text"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["add_eos"].as_bool() == Some(add_eos))
                .collect();
            if cases.is_empty() {
                continue;
            }
            let dir = TempDir::new("hf-text");
            let rows: Vec<String> = cases
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    json!({"id": i, "prompt": c["prompt"], "completion": c["completion"]})
                        .to_string()
                })
                .collect();
            let data = write_rows(&dir, &rows);
            let out = dir.join("scores.jsonl");
            let flags: &[&str] = if add_eos { &["--add-eos"] } else { &[] };
            let result = prefer_score(&model, &data, &out, flags);
            assert!(
                result.status.success(),
                "{}",
                String::from_utf8_lossy(&result.stderr)
            );
            let got = read_output(&out);
            assert_eq!(got.len(), cases.len());
            for (row, case) in got.iter().zip(&cases) {
                let want = f64s(&case["completion_logprobs"]);
                let token_logps = f64s(&row["token_logps"]);
                assert_eq!(token_logps.len(), want.len(), "{name}: {row}");
                for (g, w) in token_logps.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-4, "{name}: {g} vs {w}");
                }
                let sum: f64 = token_logps.iter().sum();
                // token_logps are printed with the digits of their f32 values; logp is their f64 sum.
                assert!((row["logp"].as_f64().unwrap() - sum).abs() < 1e-5);
                let hf = case["completion_logp"].as_f64().unwrap();
                assert!(
                    (sum - hf).abs() < 1e-4 * want.len() as f64,
                    "{name}: {sum} vs {hf}"
                );
            }
            assert!(!dir.join("scores.jsonl.tmp").exists());
        }
    }
}

/// Ids rows with extra fields: fields and their order kept, rows in input order, the same
/// log-probs as the library, whatever the batch budget.
#[test]
fn ids_rows_keep_fields_and_match_the_library() {
    let name = "mistral-tiny"; // sharded checkpoint, sliding window
    let model_dir = fixtures_dir().join("models").join(name);
    let model = model::Model::load(&model_dir, engine::Device::Cpu).unwrap();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = vec![
        (vec![2, 17, 400, 9], vec![33, 34, 35, 1]),
        (vec![2], vec![5; 30]),
        (
            vec![2, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8],
            vec![],
        ),
        (vec![2, 900], vec![901, 902]),
    ];
    let lines: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, (p, c))| {
            format!(
                r#"{{"zeta": {i}, "prompt_ids": {p:?}, "alpha": {{"b": 1, "a": [true, null]}}, "completion_ids": {c:?}, "note": "행 {i}"}}"#
            )
        })
        .collect();
    let dir = TempDir::new("ids");
    let data = write_rows(&dir, &lines);
    for budget in ["8192", "7"] {
        let out = dir.join(format!("scores-{budget}.jsonl"));
        let result = prefer_score(&model_dir, &data, &out, &["--batch-tokens", budget]);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        let text = std::fs::read_to_string(&out).unwrap();
        for (i, line) in text.lines().enumerate() {
            // Input fields first, in input order (nested ones too), then logp and token_logps.
            let prefix = format!(r#"{{"zeta":{i},"prompt_ids":"#);
            assert!(line.starts_with(&prefix), "{line}");
            let order = [
                "\"zeta\"",
                "\"prompt_ids\"",
                "\"alpha\":{\"b\":1,\"a\":[true,null]}",
                "\"completion_ids\"",
                "\"note\"",
                "\"logp\"",
                "\"token_logps\"",
            ];
            let positions: Vec<usize> = order.iter().map(|k| line.find(k).unwrap()).collect();
            assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");
            assert!(line.contains(&format!("\"note\":\"행 {i}\"")), "{line}");
        }
        let got = read_output(&out);
        for ((p, c), row) in rows.iter().zip(&got) {
            let lib = model.completion_stats(&[(p, c)]).unwrap();
            let token_logps = f64s(&row["token_logps"]);
            assert_eq!(token_logps.len(), c.len());
            for (g, w) in token_logps.iter().zip(&lib[0].logp) {
                assert!((g - *w as f64).abs() < 1e-5, "{g} vs {w}");
            }
            if c.is_empty() {
                assert_eq!(row["logp"].as_f64(), Some(0.0));
            }
        }
    }
}

/// --stats, --warmup and --profile: a JSON summary on stderr that adds up, and an output
/// identical to a plain run.
#[test]
fn stats_and_profile_summarise_the_run() {
    let model = fixtures_dir().join("models").join("llama-tiny");
    let dir = TempDir::new("stats");
    let rows: Vec<String> = (0..5)
        .map(|i| {
            let prompt: Vec<u32> = (0..3 + i).map(|t| 10 + t * 7).collect();
            let completion: Vec<u32> = (0..4 + 2 * i).map(|t| 500 + t * 3).collect();
            json!({"prompt_ids": prompt, "completion_ids": completion}).to_string()
        })
        .collect();
    let tokens: usize = (0..5).map(|i| 3 + i + 4 + 2 * i).sum();
    let scored: usize = (0..5).map(|i| 4 + 2 * i).sum();
    let data = write_rows(&dir, &rows);
    let plain = dir.join("plain.jsonl");
    let result = prefer_score(&model, &data, &plain, &["--batch-tokens", "20"]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(!String::from_utf8_lossy(&result.stderr).contains("prefer score stats"));

    let out = dir.join("stats.jsonl");
    let flags = ["--batch-tokens", "20", "--warmup", "--profile"];
    let result = prefer_score(&model, &data, &out, &flags);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&plain).unwrap()
    );
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("prefer score stats: "))
        .unwrap_or_else(|| panic!("no stats line in:\n{stderr}"));
    let stats: Value = serde_json::from_str(line).unwrap();
    assert_eq!(stats["device"], "cpu");
    assert_eq!(stats["rows"], 5);
    assert_eq!(stats["tokens"], tokens);
    assert_eq!(stats["scored_tokens"], scored);
    assert_eq!(stats["batch_tokens"], 20);
    assert_eq!(stats["warmup"], true);
    // Lengths 19, 16, 13, 10 and 7 with a budget of 20: the last two share a batch.
    assert_eq!(stats["batches"], 4);
    assert_eq!(stats["batch_ms"].as_array().unwrap().len(), 4);
    let rate = stats["tokens_per_s"].as_f64().unwrap();
    let timed_s = stats["timed_s"].as_f64().unwrap();
    assert!(
        (rate * timed_s - tokens as f64).abs() < 1e-6 * tokens as f64,
        "{stats}"
    );
    // The stage holds the warm-up and the timed pass; the timed pass holds every batch.
    let score_s = stats["score_s"].as_f64().unwrap();
    let warmup_s = stats["warmup_s"].as_f64().unwrap();
    assert!(warmup_s > 0.0 && score_s >= timed_s + warmup_s, "{stats}");
    let batch_ms: f64 = stats["batch_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!(batch_ms <= timed_s * 1e3, "{stats}");
    assert!(
        stats.get("peak_live_bytes").is_none(),
        "no GPU memory on the CPU"
    );
    // llama-tiny: 3 layers, 4 projections each; the profiled batch is the longest row.
    let profile = &stats["profile"];
    assert_eq!(profile["batch_tokens"], 19);
    assert_eq!(profile["ops"]["gemm"]["calls"], 12);
    assert_eq!(profile["ops"]["attention"]["calls"], 3);
    assert_eq!(profile["ops"]["lm_head_logprobs"]["calls"], 1);
    let share = profile["gemm_share_of_ops"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{profile}");
}

/// Runs a failing case: non-zero exit, stderr mentions every `needles`, no output files.
fn assert_fails(model: &Path, rows: Option<&[String]>, extra: &[&str], needles: &[&str]) {
    let dir = TempDir::new("bad");
    let data = match rows {
        Some(rows) => write_rows(&dir, rows),
        None => dir.join("does-not-exist.jsonl"),
    };
    let out = dir.join("scores.jsonl");
    let result = prefer_score(model, &data, &out, extra);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "expected failure for {needles:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr lacks {needle:?}:\n{stderr}"
        );
    }
    assert!(!out.exists(), "output written despite the error");
    assert!(
        !dir.join("scores.jsonl.tmp").exists(),
        "temp output left behind"
    );
}

fn good_row() -> String {
    r#"{"prompt": "안녕하세요", "completion": " 반갑습니다"}"#.to_string()
}

#[test]
fn bad_rows_are_named_by_file_and_line() {
    let model = fixtures_dir().join("models").join("llama-tiny");
    let m = &model;
    assert_fails(
        m,
        Some(&[good_row(), "".into(), "{not json".into()]),
        &[],
        &["rows.jsonl:3", "JSON"],
    );
    assert_fails(
        m,
        Some(&[good_row(), "[1, 2]".into()]),
        &[],
        &["rows.jsonl:2", "object"],
    );
    assert_fails(
        m,
        Some(&[r#"{"prompt": "x"}"#.into()]),
        &[],
        &["rows.jsonl:1", "completion"],
    );
    assert_fails(
        m,
        Some(&[
            good_row(),
            r#"{"prompt_ids": [2, "a"], "completion_ids": [1]}"#.into(),
        ]),
        &[],
        &["rows.jsonl:2", "prompt_ids[1]"],
    );
    // llama-tiny's vocab_size is 1008.
    assert_fails(
        m,
        Some(&[
            good_row(),
            good_row(),
            r#"{"prompt_ids": [2, 5], "completion_ids": [7, 1008]}"#.into(),
        ]),
        &[],
        &["rows.jsonl:3", "completion_ids[1] = 1008", "vocab"],
    );
    assert_fails(
        m,
        Some(&[r#"{"prompt_ids": [], "completion_ids": [7]}"#.into()]),
        &[],
        &["rows.jsonl:1", "prompt is empty"],
    );
    assert_fails(m, Some(&["".into()]), &[], &["no rows"]);
    assert_fails(m, None, &[], &["does-not-exist.jsonl"]);
}

#[test]
fn bad_options_fail_cleanly() {
    let model = fixtures_dir().join("models").join("llama-tiny");
    // Without the CUDA driver (CI) a GPU device is a clear error naming the device and the
    // missing library; with one, cuda:1 on a one-GPU machine names the device too.
    if !engine::cuda::Library::Driver.is_present() {
        assert_fails(
            &model,
            Some(&[good_row()]),
            &["--device", "cuda"],
            &["device cuda:0", "libcuda.so not found"],
        );
        assert_fails(
            &model,
            Some(&[good_row()]),
            &["--device", "cuda:1"],
            &["device cuda:1", "libcuda.so not found"],
        );
    }
    assert_fails(
        &model,
        Some(&[good_row()]),
        &["--device", "cuda:x"],
        &["cuda:x", "cuda:N"],
    );
    assert_fails(&model, Some(&[good_row()]), &["--device", "tpu"], &["tpu"]);
    assert_fails(
        &model,
        Some(&[good_row()]),
        &["--batch-tokens", "0"],
        &["batch-tokens"],
    );
}

#[test]
fn bad_model_directories_fail_cleanly() {
    let rows = [good_row()];
    let missing = TempDir::new("no-model").join("nothing-here");
    assert_fails(&missing, Some(&rows), &[], &["config.json"]);

    // Truncated weights.
    let dir = model_copy("llama-tiny", "truncated");
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&dir, Some(&rows), &[], &["model.safetensors", "truncated"]);

    // Corrupt header.
    let mut bytes = bytes.clone();
    bytes[8] = b'!';
    std::fs::write(&st, &bytes).unwrap();
    assert_fails(&dir, Some(&rows), &[], &["model.safetensors", "corrupt"]);

    // A config field missing, one contradicting the weights' shapes, an unsupported family.
    let edit = |tag: &str, f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let dir = model_copy("llama-tiny", tag);
        let path = dir.join("config.json");
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(cfg.as_object_mut().unwrap());
        std::fs::write(&path, cfg.to_string()).unwrap();
        dir
    };
    let dir = edit("nohidden", &|c| {
        c.remove("hidden_size");
    });
    assert_fails(
        &dir,
        Some(&rows),
        &[],
        &["config.json", "hidden_size", "missing"],
    );
    let dir = edit("shape", &|c| {
        c.insert("intermediate_size".into(), json!(64));
    });
    assert_fails(
        &dir,
        Some(&rows),
        &[],
        &["model.layers.0.mlp.gate_proj.weight", "[64, 80]"],
    );
    let dir = edit("family", &|c| {
        c.insert("model_type".into(), json!("gpt_neox"));
    });
    assert_fails(
        &dir,
        Some(&rows),
        &[],
        &["gpt_neox", "llama, mistral, qwen2, gemma, gemma2"],
    );
    let dir = edit("contradiction", &|c| {
        c.insert("num_key_value_heads".into(), json!(2));
    });
    assert_fails(&dir, Some(&rows), &[], &["num_key_value_heads", "divide"]);

    // A tensor of the wrong dtype: rewrite one as I32 with the same byte size.
    let dir = model_copy("llama-tiny", "dtype");
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let name = "model.norm.weight";
    let at = header.find(&format!("\"{name}\"")).unwrap();
    let dtype_at = at + header[at..].find("\"F32\"").unwrap();
    let mut patched = bytes.clone();
    patched[8 + dtype_at..8 + dtype_at + 5].copy_from_slice(b"\"I32\"");
    std::fs::write(&st, &patched).unwrap();
    assert_fails(&dir, Some(&rows), &[], &[name, "I32"]);

    // Text rows need a tokenizer.
    let dir = model_copy("llama-tiny", "notok");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert_fails(&dir, Some(&rows), &[], &["tokenizer.json"]);
}
