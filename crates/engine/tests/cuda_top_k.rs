//! `ops::top_k_candidates` on the GPU against the CPU reference (its own test binary,
//! `engine-cuda_top_k` in bench/gpu's .gpu/bin).
//!
//! Ids and values must match exactly: the kernel only compares and copies logits, so any
//! difference is a bug, ties included. The lse is an f32 sum of up to 10⁵ exps on the GPU
//! against an f64 one on the CPU: within a few 1e-6 relative.
//!
//! Build here with `cargo test --release -p engine --test cuda_top_k --no-run`; run on the
//! GPU machine with `--include-ignored`.

use engine::Tensor;
use engine::ops::{self, MAX_TOP_K};

mod common;
use common::{GPU, Rng};

fn check(what: &str, data: Vec<f32>, b: usize, v: usize, k: usize) {
    let cpu = Tensor::from_vec(data, &[b, v]).unwrap();
    let want = ops::top_k_candidates(&cpu, k).unwrap();
    let got = ops::top_k_candidates(&cpu.to_device_f32(GPU).unwrap(), k).unwrap();
    assert_eq!(got.k, k, "{what}");
    assert_eq!(got.ids, want.ids, "{what}: ids");
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got.values), bits(&want.values), "{what}: values");
    for (r, (&g, &w)) in got.lse.iter().zip(&want.lse).enumerate() {
        let ok = if w.is_finite() {
            (g as f64 - w as f64).abs() <= 5e-6 * (w as f64).abs().max(1.0)
        } else {
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
        };
        assert!(ok, "{what}: lse row {r}: got {g}, want {w}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn top_k_matches_the_cpu_reference() {
    let mut rng = Rng(7);
    // (B, V, k): a vocabulary under one block, a non-multiple of 32, real vocabularies.
    let shapes = [
        (3, 1, 1),
        (4, 31, 31),
        (5, 1000, 6),
        (2, 4099, 65),
        (7, 32_000, 1),
        (3, 128_256, 6),
        (2, 151_936, MAX_TOP_K),
        (256, 128_256, 2),
    ];
    for (b, v, k) in shapes {
        for distinct in [5usize, 1 << 20] {
            // Few distinct values: ties everywhere, across warps and blocks' strides.
            let data: Vec<f32> = (0..b * v)
                .map(|_| (rng.below(distinct) as f32 / distinct as f32) * 30.0 - 15.0)
                .collect();
            check(
                &format!("B {b} V {v} k {k} distinct {distinct}"),
                data,
                b,
                v,
                k,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn top_k_infinities_and_nan() {
    let (b, v) = (4, 3000);
    let mut data = vec![0.25f32; b * v];
    data[5] = f32::NAN; // row 0: NaN → lse NaN, NaN orders as −inf
    data[v..2 * v].fill(f32::NEG_INFINITY); // row 1: all −inf
    data[2 * v + 2999] = f32::INFINITY; // row 2: +inf first
    data[3 * v..4 * v]
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = if i % 3 == 0 { f32::NEG_INFINITY } else { -0.0 });
    check("infinities and NaN", data, b, v, 9);
}
