//! The samples file: JSON Lines, one object per finished sequence, appended as sequences
//! finish, so that a crash loses only the sequences in flight and a re-run continues.
//!
//! [`SamplesFile::open`] reads what an earlier run left: every complete line must be a
//! JSON object with a string `id` and an integer `sample_index` (the resume key; anything
//! else means the file is not ours, and we refuse to append to it). A last line without its
//! newline is what a kill in the middle of a write leaves: it is cut off, with a warning,
//! and that sample is generated again. Each row is written with one `write` call and no
//! user-space buffer, so a killed process never leaves more than one torn line.
//!
//! [`sample_row`] builds a row (field order and meanings in docs/sample.md).
//!
//! `prefer sample --out FILE.parquet` appends to a samples file too — the sidecar
//! `FILE.parquet.partial.jsonl` — and converts it to parquet once every row is there; a
//! leftover sidecar is checked with [`SamplesFile::read`], which changes nothing.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Result, SampleError};
use crate::sequence::SequenceState;

/// Identifies one output row: the input row's id and which of its n samples.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub id: String,
    pub sample_index: u32,
}

/// What an earlier run left in the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resume {
    /// Keys of the complete rows.
    pub done: HashSet<SampleKey>,
    /// Complete rows (duplicates included).
    pub rows: usize,
    /// Bytes of a torn last line that were cut off, if any.
    pub torn_bytes: Option<usize>,
}

/// A samples file open for appending.
pub struct SamplesFile {
    path: PathBuf,
    file: File,
    written: usize,
}

impl SamplesFile {
    /// Opens `path` for appending (creating it if needed), after checking what is there and
    /// cutting off a torn last line.
    pub fn open(path: &Path) -> Result<(SamplesFile, Resume)> {
        let io = |source| SampleError::OutputIo {
            path: path.to_path_buf(),
            source,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        let (resume, good_len) = scan(path, &bytes)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        if good_len < bytes.len() {
            file.set_len(good_len as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
            tracing::warn!(
                "{}: cut off an incomplete last line ({} bytes, left by an interrupted \
                 write); its sample will be generated again",
                path.display(),
                bytes.len() - good_len
            );
        }
        Ok((
            SamplesFile {
                path: path.to_path_buf(),
                file,
                written: 0,
            },
            resume,
        ))
    }

    /// What the file at `path` holds, read without opening it for writing: a torn last
    /// line is reported in [`Resume::torn_bytes`] but not cut off. A missing file holds
    /// nothing.
    pub fn read(path: &Path) -> Result<Resume> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(SampleError::OutputIo {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(scan(path, &bytes)?.0)
    }

    /// Appends one row (one `write` of the line and its newline).
    pub fn append(&mut self, row: &Map<String, Value>) -> Result<()> {
        let mut line = serde_json::to_vec(row).map_err(|e| SampleError::OutputIo {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(|source| SampleError::OutputIo {
                path: self.path.clone(),
                source,
            })?;
        self.written += 1;
        Ok(())
    }

    /// Forces what was written to disk (on completion or interruption).
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|source| SampleError::OutputIo {
                path: self.path.clone(),
                source,
            })
    }

    /// Rows appended through this handle.
    pub fn written(&self) -> usize {
        self.written
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Checks the complete lines and finds where they end.
fn scan(path: &Path, bytes: &[u8]) -> Result<(Resume, usize)> {
    let mut resume = Resume::default();
    let mut good_len = 0;
    let mut start = 0;
    let mut line_no = 0;
    while let Some(nl) = bytes[start..].iter().position(|&b| b == b'\n') {
        let end = start + nl;
        line_no += 1;
        let line = &bytes[start..end];
        let bad = |msg: String| SampleError::OutputFormat {
            path: path.to_path_buf(),
            line: line_no,
            msg: format!(
                "{msg}; this does not look like a file `prefer sample` wrote, so nothing is \
                 appended to it (choose another --out, or move the file away)"
            ),
        };
        if !line.iter().all(u8::is_ascii_whitespace) {
            let value: Value = serde_json::from_slice(line)
                .map_err(|e| bad(format!("not a JSON object ({e})")))?;
            resume.done.insert(key_of(&value).map_err(bad)?);
            resume.rows += 1;
        }
        start = end + 1;
        good_len = start;
    }
    if good_len < bytes.len() {
        resume.torn_bytes = Some(bytes.len() - good_len);
    }
    Ok((resume, good_len))
}

fn key_of(value: &Value) -> std::result::Result<SampleKey, String> {
    let Value::Object(obj) = value else {
        return Err("not a JSON object".into());
    };
    let id = match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        other => return Err(format!("\"id\" must be a string, found {other:?}")),
    };
    let sample_index = obj
        .get("sample_index")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| "\"sample_index\" must be a non-negative integer".to_string())?;
    Ok(SampleKey { id, sample_index })
}

/// The fields [`sample_row`] writes itself; a source field of the same name is left out.
pub const SAMPLE_FIELDS: [&str; 12] = [
    "id",
    "sample_index",
    "prompt",
    "text",
    "token_ids",
    "finish_reason",
    "stop_reason",
    "cumulative_logprob",
    "token_logprobs",
    "top_logprobs",
    "ref_logps",
    "prompt_token_count",
];

/// What goes into one output row besides the sequence itself.
pub struct RowContext<'a> {
    pub key: &'a SampleKey,
    /// The input row's fields, copied in their order (minus [`SAMPLE_FIELDS`]).
    pub source: &'a Map<String, Value>,
    /// The prompt text as sampled; `None` for rows given as token ids.
    pub prompt: Option<&'a str>,
    /// Write per-token log-probs (`--logprobs N`, N ≥ 0) and, for N > 0, the top N.
    pub logprobs: Option<usize>,
    /// Summed log-probs valid as DPO reference log-probs of this completion (see
    /// docs/sample.md), when the check passed.
    pub ref_logps: Option<f64>,
}

/// One output row for a finished sequence.
pub fn sample_row(ctx: &RowContext<'_>, seq: &SequenceState) -> Map<String, Value> {
    let mut row = Map::new();
    row.insert("id".into(), Value::from(ctx.key.id.as_str()));
    row.insert("sample_index".into(), Value::from(ctx.key.sample_index));
    for (k, v) in ctx.source {
        if !SAMPLE_FIELDS.contains(&k.as_str()) {
            row.insert(k.clone(), v.clone());
        }
    }
    row.insert("prompt".into(), ctx.prompt.map_or(Value::Null, Value::from));
    row.insert(
        "prompt_token_count".into(),
        Value::from(seq.prompt_ids().len()),
    );
    row.insert("text".into(), Value::from(seq.text()));
    row.insert("token_ids".into(), Value::from(seq.output_ids().to_vec()));
    let finish = seq.finish();
    row.insert(
        "finish_reason".into(),
        finish.map_or(Value::Null, |f| Value::from(f.reason.as_str())),
    );
    row.insert(
        "stop_reason".into(),
        finish
            .and_then(|f| f.stop_reason.as_ref())
            .and_then(|r| serde_json::to_value(r).ok())
            .unwrap_or(Value::Null),
    );
    row.insert(
        "cumulative_logprob".into(),
        Value::from(seq.cumulative_logprob()),
    );
    if let Some(n) = ctx.logprobs {
        row.insert(
            "token_logprobs".into(),
            Value::Array(
                seq.token_logprobs()
                    .iter()
                    .map(|&x| Value::from(shortest(x)))
                    .collect(),
            ),
        );
        if n > 0 {
            let top = seq
                .top_logprobs()
                .iter()
                .map(|step| {
                    Value::Array(
                        step.iter()
                            .map(|&(id, lp)| {
                                Value::from(vec![Value::from(id), Value::from(shortest(lp))])
                            })
                            .collect(),
                    )
                })
                .collect();
            row.insert("top_logprobs".into(), Value::Array(top));
        }
    }
    if let Some(r) = ctx.ref_logps {
        row.insert("ref_logps".into(), Value::from(r));
    }
    row
}

/// The f64 whose shortest decimal is the f32's (-9.211389, not -9.211389541625977), so
/// the file shows the digits the f32 holds and parses back to the same f32. Non-finite
/// values become null in JSON.
fn shortest(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(x as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sample-output-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("out.jsonl")
    }

    fn row(id: &str, k: u32) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), Value::from(id));
        m.insert("sample_index".into(), Value::from(k));
        m.insert("text".into(), Value::from("답변 🙂"));
        m
    }

    fn key(id: &str, k: u32) -> SampleKey {
        SampleKey {
            id: id.into(),
            sample_index: k,
        }
    }

    #[test]
    fn appends_and_resumes() {
        let path = temp_path("resume");
        let (mut f, resume) = SamplesFile::open(&path).unwrap();
        assert_eq!(resume, Resume::default());
        f.append(&row("a.jsonl:0", 0)).unwrap();
        f.append(&row("a.jsonl:0", 1)).unwrap();
        drop(f);
        let (mut f, resume) = SamplesFile::open(&path).unwrap();
        assert_eq!(resume.rows, 2);
        assert!(resume.done.contains(&key("a.jsonl:0", 1)));
        assert_eq!(resume.torn_bytes, None);
        f.append(&row("a.jsonl:1", 0)).unwrap();
        drop(f);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let path = temp_path("torn");
        let good = "{\"id\":\"x:0\",\"sample_index\":0,\"text\":\"ok\"}\n";
        // Torn inside a multi-byte character, as a kill can leave it.
        let torn = "{\"id\":\"x:1\",\"sample_index\":0,\"text\":\"서";
        let mut bytes = good.as_bytes().to_vec();
        bytes.extend_from_slice(&torn.as_bytes()[..torn.len() - 1]);
        std::fs::write(&path, &bytes).unwrap();
        let (f, resume) = SamplesFile::open(&path).unwrap();
        drop(f);
        assert_eq!(resume.rows, 1);
        assert_eq!(resume.torn_bytes, Some(torn.len() - 1));
        assert!(resume.done.contains(&key("x:0", 0)));
        assert!(!resume.done.contains(&key("x:1", 0)));
        // Reading without opening sees the same and leaves the torn line in place.
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(SamplesFile::read(&path).unwrap(), resume);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let (mut f, _) = SamplesFile::open(&path).unwrap();
        f.append(&row("x:1", 0)).unwrap();
        drop(f);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], good.trim_end());
        assert!(lines[1].starts_with("{\"id\":\"x:1\""));
    }

    #[test]
    fn a_foreign_file_is_refused_and_left_alone() {
        let path = temp_path("foreign");
        let content = "{\"id\":\"x:0\",\"sample_index\":0}\nnot json\n{\"id\":\"x:1\"";
        std::fs::write(&path, content).unwrap();
        let e = SamplesFile::open(&path).err().unwrap().to_string();
        assert!(
            e.contains("line 2") && e.contains("not a JSON object"),
            "{e}"
        );
        assert!(e.contains("out.jsonl"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
        let e = SamplesFile::read(&path).err().unwrap().to_string();
        assert!(e.contains("line 2"), "{e}");

        std::fs::write(&path, "{\"id\":3,\"sample_index\":0}\n").unwrap();
        let e = SamplesFile::open(&path).err().unwrap().to_string();
        assert!(
            e.contains("line 1") && e.contains("\"id\" must be a string"),
            "{e}"
        );
        std::fs::write(&path, "{\"id\":\"a\"}\n").unwrap();
        let e = SamplesFile::open(&path).err().unwrap().to_string();
        assert!(e.contains("sample_index"), "{e}");
    }

    /// A finished sequence over the fixture tokenizer: "서울" forced, then EOS.
    fn finished_sequence(logprobs: Option<i32>) -> SequenceState {
        use crate::params::SamplingParams;
        use crate::test_util::fixture_tokenizer;
        use crate::testing::forced_sequence;

        let tok = fixture_tokenizer();
        let mut ids = tok.encode("서울", false).unwrap().get_ids().to_vec();
        ids.push(1);
        let params = SamplingParams {
            temperature: 0.0,
            logprobs,
            ..Default::default()
        };
        let seq = forced_sequence(params, vec![2, 40, 41], tok, 1, 1003, &ids);
        assert!(seq.is_finished());
        seq
    }

    #[test]
    fn rows_hold_the_key_the_source_and_the_sequence() {
        let seq = finished_sequence(Some(2));
        let source: Map<String, Value> =
            serde_json::from_str(r#"{"zeta": 1, "text": "old", "question": "q"}"#).unwrap();
        let key = key("train.csv:4", 1);
        let row = sample_row(
            &RowContext {
                key: &key,
                source: &source,
                prompt: Some("P"),
                logprobs: Some(2),
                ref_logps: Some(-1.5),
            },
            &seq,
        );
        let keys: Vec<&str> = row.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "id",
                "sample_index",
                "zeta",
                "question",
                "prompt",
                "prompt_token_count",
                "text",
                "token_ids",
                "finish_reason",
                "stop_reason",
                "cumulative_logprob",
                "token_logprobs",
                "top_logprobs",
                "ref_logps"
            ]
        );
        // The source's own `text` gave way to the sample's.
        assert_eq!(row["text"], "서울");
        assert_eq!(row["id"], "train.csv:4");
        assert_eq!(row["prompt_token_count"], 3);
        assert_eq!(row["finish_reason"], "stop");
        assert_eq!(row["stop_reason"], Value::Null); // EOS
        let ids = testkit::u64s(&row["token_ids"]);
        assert_eq!(ids.last(), Some(&1));
        let lps = row["token_logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), ids.len());
        let sum: f64 = lps.iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((row["cumulative_logprob"].as_f64().unwrap() - sum).abs() < 1e-5);
        let top = row["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), ids.len());
        // Per step the N = 2 most likely as [id, logprob]; the forced token first.
        assert_eq!(top[0].as_array().unwrap().len(), 2);
        assert_eq!(top[0][0][0], ids[0]);
        assert_eq!(top[0][0][1], lps[0]);
        assert_eq!(row["ref_logps"], -1.5);

        // Without logprobs: none of the log-prob fields but the sum.
        let seq = finished_sequence(None);
        let row = sample_row(
            &RowContext {
                key: &key,
                source: &Map::new(),
                prompt: None,
                logprobs: None,
                ref_logps: None,
            },
            &seq,
        );
        assert_eq!(row["prompt"], Value::Null);
        assert!(row.get("token_logprobs").is_none() && row.get("ref_logps").is_none());
        assert!(row.get("cumulative_logprob").is_some());
    }

    #[test]
    fn shortest_round_trips() {
        for x in [-9.211_39_f32, 0.1, -1e-30, -123.456_7, 0.0] {
            assert_eq!(shortest(x) as f32, x);
        }
        assert_eq!(shortest(-0.1), -0.1);
    }
}
