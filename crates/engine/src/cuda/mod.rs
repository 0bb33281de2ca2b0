//! # The CUDA backend
//!
//! The same ops as the CPU reference, on an NVIDIA GPU, in bf16 storage with f32 math.
//!
//! - **Libraries at run time.** cudarc is built with `dynamic-loading`: nothing CUDA is
//!   needed to build, and libcuda / libnvrtc / libcublasLt are looked up when a GPU is first
//!   used ([`Library`]); a missing one is a [`CudaError::MissingLibrary`] naming it.
//! - **Kernels** are self-contained CUDA C (`kernels/*.cu`, own bf16 helpers, inline PTX for
//!   `mma.sync`), embedded in the binary, compiled by NVRTC to CUBIN for the device's
//!   architecture on first use and cached on disk ([`KernelCache`]); `prefer kernels`
//!   compiles them all ahead of time ([`compile_all`]).
//! - **GEMMs** go through cuBLASLt (bf16 in, f32 accumulate, bias epilogue), with plans
//!   cached per shape.
//! - **Memory** comes from a stream-ordered caching arena: no cuMemAlloc in a hot loop.
//! - **One stream per device**: ops run in program order; host reads wait for them.
//!
//! Tensors move with [`crate::Tensor::to_device`]; every `crate::ops` function runs here
//! when its inputs are on a GPU. A `--device` flag parses with `"cuda:0".parse::<Device>()`.

mod arena;
mod blas;
mod cache;
pub(crate) mod copies;
mod device;
mod error;
mod kernels;
mod libs;
mod nvrtc;
pub(crate) mod ops;
pub(crate) mod storage;

use std::path::PathBuf;
use std::time::Instant;

pub use arena::{DeviceBuffer, GraphPool, MemoryStats};
pub use cache::{KernelCache, Origin, default_dir};
pub use device::{CudaBackend, Graph};
pub use error::CudaError;
pub use kernels::Module;
pub use libs::Library;
pub use nvrtc::Arch;
pub use ops::attention::AttentionKernel;
pub use storage::DType;

use crate::ops::{AttentionOut, AttentionParams, SeqLayout};
use crate::{Device, EngineError, Result, Tensor};

impl std::str::FromStr for Device {
    type Err = EngineError;

    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(spec: &str) -> Result<Device> {
        let bad = || {
            EngineError::Cuda(CudaError::DeviceSpec {
                spec: spec.to_string(),
            })
        };
        match spec.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            s => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                n.parse().map(Device::Cuda).map_err(|_| bad())
            }
        }
    }
}

/// What `prefer kernels` reports for one module.
#[derive(Clone, Debug)]
pub struct KernelReport {
    pub module: Module,
    /// Kernels the module defines (each checked present in the CUBIN).
    pub kernels: &'static [&'static str],
    pub cubin_bytes: usize,
    pub origin: Origin,
    pub seconds: f64,
    /// The cache file, when there is a cache directory.
    pub path: Option<PathBuf>,
    /// NVRTC's warnings when the module was compiled now (empty otherwise).
    pub warnings: String,
}

/// Compiles every kernel module for `arch` through NVRTC (no GPU needed) into `cache`,
/// or reads it from there; errors on the first module that does not compile or lacks a
/// kernel it should define.
pub fn compile_all(arch: Arch, cache: &KernelCache) -> Result<Vec<KernelReport>> {
    let version = nvrtc::version()?;
    let mut reports = Vec::new();
    for module in Module::ALL {
        let start = Instant::now();
        let (cubin, origin, warnings) = cache.load_or_compile(module, arch, true)?;
        for name in module.kernels() {
            // Symbol names sit NUL-separated in the CUBIN's ELF string table.
            let needle = [b"\0", name.as_bytes(), b"\0"].concat();
            if !cubin.windows(needle.len()).any(|w| w == needle.as_slice()) {
                return Err(CudaError::Compile {
                    module: module.name(),
                    arch: arch.to_string(),
                    log: format!("the CUBIN has no kernel named {name}"),
                }
                .into());
            }
        }
        reports.push(KernelReport {
            module,
            kernels: module.kernels(),
            cubin_bytes: cubin.len(),
            origin,
            seconds: start.elapsed().as_secs_f64(),
            path: cache.path(module, arch, version),
            warnings,
        });
    }
    Ok(reports)
}

/// [`crate::ops::attention`] with a chosen kernel (tests and benchmarks compare them).
/// All tensors must be on one GPU.
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    params: &AttentionParams,
    kernel: AttentionKernel,
) -> Result<AttentionOut> {
    const OP: &str = "attention";
    let backend =
        ops::device_of(OP, &[("q", q), ("k", k), ("v", v)])?.ok_or_else(|| EngineError::Arg {
            op: OP,
            msg: "attention_with runs on the GPU; q, k, v are on the CPU".into(),
        })?;
    ops::attention::attention(&backend, q, k, v, layout, params, kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_tensors_and_backends_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Tensor>();
        send_sync::<CudaBackend>();
        send_sync::<storage::CudaStorage>();
    }

    #[test]
    fn device_specs_parse() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:1:2", "CUDA:0"] {
            let err = bad.parse::<Device>().unwrap_err().to_string();
            assert!(err.contains("cuda:N"), "{bad:?}: {err}");
        }
    }
}
