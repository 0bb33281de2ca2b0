//! The rows to sample from.
//!
//! Two forms:
//! - **Ready prompts** (a `.jsonl` file, no `--template`, no column mapping): each line an
//!   object with `prompt` (text) or `prompt_ids` (token ids, used as given). All of the
//!   object's fields are copied to the output.
//! - **A dataset** (`--template`, a column mapping, or any other format): read by the data
//!   crate's ingest (jsonl, json, csv/tsv, parquet, xlsx, `save_to_disk` folders; the spec
//!   `PATH[:instruction=COLUMN,input=COLUMN,prompt=COLUMN,id=COLUMN,sheet=…,split=…]`), the
//!   prompt rendered from `instruction` (+ `input`) by the template, or taken from a
//!   `prompt` column as is. The row's cells are copied to the output.
//!
//! Every row gets an `id`: its own (an `id` field, or the column mapped to id), else the
//! data crate's [`ingest::fallback_id`], `<file name>:<row>` with the row's 0-based index
//! among the file's rows, which `prefer pairs --join id` rebuilds for gold rows. Ids must be
//! unique: they are the resume key and what `prefer pairs` joins on.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use data::cell::Cell;
use data::ingest::{self, Requirements, SourceSpec};
use data::template::Template;
use serde_json::{Map, Value};

/// A row's prompt as the input gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct InputRow {
    pub id: String,
    /// Where the row is, for messages ("rows.jsonl:3", "train.xlsx: row 5").
    pub location: String,
    /// The row's fields, copied to the output.
    pub fields: Map<String, Value>,
    pub prompt: Prompt,
}

#[derive(Debug)]
pub struct Input {
    pub rows: Vec<InputRow>,
    /// The template renders the model's special tokens itself (chat templates, template
    /// files), so tokenizing must not add them again.
    pub renders_special_tokens: bool,
}

/// Reads `data` (a path or a data spec) with an optional template name.
pub fn read(data: &str, template: Option<&str>, model_dir: &Path) -> Result<Input> {
    let spec = SourceSpec::parse(data)?;
    let ext = spec
        .path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let plain = spec.columns.is_empty() && spec.sheet.is_none() && spec.split.is_none();
    let input = if template.is_none() && plain && (ext == "jsonl" || ext == "ndjson") {
        Input {
            rows: read_prompts_jsonl(&spec.path)?,
            renders_special_tokens: false,
        }
    } else {
        read_dataset(&spec, template, model_dir)?
    };
    if input.rows.is_empty() {
        bail!("{}: no rows to sample from", spec.path.display());
    }
    check_unique_ids(&input.rows)?;
    Ok(input)
}

fn read_prompts_jsonl(path: &Path) -> Result<Vec<InputRow>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the input rows {}", path.display()))?;
    let spec = SourceSpec::plain(path);
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let location = format!("{}:{}", path.display(), i + 1);
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{location}: not valid JSON"))?;
        let Value::Object(fields) = value else {
            bail!(
                "{location}: expected a JSON object, got {}",
                ingest::json_kind(&value)
            );
        };
        let prompt = prompt_of(&fields).map_err(|msg| anyhow::anyhow!("{location}: {msg}"))?;
        let id = match fields.get("id") {
            None | Some(Value::Null) => ingest::fallback_id(&spec, rows.len()),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(other) => bail!(
                "{location}: \"id\" must be a non-empty string or an integer, got {}",
                ingest::json_kind(other)
            ),
        };
        rows.push(InputRow {
            id,
            location,
            fields,
            prompt,
        });
    }
    Ok(rows)
}

/// A ready-prompt row's prompt; the message says what is wrong.
fn prompt_of(fields: &Map<String, Value>) -> std::result::Result<Prompt, String> {
    if let Some(v) = fields.get("prompt_ids") {
        let Value::Array(items) = v else {
            return Err(format!(
                "\"prompt_ids\" must be an array of token ids, got {}",
                ingest::json_kind(v)
            ));
        };
        if items.is_empty() {
            return Err("the prompt is empty (\"prompt_ids\" is [])".into());
        }
        let ids = items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!("prompt_ids[{i}] = {v} is not a token id"))
            })
            .collect::<std::result::Result<Vec<u32>, String>>()?;
        return Ok(Prompt::Ids(ids));
    }
    match fields.get("prompt") {
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err("the prompt is empty (\"prompt\" has no text)".into())
        }
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(other) => Err(format!(
            "\"prompt\" must be a string, got {}",
            ingest::json_kind(other)
        )),
        None => {
            let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
            let hint = if fields.contains_key("instruction") {
                "; to build prompts from \"instruction\", give --template (korean, alpaca, \
                 chatml, chat or a template file)"
            } else {
                ""
            };
            Err(format!(
                "no \"prompt\" or \"prompt_ids\" field (the row has: {}){hint}",
                keys.join(", ")
            ))
        }
    }
}

fn read_dataset(spec: &SourceSpec, template: Option<&str>, model_dir: &Path) -> Result<Input> {
    let template = template
        .map(|name| Template::from_name(name, Some(model_dir)))
        .transpose()?;
    let table = ingest::open(spec, None)?;
    let need = Requirements {
        output: false,
        strict: false,
    };
    let (records, _report) = ingest::records(&table, spec, need)?;
    // Rows whose prompt (or instruction) is empty are dropped by the ingest: for sampling
    // they are an error, named.
    if records.len() < table.rows.len() {
        let mut kept = vec![false; table.rows.len()];
        for r in &records {
            kept[r.row] = true;
        }
        let empty: Vec<String> = (0..table.rows.len())
            .filter(|&i| !kept[i])
            .take(5)
            .map(|i| table.location(i))
            .collect();
        // The column the ingest read the prompt from (its rule: a mapped prompt, else a
        // mapped instruction, else an `instruction` column, else a `prompt` column).
        let column = spec
            .column_for(ingest::Field::Prompt)
            .or_else(|| spec.column_for(ingest::Field::Instruction))
            .unwrap_or(if table.columns.iter().any(|c| c == "instruction") {
                "instruction"
            } else {
                "prompt"
            });
        let what = format!("column '{column}'");
        bail!(
            "{}: {}: the prompt is empty ({what} has no text){}; every row needs a prompt",
            table.source,
            empty.join(", "),
            if table.rows.len() - records.len() > empty.len() {
                format!(
                    " (and {} more rows)",
                    table.rows.len() - records.len() - empty.len()
                )
            } else {
                String::new()
            }
        );
    }
    let mut rows = Vec::with_capacity(records.len());
    for record in records {
        let location = format!("{}: {}", table.source, table.location(record.row));
        let prompt = match (&record.prompt, &template) {
            (Some(p), _) => p.clone(),
            (None, Some(t)) => t
                .render(
                    record.instruction.as_deref().unwrap_or_default(),
                    record.input.as_deref(),
                )
                .with_context(|| format!("{location}: rendering the prompt"))?,
            (None, None) => bail!(
                "{location}: the rows have an instruction but no prompt: give --template \
                 (korean, alpaca, chatml, chat or a template file) to build prompts"
            ),
        };
        let fields = table
            .columns
            .iter()
            .zip(&table.rows[record.row])
            .map(|(c, cell)| (c.clone(), cell_value(cell)))
            .collect();
        rows.push(InputRow {
            id: record
                .id
                .unwrap_or_else(|| ingest::fallback_id(spec, record.row)),
            location,
            fields,
            prompt: Prompt::Text(prompt),
        });
    }
    let renders_special_tokens =
        matches!(template, Some(Template::Chat(_)) | Some(Template::File(_)));
    Ok(Input {
        rows,
        renders_special_tokens,
    })
}

/// A table cell as JSON; values the ingest keeps no content of (lists, structs) are null.
fn cell_value(cell: &Cell) -> Value {
    match cell {
        Cell::Null | Cell::Other(_) => Value::Null,
        Cell::Bool(b) => Value::from(*b),
        Cell::Int(i) => Value::from(*i),
        Cell::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Cell::Text(s) => Value::from(s.as_str()),
    }
}

fn check_unique_ids(rows: &[InputRow]) -> Result<()> {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for row in rows {
        if let Some(first) = seen.insert(&row.id, &row.location) {
            bail!(
                "{}: id {:?} is also the id of {first}: ids must be unique (they are the \
                 resume key and what `prefer pairs` joins on)",
                row.location,
                row.id
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn prompt_forms_and_errors() {
        assert_eq!(
            prompt_of(&obj(r#"{"prompt": "질문"}"#)),
            Ok(Prompt::Text("질문".into()))
        );
        assert_eq!(
            prompt_of(&obj(r#"{"prompt": "x", "prompt_ids": [2, 5]}"#)),
            Ok(Prompt::Ids(vec![2, 5]))
        );
        let e = prompt_of(&obj(r#"{"prompt": "  "}"#)).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = prompt_of(&obj(r#"{"prompt_ids": []}"#)).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = prompt_of(&obj(r#"{"prompt_ids": [1, -1]}"#)).unwrap_err();
        assert!(e.contains("prompt_ids[1]"), "{e}");
        let e = prompt_of(&obj(r#"{"instruction": "q", "output": "a"}"#)).unwrap_err();
        assert!(
            e.contains("instruction, output") && e.contains("--template"),
            "{e}"
        );
        let e = prompt_of(&obj(r#"{"prompt": 3}"#)).unwrap_err();
        assert!(e.contains("must be a string"), "{e}");
    }

    #[test]
    fn ids_must_be_unique() {
        let row = |id: &str, at: &str| InputRow {
            id: id.into(),
            location: at.into(),
            fields: Map::new(),
            prompt: Prompt::Ids(vec![1]),
        };
        assert!(check_unique_ids(&[row("a", "f:1"), row("b", "f:2")]).is_ok());
        let e = check_unique_ids(&[row("a", "f:1"), row("a", "f:3")]).unwrap_err();
        let e = format!("{e}");
        assert!(
            e.contains("f:3") && e.contains("f:1") && e.contains("\"a\""),
            "{e}"
        );
    }

    #[test]
    fn cells_become_json() {
        assert_eq!(cell_value(&Cell::Float(f64::NAN)), Value::Null);
        assert_eq!(cell_value(&Cell::Int(3)), Value::from(3));
        assert_eq!(cell_value(&Cell::Text("a".into())), Value::from("a"));
        assert_eq!(cell_value(&Cell::Other("a list".into())), Value::Null);
    }
}
