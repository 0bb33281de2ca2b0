//! Benchmark of the paged KV cache ops on the GPU at model shapes: a decode step's attention
//! over all layers (bandwidth-bound: reported in GB/s of K/V read against the H200's
//! 4.3 TB/s), the KV write of a step, and a chunked-prefill step (reported in TFLOP/s against
//! 790, beside the contiguous attention kernel on the same shapes). Every kernel choice is
//! timed with CUDA events; "fresh layout" adds the host work of building and uploading a new
//! layout each step (wall clock).
//!
//! Build here: `cargo build --release -p engine --example paged_bench`; run on the GPU
//! machine: `target/release/examples/paged_bench [--quick]`.

mod common;

use std::time::Instant;

use common::{GPU, Result, Rng, random, time};
use engine::Tensor;
use engine::cuda::{AttentionKernel, CudaBackend, attention_with};
use engine::ops::{
    self, AttentionParams, PagedKernel, PagedLayout, SeqLayout, SlotMapping, paged_attention_with,
};
/// H200 copy bandwidth and bf16 dense GEMM rate, measured here (GUIDE §4).
const PEAK_BYTES_PER_S: f64 = 4.3e12;
const PEAK_TFLOPS: f64 = 790.0;
const BLOCK: usize = 16;

fn starts(lens: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut s = vec![0];
    for l in lens {
        s.push(s.last().copied().unwrap_or(0) + l);
    }
    s
}

/// One model's attention shapes.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    softcap: Option<f32>,
}

impl Shape {
    fn params(self) -> AttentionParams {
        AttentionParams {
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            window: self.window,
            softcap: self.softcap,
        }
    }
}

const LLAMA1B: Shape = Shape {
    name: "llama1b",
    heads: 32,
    kv_heads: 8,
    head_dim: 64,
    window: None,
    softcap: None,
};
const QWEN05: Shape = Shape {
    name: "qwen05",
    heads: 14,
    kv_heads: 2,
    head_dim: 64,
    window: None,
    softcap: None,
};
const GEMMA2B: Shape = Shape {
    name: "gemma2b",
    heads: 8,
    kv_heads: 4,
    head_dim: 256,
    window: Some(4096),
    softcap: Some(50.0),
};

/// Per-layer K and V pools holding `kv_lens` sequences (plus their new tokens), block tables
/// drawn from a shuffled free list, filled with random values.
struct Cache {
    pools: Vec<(Tensor, Tensor)>, // [L] × ([NB, BS, Hkv, D], same)
    tables: Vec<Vec<u32>>,
}

fn cache(rng: &mut Rng, s: Shape, layers: usize, kv_lens: &[usize]) -> Result<Cache> {
    let per_seq: Vec<usize> = kv_lens.iter().map(|l| l.div_ceil(BLOCK)).collect();
    let nb: usize = per_seq.iter().sum();
    let mut ids = rng.shuffled(nb).into_iter();
    let tables = per_seq
        .iter()
        .map(|&n| ids.by_ref().take(n).collect())
        .collect();
    // One random fill, copied into every layer's pools by the write kernel.
    let slots = nb * BLOCK;
    let fill = random(rng, &[slots, s.kv_heads, s.head_dim], 1.0)?;
    let all = SlotMapping::new((0..slots as i32).collect())?;
    let mut pools = Vec::with_capacity(layers);
    for _ in 0..layers {
        let mut k = ops::kv_pool(nb, BLOCK, s.kv_heads, s.head_dim, GPU)?;
        let mut v = ops::kv_pool(nb, BLOCK, s.kv_heads, s.head_dim, GPU)?;
        ops::paged_kv_write(&mut k, &mut v, &fill, &fill, &all)?;
        pools.push((k, v));
    }
    Ok(Cache { pools, tables })
}

/// Bytes of K and V a step reads in one layer: every visible key of every sequence.
fn kv_bytes(s: Shape, q_lens: &[usize], kv_lens: &[usize]) -> f64 {
    let keys: usize = q_lens
        .iter()
        .zip(kv_lens)
        .map(|(&q, &kv)| kv - s.window.map_or(0, |w| (kv - q + 1).saturating_sub(w)))
        .sum();
    (keys * s.kv_heads * s.head_dim * 2 * 2) as f64
}

/// (query, key) pairs a step computes in one head: causal, windowed.
fn pairs(s: Shape, q_lens: &[usize], kv_lens: &[usize]) -> f64 {
    let mut n = 0.0;
    for (&q, &kv) in q_lens.iter().zip(kv_lens) {
        for i in 0..q {
            let pos = kv - q + i;
            n += s.window.map_or(pos + 1, |w| (pos + 1).min(w)) as f64;
        }
    }
    n
}

fn bench_decode(
    backend: &CudaBackend,
    rng: &mut Rng,
    s: Shape,
    batch: usize,
    ctx: usize,
    layers: usize,
    iters: usize,
) -> Result<()> {
    let kv_lens = vec![ctx; batch];
    let q_lens = vec![1; batch];
    let c = cache(rng, s, layers, &kv_lens)?;
    let layout = PagedLayout::from_tables(BLOCK, &starts(q_lens.clone()), &kv_lens, &c.tables)?;
    let q = random(rng, &[batch, s.heads, s.head_dim], 2.0)?;
    let params = s.params();
    let bytes = kv_bytes(s, &q_lens, &kv_lens) * layers as f64;
    println!(
        "\n## decode {}: B {batch} × {ctx} context, {layers} layers, {:.1} MiB of K/V per step",
        s.name,
        bytes / (1 << 20) as f64
    );
    let report = |what: &str, ms: f64| {
        let gbs = bytes / (ms * 1e-3) / 1e9;
        println!(
            "{what:<40} {ms:>8.3} ms/step {gbs:>7.0} GB/s ({:>4.1}% of 4.3 TB/s)",
            100.0 * gbs * 1e9 / PEAK_BYTES_PER_S
        );
    };
    for kernel in [
        PagedKernel::Auto,
        PagedKernel::TensorCore,
        PagedKernel::Simple,
    ] {
        let ms = time(backend, 2, iters, || {
            for (k, v) in &c.pools {
                paged_attention_with(&q, k, v, &layout, &params, kernel)?;
            }
            Ok(())
        })?;
        report(&format!("{kernel:?}"), ms);
    }
    // A fresh layout each step (built and uploaded once, used by every layer): wall clock.
    let start = Instant::now();
    for _ in 0..iters {
        let fresh = PagedLayout::from_tables(BLOCK, &starts(q_lens.clone()), &kv_lens, &c.tables)?;
        for (k, v) in &c.pools {
            ops::paged_attention(&q, k, v, &fresh, &params)?;
        }
    }
    backend.synchronize()?;
    report(
        "Auto, fresh layout (wall clock)",
        start.elapsed().as_secs_f64() * 1e3 / iters as f64,
    );

    // The step's KV write: one new token per sequence in every layer (into its last slot).
    let mut pools = c.pools;
    let k_new = random(rng, &[batch, s.kv_heads, s.head_dim], 1.0)?;
    let slots = layout.slots();
    let ms = time(backend, 2, iters, || {
        for (k, v) in pools.iter_mut() {
            ops::paged_kv_write(k, v, &k_new, &k_new, slots)?;
        }
        Ok(())
    })?;
    // Each row is read once and written once, for K and for V.
    let moved = (layers * batch * s.kv_heads * s.head_dim * 2 * 2 * 2) as f64;
    println!(
        "{:<40} {ms:>8.3} ms/step ({:.1} µs per layer, {:.0} GB/s)",
        "kv write (B tokens × L layers)",
        ms * 1e3 / layers as f64,
        moved / (ms * 1e-3) / 1e9
    );
    Ok(())
}

fn bench_prefill(
    backend: &CudaBackend,
    rng: &mut Rng,
    s: Shape,
    seqs: usize,
    chunk: usize,
    cached: usize,
    iters: usize,
) -> Result<()> {
    let kv_lens = vec![cached + chunk; seqs];
    let q_lens = vec![chunk; seqs];
    let c = cache(rng, s, 1, &kv_lens)?;
    let layout = PagedLayout::from_tables(BLOCK, &starts(q_lens.clone()), &kv_lens, &c.tables)?;
    let tq = seqs * chunk;
    let q = random(rng, &[tq, s.heads, s.head_dim], 2.0)?;
    let params = s.params();
    let flops = 4.0 * (s.heads * s.head_dim) as f64 * pairs(s, &q_lens, &kv_lens);
    println!(
        "\n## chunked prefill {}: {seqs} × {chunk} new tokens after {cached} cached (one layer)",
        s.name
    );
    let report = |what: &str, ms: f64| {
        let tflops = flops / (ms * 1e-3) / 1e12;
        println!(
            "{what:<40} {ms:>8.3} ms {tflops:>7.1} TFLOP/s ({:>4.1}% of {PEAK_TFLOPS})",
            100.0 * tflops / PEAK_TFLOPS
        );
    };
    let (k, v) = &c.pools[0];
    for kernel in [PagedKernel::Auto, PagedKernel::Simple] {
        let ms = time(backend, 2, iters, || {
            paged_attention_with(&q, k, v, &layout, &params, kernel).map(|_| ())
        })?;
        report(&format!("paged {kernel:?}"), ms);
    }
    // The contiguous kernel on the same shapes, keys packed: the cost of paging.
    let tkv = seqs * (cached + chunk);
    let kp = random(rng, &[tkv, s.kv_heads, s.head_dim], 1.0)?;
    let vp = random(rng, &[tkv, s.kv_heads, s.head_dim], 1.0)?;
    let packed = SeqLayout {
        q_starts: starts(q_lens.clone()),
        kv_starts: starts(kv_lens.clone()),
    };
    let ms = time(backend, 2, iters, || {
        attention_with(&q, &kp, &vp, &packed, &params, AttentionKernel::Auto).map(|_| ())
    })?;
    report("contiguous attention (Auto)", ms);
    Ok(())
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let backend = CudaBackend::get(0)?;
    println!(
        "# paged KV cache on {} ({} SMs){}",
        backend.name(),
        backend.sm_count(),
        if quick { ", quick" } else { "" }
    );
    let iters = if quick { 3 } else { 20 };
    let mut rng = Rng(1);
    // The decode step: 256 sequences × 256 context, llama1b's 16 layers.
    bench_decode(&backend, &mut rng, LLAMA1B, 256, 256, 16, iters)?;
    if !quick {
        bench_decode(&backend, &mut rng, QWEN05, 256, 256, 24, iters)?;
        bench_decode(&backend, &mut rng, GEMMA2B, 256, 256, 26, iters)?;
        // Longer contexts; and a small batch, where split-K keeps the GPU busy.
        bench_decode(&backend, &mut rng, LLAMA1B, 256, 1024, 16, iters)?;
        bench_decode(&backend, &mut rng, LLAMA1B, 8, 4096, 16, iters)?;
        bench_decode(&backend, &mut rng, GEMMA2B, 16, 8192, 26, iters)?;
    }
    bench_prefill(&backend, &mut rng, LLAMA1B, 8, 512, 512, iters)?;
    if !quick {
        bench_prefill(&backend, &mut rng, GEMMA2B, 4, 512, 3584, iters)?;
    }
    let mem = backend.memory_stats();
    println!(
        "\npeak device memory {:.2} GiB",
        mem.peak_reserved as f64 / (1u64 << 30) as f64
    );
    Ok(())
}
