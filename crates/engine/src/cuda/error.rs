//! The CUDA backend's typed errors. Each names what failed and, where it helps, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A shared library the backend needs cannot be loaded.
    #[error("{lib} not found: {hint}")]
    MissingLibrary {
        lib: &'static str,
        hint: &'static str,
    },
    /// A `--device` value that is neither `cpu` nor `cuda:N`.
    #[error("bad device {spec:?}: expected `cpu`, `cuda` or `cuda:N` (N a GPU ordinal)")]
    DeviceSpec { spec: String },
    /// A GPU architecture name that is not `sm_XY`.
    #[error("bad GPU architecture {arch:?}: expected sm_XY, e.g. sm_90")]
    Arch { arch: String },
    /// No usable device with that ordinal.
    #[error("cuda:{ordinal}: {msg}")]
    Device { ordinal: usize, msg: String },
    /// A CUDA driver call failed.
    #[error("{call} failed on cuda:{ordinal}: {msg}")]
    Driver {
        call: &'static str,
        ordinal: usize,
        msg: String,
    },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt {call} failed: {msg}")]
    Blas { call: &'static str, msg: String },
    /// NVRTC rejected a kernel source; `log` is the compiler's output.
    #[error("NVRTC could not compile kernels/{module}.cu for {arch}:\n{log}")]
    Compile {
        module: &'static str,
        arch: String,
        log: String,
    },
    /// An NVRTC call other than the compilation itself failed.
    #[error("NVRTC {call} failed: {msg}")]
    Nvrtc { call: &'static str, msg: String },
    /// Reading or writing the on-disk kernel cache failed.
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The device ran out of memory even after the arena returned its cached blocks.
    #[error(
        "out of GPU memory on cuda:{ordinal}: {requested} bytes requested, {live} bytes in use"
    )]
    OutOfMemory {
        ordinal: usize,
        requested: usize,
        live: usize,
    },
}

pub type CudaResult<T> = std::result::Result<T, CudaError>;
