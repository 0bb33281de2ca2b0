//! JSON Lines and JSON sources.

use std::collections::HashMap;
use std::path::Path;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::{Locator, Table};
use crate::cell::Cell;
use crate::error::{DataError, Result};

/// Checks that `bytes` are UTF-8; the error names the line and the byte within it.
pub(crate) fn utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        let bad = e.valid_up_to();
        let line = bytes[..bad].iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = bytes[..bad]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        DataError::InvalidUtf8 {
            path: path.to_path_buf(),
            where_: format!("line {line}"),
            byte: bad - line_start + 1,
            unit: "line",
        }
    })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// serde_json messages end in " at line L column C"; we report the place ourselves.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// The error for JSON that does not parse, at `line` of the file and the column serde_json
/// stopped at.
fn malformed(path: &Path, line: impl std::fmt::Display, e: &serde_json::Error) -> DataError {
    DataError::parse(
        path,
        format!("line {line}, column {}", e.column()),
        format!("malformed JSON: {}", json_message(e)),
    )
}

pub(crate) fn value_to_cell(value: Value) -> Cell {
    match value {
        Value::Null => Cell::Null,
        Value::Bool(b) => Cell::Bool(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Cell::Int(i),
            None => Cell::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Cell::Text(s),
        Value::Array(_) => Cell::Other("a list".into()),
        Value::Object(_) => Cell::Other("an object".into()),
    }
}

/// What a JSON value is, for messages: "null", "a boolean", "a number", "a string",
/// "an array", "an object".
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON object with its keys in file order (serde_json's own map sorts them), so columns
/// appear as the file writes them.
struct Object(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Object, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Object(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Collects objects into columns (first-seen key order); missing keys are null.
struct Columns {
    names: Vec<String>,
    index: HashMap<String, usize>,
    rows: Vec<Vec<Cell>>,
}

impl Columns {
    fn new() -> Self {
        Columns {
            names: Vec::new(),
            index: HashMap::new(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, object: Object) {
        let mut row = vec![Cell::Null; self.names.len()];
        for (key, value) in object.0 {
            let i = match self.index.get(&key) {
                Some(&i) => i,
                None => {
                    self.names.push(key.clone());
                    self.index.insert(key, self.names.len() - 1);
                    row.push(Cell::Null);
                    self.names.len() - 1
                }
            };
            row[i] = value_to_cell(value);
        }
        self.rows.push(row);
    }

    fn finish(mut self, source: String, locator: Locator) -> Table {
        let width = self.names.len();
        for row in &mut self.rows {
            row.resize(width, Cell::Null);
        }
        Table {
            source,
            columns: self.names,
            rows: self.rows,
            locator,
        }
    }
}

/// One JSON object per line; blank lines are skipped; errors name the line.
pub(crate) fn read_jsonl(path: &Path) -> Result<Table> {
    let bytes = read_bytes(path)?;
    let mut columns = Columns::new();
    let mut lines = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i as u64 + 1;
        let text = std::str::from_utf8(raw).map_err(|e| DataError::InvalidUtf8 {
            path: path.to_path_buf(),
            where_: format!("line {line_no}"),
            byte: e.valid_up_to() + 1,
            unit: "line",
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let trimmed = text.trim_start();
        if !trimmed.starts_with('{') {
            let value: Value =
                serde_json::from_str(text).map_err(|e| malformed(path, line_no, &e))?;
            return Err(DataError::parse(
                path,
                format!("line {line_no}"),
                format!("expected a JSON object, found {}", json_kind(&value)),
            ));
        }
        let object: Object =
            serde_json::from_str(text).map_err(|e| malformed(path, line_no, &e))?;
        columns.push(object);
        lines.push(line_no);
    }
    Ok(columns.finish(path.display().to_string(), Locator::Lines(lines)))
}

/// A JSON array of objects, or an object `{split: [objects]}`.
pub(crate) fn read_json(path: &Path, split: Option<&str>, explicit: bool) -> Result<Table> {
    let bytes = read_bytes(path)?;
    let text = utf8(path, &bytes)?;
    let value: Value = serde_json::from_str(text).map_err(|e| malformed(path, e.line(), &e))?;
    let (rows, source) = match value {
        Value::Array(rows) => {
            if explicit {
                return Err(super::unsupported(
                    path,
                    "split= given but the file is a plain array",
                ));
            }
            (rows, path.display().to_string())
        }
        Value::Object(mut splits) if !splits.is_empty() && splits.values().all(Value::is_array) => {
            let names: Vec<String> = splits.keys().cloned().collect();
            let chosen = match split {
                Some(s) if splits.contains_key(s) => s.to_string(),
                Some(s) if explicit || names.len() > 1 => {
                    return Err(DataError::MissingSplit {
                        path: path.to_path_buf(),
                        split: s.to_string(),
                        existing: names.join(", "),
                    });
                }
                _ if names.len() == 1 => names[0].clone(),
                _ => {
                    return Err(DataError::MissingSplit {
                        path: path.to_path_buf(),
                        split: String::new(),
                        existing: names.join(", "),
                    });
                }
            };
            let Some(Value::Array(rows)) = splits.remove(&chosen) else {
                unreachable!("checked above that every split is an array")
            };
            (rows, format!("{}[{chosen}]", path.display()))
        }
        other => {
            return Err(DataError::parse(
                path,
                "top level",
                format!(
                    "expected an array of objects or {{split: [objects]}}, found {}",
                    json_kind(&other)
                ),
            ));
        }
    };
    let mut columns = Columns::new();
    for (i, row) in rows.into_iter().enumerate() {
        let Value::Object(object) = row else {
            return Err(DataError::parse(
                path,
                format!("row {}", i + 1),
                format!("expected a JSON object, found {}", json_kind(&row)),
            ));
        };
        // serde_json's map has sorted the keys; a .json file's columns come out sorted.
        columns.push(Object(object.into_iter().collect()));
    }
    Ok(columns.finish(source, Locator::ROWS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn jsonl_reads_types_union_of_keys_and_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.jsonl",
            "{\"instruction\":\"질문\\n둘\",\"n\":3}\n\n{\"output\":\"답\",\"n\":1.5,\"x\":[1]}\n"
                .as_bytes(),
        );
        let t = read_jsonl(&p).unwrap();
        assert_eq!(t.columns, vec!["instruction", "n", "output", "x"]);
        assert_eq!(
            t.rows[0],
            vec![
                Cell::Text("질문\n둘".into()),
                Cell::Int(3),
                Cell::Null,
                Cell::Null
            ]
        );
        assert_eq!(t.rows[1][1], Cell::Float(1.5));
        assert_eq!(t.rows[1][3], Cell::Other("a list".into()));
        assert_eq!(t.location(1), "line 3");
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "bad.jsonl", b"{\"a\":1}\n{\"a\":\n");
        let err = read_jsonl(&p).unwrap_err().to_string();
        assert!(
            err.contains("bad.jsonl: line 2, column") && err.contains("malformed JSON"),
            "{err}"
        );
        let p = write(dir.path(), "arr.jsonl", b"{\"a\":1}\n[1]\n");
        let err = read_jsonl(&p).unwrap_err().to_string();
        assert!(
            err.contains("line 2: expected a JSON object, found an array"),
            "{err}"
        );
    }

    #[test]
    fn invalid_utf8_names_line_and_byte() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "u.jsonl", b"{\"a\":\"ok\"}\n{\"a\":\"\xff\"}\n");
        let err = read_jsonl(&p).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: line 2: invalid UTF-8 (byte 7 of the line)",
                p.display()
            )
        );
        let p = write(dir.path(), "u.json", b"[\n{\"a\":\"\xc3\"}]");
        let err = read_json(&p, None, false).unwrap_err().to_string();
        assert!(err.contains("line 2: invalid UTF-8 (byte 7"), "{err}");
    }

    #[test]
    fn json_array_and_split_object() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.json",
            "[{\"instruction\":\"가\"},{\"instruction\":\"나\"}]".as_bytes(),
        );
        assert_eq!(read_json(&p, None, false).unwrap().rows.len(), 2);
        let p = write(
            dir.path(),
            "s.json",
            "{\"train\":[{\"a\":1}],\"validation\":[{\"a\":2},{\"a\":3}]}".as_bytes(),
        );
        let t = read_json(&p, Some("validation"), true).unwrap();
        assert_eq!(t.rows.len(), 2);
        assert!(t.source.ends_with("[validation]"));
        let err = read_json(&p, Some("test"), true).unwrap_err().to_string();
        assert!(
            err.contains("no split 'test'; splits are: train, validation"),
            "{err}"
        );
        // An output split the file lacks is an error only when the file has several splits.
        let err = read_json(&p, Some("test"), false).unwrap_err().to_string();
        assert!(err.contains("splits are"), "{err}");
    }

    #[test]
    fn whitespace_only_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "w.jsonl", b"\n \n");
        assert!(matches!(read_jsonl(&p), Err(DataError::EmptyFile { .. })));
    }
}
