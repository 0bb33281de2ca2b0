//! `prefer pairs` end to end: fixtures written by pyarrow / openpyxl / datasets
//! (tools/gen_data_fixtures.py), the expected pairs computed independently in Python, a
//! round trip through `datasets.load_dataset`, and bad inputs.

use std::path::{Path, PathBuf};

use serde_json::Value;
use testkit::{Ran, TempDir, prefer, python_with_datasets, run, run_python};

fn fixtures() -> PathBuf {
    testkit::fixture("data")
}

/// `prefer pairs --gold G… --samples SAMPLES --out OUT EXTRA…`.
fn pairs(golds: &[&str], samples: &Path, out: &Path, extra: &[&str]) -> Ran {
    let mut cmd = prefer!();
    cmd.arg("pairs");
    for gold in golds {
        cmd.args(["--gold", gold]);
    }
    cmd.arg("--samples")
        .arg(samples)
        .arg("--out")
        .arg(out)
        .args(extra);
    run(&mut cmd)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

/// (prompt, chosen, rejected) rows of a written split, read back with our own parquet reader.
fn read_split(folder: &Path, split: &str, ext: &str) -> Vec<[String; 3]> {
    let path = folder.join(format!("data/{split}-00000-of-00001.{ext}"));
    let table = data::ingest::open(&data::ingest::SourceSpec::plain(&path), None).unwrap();
    table
        .rows
        .iter()
        .map(|r| {
            let t = |i: usize| match &r[i] {
                data::cell::Cell::Text(s) => s.clone(),
                other => panic!("not text: {other:?}"),
            };
            [t(0), t(1), t(2)]
        })
        .collect()
}

fn expected_split(split: &str) -> Vec<[String; 3]> {
    expected()["pairs"][split]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap().to_string();
            [s("prompt"), s("chosen"), s("rejected")]
        })
        .collect()
}

fn reference_run(out: &Path, extra: &[&str]) -> Ran {
    let f = fixtures();
    let gold_train = format!("train={}", f.join("train.parquet").display());
    let gold_xlsx = format!(
        "train={}:instruction=질문,output=답변",
        f.join("extra.xlsx").display()
    );
    let gold_valid = format!("validation={}", f.join("validation.parquet").display());
    pairs(
        &[&gold_train, &gold_xlsx, &gold_valid],
        &f.join("samples.jsonl"),
        out,
        extra,
    )
}

#[test]
fn reference_workflow_sources_give_the_expected_pairs_and_report() {
    let dir = TempDir::new("reference");
    let out = dir.join("pairs");
    let stdout = reference_run(&out, &[]).ok().stdout;
    // Prompts equal the reference workflow's f-string byte for byte (rendered in Python).
    assert_eq!(
        read_split(&out, "train", "parquet"),
        expected_split("train")
    );
    assert_eq!(
        read_split(&out, "validation", "parquet"),
        expected_split("validation")
    );
    // Each filter counted once; conversions and drops per source.
    assert!(stdout.contains("1 truncated (finish_reason length), 1 empty rejected, 1 rejected identical to chosen, 1 duplicate (prompt, chosen, rejected), 8 kept"), "{stdout}");
    assert!(stdout.contains("extra.xlsx[SFT]: 5 rows read, 4 kept; 1 dropped (empty output); 2 output cells converted from numbers"), "{stdout}");
    assert!(
        stdout.contains("train.parquet: 6 rows read, 4 kept; 2 dropped (empty output)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("samples: 15 read, 1 matched no gold row"),
        "{stdout}"
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("  - name: train\n    num_bytes: ") && card.contains("    num_examples: 8\n"),
        "{card}"
    );
    assert!(card.contains("## Filter report"), "{card}");
    assert_eq!(dir.entries(), vec!["pairs"], "no temp folder left");

    // Parquet rows carry ids, xlsx rows get prefer sample's FILE:ROW ids: every join key
    // finds the same pairs.
    for join in ["id", "prompt"] {
        reference_run(&out, &["--overwrite", "--join", join]).ok();
        assert_eq!(
            read_split(&out, "train", "parquet"),
            expected_split("train"),
            "--join {join}"
        );
    }

    // Refuses to overwrite, then overwrites on request.
    let again = reference_run(&out, &[]).failed();
    assert!(
        again.stderr.contains("already exists (pass --overwrite"),
        "{}",
        again.stderr
    );
    reference_run(
        &out,
        &["--overwrite", "--schema", "reference", "--format", "jsonl"],
    )
    .ok();
    let line = std::fs::read_to_string(out.join("data/train-00000-of-00001.jsonl")).unwrap();
    let first: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(
        first["question"].as_str().unwrap(),
        expected_split("train")[0][0]
    );
    assert!(
        line.lines().next().unwrap().starts_with("{\"question\":"),
        "schema order kept"
    );
    assert!(
        !out.join("data/train-00000-of-00001.parquet").exists(),
        "old output replaced whole"
    );
    assert_eq!(dir.entries(), vec!["pairs"]);
}

#[test]
fn every_ingest_format_reads_the_same_rows() {
    let f = fixtures();
    let want: Vec<[String; 3]> = expected_split("train").into_iter().take(4).collect();
    let specs = [
        format!("train={}", f.join("gold.csv").display()),
        format!("train={}", f.join("gold.tsv").display()),
        format!("train={}", f.join("gold.json").display()),
        format!("train={}", f.join("gold.jsonl").display()),
        format!("train={}", f.join("disk").display()),
        format!("train={}:split=train", f.join("disk").display()),
        format!("train={}", f.join("disk/train").display()),
    ];
    for (i, spec) in specs.iter().enumerate() {
        let dir = TempDir::new(&format!("formats{i}"));
        let out = dir.join("o");
        pairs(&[spec], &f.join("samples.jsonl"), &out, &[]).ok();
        assert_eq!(read_split(&out, "train", "parquet"), want, "{spec}");
    }
}

#[test]
fn xlsx_second_sheet_and_mapping() {
    let f = fixtures();
    let dir = TempDir::new("sheet");
    let samples = dir.join("s.jsonl");
    let prompt = data::template::korean("추가 시트 질문입니다");
    std::fs::write(
        &samples,
        format!(
            "{}\n",
            serde_json::json!({"prompt": prompt, "response": "모델 답"})
        ),
    )
    .unwrap();
    let spec = format!(
        "{}:sheet=추가,output=response",
        f.join("extra.xlsx").display()
    );
    let out = dir.join("o");
    pairs(&[&spec], &samples, &out, &[]).ok();
    assert_eq!(
        read_split(&out, "train", "parquet"),
        vec![[
            prompt,
            "추가 시트 답변입니다".to_string(),
            "모델 답".to_string()
        ]]
    );
}

/// Runs `prefer pairs` on one bad gold file and checks: exit ≠ 0, the message, no output.
fn assert_bad_gold(name: &str, bytes: &[u8], spec_suffix: &str, expect: &[&str]) {
    let dir = TempDir::new(&format!("bad-{name}"));
    let gold = dir.join(name);
    std::fs::write(&gold, bytes).unwrap();
    let samples = fixtures().join("samples.jsonl");
    let spec = format!("{}{spec_suffix}", gold.display());
    let out = dir.join("o");
    let stderr = pairs(&[&spec], &samples, &out, &[]).failed().stderr;
    for e in expect {
        assert!(stderr.contains(e), "{name}: expected {e:?} in {stderr}");
    }
    assert!(!out.exists(), "{name}: no output");
    assert_eq!(
        dir.entries(),
        vec![name.to_string()],
        "{name}: no temp output"
    );
}

#[test]
fn bad_inputs_fail_clearly_without_output() {
    assert_bad_gold(
        "malformed.jsonl",
        "{\"instruction\":\"가\",\"output\":\"나\"}\n{\"instruction\": \"다\", \"output\" \"라\"}\n".as_bytes(),
        "",
        &["malformed.jsonl: line 2, column", "malformed JSON"],
    );
    assert_bad_gold(
        "cols.jsonl",
        "{\"질문\":\"가\",\"답변\":\"나\"}\n".as_bytes(),
        ":instruction=질문,output=response",
        &[
            "no column 'response' (mapped to output)",
            "columns are: 질문, 답변",
        ],
    );
    assert_bad_gold(
        "mixed.jsonl",
        "{\"instruction\":\"가\",\"output\":\"나\"}\n{\"instruction\":\"다\",\"output\":[\"라\"]}\n".as_bytes(),
        "",
        &["mixed.jsonl: line 2, column 'output': expected text, found a list"],
    );
    assert_bad_gold(
        "utf8.csv",
        b"instruction,output\n\xea\xb0\x80,ok\nbad,\xff\xfe\n",
        "",
        &["utf8.csv: line 3, column 2 (output): invalid UTF-8"],
    );
    assert_bad_gold("empty.jsonl", b"", "", &["empty.jsonl: file is empty"]);
    assert_bad_gold(
        "header.csv",
        b"instruction,output\n",
        "",
        &["header.csv: no data rows"],
    );
    let xlsx = std::fs::read(fixtures().join("extra.xlsx")).unwrap();
    assert_bad_gold(
        "sheet.xlsx",
        &xlsx,
        ":sheet=없는시트",
        &["no sheet '없는시트'; sheets are: SFT, 추가"],
    );
}

#[test]
fn strict_mode_refuses_numeric_cells() {
    let dir = TempDir::new("strict");
    let spec = format!(
        "{}:instruction=질문,output=답변",
        fixtures().join("extra.xlsx").display()
    );
    let samples = fixtures().join("samples.jsonl");
    let out = dir.join("o");
    let run = pairs(&[&spec], &samples, &out, &["--strict"]).failed();
    assert!(
        run.stderr
            .contains("extra.xlsx[SFT]: row 5, column '답변': expected text, found the number 42"),
        "{}",
        run.stderr
    );
    assert!(!out.exists());
}

#[test]
fn token_budget_ref_logps_holdout_and_chat_template() {
    let dir = TempDir::new("budget");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("tokenizer.json"),
        data::tokens::word_level_tokenizer_json(&["a"]),
    )
    .unwrap();
    std::fs::write(
        model.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"}"#,
    )
    .unwrap();
    let gold = dir.join("gold.jsonl");
    let samples = dir.join("samples.jsonl");
    let mut g = String::new();
    let mut s = String::new();
    for i in 0..20 {
        let instruction = format!("질문 {i}");
        g.push_str(&format!(
            "{}\n",
            serde_json::json!({"instruction": instruction, "output": "짧은 답"})
        ));
        let prompt = format!("<s><user>{instruction}\n<assistant>");
        // Word-level tokens: the prompt is <s> + "< user > 질문 N < assistant >" = 9 (the BOS the
        // tokenizer adds is not doubled). Rows 0..4 reject with 12 words: 9 + 12 + EOS = 22 > 20;
        // the others with 3 words: 9 + 3 + 1 = 13.
        let response = if i < 5 {
            "w ".repeat(12)
        } else {
            "긴 답변입니다 다른".to_string()
        };
        s.push_str(&format!("{}\n", serde_json::json!({"prompt": prompt, "response": response, "finish_reason": "stop", "ref_logps": -(i as f64) - 0.5})));
    }
    std::fs::write(&gold, g).unwrap();
    std::fs::write(&samples, s).unwrap();
    let out = dir.join("o");
    let stdout = pairs(
        &[gold.to_str().unwrap()],
        &samples,
        &out,
        &[
            "--template",
            "chat",
            "--tokenizer",
            model.to_str().unwrap(),
            "--max-length",
            "20",
            "--holdout",
            "validation=0.2",
            "--seed",
            "3",
        ],
    )
    .ok()
    .stdout;
    assert!(
        stdout.contains("5 over the token budget, 15 kept"),
        "{stdout}"
    );
    assert!(
        stdout.contains("holdout: 3 pairs moved from train to validation"),
        "{stdout}"
    );
    let table = data::ingest::open(
        &data::ingest::SourceSpec::plain(out.join("data/train-00000-of-00001.parquet")),
        None,
    )
    .unwrap();
    assert_eq!(
        table.columns,
        vec!["prompt", "chosen", "rejected", "ref_rejected_logps"]
    );
    assert_eq!(table.rows.len(), 12);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("  - name: ref_rejected_logps\n    dtype: float64"),
        "{card}"
    );
    assert!(
        card.contains("  - name: validation\n    num_bytes: ")
            && card.contains("num_examples: 3\n"),
        "{card}"
    );
}

// ---------------------------------------------------------------- python round trips

const LOAD: &str = r#"
import sys, json, datasets
d = datasets.load_dataset(sys.argv[1])
out = {name: {"columns": split.column_names, "rows": split.num_rows, "first": split[0]} for name, split in d.items()}
sys.stdout.write(json.dumps(out, ensure_ascii=False))
"#;

#[test]
fn datasets_load_dataset_reads_our_folder() {
    let Some(python) = python_with_datasets("the datasets round trip") else {
        return;
    };
    for format in ["parquet", "jsonl"] {
        let dir = TempDir::new(&format!("roundtrip-{format}"));
        let out = dir.join("pairs");
        reference_run(&out, &["--format", format]).ok();
        let got: Value =
            serde_json::from_str(&run_python(&python, LOAD, &[out.to_str().unwrap()])).unwrap();
        let splits: Vec<&String> = got.as_object().unwrap().keys().collect();
        assert_eq!(splits, vec!["train", "validation"], "{format}");
        assert_eq!(got["train"]["rows"], 8);
        assert_eq!(got["validation"]["rows"], 2);
        assert_eq!(
            got["train"]["columns"],
            serde_json::json!(["prompt", "chosen", "rejected"])
        );
        let want = &expected_split("train")[0];
        // Korean text byte for byte (JSON carries it unescaped: ensure_ascii=False).
        assert_eq!(
            got["train"]["first"]["prompt"].as_str().unwrap().as_bytes(),
            want[0].as_bytes()
        );
        assert_eq!(got["train"]["first"]["chosen"].as_str().unwrap(), want[1]);
    }
}

const SAVE: &str = r#"
import sys, json, datasets
rows = json.loads(sys.argv[2])
datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows[:1])}).save_to_disk(sys.argv[1])
"#;

#[test]
fn save_to_disk_output_is_read_by_prefer() {
    let Some(python) = python_with_datasets("the datasets round trip") else {
        return;
    };
    let dir = TempDir::new("save-to-disk");
    let rows = serde_json::json!([
        {"질문": "첫 질문\n\"따옴표\"", "답변": "첫 답", "n": 1},
        {"질문": "둘째 질문", "답변": "둘째 답", "n": 2}
    ]);
    let disk = dir.join("disk");
    run_python(&python, SAVE, &[disk.to_str().unwrap(), &rows.to_string()]);
    let samples = dir.join("s.jsonl");
    let mut s = String::new();
    for q in ["첫 질문\n\"따옴표\"", "둘째 질문"] {
        s.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": data::template::korean(q), "response": "모델"})
        ));
    }
    std::fs::write(&samples, s).unwrap();
    let out = dir.join("o");
    let train = format!("train={}:instruction=질문,output=답변", disk.display());
    let valid = format!("validation={}:instruction=질문,output=답변", disk.display());
    pairs(&[&train, &valid], &samples, &out, &[]).ok();
    let train = read_split(&out, "train", "parquet");
    assert_eq!(train.len(), 2);
    assert_eq!(train[0][0], data::template::korean("첫 질문\n\"따옴표\""));
    assert_eq!(train[0][1], "첫 답");
    assert_eq!(read_split(&out, "validation", "parquet").len(), 1);
}

/// `prefer score --add-eos` output feeds `prefer pairs --chosen-logps`: each pair carries the
/// summed log-prob that score wrote for its (prompt, chosen).
#[test]
fn chosen_logps_come_from_prefer_score_output() {
    let dir = TempDir::new("chosen-logps");
    let template = "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n###지시사항:\n{}\n\n###답변:\n";
    let rows = [
        ("보험료는 언제 내나요?", "매달 말일에 냅니다."),
        ("해지 환급금이란?", "해지할 때 돌려받는 돈입니다."),
    ];
    let (mut gold, mut samples, mut to_score) = (String::new(), String::new(), String::new());
    for (instruction, output) in rows {
        let prompt = template.replace("{}", instruction);
        gold.push_str(&format!(
            "{}\n",
            serde_json::json!({"instruction": instruction, "output": output})
        ));
        samples.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": prompt, "text": "모르겠습니다.", "finish_reason": "stop"})
        ));
        to_score.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": prompt, "completion": output})
        ));
    }
    for (name, body) in [
        ("gold.jsonl", &gold),
        ("samples.jsonl", &samples),
        ("score-in.jsonl", &to_score),
    ] {
        std::fs::write(dir.join(name), body).unwrap();
    }
    let model = testkit::fixture("models/llama-tiny");
    let scores = dir.join("scores.jsonl");
    run(prefer!()
        .args(["score", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(dir.join("score-in.jsonl"))
        .arg("--out")
        .arg(&scores)
        .arg("--add-eos"))
    .ok();
    let want: Vec<f64> = std::fs::read_to_string(&scores)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["logp"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert!(want.iter().all(|v| v.is_finite() && *v < 0.0), "{want:?}");

    let out = dir.join("pairs");
    pairs(
        &[dir.join("gold.jsonl").to_str().unwrap()],
        &dir.join("samples.jsonl"),
        &out,
        &[
            "--chosen-logps",
            scores.to_str().unwrap(),
            "--format",
            "jsonl",
        ],
    )
    .ok();
    let split = std::fs::read_dir(out.join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".jsonl"))
        .expect("a jsonl split");
    let got: Vec<f64> = std::fs::read_to_string(split)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["ref_chosen_logps"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(got, want);
}
