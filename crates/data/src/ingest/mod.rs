//! Ingest: any supported table file → a [`Table`] of typed cells → [`Record`]s of text fields.
//!
//! Formats, chosen by extension (or by folder layout):
//! - `.jsonl` / `.ndjson`: one JSON object per line (blank lines skipped);
//! - `.json`: an array of objects, or `{split: [objects]}`;
//! - `.csv` / `.tsv`: a header row, then records (all cells are text);
//! - `.parquet`: any parquet file (pyarrow, pandas, `datasets`);
//! - `.xlsx` (and `.xlsm`, `.xls`, `.ods` through calamine): one sheet, first by default, header row;
//! - a folder written by `datasets.save_to_disk`: `state.json` + Arrow IPC stream files, or
//!   `dataset_dict.json` above split folders.
//!
//! A [`SourceSpec`] names the file, an optional sheet or split, and a column mapping (our
//! field ← the file's column), since headers differ between files. [`records`] applies the
//! mapping and the text rule of [`crate::cell`], dropping rows whose required fields are
//! empty and counting every conversion and drop in [`FieldReport`].
//!
//! Every error names the file, the line or row, and the column.

mod arrow_cells;
mod delimited;
mod disk;
mod json;
mod parquet_file;
mod records;
mod spec;
mod xlsx;

use std::path::{Path, PathBuf};

pub use json::json_kind;
pub use records::{Field, FieldReport, Record, Requirements, records};
pub use spec::SourceSpec;

use crate::cell::Cell;
use crate::error::{DataError, Result};

/// How the rows of a table are addressed in messages.
#[derive(Debug, Clone)]
pub(crate) enum Locator {
    /// Physical line numbers (1-based), one per row: jsonl, csv.
    Lines(Vec<u64>),
    /// `"{unit} {index + first}"`: e.g. xlsx rows start at 2 (row 1 is the header).
    Numbered { unit: &'static str, first: usize },
}

impl Locator {
    /// "row N", 1-based: Arrow sources (parquet, save_to_disk) and JSON arrays.
    pub(crate) const ROWS: Locator = Locator::Numbered {
        unit: "row",
        first: 1,
    };
}

/// A source read into memory: column names and rows of typed cells.
#[derive(Debug, Clone)]
pub struct Table {
    /// What messages call this source: the path, plus `[sheet]` or `[split]` when chosen.
    pub source: String,
    pub columns: Vec<String>,
    /// One `Vec` per row, `columns.len()` cells each.
    pub rows: Vec<Vec<Cell>>,
    pub(crate) locator: Locator,
}

impl Table {
    /// Where row `index` (0-based) is, as a person finds it: "line 12", "row 5".
    pub fn location(&self, index: usize) -> String {
        match &self.locator {
            Locator::Lines(lines) => match lines.get(index) {
                Some(line) => format!("line {line}"),
                None => format!("record {}", index + 1),
            },
            Locator::Numbered { unit, first } => format!("{unit} {}", index + first),
        }
    }

    /// The index of a column, or an error naming it and listing the columns that exist.
    pub fn column_index(&self, name: &str, hint: &str) -> Result<usize> {
        self.columns
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| self.missing_column(name, hint))
    }

    /// The error for a column that is not there, listing those that are.
    pub fn missing_column(&self, name: &str, hint: &str) -> DataError {
        DataError::MissingColumn {
            path: self.source.clone(),
            column: name.to_string(),
            hint: hint.to_string(),
            existing: self.columns.join(", "),
        }
    }
}

/// Reads the source a spec names. `default_split` picks the split of a multi-split source
/// (`{split: rows}` JSON, a `DatasetDict` folder) when the spec does not name one.
pub fn open(spec: &SourceSpec, default_split: Option<&str>) -> Result<Table> {
    let path = spec.path.as_path();
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    if meta.is_dir() {
        if spec.sheet.is_some() {
            return Err(unsupported(path, "a sheet was given for a folder"));
        }
        return disk::open(
            path,
            spec.split.as_deref().or(default_split),
            spec.split.is_some(),
        );
    }
    if meta.len() == 0 {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let ext = extension(path);
    if spec.sheet.is_some() && !xlsx::EXTENSIONS.contains(&ext.as_str()) {
        return Err(unsupported(path, "sheet= applies to spreadsheets only"));
    }
    if spec.split.is_some() && ext != "json" {
        return Err(unsupported(
            path,
            "split= applies to .json files and save_to_disk folders only",
        ));
    }
    let table = match ext.as_str() {
        "jsonl" | "ndjson" => json::read_jsonl(path)?,
        "json" => json::read_json(
            path,
            spec.split.as_deref().or(default_split),
            spec.split.is_some(),
        )?,
        "csv" => delimited::read(path, b',')?,
        "tsv" => delimited::read(path, b'\t')?,
        "parquet" => parquet_file::read(path)?,
        e if xlsx::EXTENSIONS.contains(&e) => xlsx::read(path, spec.sheet.as_deref())?,
        other => {
            return Err(unsupported(
                path,
                &format!(
                    "extension '{other}'; expected jsonl, json, csv, tsv, parquet, xlsx or a save_to_disk folder"
                ),
            ));
        }
    };
    if table.rows.is_empty() {
        return Err(DataError::NoRows {
            path: path.to_path_buf(),
            detail: String::new(),
        });
    }
    Ok(table)
}

/// The id `prefer sample` gives a row that has no id column: `NAME:ROW`, where NAME is the
/// file (or folder) name plus `[sheet]` / `[split]` when the spec names them, and ROW the
/// row's 0-based index among the table's rows. `prefer pairs --join id` rebuilds it for gold
/// rows without ids, so the same spec must be given to both commands.
pub fn fallback_id(spec: &SourceSpec, row: usize) -> String {
    let mut name = spec
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.path.display().to_string());
    for part in [&spec.sheet, &spec.split].into_iter().flatten() {
        name.push_str(&format!("[{part}]"));
    }
    format!("{name}:{row}")
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

pub(crate) fn unsupported(path: &Path, reason: &str) -> DataError {
    DataError::Unsupported {
        path: PathBuf::from(path),
        reason: reason.to_string(),
    }
}

/// Makes header names unique the way pandas does (`a`, `a.1`, `a.2`) and names blank
/// headers `Unnamed: {i}`, so every column can be mapped.
pub(crate) fn normalise_headers(raw: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for (i, name) in raw.into_iter().enumerate() {
        let base = if name.trim().is_empty() {
            format!("Unnamed: {i}")
        } else {
            name
        };
        let mut candidate = base.clone();
        let mut n = 1;
        while out.contains(&candidate) {
            candidate = format!("{base}.{n}");
            n += 1;
        }
        out.push(candidate);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_ids_name_file_sheet_and_row() {
        let spec = SourceSpec::parse("dir/extra.xlsx:sheet=추가,output=x").unwrap();
        assert_eq!(fallback_id(&spec, 4), "extra.xlsx[추가]:4");
        assert_eq!(
            fallback_id(&SourceSpec::plain("a/train.parquet"), 0),
            "train.parquet:0"
        );
    }

    #[test]
    fn headers_are_made_unique_like_pandas() {
        let got = normalise_headers(vec!["a".into(), "".into(), "a".into(), "a".into()]);
        assert_eq!(got, vec!["a", "Unnamed: 1", "a.1", "a.2"]);
    }

    #[test]
    fn missing_column_lists_what_exists() {
        let t = Table {
            source: "x.csv".into(),
            columns: vec!["질문".into(), "답변".into()],
            rows: vec![],
            locator: Locator::ROWS,
        };
        let err = t.column_index("output", "").unwrap_err().to_string();
        assert!(
            err.contains("'output'") && err.contains("질문, 답변"),
            "{err}"
        );
    }

    #[test]
    fn empty_file_is_an_error_not_an_empty_table() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        std::fs::write(&p, b"").unwrap();
        let err = open(&SourceSpec::plain(&p), None).unwrap_err();
        assert!(matches!(err, DataError::EmptyFile { .. }), "{err}");
    }
}
