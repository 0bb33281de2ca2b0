//! `prefer kernels`: compile every CUDA kernel ahead of time through NVRTC.
//!
//! Needs libnvrtc but no GPU, so CI uses it to prove every kernel compiles, and a machine
//! can prefill its kernel cache before the first `--device cuda` run.
use std::path::PathBuf;

use anyhow::{Context, Result};
use engine::cuda::{Arch, KernelCache, Origin, compile_all};

#[derive(clap::Args)]
pub struct Args {
    /// GPU architecture to compile for (sm_90 for H100/H200).
    #[arg(long, default_value = "sm_90")]
    arch: String,
    /// Cache directory [default: $PREFER_CACHE_DIR, else $XDG_CACHE_HOME/prefer/kernels,
    /// else ~/.cache/prefer/kernels].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let arch = Arch::parse(&args.arch)?;
    let cache = KernelCache::new(args.cache_dir);
    let reports = compile_all(arch, &cache)
        .with_context(|| format!("compiling the CUDA kernels for {arch}"))?;
    for r in &reports {
        let how = match r.origin {
            Origin::Compiled => format!("compiled in {:.2} s", r.seconds),
            Origin::Cached => "cached".to_string(),
        };
        println!(
            "{:<12} {:>2} kernels {:>8.1} KiB  {how}",
            r.module.name(),
            r.kernels.len(),
            r.cubin_bytes as f64 / 1024.0
        );
        if !r.warnings.is_empty() {
            println!("  NVRTC: {}", r.warnings.replace('\n', "\n  "));
        }
    }
    match cache.dir() {
        Some(dir) => println!("{} modules for {arch} in {}", reports.len(), dir.display()),
        None => println!(
            "{} modules for {arch} compiled (no cache directory: set PREFER_CACHE_DIR or HOME, \
             or pass --cache-dir)",
            reports.len()
        ),
    }
    Ok(())
}
