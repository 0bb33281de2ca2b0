//! Source specs as written on the command line: `[SPLIT=]PATH[:KEY=VALUE,...]`.
//!
//! Keys are `sheet` (spreadsheets), `split` (multi-split JSON or `DatasetDict` folders) and
//! the fields of [`Field`] mapped to a column of the file: `instruction=질문,output=답변`.
//! The options start after the last `:` whose tail parses as such a list, so paths with
//! `:` still work when they carry no options.

use std::path::PathBuf;

use super::records::Field;
use crate::error::{DataError, Result};

/// One source: where it is, which part of it, and which column feeds which field.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourceSpec {
    pub path: PathBuf,
    pub sheet: Option<String>,
    pub split: Option<String>,
    /// Field ← column name in the file; fields not listed use their own name if present.
    pub columns: Vec<(Field, String)>,
}

impl SourceSpec {
    /// A spec with no options.
    pub fn plain(path: impl Into<PathBuf>) -> Self {
        SourceSpec {
            path: path.into(),
            ..Default::default()
        }
    }

    /// The column mapped to `field`, if the spec maps it.
    pub fn column_for(&self, field: Field) -> Option<&str> {
        self.columns
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, c)| c.as_str())
    }

    /// Parses `PATH[:KEY=VALUE,...]`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |message: String| DataError::BadSpec {
            spec: text.to_string(),
            message,
        };
        if text.is_empty() {
            return Err(bad("empty path".into()));
        }
        let Some((path, options)) = text.rsplit_once(':').filter(|(_, o)| o.contains('=')) else {
            return Ok(SourceSpec::plain(text));
        };
        if path.is_empty() {
            return Err(bad("empty path before ':'".into()));
        }
        let mut spec = SourceSpec::plain(path);
        for option in options.split(',') {
            let Some((key, value)) = option.split_once('=') else {
                return Err(bad(format!("'{option}' is not KEY=VALUE")));
            };
            let (key, value) = (key.trim(), value.to_string());
            if value.is_empty() {
                return Err(bad(format!("'{key}=' has no value")));
            }
            match key {
                "sheet" => spec.sheet = Some(value),
                "split" => spec.split = Some(value),
                _ => {
                    let field = Field::from_name(key).ok_or_else(|| {
                        bad(format!(
                            "unknown key '{key}'; expected sheet, split or a field ({})",
                            Field::ALL
                                .iter()
                                .map(|f| f.name())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?;
                    if spec.column_for(field).is_some() {
                        return Err(bad(format!("'{key}' is mapped twice")));
                    }
                    spec.columns.push((field, value));
                }
            }
        }
        Ok(spec)
    }

    /// Parses `[SPLIT=]PATH[:…]`: the part before the first `=` is a split name when it is a
    /// plain word (letters, digits, `_`, `-`) and the rest is not itself a mapping.
    pub fn parse_with_split(text: &str) -> Result<(Option<String>, Self)> {
        if let Some((split, rest)) = text.split_once('=') {
            let is_word = !split.is_empty()
                && split
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-');
            let rest_is_path = !rest.is_empty() && !rest.starts_with(':');
            // `data.json:split=train` has its first '=' inside the options: no split prefix.
            let before_colon = !split.contains(':');
            if is_word && rest_is_path && before_colon {
                return Ok((Some(split.to_string()), Self::parse(rest)?));
            }
        }
        Ok((None, Self::parse(text)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_split_path_and_mapping() {
        let (split, spec) =
            SourceSpec::parse_with_split("train=extra.xlsx:instruction=질문,output=답변").unwrap();
        assert_eq!(split.as_deref(), Some("train"));
        assert_eq!(spec.path, PathBuf::from("extra.xlsx"));
        assert_eq!(spec.column_for(Field::Instruction), Some("질문"));
        assert_eq!(spec.column_for(Field::Output), Some("답변"));
        assert_eq!(spec.column_for(Field::Input), None);
    }

    #[test]
    fn no_split_prefix_and_sheet_option() {
        let (split, spec) =
            SourceSpec::parse_with_split("dir/a.xlsx:sheet=추가,output=response").unwrap();
        assert_eq!(split, None);
        assert_eq!(spec.sheet.as_deref(), Some("추가"));
        assert_eq!(spec.column_for(Field::Output), Some("response"));
        let (split, spec) =
            SourceSpec::parse_with_split("validation=insurance/validation.parquet").unwrap();
        assert_eq!(split.as_deref(), Some("validation"));
        assert_eq!(spec, SourceSpec::plain("insurance/validation.parquet"));
    }

    #[test]
    fn path_with_colon_but_no_options_is_kept_whole() {
        let spec = SourceSpec::parse("odd:name.jsonl").unwrap();
        assert_eq!(spec.path, PathBuf::from("odd:name.jsonl"));
    }

    #[test]
    fn bad_keys_and_duplicates_are_errors() {
        let err = SourceSpec::parse("a.csv:answer=x").unwrap_err().to_string();
        assert!(err.contains("unknown key 'answer'"), "{err}");
        assert!(SourceSpec::parse("a.csv:output=x,output=y").is_err());
        assert!(SourceSpec::parse("a.csv:output=").is_err());
    }
}
