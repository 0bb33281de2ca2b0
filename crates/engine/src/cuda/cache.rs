//! The on-disk CUBIN cache.
//!
//! A CUBIN is keyed by a hash of everything that shapes it: the module's source and headers,
//! the NVRTC options, the architecture and NVRTC's version. Files are written to a temporary
//! name and renamed, so a crash or a concurrent writer never leaves a half-written CUBIN under
//! a real name. The directory is `$PREFER_CACHE_DIR`, else `$XDG_CACHE_HOME/prefer/kernels`,
//! else `~/.cache/prefer/kernels`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{CudaError, CudaResult};
use super::kernels::{HEADERS, Module, options};
use super::nvrtc::{self, Arch};

/// Where a CUBIN came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Read from the cache directory.
    Cached,
    /// Compiled now (and written to the cache when there is one).
    Compiled,
}

/// The default cache directory, from the environment; None when no variable applies.
pub fn default_dir() -> Option<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("PREFER_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("prefer").join("kernels"));
    }
    non_empty("HOME").map(|home| {
        PathBuf::from(home)
            .join(".cache")
            .join("prefer")
            .join("kernels")
    })
}

/// 64-bit FNV-1a; two of them with different offsets give the 128-bit key. Stable across
/// Rust versions, unlike `DefaultHasher`.
fn fnv1a(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h = seed;
    for part in parts {
        // Length-prefix each part so ("ab", "c") and ("a", "bc") differ.
        for b in (part.len() as u64).to_le_bytes().iter().chain(part.iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The cache key of `module` compiled with `opts` for `arch` by NVRTC `version`.
pub(crate) fn cache_key(
    module: Module,
    source: &str,
    opts: &[String],
    arch: Arch,
    version: (i32, i32),
) -> String {
    let version = format!("{}.{}", version.0, version.1);
    let arch = arch.to_string();
    let mut parts: Vec<&[u8]> = vec![module.name().as_bytes(), source.as_bytes()];
    for (name, text) in HEADERS {
        parts.push(name.as_bytes());
        parts.push(text.as_bytes());
    }
    for o in opts {
        parts.push(o.as_bytes());
    }
    parts.push(arch.as_bytes());
    parts.push(version.as_bytes());
    let a = fnv1a(0xcbf2_9ce4_8422_2325, &parts);
    let b = fnv1a(0x6c62_272e_07bb_0142, &parts);
    format!("{a:016x}{b:016x}")
}

/// A cache directory (or none: compile every time).
#[derive(Clone, Debug)]
pub struct KernelCache {
    dir: Option<PathBuf>,
}

impl KernelCache {
    /// The cache at `dir`, or at [`default_dir`] when `dir` is None.
    pub fn new(dir: Option<PathBuf>) -> KernelCache {
        KernelCache {
            dir: dir.or_else(default_dir),
        }
    }

    /// A cache that never reads or writes files.
    pub fn disabled() -> KernelCache {
        KernelCache { dir: None }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The file a module's CUBIN lives in, for this NVRTC version.
    pub fn path(&self, module: Module, arch: Arch, version: (i32, i32)) -> Option<PathBuf> {
        let key = cache_key(module, module.source(), &options(arch), arch, version);
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{}-{arch}-{key}.cubin", module.name())))
    }

    /// The module's CUBIN for `arch`: from the cache when present and sound, else compiled
    /// and stored; with NVRTC's log when it compiled (empty unless it warned). A cache that
    /// cannot be written is an error only when `strict` (`prefer kernels`, whose job is
    /// filling it); otherwise the compiled CUBIN is still returned.
    pub fn load_or_compile(
        &self,
        module: Module,
        arch: Arch,
        strict: bool,
    ) -> CudaResult<(Vec<u8>, Origin, String)> {
        let version = nvrtc::version()?;
        let path = self.path(module, arch, version);
        // A CUBIN is an ELF file; anything else is damage, so recompile over it.
        if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok())
            && bytes.starts_with(b"\x7fELF")
        {
            return Ok((bytes, Origin::Cached, String::new()));
        }
        let compiled = nvrtc::compile_cubin(
            module.name(),
            module.source(),
            HEADERS,
            &options(arch),
            arch,
        )?;
        let cubin = compiled.cubin;
        if let Some(path) = &path
            && let Err(e) = write_atomically(path, &cubin)
            && strict
        {
            return Err(e);
        }
        Ok((cubin, Origin::Compiled, compiled.log.trim().to_string()))
    }
}

/// Writes `bytes` to a unique temporary file beside `path`, then renames it into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> CudaResult<()> {
    let err = |p: &Path, source| CudaError::Cache {
        path: p.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("kernel.cubin");
    let tmp = dir.join(format!(".{file_name}.{}.{nanos}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_every_input() {
        let arch = Arch { major: 9, minor: 0 };
        let opts = options(arch);
        let base = cache_key(Module::Rope, "src", &opts, arch, (13, 0));
        assert_eq!(base.len(), 32);
        assert_eq!(base, cache_key(Module::Rope, "src", &opts, arch, (13, 0)));
        assert_ne!(base, cache_key(Module::Rope, "src2", &opts, arch, (13, 0)));
        assert_ne!(
            base,
            cache_key(Module::Attention, "src", &opts, arch, (13, 0))
        );
        assert_ne!(base, cache_key(Module::Rope, "src", &opts, arch, (13, 1)));
        let sm80 = Arch { major: 8, minor: 0 };
        assert_ne!(base, cache_key(Module::Rope, "src", &opts, sm80, (13, 0)));
        let mut more = opts.clone();
        more.push("-lineinfo".into());
        assert_ne!(base, cache_key(Module::Rope, "src", &more, arch, (13, 0)));
    }

    #[test]
    fn fnv_parts_are_length_prefixed() {
        assert_ne!(fnv1a(1, &[b"ab", b"c"]), fnv1a(1, &[b"a", b"bc"]));
    }

    #[test]
    fn atomic_write_leaves_only_the_final_file() {
        let dir = std::env::temp_dir().join(format!("prefer-cache-test-{}", std::process::id()));
        let path = dir.join("sub").join("x.cubin");
        write_atomically(&path, b"\x7fELFdata").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"\x7fELFdata");
        write_atomically(&path, b"\x7fELFnew").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"\x7fELFnew");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.cubin")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
