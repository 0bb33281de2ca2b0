//! The model crate's typed errors. Every variant that comes from a file names it, and every
//! tensor or config problem names the tensor or the field, so a user can fix the input
//! without reading our code.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    /// A file could not be opened or read (missing, permissions, ...).
    // The inner errors are displayed, not chained as `source`, so that a printed chain does
    // not repeat them.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A JSON file (config.json, tokenizer_config.json, an index, ...) does not parse.
    #[error("{path}: not valid JSON: {error}")]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
    /// A config field is missing, of the wrong type, out of range, or contradicts another.
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },
    /// config.json names a `model_type` we do not implement.
    #[error("{path}: model_type `{got}` is not supported (supported: {supported})")]
    UnsupportedModelType {
        path: PathBuf,
        got: String,
        supported: String,
    },
    /// A safetensors file (or its index) is truncated or corrupt.
    #[error("{path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    /// A tensor the model needs is in no checkpoint file.
    #[error("tensor `{name}` is missing from the checkpoint in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    /// A tensor has a shape other than the config implies.
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A tensor is stored in a dtype we cannot read as a float weight.
    #[error("{path}: tensor `{name}` has dtype {got}, expected BF16, F16 or F32")]
    TensorDtype {
        path: PathBuf,
        name: String,
        got: String,
    },
    /// tokenizer.json cannot be loaded, or a text cannot be encoded.
    #[error("{path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// A token id the model has no embedding for.
    #[error("token id {id} is out of the model's vocabulary (vocab_size {vocab})")]
    TokenOutOfVocab { id: u32, vocab: usize },
    /// Inputs of a forward/score call that do not fit together.
    #[error("{what}: {msg}")]
    Input { what: &'static str, msg: String },
    /// The device a model was asked onto cannot be used: CUDA libraries missing, no such
    /// GPU, a driver failure.
    #[error("device {device}: {error}")]
    Device {
        device: engine::Device,
        error: engine::EngineError,
    },
    /// An engine op failed (shapes are checked there too).
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn config(path: &std::path::Path, field: &str, msg: impl Into<String>) -> Self {
        ModelError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, error: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}
