//! JSON rows → one parquet file with typed columns.
//!
//! A generic table writer for rows that are JSON objects (the samples `prefer sample --out
//! FILE.parquet` converts from its JSON Lines). The caller declares the columns whose type it
//! knows ([`ColumnSpec`]); every other key gets a type inferred from all rows' values.
//! [`jsonl_to_parquet`] reads its input twice — once to infer, once to write in batches of
//! [`BATCH_ROWS`] — so memory holds one batch, not the table, and writes into a temporary
//! sibling renamed into place when complete ([`super::staging::StagedFile`]).
//!
//! Columns come in the rows' key order (a key first seen in a later row goes right after
//! the key that precedes it there). A nullable declared column is written when some row has
//! its key; a required one always (a row without it is an error).
//!
//! Inference, per undeclared column over every row (nulls and missing keys do not count):
//!
//! | values | column type |
//! |---|---|
//! | booleans | bool |
//! | integers (within int64) | int64 |
//! | numbers, some with a fraction | float64 |
//! | strings | string |
//! | lists | list of the elements' type (by the same rule; string if every list is empty) |
//! | objects | struct: the union of their keys (in first-seen order), each typed by the same rule |
//! | nothing but nulls | string |
//! | anything else: mixed types, integers beyond int64, objects without keys | string: strings as they are, other values as their JSON text |
//!
//! Inferred columns, list elements and struct fields are all nullable. Declared values are
//! checked against their type: a mismatch is an error naming the line and the column, and no
//! file is left behind.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{NullBufferBuilder, OffsetBufferBuilder};
use arrow_array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, ListArray,
    RecordBatch, StringArray, StructArray,
};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value};

use super::staging::StagedFile;
use crate::error::{DataError, Result};

/// Rows per record batch handed to the parquet writer: what is in memory at once.
pub const BATCH_ROWS: usize = 1024;
/// Row groups end at 100k rows or about 128 MiB encoded, whichever comes first: rows with
/// long token lists are far larger than a pair's, and a reader holds a row group at a time.
const ROW_GROUP_ROWS: usize = 100_000;
const ROW_GROUP_BYTES: usize = 128 << 20;

/// A column's type. Each maps to one Arrow type (what `datasets` shows as the feature).
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnType {
    Bool,
    Int32,
    Int64,
    Float32,
    Float64,
    /// Strings only.
    Utf8,
    /// A string column that takes any value: strings as they are, others as JSON text.
    JsonText,
    /// A list; its elements are nullable.
    List(Box<ColumnType>),
    /// An object with these fields (all nullable); a key outside them is an error.
    Struct(Vec<(String, ColumnType)>),
}

impl ColumnType {
    pub fn list(item: ColumnType) -> ColumnType {
        ColumnType::List(Box::new(item))
    }

    pub fn structure(fields: &[(&str, ColumnType)]) -> ColumnType {
        ColumnType::Struct(
            fields
                .iter()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect(),
        )
    }

    /// The Arrow type written.
    pub fn arrow(&self) -> DataType {
        match self {
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float32 => DataType::Float32,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Utf8 | ColumnType::JsonText => DataType::Utf8,
            ColumnType::List(item) => DataType::List(Arc::new(list_item(item))),
            ColumnType::Struct(fields) => DataType::Struct(struct_fields(fields)),
        }
    }
}

/// The element field of a list, named `item` as pyarrow and `datasets` name it.
fn list_item(item: &ColumnType) -> Field {
    Field::new("item", item.arrow(), true)
}

fn struct_fields(fields: &[(String, ColumnType)]) -> Fields {
    fields
        .iter()
        .map(|(n, t)| Field::new(n, t.arrow(), true))
        .collect()
}

/// Written the way Arrow and `datasets` print types: `list<int32>`, `struct<id: int32>`.
impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::Bool => f.write_str("bool"),
            ColumnType::Int32 => f.write_str("int32"),
            ColumnType::Int64 => f.write_str("int64"),
            ColumnType::Float32 => f.write_str("float32"),
            ColumnType::Float64 => f.write_str("float64"),
            ColumnType::Utf8 => f.write_str("string"),
            ColumnType::JsonText => f.write_str("string (any value, as JSON text)"),
            ColumnType::List(item) => write!(f, "list<{item}>"),
            ColumnType::Struct(fields) => {
                f.write_str("struct<")?;
                for (i, (n, t)) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{n}: {t}")?;
                }
                f.write_str(">")
            }
        }
    }
}

/// A column: its name, its type, and whether a row may lack it (missing key or null).
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnSpec {
    pub name: String,
    pub ty: ColumnType,
    pub nullable: bool,
}

impl ColumnSpec {
    pub fn new(name: &str, ty: ColumnType, nullable: bool) -> ColumnSpec {
        ColumnSpec {
            name: name.to_string(),
            ty,
            nullable,
        }
    }
}

/// What [`jsonl_to_parquet`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    pub rows: usize,
    /// The file's columns, in order, with their types.
    pub columns: Vec<ColumnSpec>,
}

/// Converts the JSON Lines file `jsonl` (one object per line; blank lines skipped) into the
/// parquet file `out`, replacing it only when complete. `declared` fixes the type of those
/// columns; `adapt` reshapes every row before it is typed and written (the same way in both
/// passes).
pub fn jsonl_to_parquet(
    jsonl: &Path,
    out: &Path,
    declared: &[ColumnSpec],
    adapt: &dyn Fn(&mut Map<String, Value>),
) -> Result<Converted> {
    let mut layout = Layout::new(declared);
    let mut rows = 0;
    for_each_row(jsonl, |_, mut row| {
        adapt(&mut row);
        layout.observe(&row);
        rows += 1;
        Ok(())
    })?;
    let columns = layout.columns(rows == 0);
    if columns.is_empty() {
        return Err(DataError::Write {
            path: out.to_path_buf(),
            message: format!("{} has no rows and no columns to write", jsonl.display()),
        });
    }
    let mut writer = RowsWriter::create(out, columns.clone())?;
    let mut batch: Vec<(usize, Map<String, Value>)> = Vec::with_capacity(BATCH_ROWS);
    for_each_row(jsonl, |line, mut row| {
        adapt(&mut row);
        batch.push((line, row));
        if batch.len() == BATCH_ROWS {
            writer.write(jsonl, &batch)?;
            batch.clear();
        }
        Ok(())
    })?;
    if !batch.is_empty() {
        writer.write(jsonl, &batch)?;
    }
    if writer.rows != rows {
        return Err(DataError::Write {
            path: out.to_path_buf(),
            message: format!(
                "{} changed while it was converted ({rows} rows, then {})",
                jsonl.display(),
                writer.rows
            ),
        });
    }
    writer.finish()?;
    Ok(Converted { rows, columns })
}

/// Calls `f(line, object)` for each non-blank line of a JSON Lines file.
fn for_each_row(
    path: &Path,
    mut f: impl FnMut(usize, Map<String, Value>) -> Result<()>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value: Value = serde_json::from_slice(&buf).map_err(|e| {
            DataError::parse(path, format!("line {line}"), format!("not valid JSON: {e}"))
        })?;
        let Value::Object(row) = value else {
            return Err(DataError::parse(
                path,
                format!("line {line}"),
                format!(
                    "expected a JSON object, found {}",
                    crate::ingest::json_kind(&value)
                ),
            ));
        };
        f(line, row)?;
    }
}

// ---------------------------------------------------------------- inference

/// What the values of an undeclared column (or of a nested list or field) have been so far.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// Only nulls, or nothing.
    Nothing,
    Bool,
    Int,
    Float,
    Text,
    List(Box<Seen>),
    Struct(Vec<(String, Seen)>),
    /// Values that share no type: the column is written as JSON text.
    Conflict,
}

impl Seen {
    fn observe(&mut self, value: &Value) {
        match value {
            Value::Null => {}
            _ if *self == Seen::Conflict => {}
            Value::Bool(_) => self.scalar(Seen::Bool),
            Value::Number(n) if n.is_i64() => self.scalar(Seen::Int),
            // A u64 beyond int64 fits no integer column, and float64 would round it.
            Value::Number(n) if n.is_u64() => *self = Seen::Conflict,
            Value::Number(_) => self.scalar(Seen::Float),
            Value::String(_) => self.scalar(Seen::Text),
            Value::Array(items) => {
                if *self == Seen::Nothing {
                    *self = Seen::List(Box::new(Seen::Nothing));
                }
                match self {
                    Seen::List(item) => items.iter().for_each(|v| item.observe(v)),
                    _ => *self = Seen::Conflict,
                }
            }
            Value::Object(map) => {
                if *self == Seen::Nothing {
                    *self = Seen::Struct(Vec::new());
                }
                match self {
                    Seen::Struct(fields) => observe_fields(fields, map),
                    _ => *self = Seen::Conflict,
                }
            }
        }
    }

    fn scalar(&mut self, kind: Seen) {
        *self = match (&*self, &kind) {
            (Seen::Nothing, _) => kind,
            (a, b) if a == b => kind,
            (Seen::Int, Seen::Float) | (Seen::Float, Seen::Int) => Seen::Float,
            _ => Seen::Conflict,
        };
    }

    /// The column type, or `None` where some part conflicts (the caller falls back to JSON
    /// text for the whole column: a list or struct cannot hold a string in its place).
    fn resolve(&self) -> Option<ColumnType> {
        Some(match self {
            Seen::Nothing | Seen::Text => ColumnType::Utf8,
            Seen::Bool => ColumnType::Bool,
            Seen::Int => ColumnType::Int64,
            Seen::Float => ColumnType::Float64,
            Seen::List(item) => ColumnType::list(item.resolve()?),
            // Parquet has no group without fields.
            Seen::Struct(fields) if fields.is_empty() => return None,
            Seen::Struct(fields) => ColumnType::Struct(
                fields
                    .iter()
                    .map(|(n, s)| Some((n.clone(), s.resolve()?)))
                    .collect::<Option<Vec<_>>>()?,
            ),
            Seen::Conflict => return None,
        })
    }
}

/// Adds an object's keys to a struct's fields (a new key right after the one before it in
/// this object) and observes their values.
fn observe_fields(fields: &mut Vec<(String, Seen)>, map: &Map<String, Value>) {
    let mut at = 0;
    for (key, value) in map {
        let i = match fields.iter().position(|(n, _)| n == key) {
            Some(i) => i,
            None => {
                fields.insert(at, (key.clone(), Seen::Nothing));
                at
            }
        };
        fields[i].1.observe(value);
        at = i + 1;
    }
}

/// The columns of a table being inferred: their order and what each has seen.
struct Layout<'a> {
    declared: HashMap<&'a str, &'a ColumnSpec>,
    /// Every declared column, in the caller's order (written as they are when there are no rows).
    declared_order: &'a [ColumnSpec],
    order: Vec<String>,
    /// `None` for declared columns.
    seen: HashMap<String, Option<Seen>>,
}

impl<'a> Layout<'a> {
    fn new(declared: &'a [ColumnSpec]) -> Self {
        Layout {
            declared: declared.iter().map(|c| (c.name.as_str(), c)).collect(),
            declared_order: declared,
            order: Vec::new(),
            seen: HashMap::new(),
        }
    }

    fn observe(&mut self, row: &Map<String, Value>) {
        let mut at = 0;
        for (key, value) in row {
            if !self.seen.contains_key(key) {
                self.order.insert(at, key.clone());
                let state = (!self.declared.contains_key(key.as_str())).then_some(Seen::Nothing);
                self.seen.insert(key.clone(), state);
            }
            if let Some(Some(seen)) = self.seen.get_mut(key) {
                seen.observe(value);
            }
            // The next new key goes right after this one. Rows mostly repeat the previous
            // rows' key order, so the key is usually at `at` and no search is needed.
            at = match self.order.get(at) {
                Some(k) if k == key => at + 1,
                _ => self
                    .order
                    .iter()
                    .position(|k| k == key)
                    .map_or(at, |i| i + 1),
            };
        }
    }

    fn columns(&self, empty: bool) -> Vec<ColumnSpec> {
        if empty {
            return self.declared_order.to_vec();
        }
        let mut columns: Vec<ColumnSpec> = self
            .order
            .iter()
            .map(|name| match &self.seen[name] {
                None => self.declared[name.as_str()].clone(),
                Some(seen) => ColumnSpec {
                    name: name.clone(),
                    ty: seen.resolve().unwrap_or(ColumnType::JsonText),
                    nullable: true,
                },
            })
            .collect();
        // A required column no row has: kept, so that writing reports the first row lacking it.
        columns.extend(
            self.declared_order
                .iter()
                .filter(|c| !c.nullable && !self.seen.contains_key(&c.name))
                .cloned(),
        );
        columns
    }
}

// ---------------------------------------------------------------- writing

/// A parquet file being written batch by batch into its staged temporary path.
struct RowsWriter {
    staged: StagedFile,
    target: std::path::PathBuf,
    columns: Vec<ColumnSpec>,
    names: HashSet<String>,
    schema: Arc<Schema>,
    writer: ArrowWriter<std::fs::File>,
    rows: usize,
}

impl RowsWriter {
    fn create(target: &Path, columns: Vec<ColumnSpec>) -> Result<Self> {
        let staged = StagedFile::new(target)?;
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(&c.name, c.ty.arrow(), c.nullable))
                .collect::<Vec<_>>(),
        ));
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
            .build();
        let file = std::fs::File::create(staged.path()).map_err(|e| DataError::io(target, e))?;
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
            .map_err(|e| write_error(target, &e))?;
        Ok(RowsWriter {
            staged,
            target: target.to_path_buf(),
            names: columns.iter().map(|c| c.name.clone()).collect(),
            columns,
            schema,
            writer,
            rows: 0,
        })
    }

    /// Writes rows (each with its line in `source`, for messages).
    fn write(&mut self, source: &Path, rows: &[(usize, Map<String, Value>)]) -> Result<()> {
        let lines: Vec<usize> = rows.iter().map(|(l, _)| *l).collect();
        for (line, row) in rows {
            if let Some(key) = row.keys().find(|k| !self.names.contains(*k)) {
                return Err(DataError::parse(
                    source,
                    format!("line {line}, column '{key}'"),
                    "a column the first pass over the file did not see (did the file change?)",
                ));
            }
        }
        let index: Vec<usize> = (0..rows.len()).collect();
        let mut arrays = Vec::with_capacity(self.columns.len());
        for column in &self.columns {
            let values: Vec<Option<&Value>> =
                rows.iter().map(|(_, r)| r.get(&column.name)).collect();
            let array = build(&column.ty, &values, &index, !column.nullable, &column.name)
                .map_err(|e| match e {
                    BuildError::Mismatch(m) => DataError::parse(
                        source,
                        format!("line {}, column '{}'", lines[m.row], column.name),
                        m.message(&column.name),
                    ),
                    BuildError::Arrow(msg) => DataError::Write {
                        path: self.target.clone(),
                        message: format!("column '{}': {msg}", column.name),
                    },
                })?;
            arrays.push(array);
        }
        let batch = RecordBatch::try_new(self.schema.clone(), arrays)
            .map_err(|e| write_error(&self.target, &e))?;
        self.writer
            .write(&batch)
            .map_err(|e| write_error(&self.target, &e))?;
        self.rows += rows.len();
        Ok(())
    }

    /// Writes the footer, syncs the file and renames it into place.
    fn finish(self) -> Result<()> {
        let file = self
            .writer
            .into_inner()
            .map_err(|e| write_error(&self.target, &e))?;
        file.sync_all()
            .map_err(|e| DataError::io(&self.target, e))?;
        drop(file);
        self.staged.commit()
    }
}

fn write_error(path: &Path, e: &dyn fmt::Display) -> DataError {
    DataError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A value that does not fit its column's type.
#[derive(Debug)]
struct Mismatch {
    /// Row within the batch.
    row: usize,
    /// Where in the column: `token_ids[]`, `stop_reason.token_id`.
    at: String,
    expected: String,
    found: String,
}

impl Mismatch {
    fn message(&self, column: &str) -> String {
        let inside = if self.at == column {
            String::new()
        } else {
            format!("at {}: ", self.at)
        };
        format!("{inside}expected {}, found {}", self.expected, self.found)
    }
}

#[derive(Debug)]
enum BuildError {
    Mismatch(Mismatch),
    /// Arrow refused arrays we built (a bug, or a batch beyond its offsets).
    Arrow(String),
}

type Built = std::result::Result<ArrayRef, BuildError>;

/// What a value is, for messages.
fn describe(value: Option<&Value>) -> String {
    match value {
        None => "no value".into(),
        Some(Value::Null) => "null".into(),
        Some(Value::Bool(b)) => format!("the boolean {b}"),
        Some(Value::Number(n)) => format!("the number {n}"),
        Some(Value::String(s)) => {
            let short: String = s.chars().take(40).collect();
            let more = if short.len() < s.len() { "…" } else { "" };
            format!("the string {short:?}{more}")
        }
        Some(Value::Array(items)) => format!("a list of {} values", items.len()),
        Some(Value::Object(_)) => "an object".into(),
    }
}

/// One array of type `ty` from `values` (`rows[i]`: the batch row of `values[i]`, for
/// messages). `required`: a missing or null value is a mismatch, not a null.
fn build(
    ty: &ColumnType,
    values: &[Option<&Value>],
    rows: &[usize],
    required: bool,
    at: &str,
) -> Built {
    let mismatch = |i: usize, found: String| {
        BuildError::Mismatch(Mismatch {
            row: rows[i],
            at: at.to_string(),
            expected: if required {
                format!("{ty} (required)")
            } else {
                ty.to_string()
            },
            found,
        })
    };
    // Each value as `Option<T>` (None for null), through `get`.
    fn each<'v, T>(
        values: &[Option<&'v Value>],
        required: bool,
        get: impl Fn(&'v Value) -> Option<T>,
        mismatch: impl Fn(usize, String) -> BuildError,
    ) -> std::result::Result<Vec<Option<T>>, BuildError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                None | Some(Value::Null) if required => Err(mismatch(i, describe(*v))),
                None | Some(Value::Null) => Ok(None),
                Some(v) => get(v)
                    .map(Some)
                    .ok_or_else(|| mismatch(i, describe(Some(v)))),
            })
            .collect()
    }
    Ok(match ty {
        ColumnType::Bool => Arc::new(BooleanArray::from(each(
            values,
            required,
            Value::as_bool,
            mismatch,
        )?)),
        ColumnType::Int64 => Arc::new(Int64Array::from(each(
            values,
            required,
            Value::as_i64,
            mismatch,
        )?)),
        ColumnType::Int32 => Arc::new(Int32Array::from(each(
            values,
            required,
            |v| v.as_i64().and_then(|i| i32::try_from(i).ok()),
            mismatch,
        )?)),
        ColumnType::Float64 => Arc::new(Float64Array::from(each(
            values,
            required,
            Value::as_f64,
            mismatch,
        )?)),
        ColumnType::Float32 => Arc::new(Float32Array::from(each(
            values,
            required,
            // Beyond float32's range is a mismatch, not an infinity.
            |v| v.as_f64().map(|x| x as f32).filter(|x| x.is_finite()),
            mismatch,
        )?)),
        ColumnType::Utf8 => {
            let strings = each(values, required, Value::as_str, mismatch)?;
            Arc::new(StringArray::from(strings))
        }
        ColumnType::JsonText => {
            let strings = each(
                values,
                required,
                |v| {
                    Some(match v {
                        Value::String(s) => Cow::Borrowed(s.as_str()),
                        other => Cow::Owned(other.to_string()),
                    })
                },
                mismatch,
            )?;
            Arc::new(StringArray::from_iter(strings.iter().map(|s| s.as_deref())))
        }
        ColumnType::List(item) => {
            let mut offsets = OffsetBufferBuilder::<i32>::new(values.len());
            let mut nulls = NullBufferBuilder::new(values.len());
            let mut items: Vec<Option<&Value>> = Vec::new();
            let mut item_rows: Vec<usize> = Vec::new();
            for (i, v) in values.iter().enumerate() {
                match v {
                    None | Some(Value::Null) if required => return Err(mismatch(i, describe(*v))),
                    None | Some(Value::Null) => {
                        nulls.append_null();
                        offsets.push_length(0);
                    }
                    Some(Value::Array(list)) => {
                        nulls.append_non_null();
                        offsets
                            .try_push_length(list.len())
                            .map_err(|e| BuildError::Arrow(e.to_string()))?;
                        items.extend(list.iter().map(Some));
                        item_rows.extend(std::iter::repeat_n(rows[i], list.len()));
                    }
                    Some(other) => return Err(mismatch(i, describe(Some(other)))),
                }
            }
            let child = build(item, &items, &item_rows, false, &format!("{at}[]"))?;
            let offsets = offsets
                .try_finish()
                .map_err(|e| BuildError::Arrow(e.to_string()))?;
            Arc::new(
                ListArray::try_new(Arc::new(list_item(item)), offsets, child, nulls.finish())
                    .map_err(|e| BuildError::Arrow(e.to_string()))?,
            )
        }
        ColumnType::Struct(fields) => {
            let mut nulls = NullBufferBuilder::new(values.len());
            for (i, v) in values.iter().enumerate() {
                match v {
                    None | Some(Value::Null) if required => return Err(mismatch(i, describe(*v))),
                    None | Some(Value::Null) => nulls.append_null(),
                    Some(Value::Object(map)) => {
                        if let Some(key) = map.keys().find(|k| !fields.iter().any(|(n, _)| n == *k))
                        {
                            return Err(mismatch(i, format!("an object with a field '{key}'")));
                        }
                        nulls.append_non_null();
                    }
                    Some(other) => return Err(mismatch(i, describe(Some(other)))),
                }
            }
            let mut children = Vec::with_capacity(fields.len());
            for (name, field_ty) in fields {
                let field_values: Vec<Option<&Value>> = values
                    .iter()
                    .map(|v| match v {
                        Some(Value::Object(map)) => map.get(name),
                        _ => None,
                    })
                    .collect();
                children.push(build(
                    field_ty,
                    &field_values,
                    rows,
                    false,
                    &format!("{at}.{name}"),
                )?);
            }
            Arc::new(
                StructArray::try_new(struct_fields(fields), children, nulls.finish())
                    .map_err(|e| BuildError::Arrow(e.to_string()))?,
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use serde_json::json;

    use super::*;

    fn write_jsonl(path: &Path, rows: &[Value]) {
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(path, text).unwrap();
    }

    fn infer(rows: &[Value]) -> ColumnType {
        let mut seen = Seen::Nothing;
        for r in rows {
            seen.observe(r);
        }
        seen.resolve().unwrap_or(ColumnType::JsonText)
    }

    #[test]
    fn inference_follows_the_documented_rule() {
        use ColumnType::*;
        assert_eq!(infer(&[json!(true), json!(null), json!(false)]), Bool);
        assert_eq!(infer(&[json!(1), json!(-7)]), Int64);
        assert_eq!(infer(&[json!(1), json!(0.5)]), Float64);
        assert_eq!(infer(&[json!("a"), json!(null)]), Utf8);
        assert_eq!(infer(&[json!(null)]), Utf8);
        assert_eq!(infer(&[json!([1, 2]), json!([])]), ColumnType::list(Int64));
        assert_eq!(infer(&[json!([])]), ColumnType::list(Utf8));
        assert_eq!(
            infer(&[json!([[1.5], null]), json!([[2]])]),
            ColumnType::list(ColumnType::list(Float64))
        );
        // Struct fields: the union of keys, each typed by the same rule. (Their order
        // follows the maps' key order, which depends on serde_json's features: the CLI's
        // tests check it.)
        let ColumnType::Struct(fields) = infer(&[
            json!({"a": 1}),
            json!({"a": 2.5, "b": "x"}),
            json!({"c": true, "a": 3}),
        ]) else {
            panic!("not a struct")
        };
        let fields: HashMap<String, ColumnType> = fields.into_iter().collect();
        let want: HashMap<String, ColumnType> = [("a", Float64), ("b", Utf8), ("c", Bool)]
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect();
        assert_eq!(fields, want);
        // Anything else is JSON text.
        assert_eq!(infer(&[json!(1), json!("1")]), JsonText);
        assert_eq!(infer(&[json!([1]), json!(["a"])]), JsonText);
        assert_eq!(infer(&[json!({})]), JsonText);
        assert_eq!(infer(&[json!(u64::MAX)]), JsonText);
        assert_eq!(infer(&[json!([1]), json!({"a": 1})]), JsonText);
    }

    /// One array cell back as JSON, by a reader independent of the writer's code: what
    /// `datasets` would hand out (floats as f64 of the stored value).
    fn cell(array: &dyn Array, i: usize) -> Value {
        if array.is_null(i) {
            return Value::Null;
        }
        match array.data_type() {
            DataType::Boolean => json!(array.as_boolean().value(i)),
            DataType::Int32 => json!(array.as_primitive::<Int32Type>().value(i)),
            DataType::Int64 => json!(array.as_primitive::<Int64Type>().value(i)),
            DataType::Float32 => json!(array.as_primitive::<Float32Type>().value(i) as f64),
            DataType::Float64 => json!(array.as_primitive::<Float64Type>().value(i)),
            DataType::Utf8 => json!(array.as_string::<i32>().value(i)),
            DataType::List(_) => {
                let list = array.as_list::<i32>().value(i);
                Value::Array((0..list.len()).map(|j| cell(list.as_ref(), j)).collect())
            }
            DataType::Struct(fields) => {
                let s = array.as_struct();
                Value::Object(
                    fields
                        .iter()
                        .zip(s.columns())
                        .map(|(f, c)| (f.name().clone(), cell(c.as_ref(), i)))
                        .collect(),
                )
            }
            other => panic!("unexpected type {other}"),
        }
    }

    /// (schema, rows as JSON objects) of a parquet file.
    fn read_back(path: &Path) -> (Arc<Schema>, Vec<Map<String, Value>>) {
        let file = std::fs::File::open(path).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let schema = builder.schema().clone();
        let mut rows = Vec::new();
        for batch in builder.build().unwrap() {
            let batch = batch.unwrap();
            for i in 0..batch.num_rows() {
                rows.push(
                    schema
                        .fields()
                        .iter()
                        .zip(batch.columns())
                        .map(|(f, c)| (f.name().clone(), cell(c.as_ref(), i)))
                        .collect(),
                );
            }
        }
        (schema, rows)
    }

    fn declared() -> Vec<ColumnSpec> {
        vec![
            ColumnSpec::new("id", ColumnType::Utf8, false),
            ColumnSpec::new("ids", ColumnType::list(ColumnType::Int32), false),
            ColumnSpec::new("lps", ColumnType::list(ColumnType::Float32), true),
            ColumnSpec::new(
                "why",
                ColumnType::structure(&[
                    ("token_id", ColumnType::Int32),
                    ("string", ColumnType::Utf8),
                ]),
                true,
            ),
            ColumnSpec::new("never", ColumnType::Int64, true),
        ]
    }

    #[test]
    fn rows_round_trip_with_declared_and_inferred_types() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("rows.jsonl");
        let out = dir.path().join("rows.parquet");
        let rows = [
            json!({"id": "a:0", "ids": [1, 2, 2147483647], "lps": [-0.5, -9.211389], "why": 7,
                   "n": 1, "mix": 1, "obj": {"k": 1}, "tags": ["가", "나"], "x": null}),
            json!({"id": "a:1", "ids": [], "why": "###", "n": 2, "mix": "둘",
                   "obj": {"k": 2.5, "j": [true]}, "tags": [], "x": null}),
            json!({"id": "a:2", "ids": [3], "lps": null, "why": null, "n": -3, "mix": [1],
                   "obj": null, "x": null}),
        ];
        let mut text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        text.insert(0, '\n'); // a blank line is skipped, not a row
        std::fs::write(&src, text).unwrap();
        // The caller's reshaping: a stop reason as a struct of token id or string.
        let adapt = |row: &mut Map<String, Value>| {
            if let Some(v) = row.get_mut("why") {
                *v = match v.take() {
                    Value::Number(n) => json!({"token_id": n}),
                    Value::String(s) => json!({"string": s}),
                    other => other,
                };
            }
        };
        let converted = jsonl_to_parquet(&src, &out, &declared(), &adapt).unwrap();
        assert_eq!(converted.rows, 3);
        let (schema, got) = read_back(&out);
        let types: HashMap<&str, (DataType, bool)> = schema
            .fields()
            .iter()
            .map(|f| (f.name().as_str(), (f.data_type().clone(), f.is_nullable())))
            .collect();
        assert_eq!(types.len(), 9, "{types:?}"); // `never` appears in no row
        let check = |name: &str, ty: ColumnType, nullable: bool| {
            assert_eq!(types[name], (ty.arrow(), nullable), "{name}");
        };
        check("id", ColumnType::Utf8, false);
        check("ids", ColumnType::list(ColumnType::Int32), false);
        check("lps", ColumnType::list(ColumnType::Float32), true);
        check("n", ColumnType::Int64, true);
        check("mix", ColumnType::Utf8, true);
        check("x", ColumnType::Utf8, true);
        check("tags", ColumnType::list(ColumnType::Utf8), true);
        let obj = converted.columns.iter().find(|c| c.name == "obj").unwrap();
        let ColumnType::Struct(fields) = &obj.ty else {
            panic!("{obj:?}")
        };
        let mut fields = fields.clone();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            fields,
            vec![
                ("j".to_string(), ColumnType::list(ColumnType::Bool)),
                ("k".to_string(), ColumnType::Float64)
            ]
        );
        assert_eq!(
            types["obj"].0,
            obj.ty.arrow(),
            "the file has the reported type"
        );

        let want = [
            json!({"id": "a:0", "ids": [1, 2, 2147483647], "lps": [-0.5, -9.211389f32 as f64],
                   "why": {"token_id": 7, "string": null}, "n": 1, "mix": "1",
                   "obj": {"k": 1.0, "j": null}, "tags": ["가", "나"], "x": null}),
            json!({"id": "a:1", "ids": [], "lps": null, "why": {"token_id": null, "string": "###"},
                   "n": 2, "mix": "둘", "obj": {"k": 2.5, "j": [true]}, "tags": [], "x": null}),
            json!({"id": "a:2", "ids": [3], "lps": null, "why": null, "n": -3, "mix": "[1]",
                   "obj": null, "tags": null, "x": null}),
        ];
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(&Value::Object(g.clone()), w);
        }

        // The data ingest reads the scalar columns back with the same values.
        let table = crate::ingest::open(&crate::ingest::SourceSpec::plain(&out), None).unwrap();
        let col = |n: &str| table.columns.iter().position(|c| c == n).unwrap();
        use crate::cell::Cell;
        assert_eq!(table.rows[1][col("id")], Cell::Text("a:1".into()));
        assert_eq!(table.rows[2][col("n")], Cell::Int(-3));
        assert_eq!(table.rows[1][col("mix")], Cell::Text("둘".into()));
        assert_eq!(table.rows[0][col("x")], Cell::Null);
    }

    #[test]
    fn many_rows_cross_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("big.jsonl");
        let out = dir.path().join("big.parquet");
        let n = BATCH_ROWS * 2 + 5;
        let rows: Vec<Value> = (0..n)
            .map(|i| json!({"id": format!("r:{i}"), "ids": vec![i as i64; i % 4]}))
            .collect();
        write_jsonl(&src, &rows);
        let converted = jsonl_to_parquet(&src, &out, &declared(), &|_| {}).unwrap();
        assert_eq!(converted.rows, n);
        let (_, got) = read_back(&out);
        assert_eq!(got.len(), n);
        for (i, row) in got.iter().enumerate() {
            assert_eq!(row["id"], json!(format!("r:{i}")));
            assert_eq!(row["ids"], json!(vec![i as i64; i % 4]));
        }
    }

    #[test]
    fn declared_types_are_checked_and_nothing_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("bad.jsonl");
        let out = dir.path().join("bad.parquet");
        let check = |rows: &[Value], expect: &[&str]| {
            write_jsonl(&src, rows);
            let e = jsonl_to_parquet(&src, &out, &declared(), &|_| {})
                .unwrap_err()
                .to_string();
            for want in expect {
                assert!(e.contains(want), "expected {want:?} in: {e}");
            }
            assert!(e.contains("bad.jsonl"), "{e}");
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(left.len(), 1, "only the source remains");
        };
        let ok = json!({"id": "a", "ids": [1]});
        check(
            &[ok.clone(), json!({"id": "b", "ids": [1, "x"]})],
            &[
                "line 2, column 'ids'",
                "at ids[]: expected int32, found the string \"x\"",
            ],
        );
        check(
            &[
                ok.clone(),
                ok.clone(),
                json!({"id": "c", "ids": [2147483648u64]}),
            ],
            &["line 3, column 'ids'", "int32"],
        );
        check(
            &[json!({"id": "a"})],
            &[
                "line 1, column 'ids'",
                "expected list<int32> (required), found no value",
            ],
        );
        check(
            &[json!({"id": null, "ids": []})],
            &["line 1, column 'id'", "found null"],
        );
        check(
            &[json!({"id": "a", "ids": [], "why": {"token_id": 1, "extra": 2}})],
            &["column 'why'", "a field 'extra'"],
        );
        check(
            &[json!({"id": "a", "ids": [], "lps": [1e300]})],
            &["column 'lps'", "float32"],
        );
        std::fs::write(&src, "{\"id\": \"a\", \"ids\": []}\n[1]\n").unwrap();
        let e = jsonl_to_parquet(&src, &out, &declared(), &|_| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("expected a JSON object"),
            "{e}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn an_existing_target_is_replaced_only_when_the_new_file_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("rows.jsonl");
        let out = dir.path().join("rows.parquet");
        write_jsonl(&src, &[json!({"id": "a", "ids": [1]})]);
        jsonl_to_parquet(&src, &out, &declared(), &|_| {}).unwrap();
        let before = std::fs::read(&out).unwrap();
        write_jsonl(&src, &[json!({"id": "b", "ids": ["bad"]})]);
        assert!(jsonl_to_parquet(&src, &out, &declared(), &|_| {}).is_err());
        assert_eq!(std::fs::read(&out).unwrap(), before);
    }
}
