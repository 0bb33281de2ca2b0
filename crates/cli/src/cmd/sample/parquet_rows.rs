//! The samples as a parquet table: the column types of the sample fields, the two values
//! reshaped for them, and the resume keys of a finished file.
//!
//! Columns have the JSON Lines' names and order. The sample fields are declared here; the
//! input row's fields are typed by the data crate's inference (their JSON type where the
//! column is consistent, else string). Two values change shape, because a parquet column
//! holds one type:
//!
//! - `stop_reason` (vLLM: a stop token id, a stop string, or none) becomes
//!   `struct<token_id: int32, string: string>`: `{token_id: 13, string: null}` for a stop
//!   token, `{token_id: null, string: "###"}` for a stop string, null for EOS and length.
//! - `top_logprobs` (per token, `[id, logprob]` pairs) becomes
//!   `list<list<struct<id: int32, logprob: float32>>>`.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use data::cell::Cell;
use data::ingest::{self, SourceSpec};
use data::writer::json_parquet::{ColumnSpec, ColumnType, Converted, jsonl_to_parquet};
use sample::SampleKey;
use serde_json::{Map, Value, json};

/// `stop_reason`'s column type.
fn stop_reason_type() -> ColumnType {
    ColumnType::structure(&[
        ("token_id", ColumnType::Int32),
        ("string", ColumnType::Utf8),
    ])
}

/// One entry of `top_logprobs`.
fn top_logprob_type() -> ColumnType {
    ColumnType::structure(&[("id", ColumnType::Int32), ("logprob", ColumnType::Float32)])
}

/// The sample fields' columns (every name of `sample::SAMPLE_FIELDS`). Required where
/// every row has a value; token log-probs are float32, as the model computes them.
pub(super) fn sample_columns() -> Vec<ColumnSpec> {
    use ColumnType::{Float32, Float64, Int32, Int64, Utf8};
    vec![
        ColumnSpec::new("id", Utf8, false),
        ColumnSpec::new("sample_index", Int64, false),
        ColumnSpec::new("prompt", Utf8, true),
        ColumnSpec::new("prompt_token_count", Int64, false),
        ColumnSpec::new("text", Utf8, false),
        ColumnSpec::new("token_ids", ColumnType::list(Int32), false),
        ColumnSpec::new("finish_reason", Utf8, false),
        ColumnSpec::new("stop_reason", stop_reason_type(), true),
        // Null where the sum is not finite (JSON has no -inf).
        ColumnSpec::new("cumulative_logprob", Float64, true),
        ColumnSpec::new("token_logprobs", ColumnType::list(Float32), true),
        ColumnSpec::new(
            "top_logprobs",
            ColumnType::list(ColumnType::list(top_logprob_type())),
            true,
        ),
        ColumnSpec::new("ref_logps", Float64, true),
    ]
}

/// Reshapes a JSON Lines row for the parquet columns (see the module doc). Values of
/// another shape are left as they are, for the writer to report with their line.
fn to_parquet_shape(row: &mut Map<String, Value>) {
    if let Some(v) = row.get_mut("stop_reason") {
        match v {
            Value::Number(n) => *v = json!({ "token_id": n }),
            Value::String(s) => *v = json!({ "string": s }),
            _ => {}
        }
    }
    if let Some(Value::Array(steps)) = row.get_mut("top_logprobs") {
        for step in steps {
            let Value::Array(entries) = step else {
                continue;
            };
            for entry in entries {
                if let Value::Array(pair) = entry
                    && let [id, logprob] = pair.as_slice()
                {
                    *entry = json!({ "id": id, "logprob": logprob });
                }
            }
        }
    }
}

/// Converts the finished sidecar into the parquet file `target`.
pub(super) fn convert(sidecar: &Path, target: &Path) -> Result<Converted> {
    jsonl_to_parquet(sidecar, target, &sample_columns(), &to_parquet_shape).with_context(|| {
        format!(
            "converting {} into {} (the sidecar is kept; fix it or remove it, then run again)",
            sidecar.display(),
            target.display()
        )
    })
}

/// The `(id, sample_index)` of every row of a finished parquet file.
pub(super) fn read_keys(target: &Path) -> Result<HashSet<SampleKey>> {
    let not_ours = "; this does not look like a file `prefer sample` wrote, so nothing is \
                    written to it (choose another --out, or move the file away)";
    let table = ingest::open(&SourceSpec::plain(target), None)
        .with_context(|| format!("reading the finished {}", target.display()))?;
    let id = table.column_index("id", "")?;
    let index = table.column_index("sample_index", "")?;
    let mut keys = HashSet::with_capacity(table.rows.len());
    for (r, row) in table.rows.iter().enumerate() {
        let (Cell::Text(id), Cell::Int(k)) = (&row[id], &row[index]) else {
            bail!(
                "{}: {}: expected a string id and an integer sample_index{not_ours}",
                target.display(),
                table.location(r)
            );
        };
        let Ok(sample_index) = u32::try_from(*k) else {
            bail!(
                "{}: {}: sample_index {k} is not a sample index{not_ours}",
                target.display(),
                table.location(r)
            );
        };
        keys.insert(SampleKey {
            id: id.clone(),
            sample_index,
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_field_has_a_declared_column() {
        let declared: Vec<String> = sample_columns().into_iter().map(|c| c.name).collect();
        let mut fields: Vec<String> = sample::SAMPLE_FIELDS
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut sorted = declared.clone();
        sorted.sort();
        fields.sort();
        assert_eq!(sorted, fields);
    }

    #[test]
    fn stop_reasons_and_top_logprobs_take_their_parquet_shape() {
        let mut row: Map<String, Value> = serde_json::from_value(json!({
            "stop_reason": 13,
            "top_logprobs": [[[5, -0.25], [9, -1.5]], [[2, -0.125]]],
        }))
        .unwrap();
        to_parquet_shape(&mut row);
        assert_eq!(row["stop_reason"], json!({"token_id": 13}));
        assert_eq!(
            row["top_logprobs"],
            json!([
                [{"id": 5, "logprob": -0.25}, {"id": 9, "logprob": -1.5}],
                [{"id": 2, "logprob": -0.125}]
            ])
        );
        let mut row: Map<String, Value> =
            serde_json::from_value(json!({"stop_reason": "###", "other": 1})).unwrap();
        to_parquet_shape(&mut row);
        assert_eq!(row["stop_reason"], json!({"string": "###"}));
        assert_eq!(row["other"], 1);
        // Null stays null; a malformed value is left for the writer to report.
        for v in [json!(null), json!([1])] {
            let mut row: Map<String, Value> =
                serde_json::from_value(json!({ "stop_reason": v.clone() })).unwrap();
            to_parquet_shape(&mut row);
            assert_eq!(row["stop_reason"], v);
        }
    }

    #[test]
    fn a_sidecar_with_a_bad_value_names_its_line_and_is_kept() {
        let dir = testkit::TempDir::new("parquet-rows-bad");
        let sidecar = dir.join("s.parquet.partial.jsonl");
        let good = json!({"id": "a:0", "sample_index": 0, "prompt": "p", "prompt_token_count": 1,
                          "text": "t", "token_ids": [5], "finish_reason": "stop",
                          "stop_reason": null, "cumulative_logprob": -1.0});
        let mut bad = good.clone();
        bad["token_ids"] = json!([5, -1.5]);
        std::fs::write(&sidecar, format!("{good}\n{bad}\n")).unwrap();
        let target = dir.join("s.parquet");
        let e = format!("{:#}", convert(&sidecar, &target).unwrap_err());
        assert!(
            e.contains("s.parquet.partial.jsonl: line 2, column 'token_ids'")
                && e.contains("expected int32"),
            "{e}"
        );
        assert!(!target.exists() && sidecar.exists());
    }
}
