//! From a [`Table`] to [`Record`]s: apply the column mapping and the text rule.

use std::collections::BTreeMap;

use super::{SourceSpec, Table};
use crate::cell::{Cell, TextCell};
use crate::error::{DataError, Result};

/// The fields a source can feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    /// Join key with the samples `prefer sample` wrote.
    Id,
    /// A ready prompt, used verbatim instead of rendering a template.
    Prompt,
    Instruction,
    /// Alpaca's optional extra context.
    Input,
    /// The gold answer.
    Output,
}

impl Field {
    pub const ALL: [Field; 5] = [
        Field::Id,
        Field::Prompt,
        Field::Instruction,
        Field::Input,
        Field::Output,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Field::Id => "id",
            Field::Prompt => "prompt",
            Field::Instruction => "instruction",
            Field::Input => "input",
            Field::Output => "output",
        }
    }

    pub fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// What a caller needs from each row.
#[derive(Debug, Clone, Copy, Default)]
pub struct Requirements {
    /// The gold answer must be present (pairs); sampling does not need it.
    pub output: bool,
    /// Non-text cells are errors instead of conversions.
    pub strict: bool,
}

/// One usable row. `prompt` is set when the source maps a prompt column; otherwise
/// `instruction` is, and a template makes the prompt.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Record {
    /// 0-based index into the table's rows (for [`Table::location`]).
    pub row: usize,
    pub id: Option<String>,
    pub prompt: Option<String>,
    pub instruction: Option<String>,
    pub input: Option<String>,
    pub output: Option<String>,
}

/// What happened to the cells of one source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldReport {
    pub rows_read: usize,
    pub rows_kept: usize,
    /// Field name → cells converted from numbers or booleans.
    pub converted: BTreeMap<&'static str, usize>,
    /// Field name → rows dropped because that required field was empty (first empty field only).
    pub dropped_empty: BTreeMap<&'static str, usize>,
}

impl FieldReport {
    /// Adds another source's counts into this one.
    pub fn absorb(&mut self, other: &FieldReport) {
        self.rows_read += other.rows_read;
        self.rows_kept += other.rows_kept;
        for (k, v) in &other.converted {
            *self.converted.entry(k).or_default() += v;
        }
        for (k, v) in &other.dropped_empty {
            *self.dropped_empty.entry(k).or_default() += v;
        }
    }
}

/// Resolves the spec's column mapping against the table, then converts every row.
///
/// Mapped columns must exist. Unmapped fields use a column of their own name when there is
/// one; `instruction` (or `prompt`) and, when required, `output` must resolve.
pub fn records(
    table: &Table,
    spec: &SourceSpec,
    need: Requirements,
) -> Result<(Vec<Record>, FieldReport)> {
    let resolve = |field: Field| -> Result<Option<usize>> {
        match spec.column_for(field) {
            Some(column) => table
                .column_index(column, &format!(" (mapped to {})", field.name()))
                .map(Some),
            None => Ok(table.columns.iter().position(|c| c == field.name())),
        }
    };
    let id = resolve(Field::Id)?;
    let input = resolve(Field::Input)?;
    let output = resolve(Field::Output)?;
    let mut instruction = resolve(Field::Instruction)?;
    // A `prompt` column is used only when mapped, or when there is no instruction column.
    let prompt = match spec.column_for(Field::Prompt) {
        Some(_) => {
            instruction = None;
            resolve(Field::Prompt)?
        }
        None if instruction.is_none() => resolve(Field::Prompt)?,
        None => None,
    };
    if instruction.is_none() && prompt.is_none() {
        table.column_index(
            "instruction",
            " (map it with instruction=COLUMN, or prompt=COLUMN)",
        )?;
    }
    if need.output && output.is_none() {
        table.column_index("output", " (map it with output=COLUMN)")?;
    }

    let mut report = FieldReport {
        rows_read: table.rows.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(table.rows.len());
    'rows: for (row_index, row) in table.rows.iter().enumerate() {
        let mut record = Record {
            row: row_index,
            ..Default::default()
        };
        let required: [(Field, Option<usize>, bool); 4] = [
            (Field::Prompt, prompt, true),
            (Field::Instruction, instruction, true),
            (Field::Output, output, need.output),
            (Field::Input, input, false),
        ];
        for (field, column, is_required) in required {
            let Some(column) = column else { continue };
            let text = match row[column].to_text(need.strict) {
                Ok(t) => t,
                Err(not_text) => {
                    return Err(DataError::MixedType {
                        path: table.source.clone(),
                        where_: table.location(row_index),
                        column: table.columns[column].clone(),
                        found: not_text.found,
                    });
                }
            };
            let value = match text {
                TextCell::Text(s) => Some(s),
                TextCell::Converted(s) => {
                    *report.converted.entry(field.name()).or_default() += 1;
                    Some(s)
                }
                TextCell::Empty if is_required => {
                    *report.dropped_empty.entry(field.name()).or_default() += 1;
                    continue 'rows;
                }
                TextCell::Empty => None,
            };
            match field {
                Field::Prompt => record.prompt = value,
                Field::Instruction => record.instruction = value,
                Field::Output => record.output = value,
                Field::Input => record.input = value,
                Field::Id => {}
            }
        }
        if let Some(column) = id {
            record.id = match &row[column] {
                Cell::Other(found) => {
                    return Err(DataError::MixedType {
                        path: table.source.clone(),
                        where_: table.location(row_index),
                        column: table.columns[column].clone(),
                        found: found.clone(),
                    });
                }
                cell => cell.to_key(),
            };
        }
        out.push(record);
    }
    report.rows_kept = out.len();
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::super::Locator;
    use super::*;

    fn table(columns: &[&str], rows: Vec<Vec<Cell>>) -> Table {
        Table {
            source: "t.xlsx".into(),
            columns: columns.iter().map(|s| s.to_string()).collect(),
            rows,
            locator: Locator::Numbered {
                unit: "row",
                first: 2,
            },
        }
    }

    fn text(s: &str) -> Cell {
        Cell::Text(s.into())
    }

    /// What `prefer pairs` asks of a gold row: an output, cells converted to text.
    const GOLD: Requirements = Requirements {
        output: true,
        strict: false,
    };

    /// The message of the error `records` gives for a gold table.
    fn gold_error(t: &Table, spec: &SourceSpec) -> String {
        records(t, spec, GOLD).unwrap_err().to_string()
    }

    #[test]
    fn mapping_conversion_and_drops_are_counted() {
        let t = table(
            &["질문", "답변", "id"],
            vec![
                vec![text("보험이란?"), text("위험 분담"), Cell::Int(1)],
                vec![text("숫자?"), Cell::Float(42.0), Cell::Int(2)],
                vec![text("빈 답"), Cell::Null, Cell::Int(3)],
                vec![text("  "), text("x"), Cell::Int(4)],
            ],
        );
        let spec = SourceSpec::parse("t.xlsx:instruction=질문,output=답변").unwrap();
        let (recs, report) = records(&t, &spec, GOLD).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].output.as_deref(), Some("42"));
        assert_eq!(recs[1].id.as_deref(), Some("2"));
        assert_eq!(report.converted.get("output"), Some(&1));
        assert_eq!(report.dropped_empty.get("output"), Some(&1));
        assert_eq!(report.dropped_empty.get("instruction"), Some(&1));
        assert_eq!((report.rows_read, report.rows_kept), (4, 2));
    }

    #[test]
    fn mapped_column_must_exist_and_error_lists_columns() {
        let t = table(&["instruction", "answer"], vec![vec![text("a"), text("b")]]);
        let spec = SourceSpec::parse("t.xlsx:output=response").unwrap();
        let err = gold_error(&t, &spec);
        assert!(
            err.contains("'response'") && err.contains("instruction, answer"),
            "{err}"
        );
        let err = gold_error(&t, &SourceSpec::plain("t.xlsx"));
        assert!(
            err.contains("'output'") && err.contains("output=COLUMN"),
            "{err}"
        );
    }

    #[test]
    fn nested_values_name_row_and_column() {
        let t = table(
            &["instruction", "output"],
            vec![vec![text("a"), Cell::Other("a list".into())]],
        );
        let err = gold_error(&t, &SourceSpec::plain("t.xlsx"));
        assert_eq!(
            err,
            "t.xlsx: row 2, column 'output': expected text, found a list"
        );
    }

    #[test]
    fn prompt_column_used_when_no_instruction() {
        let t = table(&["prompt", "output"], vec![vec![text("P"), text("O")]]);
        let (recs, _) = records(&t, &SourceSpec::plain("t"), GOLD).unwrap();
        assert_eq!(recs[0].prompt.as_deref(), Some("P"));
        assert_eq!(recs[0].instruction, None);
    }
}
