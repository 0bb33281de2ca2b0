//! Run-time presence checks for the CUDA libraries.
//!
//! cudarc loads libcuda, libnvrtc and libcublasLt lazily (`dynamic-loading`) and panics inside
//! the first call into a library it cannot find. Every entry point of the backend calls
//! [`require`] first, so a machine without CUDA gets an error that says what is missing.

use std::sync::OnceLock;

use super::error::{CudaError, CudaResult};

/// A shared library the backend loads at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// libcuda: the driver (contexts, memory, kernel launches).
    Driver,
    /// libnvrtc: the run-time compiler for kernels/*.cu.
    Nvrtc,
    /// libcublasLt: the GEMMs.
    CublasLt,
}

impl Library {
    fn name(self) -> &'static str {
        match self {
            Library::Driver => "libcuda.so",
            Library::Nvrtc => "libnvrtc.so",
            Library::CublasLt => "libcublasLt.so",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Library::Driver => "install the NVIDIA driver or set LD_LIBRARY_PATH to its directory",
            Library::Nvrtc => {
                "install CUDA 13 (or `pip install nvidia-cuda-nvrtc==13.0.88` and add its \
                 nvidia/cu13/lib) or set LD_LIBRARY_PATH"
            }
            Library::CublasLt => "install CUDA 13 or set LD_LIBRARY_PATH",
        }
    }

    /// Whether the library loads; asked once per process (each probe is a dlopen).
    pub fn is_present(self) -> bool {
        static DRIVER: OnceLock<bool> = OnceLock::new();
        static NVRTC: OnceLock<bool> = OnceLock::new();
        static CUBLASLT: OnceLock<bool> = OnceLock::new();
        // SAFETY: is_culib_present only tries to dlopen the library's candidate names.
        match self {
            Library::Driver => {
                *DRIVER.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
            }
            Library::Nvrtc => {
                *NVRTC.get_or_init(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
            }
            Library::CublasLt => {
                *CUBLASLT.get_or_init(|| unsafe { cudarc::cublaslt::sys::is_culib_present() })
            }
        }
    }
}

/// Errors with the first library of `libs` that cannot be loaded.
pub fn require(libs: &[Library]) -> CudaResult<()> {
    for &lib in libs {
        if !lib.is_present() {
            return Err(CudaError::MissingLibrary {
                lib: lib.name(),
                hint: lib.hint(),
            });
        }
    }
    Ok(())
}
