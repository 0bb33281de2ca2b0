//! `prefer sample` end to end: the built binary on the fixture models.
//!
//! Good runs: greedy output token for token equal to HF `generate` (the fixtures' greedy
//! references, given as `prompt_ids` rows), stop strings, n > 1 with seeds, templates over a
//! dataset, and resuming after a torn output file or a Ctrl-C giving exactly the rows of an
//! uninterrupted run. Bad input must exit non-zero with a message naming the problem, and
//! leave an existing output file as it was.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};
use testkit::{TempDir, f64s, prefer, run, u64s};

mod common;
use common::{
    INTERRUPT_ARGS, RESUME_ARGS, command, interrupt_after_rows, model_dir, prefer_sample,
    sample_then_pair, torn_after_three, write_interrupt_prompts, write_lines, write_resume_prompts,
};

fn read_rows(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Rows keyed by (id, sample_index).
fn by_key(rows: &[Value]) -> BTreeMap<(String, u64), Value> {
    rows.iter()
        .map(|r| {
            (
                (
                    r["id"].as_str().unwrap().to_string(),
                    r["sample_index"].as_u64().unwrap(),
                ),
                r.clone(),
            )
        })
        .collect()
}

fn greedy_reference(name: &str) -> Vec<Value> {
    let path = testkit::fixture("reference").join(format!("{name}.json"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["greedy"].as_array().unwrap().clone()
}

/// Greedy through the CLI equals HF generate, with small KV blocks and chunked prefill;
/// every output field is there and consistent.
#[test]
fn greedy_rows_match_hf_generate() {
    for name in ["llama-tiny", "gemma2-tiny", "mistral-tiny"] {
        let cases = greedy_reference(name);
        let dir = TempDir::new("greedy");
        let data = dir.join("prompts.jsonl");
        let rows: Vec<Value> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| json!({"case": i, "prompt_ids": c["prompt_ids"], "note": "메모"}))
            .collect();
        write_lines(&data, &rows);
        let out = dir.join("samples.jsonl");
        let mut flags = vec![
            "--temperature",
            "0",
            "--ignore-eos",
            "--max-tokens",
            "40",
            "--logprobs",
            "0",
            "--block-size",
            "4",
            "--max-num-batched-tokens",
            "9",
        ];
        // vLLM's flag is accepted (on the CPU there are no graphs to turn off).
        if name == "mistral-tiny" {
            flags.push("--enforce-eager");
        }
        let o = prefer_sample(&model_dir(name), &data, &out, &flags);
        o.ok();
        let got = by_key(&read_rows(&out));
        assert_eq!(got.len(), cases.len());
        for (i, case) in cases.iter().enumerate() {
            let row = &got[&(format!("prompts.jsonl:{i}"), 0)];
            assert_eq!(
                u64s(&row["token_ids"]),
                u64s(&case["output_ids"]),
                "{name} case {i}"
            );
            assert_eq!(row["case"], i);
            assert_eq!(row["note"], "메모");
            assert_eq!(row["prompt_ids"], case["prompt_ids"]);
            assert_eq!(row["prompt"], Value::Null);
            assert_eq!(row["finish_reason"], "length");
            assert_eq!(row["stop_reason"], Value::Null);
            let lps = f64s(&row["token_logprobs"]);
            assert_eq!(lps.len(), 40);
            assert!(lps.iter().all(|&x| x <= 0.0));
            let sum: f64 = lps.iter().sum();
            assert!((row["cumulative_logprob"].as_f64().unwrap() - sum).abs() < 1e-4);
            // Token prompts have no text to re-tokenize: no reference log-probs.
            assert!(row.get("ref_logps").is_none());
        }
    }
}

/// Text prompts over the fixture tokenizer: special tokens added (BOS), Korean text, and the
/// raw token log-probs equal `prefer score`'s of the same completion.
#[test]
fn text_prompts_get_bos_and_their_logprobs_agree_with_score() {
    let model = model_dir("qwen2-tiny");
    let dir = TempDir::new("text");
    let data = dir.join("rows.jsonl");
    write_lines(
        &data,
        &[
            json!({"id": "q1", "prompt": "###지시사항:\n한국의 수도는?\n\n###답변:\n"}),
            json!({"id": 7, "prompt": "Hello 🙂"}),
        ],
    );
    let out = dir.join("s.jsonl");
    prefer_sample(
        &model,
        &data,
        &out,
        &[
            "--temperature",
            "0.8",
            "--seed",
            "3",
            "--max-tokens",
            "12",
            "--logprobs",
            "0",
        ],
    )
    .ok();
    let rows = by_key(&read_rows(&out));
    let r = &rows[&("q1".to_string(), 0)];
    assert_eq!(r["prompt"], "###지시사항:\n한국의 수도는?\n\n###답변:\n");
    assert!(rows.contains_key(&("7".to_string(), 0)));

    // prefer score on (prompt_ids, token_ids) gives the same per-token log-probs.
    let ids_rows: Vec<Value> = rows
        .values()
        .map(|r| {
            let tok = tokenizers_encode(&model, r["prompt"].as_str().unwrap());
            assert_eq!(
                tok.len(),
                r["prompt_token_count"].as_u64().unwrap() as usize
            );
            assert_eq!(tok[0], 2, "BOS first");
            json!({"prompt_ids": tok, "completion_ids": r["token_ids"]})
        })
        .collect();
    let score_in = dir.join("score_in.jsonl");
    write_lines(&score_in, &ids_rows);
    let score_out = dir.join("score_out.jsonl");
    run(prefer!()
        .args(["score", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&score_in)
        .arg("--out")
        .arg(&score_out))
    .ok();
    for (scored, row) in read_rows(&score_out).iter().zip(rows.values()) {
        let a = scored["token_logps"].as_array().unwrap();
        let b = row["token_logprobs"].as_array().unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4,
                "{x} vs {y}"
            );
        }
    }
}

/// The fixture tokenizer's ids for `text` with special tokens (as `prefer sample` does).
fn tokenizers_encode(model: &Path, text: &str) -> Vec<u64> {
    let tok = model::Tokenizer::load(model).unwrap();
    tok.encode(text)
        .unwrap()
        .into_iter()
        .map(u64::from)
        .collect()
}

/// A stop string taken from the middle of an unstopped greedy output: the text is cut
/// before it (or kept with --include-stop-str), finish_reason "stop", stop_reason the string.
#[test]
fn stop_strings_cut_the_text() {
    let model = model_dir("gemma-tiny");
    let dir = TempDir::new("stop");
    let data = dir.join("rows.jsonl");
    write_lines(
        &data,
        &[
            json!({"prompt": "아래는 문제를 설명하는 지시사항입니다.\n\n###지시사항:\n보험료는?\n\n###답변:\n"}),
        ],
    );
    let base = ["--temperature", "0", "--ignore-eos", "--max-tokens", "40"];
    let out = dir.join("plain.jsonl");
    prefer_sample(&model, &data, &out, &base).ok();
    let plain = read_rows(&out)[0].clone();
    let text = plain["text"].as_str().unwrap().to_string();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    // A two-character stop string, first occurring at character 4 or later.
    let (at, stop) = (4..chars.len() - 2)
        .map(|i| (chars[i].0, format!("{}{}", chars[i].1, chars[i + 1].1)))
        .find(|(at, s)| {
            !s.contains('\u{FFFD}') && !s.trim().is_empty() && text.find(s.as_str()) == Some(*at)
        })
        .expect("a usable stop string in the greedy text");

    for include in [false, true] {
        let out = dir.join(format!("stop-{include}.jsonl"));
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--stop", "a-stop-that-never-comes", "--stop", &stop]);
        if include {
            args.push("--include-stop-str");
        }
        prefer_sample(&model, &data, &out, &args).ok();
        let row = &read_rows(&out)[0];
        let want = if include {
            format!("{}{stop}", &text[..at])
        } else {
            text[..at].to_string()
        };
        assert_eq!(row["text"], want.as_str(), "stop {stop:?}");
        assert_eq!(row["finish_reason"], "stop");
        assert_eq!(row["stop_reason"], stop.as_str());
        // Generation ended at the token that completed the stop string.
        let n = row["token_ids"].as_array().unwrap().len();
        assert!(n < 40);
        assert_eq!(u64s(&row["token_ids"]), u64s(&plain["token_ids"])[..n]);
    }
}

/// n > 1: sample_index 0..n per row; samples differ; the same seed reproduces every row,
/// another seed does not.
#[test]
fn n_samples_per_prompt_are_seeded() {
    let model = model_dir("llama-tiny");
    let dir = TempDir::new("n");
    let data = dir.join("rows.jsonl");
    write_lines(
        &data,
        &[json!({"prompt": "질문 하나"}), json!({"prompt": "질문 둘"})],
    );
    let run = |seed: &str, file: &str| {
        let out = dir.join(file);
        prefer_sample(
            &model,
            &data,
            &out,
            &[
                "--n",
                "3",
                "--temperature",
                "1.0",
                "--seed",
                seed,
                "--max-tokens",
                "10",
            ],
        )
        .ok();
        by_key(&read_rows(&out))
    };
    let a = run("11", "a.jsonl");
    assert_eq!(a.len(), 6);
    for row in 0..2 {
        let id = format!("rows.jsonl:{row}");
        let samples: Vec<Vec<u64>> = (0..3)
            .map(|k| u64s(&a[&(id.clone(), k)]["token_ids"]))
            .collect();
        assert!(
            samples[0] != samples[1] || samples[1] != samples[2],
            "{samples:?}"
        );
    }
    assert_eq!(a, run("11", "b.jsonl"));
    let c = run("12", "c.jsonl");
    assert!(a.keys().any(|k| a[k]["token_ids"] != c[k]["token_ids"]));
}

/// A dataset (CSV) with a column mapping and the Korean template: prompts rendered, ids
/// from the file name and row, source fields kept.
#[test]
fn dataset_rows_with_a_template() {
    let model = model_dir("llama-tiny");
    let dir = TempDir::new("dataset");
    let data = dir.join("train.csv");
    std::fs::write(
        &data,
        "질문,답변\n보험료는?,월 3만원입니다.\n해지 환급금은?,없습니다.\n",
    )
    .unwrap();
    let out = dir.join("s.jsonl");
    let spec = format!("{}:instruction=질문", data.display());
    run(&mut command(
        &model,
        &spec,
        &out,
        &["--template", "korean", "--max-tokens", "4"],
    ))
    .ok();
    let rows = by_key(&read_rows(&out));
    let r = &rows[&("train.csv:1".to_string(), 0)];
    assert_eq!(
        r["prompt"],
        "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n###지시사항:\n해지 환급금은?\n\n###답변:\n"
    );
    assert_eq!(r["답변"], "없습니다.");
    assert_eq!(r["질문"], "해지 환급금은?");

    // The model's chat template renders BOS itself: it is not added twice.
    let out = dir.join("chat.jsonl");
    run(&mut command(
        &model,
        &spec,
        &out,
        &["--template", "chat", "--max-tokens", "2"],
    ))
    .ok();
    let r = &by_key(&read_rows(&out))[&("train.csv:0".to_string(), 0)];
    let prompt = r["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with("<bos><start_of_turn>user\n보험료는?"),
        "{prompt}"
    );
    let with_special = tokenizers_encode(&model, prompt).len() as u64;
    assert_eq!(r["prompt_token_count"].as_u64().unwrap() + 1, with_special);
}

/// Sampled rows (not greedy) after a kill -9 left a torn last line: the re-run cuts it,
/// says so, and ends with exactly the rows of an uninterrupted run.
#[test]
fn resume_after_a_torn_output_equals_an_uninterrupted_run() {
    let model = model_dir("mistral-tiny");
    let dir = TempDir::new("resume");
    let data = dir.join("rows.jsonl");
    write_resume_prompts(&data);
    let args = RESUME_ARGS;
    let full = dir.join("full.jsonl");
    prefer_sample(&model, &data, &full, &args).ok();
    let full_text = std::fs::read_to_string(&full).unwrap();
    let lines: Vec<&str> = full_text.lines().collect();
    assert_eq!(lines.len(), 12);

    // Three complete lines and half of the fourth's bytes (maybe inside a character).
    let partial = dir.join("partial.jsonl");
    std::fs::write(&partial, torn_after_three(&lines)).unwrap();
    let stderr = prefer_sample(&model, &data, &partial, &args).ok().stderr;
    assert!(stderr.contains("incomplete last line"), "{stderr}");
    assert!(stderr.contains("3 of 12 samples already there"), "{stderr}");
    let resumed = std::fs::read_to_string(&partial).unwrap();
    assert!(resumed.starts_with(&format!("{}\n{}\n{}\n", lines[0], lines[1], lines[2])));
    assert_eq!(by_key(&read_rows(&partial)), by_key(&read_rows(&full)));
    assert_eq!(read_rows(&partial).len(), 12);

    // Once complete, a re-run does nothing.
    let stderr = prefer_sample(&model, &data, &partial, &args).ok().stderr;
    assert!(stderr.contains("nothing to do"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&partial).unwrap(), resumed);
}

/// Ctrl-C stops the run with what finished on disk (whole lines only); the same command
/// then finishes it with every row exactly once.
#[test]
fn ctrl_c_stops_cleanly_and_the_run_continues() {
    let model = model_dir("llama-tiny");
    let dir = TempDir::new("ctrlc");
    let data = dir.join("rows.jsonl");
    write_interrupt_prompts(&data);
    let out = dir.join("s.jsonl");
    let args = INTERRUPT_ARGS;
    // Interrupt once the first rows have finished.
    let stderr = interrupt_after_rows(&mut command(&model, &data, &out, &args), &out, 2).stderr;
    assert!(
        stderr.contains("interrupted") && stderr.contains("run the same command"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.ends_with('\n'));
    let first = read_rows(&out).len();
    assert!((2..24).contains(&first), "{first} rows after the interrupt");

    run(&mut command(&model, &data, &out, &args)).ok();
    let rows = read_rows(&out);
    assert_eq!(rows.len(), 24);
    assert_eq!(by_key(&rows).len(), 24);
    assert!(
        rows.iter()
            .all(|r| r["token_ids"].as_array().unwrap().len() == 400)
    );
}

/// Bad input: a clear message, a non-zero exit, and an existing output left as it was.
#[test]
fn bad_input_is_a_clear_error_and_loses_nothing() {
    let model = model_dir("llama-tiny");
    let dir = TempDir::new("bad");
    let out = dir.join("s.jsonl");
    let existing = "{\"id\":\"x:0\",\"sample_index\":0,\"text\":\"keep me\"}\n";
    std::fs::write(&out, existing).unwrap();
    let check = |spec: &str, extra: &[&str], expect: &[&str]| {
        let stderr = run(&mut command(&model, spec, &out, extra)).failed().stderr;
        for e in expect {
            assert!(stderr.contains(e), "expected {e:?} in:\n{stderr}");
        }
        assert_eq!(std::fs::read_to_string(&out).unwrap(), existing, "{spec}");
    };

    // A column mapping (used by the template) naming a missing column.
    let csv = dir.join("train.csv");
    std::fs::write(&csv, "question,answer\nq1,a1\n").unwrap();
    check(
        &format!("{}:instruction=질문", csv.display()),
        &["--template", "korean"],
        &["질문", "question, answer"],
    );
    // No instruction column at all.
    check(
        csv.to_str().unwrap(),
        &["--template", "korean"],
        &["instruction", "question, answer"],
    );

    // Empty prompts, named by line / row.
    let jsonl = dir.join("rows.jsonl");
    std::fs::write(&jsonl, "{\"prompt\": \"ok\"}\n{\"prompt\": \"\"}\n").unwrap();
    check(
        jsonl.to_str().unwrap(),
        &[],
        &["rows.jsonl:2", "prompt is empty"],
    );
    std::fs::write(&csv, "instruction,answer\nq1,a1\n,a2\n").unwrap();
    check(
        csv.to_str().unwrap(),
        &["--template", "alpaca"],
        &[
            "train.csv: line 3",
            "prompt is empty",
            "column 'instruction'",
        ],
    );
    std::fs::write(&jsonl, "{\"prompt_ids\": []}\n").unwrap();
    check(
        jsonl.to_str().unwrap(),
        &[],
        &["rows.jsonl:1", "prompt is empty"],
    );

    // Unreadable or malformed input.
    check("/nonexistent/rows.jsonl", &[], &["/nonexistent/rows.jsonl"]);
    check(
        "/nonexistent/rows.parquet",
        &["--template", "korean"],
        &["/nonexistent/rows.parquet"],
    );
    std::fs::write(&jsonl, "{\"prompt\": \"ok\"}\n{not json\n").unwrap();
    check(
        jsonl.to_str().unwrap(),
        &[],
        &["rows.jsonl:2", "not valid JSON"],
    );
    std::fs::write(&jsonl, "{\"instruction\": \"q\"}\n").unwrap();
    check(
        jsonl.to_str().unwrap(),
        &[],
        &["rows.jsonl:1", "--template"],
    );

    // Prompts longer than the context.
    std::fs::write(
        &jsonl,
        "{\"prompt_ids\": [2, 5]}\n{\"prompt_ids\": [2, 5, 6, 7, 8, 9]}\n",
    )
    .unwrap();
    check(
        jsonl.to_str().unwrap(),
        &["--max-model-len", "4"],
        &[
            "1 prompts are longer than the model's context of 4",
            "rows.jsonl:2 (6 tokens)",
        ],
    );
    // Token ids outside the vocabulary; duplicate ids.
    std::fs::write(&jsonl, "{\"prompt_ids\": [2, 5000]}\n").unwrap();
    check(
        jsonl.to_str().unwrap(),
        &[],
        &["rows.jsonl:1", "5000", "vocabulary"],
    );
    std::fs::write(
        &jsonl,
        "{\"id\": 1, \"prompt\": \"a\"}\n{\"id\": \"1\", \"prompt\": \"b\"}\n",
    )
    .unwrap();
    check(
        jsonl.to_str().unwrap(),
        &[],
        &["rows.jsonl:2", "rows.jsonl:1", "unique"],
    );

    // Bad settings, CUDA without a GPU, an unknown output format.
    std::fs::write(&jsonl, "{\"prompt\": \"ok\"}\n").unwrap();
    check(jsonl.to_str().unwrap(), &["--top-p", "0"], &["top_p"]);
    check(
        jsonl.to_str().unwrap(),
        &["--temperature", "0", "--n", "2"],
        &["greedy"],
    );
    // Only meaningful where no CUDA driver is installed (CI, this machine): the error names
    // the device and says how to run without one.
    if !engine::cuda::Library::Driver.is_present() {
        check(
            jsonl.to_str().unwrap(),
            &["--device", "cuda"],
            &["cuda", "--device cpu"],
        );
    }
    // An output that is neither .jsonl nor .parquet (tests/sample_parquet.rs has parquet).
    let text_out = dir.join("s.txt");
    let stderr = prefer_sample(&model, &jsonl, &text_out, &[])
        .failed()
        .stderr;
    assert!(
        stderr.contains("--out") && stderr.contains("s.txt: expected a .jsonl file"),
        "{stderr}"
    );
    assert!(!text_out.exists());

    // An output file that is not ours is refused and left alone.
    let foreign = dir.join("foreign.jsonl");
    std::fs::write(&foreign, "{\"a\": 1}\n").unwrap();
    let stderr = prefer_sample(&model, &jsonl, &foreign, &[]).failed().stderr;
    assert!(
        stderr.contains("foreign.jsonl") && stderr.contains("line 1"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "{\"a\": 1}\n");
}

/// The low-temperature clamp is announced.
#[test]
fn the_temperature_clamp_is_a_warning() {
    let model = model_dir("llama-tiny");
    let dir = TempDir::new("clamp");
    let data = dir.join("rows.jsonl");
    write_lines(&data, &[json!({"prompt": "a"})]);
    let stderr = prefer_sample(
        &model,
        &data,
        &dir.join("s.jsonl"),
        &["--temperature", "0.001", "--max-tokens", "2"],
    )
    .ok()
    .stderr;
    assert!(
        stderr.contains("temperature 0.001") && stderr.contains("raised to 0.01"),
        "{stderr}"
    );
}

/// The contract with `prefer pairs`: samples of a gold file without ids join by id (the
/// fallback `FILE:ROW` both commands build) and become the rejected answers.
#[test]
fn samples_join_in_prefer_pairs_by_id() {
    let (_dir, samples, pairs) = sample_then_pair("pairs", "samples.jsonl");
    let sampled = by_key(&read_rows(&samples));
    assert_eq!(pairs.len(), 3);
    for (row, pair) in pairs.iter().enumerate() {
        let sample = &sampled[&(format!("train.csv:{row}"), 0)];
        assert_eq!(pair["prompt"], sample["prompt"]);
        assert_eq!(pair["rejected"], sample["text"]);
        assert_eq!(pair["chosen"], sample["output"]);
    }
}
