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

    /// The model failed on a step; its own error (the model crate's, or a test model's).
    #[error("model step failed: {0}")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// An engine setting that cannot work (a zero block size, say).
    #[error("engine setting `{name}`: {msg}")]
    EngineConfig { name: &'static str, msg: String },

    /// A prompt that does not fit in the model's context.
    #[error("prompt of {len} tokens is longer than the model's context of {max_model_len} tokens")]
    PromptTooLong { len: usize, max_model_len: usize },

    /// A sequence that can never fit in the KV cache, even alone.
    #[error(
        "a sequence of up to {tokens} tokens needs {needed} KV blocks of {block_size} tokens, \
         but the cache holds only {total}: give the KV cache more memory or lower max_tokens"
    )]
    KvCacheTooSmall {
        tokens: usize,
        needed: usize,
        block_size: usize,
        total: usize,
    },

    /// A samples file that cannot be read, written or truncated.
    #[error("{path}: {source}")]
    OutputIo {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A line of an existing samples file that is not what this program writes.
    #[error("{path}, line {line}: {msg}")]
    OutputFormat {
        path: PathBuf,
        line: usize,
        msg: String,
    },
}

impl SampleError {
    /// Wraps a model's error (for [`crate::StepModel`] implementations).
    pub fn model(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        SampleError::Model(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, SampleError>;
