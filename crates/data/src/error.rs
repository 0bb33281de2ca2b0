//! The one error type of the data crate.
//!
//! Every variant that comes from input names where the problem is (file, line or row,
//! column) and what was expected, so the binary can print it as is.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, DataError>;

/// Everything that can go wrong while reading sources, rendering templates, building pairs,
/// writing datasets or talking to the Hub.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: file is empty")]
    EmptyFile { path: PathBuf },

    #[error("{path}: no data rows{detail}")]
    NoRows { path: PathBuf, detail: String },

    /// Malformed content at a known place (`where_` is e.g. "line 3" or "row 7, column 질문").
    #[error("{path}: {where_}: {message}")]
    Parse {
        path: PathBuf,
        where_: String,
        message: String,
    },

    #[error("{path}: {where_}: invalid UTF-8 (byte {byte} of the {unit})")]
    InvalidUtf8 {
        path: PathBuf,
        where_: String,
        byte: usize,
        unit: &'static str,
    },

    #[error("{path}: no column '{column}'{hint}; columns are: {existing}")]
    MissingColumn {
        path: String,
        column: String,
        hint: String,
        existing: String,
    },

    #[error("{path}: no sheet '{sheet}'; sheets are: {existing}")]
    MissingSheet {
        path: PathBuf,
        sheet: String,
        existing: String,
    },

    #[error("{path}: no split '{split}'; splits are: {existing}")]
    MissingSplit {
        path: PathBuf,
        split: String,
        existing: String,
    },

    /// A cell holds a value that cannot stand for text (a list, an object, a date, an error
    /// cell) — or any non-text value under `--strict`.
    #[error("{path}: {where_}, column '{column}': expected text, found {found}")]
    MixedType {
        path: String,
        where_: String,
        column: String,
        found: String,
    },

    #[error("{path}: unsupported source ({reason})")]
    Unsupported { path: PathBuf, reason: String },

    #[error("source spec '{spec}': {message}")]
    BadSpec { spec: String, message: String },

    #[error("template {name}: {message}")]
    Template { name: String, message: String },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("{0}")]
    Pairs(String),

    #[error("{path} already exists (pass --overwrite to replace it)")]
    OutputExists { path: PathBuf },

    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },

    #[error("hub: {0}")]
    Hub(String),

    /// An HTTP exchange with the Hub failed; `message` is the server's (never the token).
    #[error("hub: {method} {url}: HTTP {status}: {message}")]
    HubStatus {
        method: &'static str,
        url: String,
        status: u16,
        message: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parse(
        path: impl Into<PathBuf>,
        where_: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        DataError::Parse {
            path: path.into(),
            where_: where_.into(),
            message: message.into(),
        }
    }
}
