//! Parquet sources (pyarrow, pandas, `datasets`): every row group, every column.

use std::path::Path;

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::arrow_cells::{append_batches, column_names};
use super::{Locator, Table};
use crate::error::{DataError, Result};

pub(crate) fn read(path: &Path) -> Result<Table> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let bad = |e: &dyn std::fmt::Display| DataError::parse(path, "parquet", e.to_string());
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(&e))?;
    let columns = column_names(builder.schema());
    let reader = builder.build().map_err(|e| bad(&e))?;
    let mut rows = Vec::new();
    append_batches(path, reader, &mut rows)?;
    Ok(Table {
        source: path.display().to_string(),
        columns,
        rows,
        locator: Locator::ROWS,
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
