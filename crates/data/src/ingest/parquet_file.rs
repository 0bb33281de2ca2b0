//! Parquet sources (pyarrow, pandas, `datasets`): every row group, every column.

use std::path::Path;

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::arrow_cells::append_batch;
use super::{Locator, Table};
use crate::error::{DataError, Result};

pub(crate) fn read(path: &Path) -> Result<Table> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let bad = |e: &dyn std::fmt::Display| DataError::parse(path, "parquet", e.to_string());
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(&e))?;
    let columns: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let reader = builder.build().map_err(|e| bad(&e))?;
    let mut rows = Vec::new();
    for batch in reader {
        // arrow validates UTF-8 while decoding: a bad string surfaces here.
        let batch = batch.map_err(|e| {
            DataError::parse(path, format!("near row {}", rows.len() + 1), e.to_string())
        })?;
        append_batch(&batch, &mut rows);
    }
    Ok(Table {
        source: path.display().to_string(),
        columns,
        rows,
        locator: Locator::Numbered {
            unit: "row",
            first: 1,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_parse_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.parquet");
        std::fs::write(&p, b"not parquet at all").unwrap();
        let err = read(&p).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: parquet:", p.display())),
            "{err}"
        );
    }
}
