//! CSV and TSV sources: a header row, then records of text cells.
//!
//! CSV has no types, so every cell is text, kept exactly (a cell `42` stays the text "42");
//! an empty cell is empty text. Quoted cells may hold newlines and doubled quotes.

use std::path::Path;

use super::{Locator, Table, normalise_headers};
use crate::cell::Cell;
use crate::error::{DataError, Result};

pub(crate) fn read(path: &Path, delimiter: u8) -> Result<Table> {
    let mut bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        bytes.drain(..3); // Excel writes a BOM before the header
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes.as_slice());

    let header = reader
        .byte_headers()
        .map_err(|e| csv_error(path, &e))?
        .clone();
    let mut names = Vec::with_capacity(header.len());
    for (i, field) in header.iter().enumerate() {
        names.push(field_text(path, 1, i, field, "header")?.to_string());
    }
    let columns = normalise_headers(names);

    let mut rows = Vec::new();
    let mut lines = Vec::new();
    for record in reader.byte_records() {
        let record = record.map_err(|e| csv_error(path, &e))?;
        let line = record.position().map_or(0, |p| p.line());
        let mut row = Vec::with_capacity(record.len());
        for (i, field) in record.iter().enumerate() {
            let column = columns.get(i).map_or("?", String::as_str);
            row.push(Cell::Text(
                field_text(path, line, i, field, column)?.to_string(),
            ));
        }
        rows.push(row);
        lines.push(line);
    }
    Ok(Table {
        source: path.display().to_string(),
        columns,
        rows,
        locator: Locator::Lines(lines),
    })
}

fn field_text<'a>(
    path: &Path,
    line: u64,
    index: usize,
    field: &'a [u8],
    column: &str,
) -> Result<&'a str> {
    std::str::from_utf8(field).map_err(|e| DataError::InvalidUtf8 {
        path: path.to_path_buf(),
        where_: format!("line {line}, column {} ({column})", index + 1),
        byte: e.valid_up_to() + 1,
        unit: "cell",
    })
}

fn csv_error(path: &Path, e: &csv::Error) -> DataError {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            pos,
            expected_len,
            len,
        } => DataError::parse(
            path,
            format!("line {}", pos.as_ref().map_or(0, |p| p.line())),
            format!("expected {expected_len} fields like the header, found {len}"),
        ),
        _ => DataError::parse(
            path,
            e.position()
                .map_or_else(|| "?".to_string(), |p| format!("line {}", p.line())),
            e.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_newlines_and_quotes_survive() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.csv");
        std::fs::write(&p, "\u{feff}instruction,output\n\"줄\n바꿈\",\"그는 \"\"안녕\"\"이라 했다\"\n숫자,42\n빈,\n".as_bytes())
            .unwrap();
        let t = read(&p, b',').unwrap();
        assert_eq!(t.columns, vec!["instruction", "output"]);
        assert_eq!(t.rows[0][0], Cell::Text("줄\n바꿈".into()));
        assert_eq!(t.rows[0][1], Cell::Text("그는 \"안녕\"이라 했다".into()));
        assert_eq!(t.rows[1][1], Cell::Text("42".into()));
        assert_eq!(t.rows[2][1], Cell::Text(String::new()));
        assert_eq!(t.location(1), "line 4");
    }

    #[test]
    fn ragged_rows_and_bad_utf8_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.tsv");
        std::fs::write(&p, b"a\tb\n1\t2\n3\n").unwrap();
        let err = read(&p, b'\t').unwrap_err().to_string();
        assert!(
            err.contains("line 3: expected 2 fields like the header, found 1"),
            "{err}"
        );
        std::fs::write(&p, b"a\tb\n1\t\xfe\n").unwrap();
        let err = read(&p, b'\t').unwrap_err().to_string();
        assert!(err.contains("line 2, column 2 (b): invalid UTF-8"), "{err}");
    }
}
