//! The one error type of the train crate.
//!
//! Variants that come from input name where the problem is (file, tensor, option) and what
//! was expected, so the binary can print them as they are.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, TrainError>;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A bad option or argument: `what` names it (e.g. "beta", "loss_type").
    #[error("{what}: {msg}")]
    Arg { what: &'static str, msg: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// Malformed file content at a known place (`where_` e.g. "tensor lora_A.weight").
    #[error("{path}: {where_}: {msg}")]
    Format {
        path: PathBuf,
        where_: String,
        msg: String,
    },

    #[error(transparent)]
    Model(#[from] model::ModelError),

    #[error(transparent)]
    Engine(#[from] engine::EngineError),
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> TrainError {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}
