//! Parquet split files: snappy-compressed (what `datasets` writes), UTF-8 `string` columns,
//! non-null, one row group per 100k rows.

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema as ArrowSchema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::Columns;
use crate::error::{DataError, Result};
use crate::pairs::Pair;

const ROW_GROUP: usize = 100_000;

pub(crate) fn write(path: &std::path::Path, pairs: &[Pair], columns: Columns) -> Result<()> {
    let failed = |e: &dyn std::fmt::Display| DataError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut fields: Vec<Field> = columns
        .schema
        .text_columns()
        .iter()
        .map(|n| Field::new(*n, DataType::Utf8, false))
        .collect();
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            pairs.iter().map(|p| p.prompt.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            pairs.iter().map(|p| p.chosen.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            pairs.iter().map(|p| p.rejected.as_str()),
        )),
    ];
    if columns.ref_chosen {
        fields.push(Field::new("ref_chosen_logps", DataType::Float64, true));
        arrays.push(Arc::new(Float64Array::from_iter(
            pairs.iter().map(|p| p.ref_chosen_logps),
        )));
    }
    if columns.ref_rejected {
        fields.push(Field::new("ref_rejected_logps", DataType::Float64, true));
        arrays.push(Arc::new(Float64Array::from_iter(
            pairs.iter().map(|p| p.ref_rejected_logps),
        )));
    }
    let schema = Arc::new(ArrowSchema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), arrays).map_err(|e| failed(&e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP))
        .build();
    let file = std::fs::File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| failed(&e))?;
    writer.write(&batch).map_err(|e| failed(&e))?;
    writer.close().map_err(|e| failed(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Schema;
    use super::*;
    use crate::cell::Cell;

    #[test]
    fn round_trips_through_our_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let pairs = vec![Pair {
            prompt: "질문\n\"인용\"".into(),
            chosen: "좋음".into(),
            rejected: "나쁨".into(),
            ref_chosen_logps: None,
            ref_rejected_logps: Some(-3.5),
        }];
        let columns = Columns {
            schema: Schema::Trl,
            ref_chosen: false,
            ref_rejected: true,
        };
        write(&path, &pairs, columns).unwrap();
        let table = crate::ingest::open(&crate::ingest::SourceSpec::plain(&path), None).unwrap();
        assert_eq!(
            table.columns,
            vec!["prompt", "chosen", "rejected", "ref_rejected_logps"]
        );
        assert_eq!(table.rows[0][0], Cell::Text("질문\n\"인용\"".into()));
        assert_eq!(table.rows[0][3], Cell::Float(-3.5));
    }
}
