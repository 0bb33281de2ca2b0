//! NVRTC: CUDA C source → CUBIN for one GPU architecture, with in-memory headers.
//!
//! cudarc's safe NVRTC wrapper only returns PTX; we want CUBIN (no driver JIT at load time,
//! and a file worth caching), so this talks to `cudarc::nvrtc::sys` directly.

use std::ffi::{CStr, CString, c_char, c_int};

use cudarc::nvrtc::sys;

use super::error::{CudaError, CudaResult};
use super::libs::{Library, require};

/// A GPU architecture, e.g. `sm_90` (compute capability 9.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl Arch {
    /// Parses `sm_XY` (`sm_90`, `sm_100`, `sm_120`): the last digit is the minor version.
    pub fn parse(s: &str) -> CudaResult<Arch> {
        let bad = || CudaError::Arch {
            arch: s.to_string(),
        };
        let digits = s.trim().strip_prefix("sm_").ok_or_else(bad)?;
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        Ok(Arch {
            major: major.parse().map_err(|_| bad())?,
            minor: minor.parse().map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

fn status_msg(status: sys::nvrtcResult) -> String {
    // SAFETY: nvrtcGetErrorString returns a pointer to a static string (or null).
    let ptr = unsafe { sys::nvrtcGetErrorString(status) };
    if ptr.is_null() {
        format!("{status:?}")
    } else {
        // SAFETY: non-null pointers from nvrtcGetErrorString are NUL-terminated and static.
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }
}

fn check(call: &'static str, status: sys::nvrtcResult) -> CudaResult<()> {
    if status == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Nvrtc {
            call,
            msg: status_msg(status),
        })
    }
}

/// NVRTC's (major, minor) version: part of every cache key.
pub fn version() -> CudaResult<(i32, i32)> {
    require(&[Library::Nvrtc])?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: both pointers are valid for writes.
    check("nvrtcVersion", unsafe {
        sys::nvrtcVersion(&mut major, &mut minor)
    })?;
    Ok((major, minor))
}

/// Destroys the program however compilation ends.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed exactly once.
        unsafe {
            sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn c_string(what: &'static str, s: &str) -> CudaResult<CString> {
    CString::new(s).map_err(|_| CudaError::Nvrtc {
        call: what,
        msg: "embedded NUL byte".to_string(),
    })
}

/// A compiled module: its CUBIN and NVRTC's log (warnings; ptxas statistics when asked for
/// with `--ptxas-options=--verbose`).
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

/// Compiles `source` (file name `module`.cu) to CUBIN. `headers` are (include name, text)
/// pairs the source may `#include "name"`; `options` are NVRTC flags and must name a real
/// architecture (`--gpu-architecture=sm_XY`), or there is no CUBIN to return.
pub fn compile_cubin(
    module: &'static str,
    source: &str,
    headers: &[(&str, &str)],
    options: &[String],
    arch: Arch,
) -> CudaResult<Compiled> {
    require(&[Library::Nvrtc])?;
    let src = c_string("nvrtcCreateProgram", source)?;
    let name = c_string("nvrtcCreateProgram", &format!("{module}.cu"))?;
    let header_texts = headers
        .iter()
        .map(|(_, text)| c_string("nvrtcCreateProgram", text))
        .collect::<CudaResult<Vec<_>>>()?;
    let header_names = headers
        .iter()
        .map(|(name, _)| c_string("nvrtcCreateProgram", name))
        .collect::<CudaResult<Vec<_>>>()?;
    let text_ptrs: Vec<*const c_char> = header_texts.iter().map(|s| s.as_ptr()).collect();
    let name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
    let opts = options
        .iter()
        .map(|o| c_string("nvrtcCompileProgram", o))
        .collect::<CudaResult<Vec<_>>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();

    let mut raw: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live NUL-terminated string for the whole call; the
    // arrays hold `headers.len()` entries each.
    check("nvrtcCreateProgram", unsafe {
        sys::nvrtcCreateProgram(
            &mut raw,
            src.as_ptr(),
            name.as_ptr(),
            headers.len() as c_int,
            text_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
    })?;
    let program = Program(raw);

    // SAFETY: the program is live; the option strings outlive the call.
    let status =
        unsafe { sys::nvrtcCompileProgram(program.0, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        let log = program_log(&program).unwrap_or_else(|e| e.to_string());
        return Err(CudaError::Compile {
            module,
            arch: arch.to_string(),
            log: format!("{}\n{log}", status_msg(status)),
        });
    }

    let mut size = 0usize;
    // SAFETY: the program compiled; `size` is valid for writes.
    check("nvrtcGetCUBINSize", unsafe {
        sys::nvrtcGetCUBINSize(program.0, &mut size)
    })?;
    let mut cubin = vec![0u8; size];
    // SAFETY: the buffer holds exactly the size NVRTC reported.
    check("nvrtcGetCUBIN", unsafe {
        sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr() as *mut c_char)
    })?;
    if size == 0 {
        return Err(CudaError::Nvrtc {
            call: "nvrtcGetCUBIN",
            msg: format!("empty CUBIN for {module} (options {options:?})"),
        });
    }
    let log = program_log(&program)?;
    Ok(Compiled { cubin, log })
}

fn program_log(program: &Program) -> CudaResult<String> {
    let mut size = 0usize;
    // SAFETY: the program is live; `size` is valid for writes.
    check("nvrtcGetProgramLogSize", unsafe {
        sys::nvrtcGetProgramLogSize(program.0, &mut size)
    })?;
    let mut log = vec![0u8; size.max(1)];
    // SAFETY: the buffer holds at least the size NVRTC reported.
    check("nvrtcGetProgramLog", unsafe {
        sys::nvrtcGetProgramLog(program.0, log.as_mut_ptr() as *mut c_char)
    })?;
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    Ok(String::from_utf8_lossy(&log[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_parses_sm_names() {
        assert_eq!(Arch::parse("sm_90").unwrap(), Arch { major: 9, minor: 0 });
        assert_eq!(Arch::parse("sm_86").unwrap(), Arch { major: 8, minor: 6 });
        assert_eq!(
            Arch::parse("sm_120").unwrap(),
            Arch {
                major: 12,
                minor: 0
            }
        );
        assert_eq!(Arch::parse("sm_90").unwrap().to_string(), "sm_90");
        assert_eq!(Arch::parse("sm_120").unwrap().to_string(), "sm_120");
        for bad in ["90", "sm_9", "sm_", "sm_9x", "compute_90", ""] {
            assert!(Arch::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
