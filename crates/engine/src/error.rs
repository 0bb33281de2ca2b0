//! The engine's typed errors.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    /// A tensor handed to an op has the wrong shape.
    #[error("{op}: expected shape {expected}, got {got:?}")]
    Shape {
        op: &'static str,
        expected: String,
        got: Vec<usize>,
    },
    /// Data length does not match the product of the shape.
    #[error("tensor of shape {shape:?} needs {expected} elements, got {got}")]
    Len {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    /// A token id or position outside what the op can index.
    #[error("{op}: index {index} out of range (limit {limit})")]
    Index {
        op: &'static str,
        index: usize,
        limit: usize,
    },
    /// An argument that is not a shape problem (a chunk size of zero, an empty batch...).
    #[error("{op}: {msg}")]
    Arg { op: &'static str, msg: String },
    /// The CUDA backend failed (missing library, driver, NVRTC, cuBLASLt, memory).
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
    /// The op is not available on this device yet.
    #[error("{op} is not available on {device}")]
    Unsupported { op: &'static str, device: String },
}

pub type Result<T> = std::result::Result<T, EngineError>;
