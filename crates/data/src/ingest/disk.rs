//! Folders written by `datasets.save_to_disk`.
//!
//! A `Dataset` folder holds `state.json` (whose `_data_files` list the Arrow files in order)
//! and Arrow IPC *stream* files; a `DatasetDict` folder holds `dataset_dict.json`
//! (`{"splits": [...]}`) and one `Dataset` folder per split.

use std::path::{Path, PathBuf};

use arrow_ipc::reader::StreamReader;
use serde::Deserialize;

use super::arrow_cells::{append_batches, column_names};
use super::{Locator, Table, unsupported};
use crate::error::{DataError, Result};

#[derive(Deserialize)]
struct DatasetDict {
    splits: Vec<String>,
}

#[derive(Deserialize)]
struct State {
    #[serde(rename = "_data_files")]
    data_files: Vec<DataFile>,
}

#[derive(Deserialize)]
struct DataFile {
    filename: String,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        DataError::parse(
            path,
            format!("line {}, column {}", e.line(), e.column()),
            e.to_string(),
        )
    })
}

/// Opens a `Dataset` or `DatasetDict` folder; `split` picks the split of a dict (`explicit`
/// when the user named it, otherwise it is the output split and a single-split dict is fine).
pub(crate) fn open(folder: &Path, split: Option<&str>, explicit: bool) -> Result<Table> {
    let dict_path = folder.join("dataset_dict.json");
    if dict_path.is_file() {
        let dict: DatasetDict = read_json(&dict_path)?;
        let chosen = match split {
            Some(s) if dict.splits.iter().any(|x| x == s) => s.to_string(),
            _ if !explicit && dict.splits.len() == 1 => dict.splits[0].clone(),
            other => {
                return Err(DataError::MissingSplit {
                    path: folder.to_path_buf(),
                    split: other.unwrap_or("").to_string(),
                    existing: dict.splits.join(", "),
                });
            }
        };
        return read_dataset(
            &folder.join(&chosen),
            format!("{}[{chosen}]", folder.display()),
        );
    }
    if explicit {
        return Err(unsupported(
            folder,
            "split= given but the folder has no dataset_dict.json",
        ));
    }
    read_dataset(folder, folder.display().to_string())
}

fn read_dataset(folder: &Path, source: String) -> Result<Table> {
    let state_path = folder.join("state.json");
    if !state_path.is_file() {
        return Err(unsupported(
            folder,
            "a folder must be a datasets.save_to_disk output (state.json or dataset_dict.json)",
        ));
    }
    let state: State = read_json(&state_path)?;
    let mut columns: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    for data_file in &state.data_files {
        let path: PathBuf = folder.join(&data_file.filename);
        let file = std::fs::File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let reader = StreamReader::try_new(std::io::BufReader::new(file), None)
            .map_err(|e| DataError::parse(&path, "Arrow IPC stream", e.to_string()))?;
        let names = column_names(&reader.schema());
        match &columns {
            None => columns = Some(names),
            Some(existing) if *existing != names => {
                return Err(DataError::parse(
                    &path,
                    "schema",
                    "columns differ from the first data file",
                ));
            }
            Some(_) => {}
        }
        append_batches(&path, reader, &mut rows)?;
    }
    let Some(columns) = columns else {
        return Err(DataError::NoRows {
            path: folder.to_path_buf(),
            detail: " (state.json lists no data files)".into(),
        });
    };
    if rows.is_empty() {
        return Err(DataError::NoRows {
            path: folder.to_path_buf(),
            detail: String::new(),
        });
    }
    Ok(Table {
        source,
        columns,
        rows,
        locator: Locator::ROWS,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use arrow_ipc::writer::StreamWriter;
    use arrow_schema::{DataType, Field, Schema};

    use super::*;
    use crate::cell::Cell;

    fn write_split(folder: &Path, values: &[&str]) {
        std::fs::create_dir_all(folder).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new(
            "instruction",
            DataType::Utf8,
            true,
        )]));
        let array: ArrayRef = Arc::new(StringArray::from(values.to_vec()));
        let batch = RecordBatch::try_new(schema.clone(), vec![array]).unwrap();
        let file = std::fs::File::create(folder.join("data-00000-of-00001.arrow")).unwrap();
        let mut w = StreamWriter::try_new(file, &schema).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        std::fs::write(
            folder.join("state.json"),
            r#"{"_data_files":[{"filename":"data-00000-of-00001.arrow"}]}"#,
        )
        .unwrap();
    }

    #[test]
    fn reads_dict_splits_and_names_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        write_split(&dir.path().join("train"), &["가", "나"]);
        write_split(&dir.path().join("validation"), &["다"]);
        std::fs::write(
            dir.path().join("dataset_dict.json"),
            r#"{"splits":["train","validation"]}"#,
        )
        .unwrap();
        let t = open(dir.path(), Some("validation"), false).unwrap();
        assert_eq!(t.rows, vec![vec![Cell::Text("다".into())]]);
        let err = open(dir.path(), Some("test"), true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no split 'test'; splits are: train, validation"),
            "{err}"
        );
        let t = open(&dir.path().join("train"), None, false).unwrap();
        assert_eq!(t.rows.len(), 2);
    }

    #[test]
    fn plain_folder_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(dir.path(), None, false).unwrap_err().to_string();
        assert!(err.contains("save_to_disk"), "{err}");
    }
}
