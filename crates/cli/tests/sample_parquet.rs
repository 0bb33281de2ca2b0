//! `prefer sample --out FILE.parquet` end to end: the parquet file holds the rows of the
//! same run written as JSON Lines, typed (read back by `datasets.load_dataset("parquet")`,
//! by the data ingest and by `prefer pairs`); the JSON Lines sidecar resumes after a torn
//! write or a Ctrl-C and disappears once the parquet file is complete; a finished, a foreign
//! or an incomplete target is never rewritten.

use std::collections::BTreeMap;
use std::path::Path;

use data::cell::Cell;
use serde_json::{Map, Value, json};
use testkit::{TempDir, python_with_datasets, run, run_python, u64s};

mod common;
use common::{
    INTERRUPT_ARGS, RESUME_ARGS, command, interrupt_after_rows, model_dir, prefer_sample,
    sample_then_pair, torn_after_three, write_interrupt_prompts, write_lines, write_resume_prompts,
};

fn read_rows(path: &Path) -> Vec<Map<String, Value>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn key_of(row: &Map<String, Value>) -> (String, u64) {
    (
        row["id"].as_str().unwrap().to_string(),
        row["sample_index"].as_u64().unwrap(),
    )
}

fn by_key(rows: Vec<Map<String, Value>>) -> BTreeMap<(String, u64), Map<String, Value>> {
    rows.into_iter().map(|r| (key_of(&r), r)).collect()
}

/// Rows of a parquet file through the data ingest (the reader `prefer pairs` uses), keyed
/// by (id, sample_index): the named scalar columns as cells.
fn ingest_rows(path: &Path, columns: &[&str]) -> BTreeMap<(String, u64), Vec<Cell>> {
    let table = data::ingest::open(&data::ingest::SourceSpec::plain(path), None).unwrap();
    let at = |name: &str| table.columns.iter().position(|c| c == name).unwrap();
    let (id, index) = (at("id"), at("sample_index"));
    table
        .rows
        .iter()
        .map(|r| {
            let (Cell::Text(id), Cell::Int(k)) = (&r[id], &r[index]) else {
                panic!("bad key cells {:?} {:?}", r[id], r[index]);
            };
            let cells = columns.iter().map(|c| r[at(c)].clone()).collect();
            ((id.clone(), *k as u64), cells)
        })
        .collect()
}

fn json_cell(v: Option<&Value>) -> Cell {
    match v {
        None | Some(Value::Null) => Cell::Null,
        Some(Value::String(s)) => Cell::Text(s.clone()),
        Some(Value::Number(n)) if n.is_i64() => Cell::Int(n.as_i64().unwrap()),
        Some(Value::Number(n)) => Cell::Float(n.as_f64().unwrap()),
        Some(other) => panic!("not a scalar: {other}"),
    }
}

// ---------------------------------------------------------------- python

/// `datasets.load_dataset("parquet", data_files=FILE)`: its features (each written as
/// `int32`, `list<…>`, `struct<name: …>`) in column order, and its rows.
const LOAD_PARQUET: &str = r#"
import sys, json, datasets

def describe(f):
    if isinstance(f, dict):
        return "struct<" + ", ".join(f"{k}: {describe(v)}" for k, v in f.items()) + ">"
    if isinstance(f, datasets.Value):
        return f.dtype
    inner = getattr(f, "feature", None)
    if inner is not None:
        return "list<" + describe(inner) + ">"
    return repr(f)

d = datasets.load_dataset("parquet", data_files=sys.argv[1], split="train")
out = {
    "features": [[name, describe(f)] for name, f in d.features.items()],
    "rows": d.to_list(),
}
sys.stdout.write(json.dumps(out, ensure_ascii=False))
"#;

fn load_with_datasets(python: &str, path: &Path) -> Value {
    serde_json::from_str(&run_python(python, LOAD_PARQUET, &[path.to_str().unwrap()])).unwrap()
}

// ---------------------------------------------------------------- the rows

/// A two-character stop string of `text`, first found at character 2 or later, that none
/// of `avoid` contains.
fn stop_string_in(text: &str, avoid: &[&str]) -> Option<String> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    (2..chars.len().saturating_sub(2))
        .map(|i| (chars[i].0, format!("{}{}", chars[i].1, chars[i + 1].1)))
        .find(|(at, s)| {
            !s.contains('\u{FFFD}')
                && !s.trim().is_empty()
                && text.find(s.as_str()) == Some(*at)
                && avoid.iter().all(|a| !a.contains(s.as_str()))
        })
        .map(|(_, s)| s)
}

/// What the parquet file holds for a JSON Lines value of `column` (docs/sample.md): the
/// stop reason and top log-probs reshaped, the inconsistent `mix` column as JSON text,
/// missing keys and struct fields as null.
fn expected_cell(column: &str, v: Option<&Value>) -> Value {
    let Some(v) = v else {
        return Value::Null;
    };
    match (column, v) {
        ("stop_reason", Value::Number(n)) => json!({"token_id": n, "string": null}),
        ("stop_reason", Value::String(s)) => json!({"token_id": null, "string": s}),
        ("top_logprobs", Value::Array(steps)) => Value::Array(
            steps
                .iter()
                .map(|step| {
                    Value::Array(
                        step.as_array()
                            .unwrap()
                            .iter()
                            .map(|p| json!({"id": p[0], "logprob": p[1]}))
                            .collect(),
                    )
                })
                .collect(),
        ),
        ("mix", Value::String(_)) => v.clone(),
        ("mix", other) => Value::String(other.to_string()),
        ("obj", Value::Object(m)) => json!({"k": m.get("k"), "j": m.get("j")}),
        _ => v.clone(),
    }
}

/// Equal JSON, numbers compared as f64 — or as f32 under a float32 column, since
/// `datasets` hands out the f64 of the stored f32 and the JSON Lines its shortest digits.
fn same(a: &Value, b: &Value, f32s: bool) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            if f32s { x as f32 == y as f32 } else { x == y }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y, f32s))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same(v, w, f32s || k == "logprob")))
        }
        _ => a == b,
    }
}

/// Greedy rows with every kind of stop reason (a stop token id, a stop string, none) and
/// source fields of every kind, written as JSON Lines and as parquet by the same command:
/// `datasets` loads the parquet file with the documented features and exactly the JSON
/// Lines' values; the data ingest and `prefer pairs`' samples reader read it too.
#[test]
fn parquet_holds_the_jsonl_rows_with_typed_columns() {
    let model = model_dir("gemma-tiny");
    let dir = TempDir::new("parquet-typed");
    let data = dir.join("rows.jsonl");
    let question = "아래는 문제를 설명하는 지시사항입니다.\n\n###지시사항:\n";
    write_lines(
        &data,
        &[
            json!({"prompt": format!("{question}보험료는?\n\n###답변:\n"), "n": 1, "tag": "a",
                   "mix": 1, "obj": {"k": 1}, "flags": [true]}),
            json!({"prompt": format!("{question}해지 환급금은?\n\n###답변:\n"), "n": 2.5,
                   "tag": "b", "mix": "둘", "obj": {"k": 2, "j": true}, "flags": []}),
            json!({"prompt_ids": [2, 10, 20, 30], "max_tokens": 2, "tag": "c", "mix": [1],
                   "obj": null}),
        ],
    );
    let base = [
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-tokens",
        "30",
        "--logprobs",
        "2",
    ];
    // An unstopped run shows what each row generates.
    let plain = dir.join("plain.jsonl");
    prefer_sample(&model, &data, &plain, &base).ok();
    let plain = by_key(read_rows(&plain));
    let row = |r: usize| &plain[&(format!("rows.jsonl:{r}"), 0)];
    let text = |r: usize| row(r)["text"].as_str().unwrap().to_string();
    let ids = |r: usize| u64s(&row(r)["token_ids"]);
    // Row 0 stops on a token id rows 1 and 2 never generate; row 1 on a string row 0 never
    // writes; row 2 runs out of max_tokens.
    let stop_token = ids(0)[1..]
        .iter()
        .copied()
        .find(|t| !ids(1).contains(t) && !ids(2).contains(t))
        .expect("a token of row 0 only");
    let stop_string = stop_string_in(&text(1), &[&text(0), &text(2)]).expect("a stop string");
    let token_arg = stop_token.to_string();
    let mut args = base.to_vec();
    args.extend(["--stop-token-ids", &token_arg, "--stop", &stop_string]);

    let jsonl = dir.join("s.jsonl");
    prefer_sample(&model, &data, &jsonl, &args).ok();
    let parquet = dir.join("s.parquet");
    let stderr = prefer_sample(&model, &data, &parquet, &args).ok().stderr;
    assert!(
        stderr.contains("wrote 3 rows") && stderr.contains("s.parquet"),
        "{stderr}"
    );
    assert_eq!(
        dir.entries(),
        ["plain.jsonl", "rows.jsonl", "s.jsonl", "s.parquet"],
        "no sidecar or temporary file is left"
    );
    let lines = read_rows(&jsonl);
    let reasons: Vec<&Value> = lines.iter().map(|r| &r["stop_reason"]).collect();
    assert!(
        reasons.iter().any(|r| r.is_u64())
            && reasons.iter().any(|r| r.is_string())
            && reasons.iter().any(|r| r.is_null()),
        "every kind of stop reason: {reasons:?}"
    );
    let jsonl_rows = by_key(lines.clone());

    // The data ingest reads the scalar columns with the JSON Lines' values.
    let scalars = [
        "prompt",
        "prompt_token_count",
        "text",
        "finish_reason",
        "cumulative_logprob",
        "tag",
        "max_tokens",
    ];
    let ingested = ingest_rows(&parquet, &scalars);
    assert_eq!(ingested.len(), 3);
    for (key, cells) in &ingested {
        let want: Vec<Cell> = scalars
            .iter()
            .map(|c| json_cell(jsonl_rows[key].get(*c)))
            .collect();
        assert_eq!(cells, &want, "{key:?}");
    }
    // So does `prefer pairs`' samples reader.
    let samples = data::samples::read_samples(&parquet).unwrap();
    assert_eq!(samples.len(), 3);
    for s in &samples {
        let line = jsonl_rows
            .values()
            .find(|r| r["id"] == s.id.as_deref().unwrap())
            .unwrap();
        assert_eq!(s.response, line["text"].as_str().unwrap());
        assert_eq!(s.prompt.as_deref(), line["prompt"].as_str());
        assert_eq!(s.finish_reason.as_deref(), line["finish_reason"].as_str());
    }

    let Some(python) = python_with_datasets("the datasets check") else {
        return;
    };
    let loaded = load_with_datasets(&python, &parquet);
    let features: Vec<(String, String)> = loaded["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f[0].as_str().unwrap().to_string(),
                f[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let types: BTreeMap<&str, &str> = features
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let mut want: BTreeMap<&str, &str> = [
        ("id", "string"),
        ("sample_index", "int64"),
        ("prompt", "string"),
        ("prompt_ids", "list<int64>"),
        ("prompt_token_count", "int64"),
        ("text", "string"),
        ("token_ids", "list<int32>"),
        ("finish_reason", "string"),
        ("stop_reason", "struct<token_id: int32, string: string>"),
        ("cumulative_logprob", "float64"),
        ("token_logprobs", "list<float32>"),
        (
            "top_logprobs",
            "list<list<struct<id: int32, logprob: float32>>>",
        ),
        ("n", "float64"),
        ("tag", "string"),
        ("mix", "string"),
        ("obj", "struct<k: int64, j: bool>"),
        ("flags", "list<bool>"),
        ("max_tokens", "int64"),
    ]
    .into_iter()
    .collect();
    if lines.iter().any(|r| r.contains_key("ref_logps")) {
        want.insert("ref_logps", "float64");
    }
    assert_eq!(types, want);
    // Column order: every JSON Lines row's keys in the same order as the columns.
    let position = |name: &str| features.iter().position(|(n, _)| n == name).unwrap();
    for line in &lines {
        let at: Vec<usize> = line.keys().map(|k| position(k)).collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "{:?} vs {features:?}",
            line.keys().collect::<Vec<_>>()
        );
    }
    assert_eq!(features[0].0, "id");
    assert_eq!(features[1].0, "sample_index");

    // Every value, as `datasets` hands it out, is the JSON Lines' (reshaped as documented).
    let rows = loaded["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for got in rows {
        let got = got.as_object().unwrap();
        let line = &jsonl_rows[&key_of(got)];
        for (column, value) in got {
            let want = expected_cell(column, line.get(column));
            assert!(
                same(&want, value, column == "token_logprobs"),
                "{column}: {value} vs {want} (from {:?})",
                line.get(column)
            );
        }
    }
}

/// The sidecar resumes like a JSON Lines output (torn last line cut, done samples
/// skipped), and the parquet file then holds exactly an uninterrupted run's rows. A re-run
/// finds nothing to do; a leftover sidecar is removed; a target that lacks samples asked
/// for, or is not ours, is refused and left as it was.
#[test]
fn the_sidecar_resumes_and_a_finished_parquet_is_final() {
    let model = model_dir("mistral-tiny");
    let dir = TempDir::new("parquet-resume");
    let data = dir.join("rows.jsonl");
    write_resume_prompts(&data);
    let args = RESUME_ARGS;
    let full = dir.join("full.jsonl");
    prefer_sample(&model, &data, &full, &args).ok();
    let full_text = std::fs::read_to_string(&full).unwrap();
    let lines: Vec<&str> = full_text.lines().collect();
    assert_eq!(lines.len(), 12);

    // What a kill -9 leaves: three rows and half of the fourth in the sidecar.
    let parquet = dir.join("s.parquet");
    let sidecar = dir.join("s.parquet.partial.jsonl");
    std::fs::write(&sidecar, torn_after_three(&lines)).unwrap();
    let stderr = prefer_sample(&model, &data, &parquet, &args).ok().stderr;
    for want in [
        "incomplete last line",
        "resuming",
        "s.parquet.partial.jsonl: 3 of 12 samples already there",
        "wrote 12 rows",
    ] {
        assert!(stderr.contains(want), "{want:?} in {stderr}");
    }
    assert_eq!(dir.entries(), ["full.jsonl", "rows.jsonl", "s.parquet"]);
    let columns = ["text", "cumulative_logprob", "finish_reason"];
    let got = ingest_rows(&parquet, &columns);
    let want: BTreeMap<(String, u64), Vec<Cell>> = read_rows(&full)
        .into_iter()
        .map(|r| {
            (
                key_of(&r),
                columns.iter().map(|c| json_cell(r.get(*c))).collect(),
            )
        })
        .collect();
    assert_eq!(got, want);
    let finished = std::fs::read(&parquet).unwrap();

    // Complete: nothing to do, the file untouched.
    let stderr = prefer_sample(&model, &data, &parquet, &args).ok().stderr;
    assert!(
        stderr.contains("nothing to do: every sample is in"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&parquet).unwrap(), finished);

    // A crash between the rename and the sidecar's removal: the leftover goes.
    std::fs::copy(&full, &sidecar).unwrap();
    let stderr = prefer_sample(&model, &data, &parquet, &args).ok().stderr;
    assert!(
        stderr.contains("removed") && stderr.contains("nothing to do"),
        "{stderr}"
    );
    assert!(!sidecar.exists());
    // A sidecar holding other samples is not ours to delete.
    std::fs::write(&sidecar, "{\"id\":\"other:0\",\"sample_index\":0}\n").unwrap();
    let stderr = prefer_sample(&model, &data, &parquet, &args).ok().stderr;
    assert!(stderr.contains("left as it is"), "{stderr}");
    assert!(sidecar.exists());
    std::fs::remove_file(&sidecar).unwrap();

    // More samples than the finished file holds: refused, nothing written.
    let more: Vec<&str> = args
        .iter()
        .map(|a| if *a == "2" { "3" } else { a })
        .collect();
    let stderr = prefer_sample(&model, &data, &parquet, &more)
        .failed()
        .stderr;
    assert!(
        stderr.contains("s.parquet") && stderr.contains("holds 12 of the 18 samples"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&parquet).unwrap(), finished);
    assert_eq!(dir.entries(), ["full.jsonl", "rows.jsonl", "s.parquet"]);

    // A parquet file that is not ours.
    let foreign_src = dir.join("foreign.jsonl");
    std::fs::write(&foreign_src, "{\"a\": 1}\n").unwrap();
    let foreign = dir.join("foreign.parquet");
    data::writer::json_parquet::jsonl_to_parquet(&foreign_src, &foreign, &[], &|_| {}).unwrap();
    let before = std::fs::read(&foreign).unwrap();
    let stderr = prefer_sample(&model, &data, &foreign, &args)
        .failed()
        .stderr;
    assert!(
        stderr.contains("foreign.parquet") && stderr.contains("no column 'id'"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&foreign).unwrap(), before);
    assert!(!dir.join("foreign.parquet.partial.jsonl").exists());
}

/// Ctrl-C: the finished rows are in the sidecar and no parquet file exists; the same
/// command finishes the run into the parquet file.
#[test]
fn an_interrupted_parquet_run_leaves_its_sidecar_to_continue() {
    let model = model_dir("llama-tiny");
    let dir = TempDir::new("parquet-ctrlc");
    let data = dir.join("rows.jsonl");
    write_interrupt_prompts(&data);
    let parquet = dir.join("s.parquet");
    let sidecar = dir.join("s.parquet.partial.jsonl");
    let args = INTERRUPT_ARGS;
    let stderr =
        interrupt_after_rows(&mut command(&model, &data, &parquet, &args), &sidecar, 2).stderr;
    assert!(
        stderr.contains("interrupted")
            && stderr.contains("s.parquet.partial.jsonl")
            && stderr.contains("is written once every row is done"),
        "{stderr}"
    );
    assert!(!parquet.exists());
    let first = read_rows(&sidecar).len();
    assert!((2..24).contains(&first), "{first} rows after the interrupt");

    run(&mut command(&model, &data, &parquet, &args)).ok();
    assert!(!sidecar.exists());
    let got = ingest_rows(&parquet, &["prompt_token_count"]);
    assert_eq!(got.len(), 24);
    assert!(got.keys().all(|(_, k)| *k == 0));
}

/// The contract with `prefer pairs`: parquet samples of a gold file without ids join by id
/// and become the rejected answers.
#[test]
fn parquet_samples_join_in_prefer_pairs_by_id() {
    let (_dir, samples, pairs) = sample_then_pair("parquet-pairs", "samples.parquet");
    let sampled = ingest_rows(&samples, &["prompt", "text", "output"]);
    assert_eq!(pairs.len(), 3);
    for (row, pair) in pairs.iter().enumerate() {
        let cells = &sampled[&(format!("train.csv:{row}"), 0)];
        let cell = |v: &Value| Cell::Text(v.as_str().unwrap().to_string());
        assert_eq!(cell(&pair["prompt"]), cells[0]);
        assert_eq!(cell(&pair["rejected"]), cells[1]);
        assert_eq!(cell(&pair["chosen"]), cells[2]);
    }
}
