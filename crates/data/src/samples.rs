//! The sample rows `prefer sample` writes, and the chosen-side scores `prefer score` writes.
//!
//! Samples (JSON Lines, or any ingest format), one object per sampled response:
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `id` | string or integer, optional | the gold row's id (or `FILE:ROW`), for joining by id |
//! | `prompt` | string | the prompt exactly as sampled (joins by prompt text) |
//! | `text` (or `response`) | string | the sampled completion: the rejected answer |
//! | `finish_reason` | `"stop"` / `"length"`, optional | `"length"`: cut by max_tokens |
//! | `ref_logps` | number, optional | sum of the completion's token log-probs under the sampling model, written by `prefer sample --logprobs 0` only when its validity check passes |
//!
//! `prefer sample` also copies the input row's fields into each sample; `text` is therefore
//! looked up before `response` (a gold table may well have a `response` column). Other keys
//! (`token_ids`, `cumulative_logprob`, …) are ignored.
//!
//! Scores (`prefer score` output), one object per scored completion: `prompt`,
//! `completion` (or `chosen`), and `logp` — the summed completion log-probs `prefer score`
//! writes (`logps` and `ref_chosen_logps` are accepted too). Score with `--add-eos` so the
//! sum covers the EOS that TRL appends to every chosen answer.

use std::collections::HashMap;
use std::path::Path;

use crate::cell::{Cell, TextCell};
use crate::error::{DataError, Result};
use crate::ingest::{self, SourceSpec, Table};

/// One sampled response.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sample {
    /// Where it came from ("line 7"), for messages.
    pub location: String,
    pub id: Option<String>,
    pub prompt: Option<String>,
    pub response: String,
    pub finish_reason: Option<String>,
    pub ref_logps: Option<f64>,
}

impl Sample {
    /// Cut by max_tokens (vLLM's `finish_reason == "length"`).
    pub fn truncated(&self) -> bool {
        self.finish_reason.as_deref() == Some("length")
    }
}

fn first_column(table: &Table, names: &[&str]) -> Option<usize> {
    names
        .iter()
        .find_map(|n| table.columns.iter().position(|c| c == n))
}

fn text_at(table: &Table, row: usize, column: usize) -> Result<Option<String>> {
    match table.rows[row][column].to_text(false) {
        Ok(TextCell::Text(s)) | Ok(TextCell::Converted(s)) => Ok(Some(s)),
        Ok(TextCell::Empty) => match &table.rows[row][column] {
            // Whitespace-only text is a real (bad) response: keep it for the empty filter.
            Cell::Text(s) => Ok(Some(s.clone())),
            _ => Ok(None),
        },
        Err(e) => Err(DataError::MixedType {
            path: table.source.clone(),
            where_: table.location(row),
            column: table.columns[column].clone(),
            found: e.found,
        }),
    }
}

fn number_at(table: &Table, row: usize, column: usize) -> Result<Option<f64>> {
    match &table.rows[row][column] {
        Cell::Null => Ok(None),
        Cell::Int(i) => Ok(Some(*i as f64)),
        Cell::Float(f) if f.is_finite() => Ok(Some(*f)),
        other => Err(DataError::MixedType {
            path: table.source.clone(),
            where_: table.location(row),
            column: table.columns[column].clone(),
            found: format!("{other:?} where a finite number was expected"),
        }),
    }
}

/// Reads a samples file. A missing response column is an error; a missing prompt column
/// is allowed only when every row has an id.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    let table = ingest::open(&SourceSpec::plain(path), None)?;
    let response = first_column(&table, &["text", "response"])
        .ok_or_else(|| table.missing_column("text", " (or response)"))?;
    let prompt = first_column(&table, &["prompt"]);
    let id = first_column(&table, &["id"]);
    if prompt.is_none() && id.is_none() {
        return Err(table.missing_column("prompt", " (samples need a prompt or an id to join on)"));
    }
    let finish = first_column(&table, &["finish_reason"]);
    let logps = first_column(&table, &["ref_logps"]);
    let mut out = Vec::with_capacity(table.rows.len());
    for row in 0..table.rows.len() {
        out.push(Sample {
            location: table.location(row),
            id: id.and_then(|c| table.rows[row][c].to_key()),
            prompt: prompt
                .map(|c| text_at(&table, row, c))
                .transpose()?
                .flatten(),
            response: text_at(&table, row, response)?.unwrap_or_default(),
            finish_reason: finish
                .map(|c| text_at(&table, row, c))
                .transpose()?
                .flatten(),
            ref_logps: logps
                .map(|c| number_at(&table, row, c))
                .transpose()?
                .flatten(),
        });
    }
    Ok(out)
}

/// Summed log-probs of completions under the reference model, keyed by (prompt, completion).
#[derive(Debug, Clone, Default)]
pub struct Scores {
    by_text: HashMap<(String, String), f64>,
}

impl Scores {
    pub fn get(&self, prompt: &str, completion: &str) -> Option<f64> {
        self.by_text
            .get(&(prompt.to_string(), completion.to_string()))
            .copied()
    }

    pub fn len(&self) -> usize {
        self.by_text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_text.is_empty()
    }
}

/// Reads a `prefer score` output.
pub fn read_scores(path: &Path) -> Result<Scores> {
    let table = ingest::open(&SourceSpec::plain(path), None)?;
    let prompt = table.column_index("prompt", "")?;
    let completion = first_column(&table, &["completion", "chosen"])
        .ok_or_else(|| table.missing_column("completion", " (or chosen)"))?;
    let logps = first_column(&table, &["logp", "logps", "ref_chosen_logps"])
        .ok_or_else(|| table.missing_column("logp", " (or logps, ref_chosen_logps)"))?;
    let mut by_text = HashMap::with_capacity(table.rows.len());
    for row in 0..table.rows.len() {
        let p = text_at(&table, row, prompt)?.unwrap_or_default();
        let c = text_at(&table, row, completion)?.unwrap_or_default();
        let Some(v) = number_at(&table, row, logps)? else {
            return Err(DataError::parse(
                &table.source,
                table.location(row),
                format!("column '{}' is empty", table.columns[logps]),
            ));
        };
        by_text.insert((p, c), v);
    }
    Ok(Scores { by_text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_with_aliases_and_types() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.jsonl");
        std::fs::write(
            &p,
            "{\"id\":3,\"prompt\":\"P\",\"response\":\"gold column copied by sample\",\"text\":\"답\",\"finish_reason\":\"length\",\"ref_logps\":-12.5}\n{\"prompt\":\"Q\",\"text\":\"  \"}\n"
                .as_bytes(),
        )
        .unwrap();
        let s = read_samples(&p).unwrap();
        assert_eq!(s[0].id.as_deref(), Some("3"));
        assert_eq!(
            s[0].response, "답",
            "text wins over a copied response column"
        );
        assert!(s[0].truncated());
        assert_eq!(s[0].ref_logps, Some(-12.5));
        assert_eq!(s[1].response, "  ");
        assert_eq!(s[1].location, "line 2");
    }

    #[test]
    fn missing_response_and_bad_logps_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.jsonl");
        std::fs::write(&p, "{\"prompt\":\"P\",\"answer\":\"x\"}\n").unwrap();
        let err = read_samples(&p).unwrap_err().to_string();
        assert!(
            err.contains("no column 'text' (or response)") && err.contains("prompt, answer"),
            "{err}"
        );
        std::fs::write(
            &p,
            "{\"prompt\":\"P\",\"response\":\"x\",\"ref_logps\":\"high\"}\n",
        )
        .unwrap();
        let err = read_samples(&p).unwrap_err().to_string();
        assert!(err.contains("line 1, column 'ref_logps'"), "{err}");
    }

    #[test]
    fn scores_key_by_prompt_and_completion() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(&p, "{\"prompt\":\"P\",\"completion\":\"C\",\"logps\":-3}\n").unwrap();
        let s = read_scores(&p).unwrap();
        assert_eq!(s.get("P", "C"), Some(-3.0));
        assert_eq!(s.get("P", "D"), None);
    }
}
