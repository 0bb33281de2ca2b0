//! The dataset folder: what `datasets.load_dataset(folder)` and the Hub read.
//!
//! ```text
//! OUT/
//!   README.md                          dataset card: YAML (configs, features, splits with
//!                                      exact num_examples), then counts and the filter report
//!   data/train-00000-of-00001.parquet  one file per split (snappy), or .jsonl with --format jsonl
//!   data/validation-00000-of-00001.parquet
//! ```
//!
//! Everything is written into a hidden sibling folder first and renamed into place when
//! complete ([`staging`]): a crash or an error leaves no folder that looks finished.
//!
//! [`json_parquet`] is a separate, generic writer: JSON rows → one typed parquet file
//! (`prefer sample --out FILE.parquet` uses it; the pair folder does not).

mod card;
pub mod json_parquet;
mod jsonl;
mod parquet_out;
pub mod staging;

use std::path::Path;

pub use card::card;

use crate::error::{DataError, Result};
use crate::pairs::{Pair, SplitPairs};

/// Column names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schema {
    /// TRL's `prompt` / `chosen` / `rejected`.
    #[default]
    Trl,
    /// The reference workflow's `question` / `response_j` / `response_k`.
    Reference,
}

impl Schema {
    pub fn from_name(name: &str) -> Option<Schema> {
        match name {
            "trl" => Some(Schema::Trl),
            "reference" => Some(Schema::Reference),
            _ => None,
        }
    }

    /// (prompt, chosen, rejected) column names.
    pub fn text_columns(self) -> [&'static str; 3] {
        match self {
            Schema::Trl => ["prompt", "chosen", "rejected"],
            Schema::Reference => ["question", "response_j", "response_k"],
        }
    }
}

/// File format of the split files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Parquet,
    Jsonl,
}

impl Format {
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "parquet" => Some(Format::Parquet),
            "jsonl" => Some(Format::Jsonl),
            _ => None,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Jsonl => "jsonl",
        }
    }
}

/// The columns a written dataset has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Columns {
    pub schema: Schema,
    pub ref_chosen: bool,
    pub ref_rejected: bool,
}

impl Columns {
    /// Every column with its `datasets` dtype, in order.
    pub fn features(&self) -> Vec<(&'static str, &'static str)> {
        let mut out: Vec<(&str, &str)> = self
            .schema
            .text_columns()
            .iter()
            .map(|c| (*c, "string"))
            .collect();
        if self.ref_chosen {
            out.push(("ref_chosen_logps", "float64"));
        }
        if self.ref_rejected {
            out.push(("ref_rejected_logps", "float64"));
        }
        out
    }
}

/// A split name `datasets` accepts: word characters, optionally dotted (`^\w+(\.\w+)*$`).
pub fn valid_split_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_alphanumeric() || c == '_'))
}

/// Relative path of a split's file.
pub fn split_file(split: &str, format: Format) -> String {
    format!("data/{split}-00000-of-00001.{}", format.extension())
}

/// Writes the dataset folder atomically. Splits without pairs are left out (the card says so).
pub fn write_dataset(
    out: &Path,
    splits: &[SplitPairs],
    columns: Columns,
    format: Format,
    card_body: &str,
    overwrite: bool,
) -> Result<()> {
    for s in splits {
        if !valid_split_name(&s.name) {
            return Err(DataError::Pairs(format!(
                "split name '{}' is not valid for datasets (letters, digits, _ and dots)",
                s.name
            )));
        }
    }
    let written: Vec<&SplitPairs> = splits.iter().filter(|s| !s.pairs.is_empty()).collect();
    let staged = staging::Staged::new(out, overwrite)?;
    let data = staged.path().join("data");
    std::fs::create_dir_all(&data).map_err(|e| DataError::io(&data, e))?;
    for split in &written {
        let path = staged.path().join(split_file(&split.name, format));
        match format {
            Format::Parquet => parquet_out::write(&path, &split.pairs, columns)?,
            Format::Jsonl => jsonl::write(&path, &split.pairs, columns)?,
        }
    }
    let counts: Vec<(&str, usize, u64)> = written
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.pairs.len(),
                arrow_bytes(&s.pairs, columns),
            )
        })
        .collect();
    let readme = staged.path().join("README.md");
    std::fs::write(&readme, card(&counts, columns, format, card_body))
        .map_err(|e| DataError::io(&readme, e))?;
    staged.commit()
}

/// The in-memory Arrow size `datasets` records for a split (see [`card`]).
fn arrow_bytes(pairs: &[Pair], columns: Columns) -> u64 {
    let text: u64 = pairs
        .iter()
        .flat_map(text_cells)
        .map(|t| 4 + t.len() as u64)
        .sum();
    let floats = (columns.ref_chosen as u64 + columns.ref_rejected as u64) * 8 * pairs.len() as u64;
    text + floats
}

/// The `(column, text)` cells of a pair in schema order, for writers.
pub(crate) fn text_cells(pair: &Pair) -> [&str; 3] {
    [&pair.prompt, &pair.chosen, &pair.rejected]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_splits_are_left_out_of_files_and_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ds");
        let pair = Pair {
            prompt: "p".into(),
            chosen: "c".into(),
            rejected: "r".into(),
            ref_chosen_logps: None,
            ref_rejected_logps: None,
        };
        let splits = vec![
            SplitPairs {
                name: "train".into(),
                pairs: vec![pair],
            },
            SplitPairs {
                name: "validation".into(),
                pairs: vec![],
            },
        ];
        let columns = Columns {
            schema: Schema::Trl,
            ref_chosen: false,
            ref_rejected: false,
        };
        write_dataset(&out, &splits, columns, Format::Jsonl, "body", false).unwrap();
        let files: Vec<_> = std::fs::read_dir(out.join("data"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, vec!["train-00000-of-00001.jsonl"]);
        assert_eq!(
            std::fs::read_to_string(out.join("data/train-00000-of-00001.jsonl")).unwrap(),
            "{\"prompt\":\"p\",\"chosen\":\"c\",\"rejected\":\"r\"}\n"
        );
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(!card.contains("validation"), "{card}");
        // num_bytes: 3 strings of 1 byte, each with a 4-byte offset.
        assert!(
            card.contains("num_bytes: 15\n    num_examples: 1\n"),
            "{card}"
        );
    }

    #[test]
    fn split_names_follow_datasets_rules() {
        assert!(valid_split_name("train"));
        assert!(valid_split_name("validation_2"));
        assert!(valid_split_name("test.part"));
        assert!(!valid_split_name("val-idation"));
        assert!(!valid_split_name(""));
        assert!(!valid_split_name("a..b"));
    }

    #[test]
    fn features_follow_schema_and_ref_columns() {
        let c = Columns {
            schema: Schema::Reference,
            ref_chosen: false,
            ref_rejected: true,
        };
        assert_eq!(
            c.features(),
            vec![
                ("question", "string"),
                ("response_j", "string"),
                ("response_k", "string"),
                ("ref_rejected_logps", "float64")
            ]
        );
    }
}
