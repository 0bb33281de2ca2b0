//! The sample crate's typed errors.
//!
//! Every variant names what was wrong and what was expected, so the binary can print it as is
//! (with `anyhow` context for the file or row it came from).

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SampleError {
    /// A sampling parameter outside the range vLLM accepts.
    #[error("sampling parameter `{name}`: {msg}")]
    Param { name: &'static str, msg: String },

    /// A sampling-settings TOML document that does not parse or has an unknown/mistyped key.
    /// `msg` is the TOML parser's message, which carries the line and column.
    #[error("sampling settings {origin}: {msg}")]
    Toml { origin: String, msg: String },

    /// A sampling-settings file that cannot be read.
    #[error("cannot read sampling settings {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A logits row that is empty.
    #[error("logits row is empty (expected one logit per vocabulary entry)")]
    EmptyLogits,

    /// A logits row of the wrong length for a batch.
    #[error("logits of {got} values do not hold {rows} rows of the vocabulary size {vocab}")]
    LogitsShape {
        got: usize,
        rows: usize,
        vocab: usize,
    },

    /// A NaN or +inf logit: the model's output is broken, sampling from it means nothing.
    #[error("logit of token {token_id} is {value}: expected a finite number or -inf")]
    BadLogit { token_id: u32, value: f32 },

    /// A token id (from the prompt, the output or the stop set) outside the logits row.
    #[error("{what} token id {token_id} is outside the vocabulary of {vocab} logits")]
    TokenOutOfRange {
        what: &'static str,
        token_id: u32,
        vocab: usize,
    },

    /// Every logit is -inf after the named processing stage, so there is nothing to draw.
    #[error("no token can be sampled: every logit is -inf after {stage}")]
    NothingToSample { stage: &'static str },

    /// A prompt with no tokens: the model has nothing to condition on.
    #[error("prompt has no tokens")]
    EmptyPrompt,

    /// `step` called on a sequence that has already finished.
    #[error("sequence already finished ({reason}); it takes no more steps")]
    Finished { reason: &'static str },

    /// The tokenizer failed to decode ids.
    #[error("tokenizer cannot decode token ids {ids:?}: {msg}")]
    Decode { ids: Vec<u32>, msg: String },
}

pub type Result<T> = std::result::Result<T, SampleError>;
