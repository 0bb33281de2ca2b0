//! Spreadsheets through calamine: one sheet (the first unless named), header in row 1.
//!
//! Excel stores every number as a float; the text rule turns integral ones back into
//! integers. Rows are reported with their spreadsheet row number (the header is row 1).

use std::path::Path;

use calamine::{Data, Reader, open_workbook_auto};

use super::{Locator, Table, normalise_headers};
use crate::cell::Cell;
use crate::error::{DataError, Result};

pub(crate) const EXTENSIONS: [&str; 5] = ["xlsx", "xlsm", "xlsb", "xls", "ods"];

pub(crate) fn read(path: &Path, sheet: Option<&str>) -> Result<Table> {
    let bad = |e: &dyn std::fmt::Display| DataError::parse(path, "workbook", e.to_string());
    let mut workbook = open_workbook_auto(path).map_err(|e| bad(&e))?;
    let names = workbook.sheet_names();
    let name = match sheet {
        Some(s) if names.iter().any(|n| n == s) => s.to_string(),
        Some(s) => {
            return Err(DataError::MissingSheet {
                path: path.to_path_buf(),
                sheet: s.to_string(),
                existing: names.join(", "),
            });
        }
        None => names.first().cloned().ok_or_else(|| DataError::NoRows {
            path: path.to_path_buf(),
            detail: " (the workbook has no sheets)".into(),
        })?,
    };
    let range = workbook.worksheet_range(&name).map_err(|e| bad(&e))?;
    // Rows are positioned from the range's start: a sheet whose data begins lower keeps its
    // real row numbers in messages.
    let first_row = range.start().map_or(0, |(r, _)| r as usize);
    let mut iter = range.rows();
    let Some(header) = iter.next() else {
        return Err(DataError::NoRows {
            path: path.to_path_buf(),
            detail: format!(" (sheet '{name}' is empty)"),
        });
    };
    let columns = normalise_headers(header.iter().map(header_text).collect());
    let rows: Vec<Vec<Cell>> = iter
        .map(|row| row.iter().map(cell).collect())
        // Trailing rows that are entirely blank (formatting only) are not data.
        .collect();
    let mut rows = rows;
    while rows
        .last()
        .is_some_and(|r: &Vec<Cell>| r.iter().all(|c| *c == Cell::Null))
    {
        rows.pop();
    }
    if rows.is_empty() {
        return Err(DataError::NoRows {
            path: path.to_path_buf(),
            detail: format!(" (sheet '{name}' has only a header)"),
        });
    }
    Ok(Table {
        source: format!("{}[{name}]", path.display()),
        columns,
        rows,
        locator: Locator::Numbered {
            unit: "row",
            first: first_row + 2,
        },
    })
}

fn header_text(data: &Data) -> String {
    match cell(data) {
        Cell::Text(s) => s,
        Cell::Null => String::new(),
        Cell::Int(i) => i.to_string(),
        Cell::Float(f) => f.to_string(),
        Cell::Bool(b) => b.to_string(),
        Cell::Other(s) => s,
    }
}

fn cell(data: &Data) -> Cell {
    match data {
        Data::Empty => Cell::Null,
        Data::String(s) => Cell::Text(s.clone()),
        Data::Int(i) => Cell::Int(*i),
        Data::Float(f) => Cell::Float(*f),
        Data::Bool(b) => Cell::Bool(*b),
        Data::DateTime(_) | Data::DateTimeIso(_) => Cell::Other("a date".into()),
        Data::DurationIso(_) => Cell::Other("a duration".into()),
        Data::Error(e) => Cell::Other(format!("an error cell ({e})")),
    }
}
