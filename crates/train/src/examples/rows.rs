//! Preference rows as text: which columns hold prompt / chosen / rejected, and the checks a
//! row must pass before it is tokenized.
//!
//! Two namings are accepted: TRL's `prompt` / `chosen` / `rejected`, and the reference
//! workflow's `question` / `response_j` / `response_k` (what `prefer pairs --schema
//! reference` writes). Only plain-text rows are handled; TRL's conversational rows (lists of
//! messages) and its implicit-prompt rows (no prompt column) are not.

use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// TRL's column names, then the reference workflow's: (prompt, chosen, rejected).
const NAMINGS: [[&str; 3]; 2] = [
    ["prompt", "chosen", "rejected"],
    ["question", "response_j", "response_k"],
];

/// One preference pair as text: the prompt as stored (no wrapper yet) and both completions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferenceRow {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// Where a table keeps the three texts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferenceColumns {
    source: PathBuf,
    names: [&'static str; 3],
    indices: [usize; 3], // (prompt, chosen, rejected) into the table's columns
}

impl PreferenceColumns {
    /// Finds the columns in `columns` (the table's header, in order). Exactly one naming must
    /// be complete: a table with neither, or with both, is refused with the columns it has.
    pub fn resolve(source: &Path, columns: &[String]) -> Result<PreferenceColumns> {
        let find = |name: &str| columns.iter().position(|c| c == name);
        let complete: Vec<([&'static str; 3], [usize; 3])> = NAMINGS
            .iter()
            .filter_map(|names| {
                let idx = [find(names[0])?, find(names[1])?, find(names[2])?];
                Some((*names, idx))
            })
            .collect();
        let existing = columns.join(", ");
        match complete.as_slice() {
            [(names, indices)] => Ok(PreferenceColumns {
                source: source.to_path_buf(),
                names: *names,
                indices: *indices,
            }),
            [] => {
                // Name what is missing from the naming the table comes closest to (TRL's on
                // a tie).
                let missing = |names: &[&'static str; 3]| -> Vec<&'static str> {
                    names
                        .iter()
                        .copied()
                        .filter(|n| find(n).is_none())
                        .collect()
                };
                let (trl, reference) = (missing(&NAMINGS[0]), missing(&NAMINGS[1]));
                let (names, missing) = if reference.len() < trl.len() {
                    (NAMINGS[1], reference)
                } else {
                    (NAMINGS[0], trl)
                };
                let noun = if missing.len() == 1 {
                    "column"
                } else {
                    "columns"
                };
                Err(TrainError::Format {
                    path: source.to_path_buf(),
                    where_: "columns".into(),
                    msg: format!(
                        "no {noun} {} (closest naming: {}; expected {} or {}); the columns are: \
                         {existing}",
                        missing.join(", "),
                        names.join("/"),
                        NAMINGS[0].join("/"),
                        NAMINGS[1].join("/"),
                    ),
                })
            }
            _ => Err(TrainError::Format {
                path: source.to_path_buf(),
                where_: "columns".into(),
                msg: format!(
                    "both {} and {} are present, so which pair to train on is ambiguous; \
                     keep one naming (the columns are: {existing})",
                    NAMINGS[0].join("/"),
                    NAMINGS[1].join("/"),
                ),
            }),
        }
    }

    /// The (prompt, chosen, rejected) column names found.
    pub fn names(&self) -> [&'static str; 3] {
        self.names
    }

    /// The row at `location` (as a person finds it: "row 5", "line 12"), from its cells in
    /// column order (`None`: null or absent). Every text must be present; chosen and rejected
    /// must not be empty or whitespace only.
    ///
    /// TRL itself would train on an empty completion (EOS alone). We refuse it: `prefer
    /// pairs` drops empty samples, so one here means the data did not come from it or was
    /// edited, and a pair whose side is nothing teaches little but "stop at once".
    pub fn row(&self, location: &str, cells: &[Option<&str>]) -> Result<PreferenceRow> {
        let [prompt, chosen, rejected] = [0, 1, 2].map(|k| self.cell(location, cells, k));
        let (prompt, chosen, rejected) = (prompt?, chosen?, rejected?);
        for (k, text) in [(1, chosen), (2, rejected)] {
            if text.trim().is_empty() {
                return Err(self.error(
                    location,
                    k,
                    "empty completion: a preference pair needs text on both sides".into(),
                ));
            }
        }
        Ok(PreferenceRow {
            prompt: prompt.to_string(),
            chosen: chosen.to_string(),
            rejected: rejected.to_string(),
        })
    }

    fn cell<'a>(&self, location: &str, cells: &[Option<&'a str>], k: usize) -> Result<&'a str> {
        match cells.get(self.indices[k]) {
            Some(Some(text)) => Ok(text),
            Some(None) => Err(self.error(location, k, "missing (null); expected text".into())),
            None => Err(self.error(
                location,
                k,
                format!(
                    "the row has {} cells, the column is number {}",
                    cells.len(),
                    self.indices[k] + 1
                ),
            )),
        }
    }

    fn error(&self, location: &str, k: usize, msg: String) -> TrainError {
        TrainError::Format {
            path: self.source.clone(),
            where_: format!("{location}, column {}", self.names[k]),
            msg,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn message(e: TrainError) -> String {
        e.to_string()
    }

    #[test]
    fn both_namings_resolve() {
        let p = Path::new("pairs.parquet");
        let trl =
            PreferenceColumns::resolve(p, &cols(&["id", "rejected", "prompt", "chosen"])).unwrap();
        assert_eq!(trl.names(), ["prompt", "chosen", "rejected"]);
        let row = trl
            .row("row 1", &[Some("7"), Some("R"), Some("P"), Some("C")])
            .unwrap();
        assert_eq!(
            row,
            PreferenceRow {
                prompt: "P".into(),
                chosen: "C".into(),
                rejected: "R".into()
            }
        );
        let reference =
            PreferenceColumns::resolve(p, &cols(&["question", "response_j", "response_k"]))
                .unwrap();
        assert_eq!(reference.names(), ["question", "response_j", "response_k"]);
        let row = reference
            .row("row 1", &[Some("Q"), Some("J"), Some("K")])
            .unwrap();
        assert_eq!((row.prompt.as_str(), row.chosen.as_str()), ("Q", "J"));
        assert_eq!(row.rejected, "K");
    }

    #[test]
    fn missing_columns_are_named_with_what_exists() {
        let e = PreferenceColumns::resolve(
            Path::new("d/train.parquet"),
            &cols(&["question", "response_j", "extra"]),
        )
        .unwrap_err();
        let m = message(e);
        assert!(m.starts_with("d/train.parquet: columns: "), "{m}");
        assert!(m.contains("no column response_k"), "{m}");
        assert!(
            m.ends_with("the columns are: question, response_j, extra"),
            "{m}"
        );
        assert!(
            m.contains("closest naming: question/response_j/response_k"),
            "{m}"
        );

        let m =
            message(PreferenceColumns::resolve(Path::new("x.jsonl"), &cols(&["a"])).unwrap_err());
        assert!(m.contains("no columns prompt, chosen, rejected"), "{m}");
    }

    #[test]
    fn both_namings_at_once_are_ambiguous() {
        let all = cols(&[
            "prompt",
            "chosen",
            "rejected",
            "question",
            "response_j",
            "response_k",
        ]);
        let m = message(PreferenceColumns::resolve(Path::new("x.jsonl"), &all).unwrap_err());
        assert!(m.contains("ambiguous"), "{m}");
    }

    #[test]
    fn null_cell_names_row_and_column() {
        let c = PreferenceColumns::resolve(
            Path::new("pairs.jsonl"),
            &cols(&["question", "response_j", "response_k"]),
        )
        .unwrap();
        let m = message(c.row("line 12", &[Some("Q"), Some("J"), None]).unwrap_err());
        assert_eq!(
            m,
            "pairs.jsonl: line 12, column response_k: missing (null); expected text"
        );
        let m = message(c.row("row 3", &[Some("Q")]).unwrap_err());
        assert!(
            m.starts_with("pairs.jsonl: row 3, column response_j: the row has 1 cells"),
            "{m}"
        );
    }

    #[test]
    fn empty_completion_is_refused() {
        let c = PreferenceColumns::resolve(
            Path::new("p.parquet"),
            &cols(&["prompt", "chosen", "rejected"]),
        )
        .unwrap();
        let m = message(
            c.row("row 5", &[Some("P"), Some("C"), Some(" \n\t")])
                .unwrap_err(),
        );
        assert!(
            m.starts_with("p.parquet: row 5, column rejected: empty completion"),
            "{m}"
        );
        let m = message(
            c.row("row 6", &[Some("P"), Some(""), Some("R")])
                .unwrap_err(),
        );
        assert!(
            m.starts_with("p.parquet: row 6, column chosen: empty completion"),
            "{m}"
        );
        // An empty prompt is what TRL accepts (only <bos> precedes the completion).
        assert_eq!(
            c.row("row 7", &[Some(""), Some("C"), Some("R")])
                .unwrap()
                .prompt,
            ""
        );
    }
}
