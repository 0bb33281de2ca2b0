//! CPU GEMM rate of `ops::linear` against this machine's f32 FMA peak.
//!
//! Run: `cargo run --release -p engine --example gemm_peak`
//!
//! The peak is given two ways: the nominal one (logical CPUs × reported clock × FLOPs per
//! cycle from the widest FMA that /proc/cpuinfo lists, assuming two FMA pipes), and a measured
//! one: a loop of independent register-only FMAs timed on one thread and on all threads,
//! with the clock measured by a chain of dependent integer adds (one per cycle). A VM's
//! reported MHz and its vCPU count can both mislead; the measured numbers cannot.
use std::hint::black_box;
use std::time::{Duration, Instant};

use engine::{Tensor, ops};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cpu = CpuInfo::read();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "cpu: {} ({threads} logical CPUs, rayon uses {})",
        cpu.model,
        rayon::current_num_threads()
    );
    println!(
        "cpuinfo: avx512f={} avx2={} fma={}, reported clock {:.2} GHz",
        cpu.avx512f,
        cpu.avx2,
        cpu.fma,
        cpu.mhz / 1e3
    );

    let (lanes, isa) = if cpu.avx512f {
        (16, "AVX-512")
    } else if cpu.avx2 && cpu.fma {
        (8, "AVX2+FMA")
    } else {
        (4, "SSE (no FMA)")
    };
    // Two FMA pipes × lanes × 2 FLOPs per FMA (Zen 4 splits a 512-bit FMA into two 256-bit
    // halves, so there the measured rate is half of this).
    let nominal_fpc = 2 * lanes * 2;
    let nominal = threads as f64 * cpu.mhz / 1e3 * nominal_fpc as f64;
    println!(
        "nominal peak: {threads} × {:.2} GHz × {nominal_fpc} FLOP/cycle ({isa}) = {nominal:.1} GFLOP/s",
        cpu.mhz / 1e3
    );

    let ghz = measure_clock_ghz();
    let one = fma_gflops(1, cpu.avx512f, cpu.avx2 && cpu.fma);
    let all = fma_gflops(threads, cpu.avx512f, cpu.avx2 && cpu.fma);
    match ghz {
        Some(g) => println!(
            "measured: clock {g:.2} GHz; FMA loop {one:.1} GFLOP/s on 1 thread ({:.1} FLOP/cycle), {all:.1} GFLOP/s on {threads}",
            one / g
        ),
        None => println!(
            "measured: FMA loop {one:.1} GFLOP/s on 1 thread, {all:.1} GFLOP/s on {threads}"
        ),
    }

    // The all-thread loop is the truth on an idle machine; when other work holds a core it
    // undercounts, so the reference peak is the larger of it and threads × one thread.
    let peak = all.max(one * threads as f64);
    if let Some(load) = load_average()
        && load > 0.5
    {
        println!(
            "note: load average {load:.2}: other processes share the cores; rates are lower bounds"
        );
    }
    println!("\nlinear (x [T, K] · wᵀ, w [N, K]), f32, best of ≥ 3 runs and ≥ 1 s;");
    println!(
        "peak = {peak:.1} GFLOP/s (the larger of the all-thread FMA rate and {threads} × the 1-thread rate)"
    );
    println!(
        "{:>5} {:>6} {:>6} {:>10} {:>10} {:>8}",
        "T", "K", "N", "ms", "GFLOP/s", "of peak"
    );
    for (t, k, n) in [
        (512, 768, 768),
        (512, 2048, 2048),
        (512, 4096, 4096),
        (512, 2048, 8192),
    ] {
        let x = Tensor::from_vec(fill(t * k, 1), &[t, k])?;
        let w = Tensor::from_vec(fill(n * k, 2), &[n, k])?;
        let best = time_best(|| {
            black_box(ops::linear(&x, &w, None).expect("shapes are consistent"));
        });
        let gflops = 2.0 * (t * k * n) as f64 / best.as_secs_f64() / 1e9;
        println!(
            "{t:>5} {k:>6} {n:>6} {:>10.2} {gflops:>10.1} {:>7.0}%",
            best.as_secs_f64() * 1e3,
            100.0 * gflops / peak
        );
    }
    Ok(())
}

/// The 1-minute load average, if /proc says.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Deterministic values in [-1, 1) (the rate does not depend on them; denormals are avoided).
fn fill(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// Best wall time of `f` over at least 3 runs and at least one second, after a warm-up.
fn time_best(mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut runs = 0;
    while runs < 3 || start.elapsed() < Duration::from_secs(1) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        runs += 1;
    }
    best
}

struct CpuInfo {
    model: String,
    mhz: f64,
    avx512f: bool,
    avx2: bool,
    fma: bool,
}

impl CpuInfo {
    /// The first processor's entries of /proc/cpuinfo (absent fields: unknown, 0 MHz).
    fn read() -> CpuInfo {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        let flags = field("flags");
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        CpuInfo {
            model: field("model name"),
            mhz: field("cpu MHz").parse().unwrap_or(0.0),
            avx512f: has("avx512f"),
            avx2: has("avx2"),
            fma: has("fma"),
        }
    }
}

/// Core clock from a chain of dependent adds: each waits for the previous, one per cycle.
#[cfg(target_arch = "x86_64")]
fn measure_clock_ghz() -> Option<f64> {
    const ITERS: u64 = 200_000_000;
    const ADDS_PER_ITER: u64 = 10;
    let run = || {
        let mut x: u64 = 0;
        let mut n = ITERS;
        let t = Instant::now();
        // SAFETY: register-only arithmetic on the two named operands.
        unsafe {
            std::arch::asm!(
                "2:",
                "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                "dec {n}",
                "jnz 2b",
                x = inout(reg) x,
                n = inout(reg) n,
                options(nomem, nostack),
            );
        }
        black_box((x, n));
        t.elapsed()
    };
    run();
    let best = (0..3).map(|_| run()).min()?;
    Some((ITERS * ADDS_PER_ITER) as f64 / best.as_secs_f64() / 1e9)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_clock_ghz() -> Option<f64> {
    None
}

/// GFLOP/s of independent FMAs on `threads` threads at once (best of 3).
fn fma_gflops(threads: usize, avx512: bool, avx2: bool) -> f64 {
    const ITERS: u64 = 20_000_000;
    let per_thread = move || -> (u64, f32) {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512 {
                // SAFETY: the CPU reports avx512f.
                return (ITERS * 16 * 16 * 2, unsafe { fma::avx512(ITERS) });
            }
            if avx2 {
                // SAFETY: the CPU reports avx2 and fma.
                return (ITERS * 10 * 8 * 2, unsafe { fma::avx2(ITERS) });
            }
        }
        let _ = (avx512, avx2);
        (ITERS * 8 * 2, fma::scalar(ITERS))
    };
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let flops: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(per_thread)).collect();
            handles
                .into_iter()
                .map(|h| {
                    let (flops, v) = h.join().expect("FMA loop does not panic");
                    black_box(v);
                    flops
                })
                .sum()
        });
        best = best.max(flops as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

mod fma {
    /// x ← x·a + b converges to b / (1 − a) = 0.1: no overflow and no denormals.
    const A: f32 = 0.999_999;
    const B: f32 = 1e-7;

    /// 16 independent 512-bit accumulators: more than latency × pipes (4 × 2 on current
    /// cores), so the pipes never wait.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn avx512(iters: u64) -> f32 {
        use std::arch::x86_64::*;
        let (a, b) = (_mm512_set1_ps(A), _mm512_set1_ps(B));
        let mut acc = [_mm512_set1_ps(1.0); 16];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, &x| _mm512_add_ps(s, x));
        _mm512_reduce_add_ps(sum)
    }

    /// 10 accumulators: AVX2 has 16 registers, two hold a and b.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn avx2(iters: u64) -> f32 {
        use std::arch::x86_64::*;
        let (a, b) = (_mm256_set1_ps(A), _mm256_set1_ps(B));
        let mut acc = [_mm256_set1_ps(1.0); 10];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut out = [0.0f32; 8];
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &x| _mm256_add_ps(s, x));
        // SAFETY: `out` holds 8 floats, what an unaligned 256-bit store writes.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        out.iter().sum()
    }

    /// Portable fallback: 8 scalar chains the compiler may or may not vectorise.
    pub(crate) fn scalar(iters: u64) -> f32 {
        let mut acc = [1.0f32; 8];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = x.mul_add(A, B);
            }
        }
        acc.iter().sum()
    }
}
