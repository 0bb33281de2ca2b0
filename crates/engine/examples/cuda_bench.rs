//! Micro-benchmark of the CUDA backend at real model shapes: the attention kernel, the
//! cuBLASLt linear layers and the chunked lm_head log-probs, timed with CUDA events and
//! reported in TFLOP/s against the H200's measured bf16 GEMM rate (790 TFLOP/s); and the
//! sampler's top-k ranking, in µs and GB/s against the H200's 4.8 TB/s.
//!
//! Build here: `cargo build --release -p engine --example cuda_bench`; run on the GPU
//! machine: `target/release/examples/cuda_bench [--quick]`.

mod common;

use common::{GPU, Result, Rng, random, time};
use engine::Tensor;
use engine::cuda::{AttentionKernel, CudaBackend, attention_with};
use engine::ops::{self, AttentionParams, LogProbChunks, SeqLayout};

/// H200 bf16 dense GEMM, measured here with cuBLASLt (GUIDE §4).
const PEAK_TFLOPS: f64 = 790.0;
/// Tokens per call, as in scoring 8 rows × 1024 tokens.
const TOKENS: usize = 8192;
/// H200 HBM3e bandwidth (spec sheet).
const PEAK_GBS: f64 = 4800.0;

fn report(what: &str, ms: f64, flops: f64) {
    let tflops = flops / (ms * 1e-3) / 1e12;
    println!(
        "{what:<58} {ms:>9.3} ms {tflops:>7.1} TFLOP/s ({:>4.1}% of {PEAK_TFLOPS})",
        100.0 * tflops / PEAK_TFLOPS
    );
}

/// Visible (query, key) pairs of one causal sequence of `t` tokens with window `w`.
fn causal_pairs(t: usize, window: Option<usize>) -> f64 {
    (0..t)
        .map(|i| window.map_or(i + 1, |w| (i + 1).min(w)) as f64)
        .sum()
}

fn bench_attention(backend: &CudaBackend, rng: &mut Rng, quick: bool) -> Result<()> {
    println!("\n# attention (one kernel per layer; {TOKENS} tokens per call)");
    // (name, H, Hkv, D, params)
    let shapes = [
        (
            "H 32 / Hkv 8 / D 64 (llama1b)",
            (32, 8, 64),
            AttentionParams {
                scale: 0.125,
                window: None,
                softcap: None,
            },
        ),
        (
            "H 8 / Hkv 4 / D 256, cap 50, window 4096 (gemma2b)",
            (8, 4, 256),
            AttentionParams {
                scale: 0.0625,
                window: Some(4096),
                softcap: Some(50.0),
            },
        ),
    ];
    let lens: &[usize] = if quick { &[1024] } else { &[1024, 2048, 4096] };
    for (name, (h, hkv, d), params) in shapes {
        for &t in lens {
            let b = TOKENS / t;
            let layout = SeqLayout::prefill(&vec![t; b]);
            let q = random(rng, &[TOKENS, h, d], 2.0)?;
            let k = random(rng, &[TOKENS, hkv, d], 2.0)?;
            let v = random(rng, &[TOKENS, hkv, d], 1.0)?;
            // QKᵀ and PV: 2 GEMMs × 2 FLOP per multiply-add, over the visible pairs.
            let flops = 4.0 * (h * d) as f64 * causal_pairs(t, params.window) * b as f64;
            let variants: &[(&str, AttentionKernel)] = if d <= 96 {
                &[
                    ("1 m-tile/warp", AttentionKernel::TensorCoreMTiles(1)),
                    ("2 m-tiles/warp", AttentionKernel::TensorCoreMTiles(2)),
                ]
            } else {
                &[("1 m-tile/warp", AttentionKernel::TensorCoreMTiles(1))]
            };
            for &(variant, kernel) in variants {
                let ms = time(backend, 2, if quick { 3 } else { 10 }, || {
                    attention_with(&q, &k, &v, &layout, &params, kernel).map(|_| ())
                })?;
                report(&format!("{name}, {b} × T {t}, {variant}"), ms, flops);
            }
        }
    }
    Ok(())
}

fn bench_linear(backend: &CudaBackend, rng: &mut Rng, quick: bool) -> Result<()> {
    println!("\n# linear (cuBLASLt, bf16 in, f32 accumulate; {TOKENS} tokens)");
    // (model, layer, K, N, bias)
    let shapes: &[(&str, &str, usize, usize, bool)] = &[
        ("qwen05", "qkv (fused, bias)", 896, 896 + 2 * 128, true),
        ("qwen05", "gate+up (fused)", 896, 2 * 4864, false),
        ("qwen05", "down", 4864, 896, false),
        ("llama1b", "qkv (fused)", 2048, 2048 + 2 * 512, false),
        ("llama1b", "o", 2048, 2048, false),
        ("llama1b", "gate+up (fused)", 2048, 2 * 8192, false),
        ("llama1b", "down", 8192, 2048, false),
        ("gemma2b", "qkv (fused)", 2304, 2048 + 2 * 1024, false),
        ("gemma2b", "gate+up (fused)", 2304, 2 * 9216, false),
        ("gemma2b", "down", 9216, 2304, false),
    ];
    for &(model, layer, k, n, with_bias) in shapes {
        let x = random(rng, &[TOKENS, k], 1.0)?;
        let w = random(rng, &[n, k], 0.05)?;
        let bias = if with_bias {
            Some(random(rng, &[n], 0.1)?)
        } else {
            None
        };
        let ms = time(backend, 3, if quick { 5 } else { 20 }, || {
            ops::linear(&x, &w, bias.as_ref()).map(|_| ())
        })?;
        report(
            &format!("{model} {layer} [{TOKENS}×{k}]·[{n}×{k}]ᵀ"),
            ms,
            2.0 * (TOKENS * k * n) as f64,
        );
    }
    Ok(())
}

fn bench_logprobs(backend: &CudaBackend, rng: &mut Rng, quick: bool) -> Result<()> {
    println!(
        "\n# lm_head + log-softmax gather (GEMM per vocab chunk + online stats; {TOKENS} tokens)"
    );
    let shapes: &[(&str, usize, usize, Option<f32>)] = &[
        ("qwen05", 896, 151_936, None),
        ("llama1b", 2048, 128_256, None),
        ("gemma2b", 2304, 256_000, Some(30.0)),
    ];
    for &(model, c, v, cap) in shapes {
        let hidden = random(rng, &[TOKENS, c], 1.0)?;
        let head = random(rng, &[v, c], 0.05)?;
        let targets: Vec<u32> = (0..TOKENS)
            .map(|_| (rng.next() % v as u64) as u32)
            .collect();
        let ms = time(backend, 1, if quick { 2 } else { 5 }, || {
            ops::token_logprobs(&hidden, &head, &targets, cap, LogProbChunks::default()).map(|_| ())
        })?;
        report(
            &format!("{model} [{TOKENS}×{c}]·[{v}×{c}]ᵀ → logp/entropy"),
            ms,
            2.0 * (TOKENS * c) as f64 * v as f64,
        );
        backend.trim_memory();
    }
    Ok(())
}

/// `ops::top_k_candidates` on f32 logits [B, V]: the sampler's per-step ranking. Timed as
/// replays of a CUDA graph of `REPS` queued rankings (as a decode step runs it, without the
/// host's launch latency, which would hide the B = 1 kernels). GB/s counts one read of the
/// logits, the least any ranking must do.
fn bench_top_k(backend: &CudaBackend, rng: &mut Rng, quick: bool) -> Result<()> {
    const REPS: usize = 20;
    println!("\n# top-k candidates + lse (f32 logits [B, V], one read = B·V·4 bytes)");
    for v in [128_256, 256_000] {
        for b in [1, 256] {
            // Uniform in [-8, 8): every thread's list fills early and then rarely changes,
            // as with real logits.
            let data: Vec<f32> = (0..b * v)
                .map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 16.0 - 8.0)
                .collect();
            let logits = Tensor::from_vec(data, &[b, v])?.to_device_f32(GPU)?;
            for k in [2, 6, 65] {
                let pool = backend.graph_pool();
                let (graph, _pending) = backend.capture(&pool, || {
                    (0..REPS)
                        .map(|_| ops::top_k_candidates_queued(&logits, k))
                        .collect::<Result<Vec<_>>>()
                })?;
                let ms = time(backend, 2, if quick { 5 } else { 50 }, || {
                    Ok(graph.launch()?)
                })? / REPS as f64;
                let gbs = (b * v * 4) as f64 / (ms * 1e-3) / 1e9;
                println!(
                    "{:<58} {:>9.1} µs {gbs:>7.0} GB/s ({:>4.1}% of {PEAK_GBS})",
                    format!("B {b} × V {v}, k {k}"),
                    ms * 1e3,
                    100.0 * gbs / PEAK_GBS
                );
            }
        }
        backend.trim_memory();
    }
    Ok(())
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let backend = CudaBackend::get(0)?;
    println!(
        "{} ({}, {} SMs)",
        backend.name(),
        backend.arch(),
        backend.sm_count()
    );
    let mut rng = Rng(42);
    bench_attention(&backend, &mut rng, quick)?;
    bench_linear(&backend, &mut rng, quick)?;
    bench_logprobs(&backend, &mut rng, quick)?;
    bench_top_k(&backend, &mut rng, quick)?;
    let m = backend.memory_stats();
    println!(
        "\narena: peak {:.2} GiB live, {:.2} GiB reserved, {} driver allocations",
        m.peak_live as f64 / (1u64 << 30) as f64,
        m.peak_reserved as f64 / (1u64 << 30) as f64,
        m.driver_allocs
    );
    Ok(())
}
