//! Arrow record batches (from parquet or IPC streams) → rows of [`Cell`]s.

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{ArrowError, DataType, Schema};

use crate::cell::Cell;
use crate::error::{DataError, Result};

/// Column names of an Arrow schema, in order.
pub(crate) fn column_names(schema: &Schema) -> Vec<String> {
    schema.fields().iter().map(|f| f.name().clone()).collect()
}

/// Appends every batch an Arrow reader (parquet, IPC stream) yields to `rows`. Arrow
/// validates UTF-8 while decoding, so a bad string surfaces here: the error names the file
/// and the row it was near.
pub(crate) fn append_batches(
    path: &Path,
    batches: impl IntoIterator<Item = std::result::Result<RecordBatch, ArrowError>>,
    rows: &mut Vec<Vec<Cell>>,
) -> Result<()> {
    for batch in batches {
        let batch = batch.map_err(|e| {
            DataError::parse(path, format!("near row {}", rows.len() + 1), e.to_string())
        })?;
        append_batch(&batch, rows);
    }
    Ok(())
}

/// Appends the batch's rows to `rows` (one `Vec<Cell>` per row, one cell per column).
fn append_batch(batch: &RecordBatch, rows: &mut Vec<Vec<Cell>>) {
    let first = rows.len();
    rows.extend((0..batch.num_rows()).map(|_| Vec::with_capacity(batch.num_columns())));
    for column in batch.columns() {
        let cells = array_cells(column.as_ref());
        for (row, cell) in rows[first..].iter_mut().zip(cells) {
            row.push(cell);
        }
    }
}

/// One cell per element of `array`; nulls become [`Cell::Null`].
fn array_cells(array: &dyn Array) -> Vec<Cell> {
    fn each<T>(
        array: &dyn Array,
        len: usize,
        get: impl Fn(usize) -> T,
        wrap: impl Fn(T) -> Cell,
    ) -> Vec<Cell> {
        (0..len)
            .map(|i| {
                if array.is_null(i) {
                    Cell::Null
                } else {
                    wrap(get(i))
                }
            })
            .collect()
    }
    let n = array.len();
    macro_rules! ints {
        ($t:ty) => {{
            let a = array.as_primitive::<$t>();
            each(array, n, |i| a.value(i), |v| Cell::Int(v as i64))
        }};
    }
    match array.data_type() {
        DataType::Null => vec![Cell::Null; n],
        DataType::Utf8 => {
            let a = array.as_string::<i32>();
            each(array, n, |i| a.value(i).to_string(), Cell::Text)
        }
        DataType::LargeUtf8 => {
            let a = array.as_string::<i64>();
            each(array, n, |i| a.value(i).to_string(), Cell::Text)
        }
        DataType::Utf8View => {
            let a = array.as_string_view();
            each(array, n, |i| a.value(i).to_string(), Cell::Text)
        }
        DataType::Boolean => {
            let a = array.as_boolean();
            each(array, n, |i| a.value(i), Cell::Bool)
        }
        DataType::Int8 => ints!(Int8Type),
        DataType::Int16 => ints!(Int16Type),
        DataType::Int32 => ints!(Int32Type),
        DataType::Int64 => ints!(Int64Type),
        DataType::UInt8 => ints!(UInt8Type),
        DataType::UInt16 => ints!(UInt16Type),
        DataType::UInt32 => ints!(UInt32Type),
        DataType::UInt64 => {
            let a = array.as_primitive::<UInt64Type>();
            each(
                array,
                n,
                |i| a.value(i),
                |v| i64::try_from(v).map_or(Cell::Float(v as f64), Cell::Int),
            )
        }
        DataType::Float32 => {
            let a = array.as_primitive::<Float32Type>();
            each(array, n, |i| a.value(i) as f64, Cell::Float)
        }
        DataType::Float64 => {
            let a = array.as_primitive::<Float64Type>();
            each(array, n, |i| a.value(i), Cell::Float)
        }
        DataType::Dictionary(_, _) => {
            // pandas categoricals and `datasets` ClassLabel-like columns arrive dictionary-encoded.
            let dict = array.as_any_dictionary();
            let values = array_cells(dict.values().as_ref());
            let keys = dict.normalized_keys();
            (0..n)
                .map(|i| {
                    if array.is_null(i) {
                        Cell::Null
                    } else {
                        values.get(keys[i]).cloned().unwrap_or(Cell::Null)
                    }
                })
                .collect()
        }
        other => {
            let name = format!("a value of Arrow type {other}");
            (0..n)
                .map(|i| {
                    if array.is_null(i) {
                        Cell::Null
                    } else {
                        Cell::Other(name.clone())
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Float64Array, Int64Array, ListArray, StringArray};
    use arrow_schema::{Field, Schema};

    use super::*;

    #[test]
    fn converts_types_and_nulls() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("s", DataType::Utf8, true),
            Field::new("i", DataType::Int64, true),
            Field::new("f", DataType::Float64, true),
            Field::new_list("l", Field::new_list_field(DataType::Int64, true), true),
        ]));
        let list =
            ListArray::from_iter_primitive::<Int64Type, _, _>(vec![Some(vec![Some(1)]), None]);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![Some("한글"), None])),
            Arc::new(Int64Array::from(vec![Some(7), None])),
            Arc::new(Float64Array::from(vec![Some(0.5), Some(f64::NAN)])),
            Arc::new(list),
        ];
        let batch = RecordBatch::try_new(schema, columns).unwrap();
        let mut rows = Vec::new();
        append_batch(&batch, &mut rows);
        assert_eq!(rows[0][0], Cell::Text("한글".into()));
        assert_eq!(rows[0][1], Cell::Int(7));
        assert_eq!(rows[0][2], Cell::Float(0.5));
        assert!(matches!(&rows[0][3], Cell::Other(s) if s.contains("List")));
        assert_eq!(rows[1][0], Cell::Null);
        assert_eq!(rows[1][1], Cell::Null);
        assert_eq!(rows[1][3], Cell::Null);
    }
}
