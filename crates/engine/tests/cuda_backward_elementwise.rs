//! CUDA backward of the elementwise ops, and LoRA's device ops, against the CPU reference.
//!
//! Covered: `rms_norm_backward`, `gated_activation_backward` and its packed form (all three
//! activations), `rope_backward`, `rope_qkv_split_backward`, `embedding_backward`; the f32
//! paths of `add`, `add_inplace` and `scale`; and `columns`, `add_into_columns`,
//! `transpose`, `dropout_mask`, `apply_dropout` and its backward, in bf16 and f32.
//!
//! Inputs are drawn in f32 and rounded to bf16 first, so both devices see identical values;
//! the CPU result (f32, or f64 inside the op) is the reference. Tolerances are
//! `abs + rel·U·|want|` with U = 2⁻⁸ (bf16's unit roundoff), stated per test: a bf16 output is
//! at best the reference rounded once (rel = 1); f32 outputs get `abs` from the size of the
//! sums behind them. Shapes include 0, 1 and sizes that are not multiples of 8 (the 16-byte
//! vector paths) or of the block sizes.
//!
//! Every test needs a GPU: `#[ignore = "needs a CUDA GPU"]`. Build with
//! `cargo test --release -p engine --test cuda_backward_elementwise --no-run` and run the
//! binary on the GPU machine with `--include-ignored`.

use engine::cuda::DType;
use engine::ops::{self, Activation, DropoutKey, Rope, RopeScaling};
use engine::{Device, Indices, Tensor};

mod common;
use common::{GPU, NonFinite, Rng, gpu, gpu_lock, llama3, rand_tensor};

fn assert_close(what: &str, got: &Tensor, want: &Tensor, abs: f64, rel: f64) {
    common::assert_close_tensors(what, got, want, abs, rel, NonFinite::SameIsEqual);
}

/// [`common::max_abs`] of a tensor's values.
fn max_abs(t: &Tensor) -> f64 {
    common::max_abs(&host(t))
}

/// An f32 tensor on the GPU with exactly `t`'s values (LoRA's parameters and gradients).
fn gpu_f32(t: &Tensor) -> Tensor {
    t.to_device_f32(GPU).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_vec().unwrap()
}

const ACTS: [Activation; 3] = [Activation::Silu, Activation::GeluTanh, Activation::Gelu];

// ---------------------------------------------------------------------------------------
// Backward of the decoder's elementwise ops.

#[test]
#[ignore = "needs a CUDA GPU"]
fn rms_norm_backward_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(101);
    // Hidden sizes of the benchmark models, odd ones (scalar path), and enough rows for
    // several chunks of the dw reduction (32 rows at least each).
    for (t, c) in [
        (1, 64),
        (7, 896),
        (5, 2304),
        (3, 100),
        (67, 37),
        (300, 72),
        (2000, 64),
        (2, 3584),
    ] {
        for offset in [0.0, 1.0] {
            let x = rand_tensor(&mut rng, &[t, c], -2.0, 2.0);
            let w = rand_tensor(&mut rng, &[c], -1.0, 1.0);
            let dy = rand_tensor(&mut rng, &[t, c], -1.0, 1.0);
            let (want_dx, want_dw) = ops::rms_norm_backward(&x, &w, 1e-6, offset, &dy).unwrap();
            let (dx, dw) =
                ops::rms_norm_backward(&gpu(&x), &gpu(&w), 1e-6, offset, &gpu(&dy)).unwrap();
            assert_eq!((dx.dtype(), dw.dtype()), (DType::Bf16, DType::F32));
            let what = format!("{t}x{c} +{offset}");
            // dx: f32 math rounded once to bf16; its two terms cancel, and their f32 errors
            // (the row sums over C) stay below 1e-4 of the largest |dx|.
            assert_close(
                &format!("rms_norm dx {what}"),
                &dx,
                &want_dx,
                1e-4 * max_abs(&want_dx),
                1.05,
            );
            // dw: an f32 sum over T rows of bf16-exact products (the CPU sums in f64):
            // T·2⁻²⁴ relative to the largest term at worst, far below 1e-4 of max |dw|.
            assert_close(
                &format!("rms_norm dw {what}"),
                &dw,
                &want_dw,
                1e-4 * max_abs(&want_dw),
                0.0,
            );
            // Deterministic: a second run gives the same bits.
            let (dx2, dw2) =
                ops::rms_norm_backward(&gpu(&x), &gpu(&w), 1e-6, offset, &gpu(&dy)).unwrap();
            assert_eq!(host(&dx2), host(&dx), "{what}: dx changed between runs");
            assert_eq!(host(&dw2), host(&dw), "{what}: dw changed between runs");
        }
    }
    // No tokens: dw is zero; no columns: both empty.
    let w = gpu(&Tensor::zeros(&[16]));
    let none = gpu(&Tensor::zeros(&[0, 16]));
    let (dx, dw) = ops::rms_norm_backward(&none, &w, 1e-6, 0.0, &none).unwrap();
    assert_eq!((dx.shape(), dw.shape()), (&[0, 16][..], &[16][..]));
    assert_eq!(host(&dw), vec![0.0; 16]);
    let thin = gpu(&Tensor::zeros(&[4, 0]));
    let (dx, dw) =
        ops::rms_norm_backward(&thin, &gpu(&Tensor::zeros(&[0])), 1e-6, 0.0, &thin).unwrap();
    assert_eq!((dx.shape(), dw.shape()), (&[4, 0][..], &[0][..]));
    // Split devices are an error naming both.
    let err = ops::rms_norm_backward(
        &gpu(&Tensor::zeros(&[2, 4])),
        &Tensor::zeros(&[4]),
        1e-6,
        0.0,
        &gpu(&Tensor::zeros(&[2, 4])),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cuda:0") && err.contains("cpu"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gated_activation_backwards_match_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(102);
    // I = 8 and 4864 take the vector paths, 13 and 1001 the scalar tails.
    for (t, i) in [(1, 8), (3, 13), (2, 4864), (5, 1001), (0, 8)] {
        for act in ACTS {
            let gate = rand_tensor(&mut rng, &[t, i], -6.0, 6.0);
            let up = rand_tensor(&mut rng, &[t, i], -2.0, 2.0);
            let dy = rand_tensor(&mut rng, &[t, i], -1.0, 1.0);
            let (want_dg, want_du) = ops::gated_activation_backward(&gate, &up, act, &dy).unwrap();
            let (dg, du) =
                ops::gated_activation_backward(&gpu(&gate), &gpu(&up), act, &gpu(&dy)).unwrap();
            assert_eq!((dg.dtype(), du.dtype()), (DType::Bf16, DType::Bf16));
            // f32 transcendental functions differ by a few ulps, and SiLU's slope crosses 0
            // by cancellation (x ≈ −1.28): abs 1e-5 of the largest value; one bf16 rounding.
            let what = format!("{act:?} {t}x{i}");
            let abs_g = 1e-5 * max_abs(&want_dg);
            let abs_u = 1e-5 * max_abs(&want_du);
            assert_close(&format!("dgate {what}"), &dg, &want_dg, abs_g, 1.05);
            assert_close(&format!("dup {what}"), &du, &want_du, abs_u, 1.05);

            let gu = rand_tensor(&mut rng, &[t, 2 * i], -6.0, 6.0);
            let want = ops::gated_activation_packed_backward(&gu, act, &dy).unwrap();
            let got = ops::gated_activation_packed_backward(&gpu(&gu), act, &gpu(&dy)).unwrap();
            assert_eq!(got.shape(), &[t, 2 * i]);
            let abs = 1e-5 * max_abs(&want);
            assert_close(&format!("packed dgu {what}"), &got, &want, abs, 1.05);
        }
    }
    // The tails: slopes 0 far left, 1 far right, all finite.
    let g = Tensor::from_vec(
        vec![-1e20, -1e4, -100.0, 100.0, 1e4, 1e20, 0.0, -1.25],
        &[1, 8],
    )
    .unwrap();
    let ones = Tensor::from_vec(vec![1.0; 8], &[1, 8]).unwrap();
    for act in ACTS {
        let (want, _) = ops::gated_activation_backward(&g, &ones, act, &ones).unwrap();
        let (got, _) =
            ops::gated_activation_backward(&gpu(&g), &gpu(&ones), act, &gpu(&ones)).unwrap();
        assert!(
            host(&got).iter().all(|v| v.is_finite()),
            "{act:?}: {:?}",
            host(&got)
        );
        assert_close(&format!("{act:?} tails"), &got, &want, 1e-6, 1.05);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_backwards_match_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(103);
    for (t, heads, kv_heads, d, theta, scaling) in [
        (5, 4, 1, 64, 10_000.0, RopeScaling::Default),
        (9, 2, 2, 128, 500_000.0, llama3()),
        (3, 8, 4, 256, 10_000.0, RopeScaling::Default),
        (
            4,
            3,
            1,
            80,
            1_000_000.0,
            RopeScaling::Linear { factor: 4.0 },
        ),
        (301, 14, 2, 64, 1_000_000.0, RopeScaling::Default),
        (0, 2, 1, 64, 10_000.0, RopeScaling::Default),
    ] {
        let mut rope = Rope::new(d, theta, &scaling);
        let positions: Vec<u32> = (0..t).map(|_| rng.below(8192) as u32).collect();
        for attention_scaling in [1.0, 1.25] {
            rope.attention_scaling = attention_scaling;
            let what = format!("{t}x{heads}x{d} s{attention_scaling}");
            let dy = rand_tensor(&mut rng, &[t, heads, d], -1.0, 1.0);
            let mut want = dy.clone();
            ops::rope_backward(&mut want, &positions, &rope).unwrap();
            let mut got = gpu(&dy);
            let untouched = got.clone();
            ops::rope_backward(&mut got, &positions, &rope).unwrap();
            // Same f32 angle, accurate sin/cos on both sides, one bf16 rounding.
            assert_close(&format!("rope_backward {what}"), &got, &want, 1e-5, 1.05);
            assert_eq!(
                host(&untouched),
                host(&dy),
                "rope_backward wrote through a clone"
            );

            let dq = rand_tensor(&mut rng, &[t, heads, d], -1.0, 1.0);
            let dk = rand_tensor(&mut rng, &[t, kv_heads, d], -1.0, 1.0);
            let dv = rand_tensor(&mut rng, &[t, kv_heads, d], -1.0, 1.0);
            let pos = Indices::from(&positions[..]);
            let want = ops::rope_qkv_split_backward(&dq, &dk, &dv, &pos, &rope).unwrap();
            let got =
                ops::rope_qkv_split_backward(&gpu(&dq), &gpu(&dk), &gpu(&dv), &pos, &rope).unwrap();
            assert_eq!(got.shape(), &[t, (heads + 2 * kv_heads) * d]);
            assert_close(
                &format!("rope_qkv_split_backward {what}"),
                &got,
                &want,
                1e-5,
                1.05,
            );
            // The v heads are copied: exact.
            let width = (heads + 2 * kv_heads) * d;
            let v0 = (heads + kv_heads) * d;
            let (g, w) = (host(&got), host(&want));
            for row in 0..t {
                let span = row * width + v0..(row + 1) * width;
                assert_eq!(g[span.clone()], w[span], "{what}: dv of row {row}");
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_backward_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(104);
    // (V, C, T, distinct ids drawn from): few ids repeated many times, many ids once, a LoRA
    // rank as C, and C not a multiple of 8.
    for (v, c, t, spread) in [
        (300, 64, 5, 300),
        (1000, 896, 200, 1000),
        (50, 37, 300, 7),
        (3001, 16, 700, 40),
        (151_936, 16, 513, 151_936),
        (10, 3, 1, 10),
    ] {
        let ids: Vec<u32> = (0..t)
            .map(|_| (rng.below(spread) * (v / spread)) as u32)
            .collect();
        let dy = rand_tensor(&mut rng, &[t, c], -1.0, 1.0);
        for scale in [1.0f32, 0.5, 2.645_751_3] {
            let want = ops::embedding_backward(&ids, &dy, v, scale).unwrap();
            let got = ops::embedding_backward(&ids, &gpu(&dy), v, scale).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            assert_eq!(got.shape(), &[v, c]);
            // An f32 sum of at most T bf16-exact terms (the CPU sums in f64): T·2⁻²⁴ of the
            // largest partial sum, below 1e-5 of max |want| here; rows no id names are 0 on
            // both sides.
            let what = format!("d_table v{v} c{c} t{t} s{scale}");
            assert_close(&what, &got, &want, 1e-5 * max_abs(&want), 0.0);
            let again = ops::embedding_backward(&ids, &gpu(&dy), v, scale).unwrap();
            assert_eq!(host(&again), host(&got), "{what}: changed between runs");
        }
    }
    // No tokens: a zero table gradient. An id past the table: an error naming it.
    let empty = ops::embedding_backward(&[], &gpu(&Tensor::zeros(&[0, 4])), 3, 1.0).unwrap();
    assert_eq!(host(&empty), vec![0.0; 12]);
    let err = ops::embedding_backward(&[0, 3], &gpu(&Tensor::zeros(&[2, 4])), 3, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ids[1] = 3"), "{err}");
}

// ---------------------------------------------------------------------------------------
// f32 elementwise ops (LoRA's gradient accumulators).

#[test]
#[ignore = "needs a CUDA GPU"]
fn f32_add_and_scale_match_cpu_exactly() {
    let _gpu = gpu_lock();
    let mut rng = Rng(105);
    for n in [1, 7, 8, 1000, 3 * 4096 + 5] {
        // f32 values that are not bf16-exact: the f32 paths must not round them.
        let a = Tensor::from_vec((0..n).map(|_| rng.uniform(-4.0, 4.0)).collect(), &[n]).unwrap();
        let b = Tensor::from_vec((0..n).map(|_| rng.uniform(-4.0, 4.0)).collect(), &[n]).unwrap();
        // One f32 add or multiply on both devices: the same bits.
        let sum = ops::add(&gpu_f32(&a), &gpu_f32(&b)).unwrap();
        assert_eq!(sum.dtype(), DType::F32);
        assert_eq!(host(&sum), host(&ops::add(&a, &b).unwrap()), "add n{n}");
        let scaled = ops::scale(&gpu_f32(&a), 0.37).unwrap();
        assert_eq!(scaled.dtype(), DType::F32);
        assert_eq!(
            host(&scaled),
            host(&ops::scale(&a, 0.37).unwrap()),
            "scale n{n}"
        );
        let mut acc = gpu_f32(&a);
        let shared = acc.clone();
        ops::add_inplace(&mut acc, &gpu_f32(&b)).unwrap();
        assert_eq!(
            host(&acc),
            host(&ops::add(&a, &b).unwrap()),
            "add_inplace n{n}"
        );
        assert_eq!(host(&shared), host(&a), "add_inplace wrote through a clone");
        // f32 += bf16: the bf16 term as stored, added in f32.
        let b16 = gpu(&b);
        let mut acc = gpu_f32(&a);
        ops::add_inplace(&mut acc, &b16).unwrap();
        let b_rounded = Tensor::from_vec(host(&b16), &[n]).unwrap();
        assert_eq!(
            host(&acc),
            host(&ops::add(&a, &b_rounded).unwrap()),
            "f32 += bf16"
        );
    }
    // bf16 += f32 and a mixed `add` are refused, not silently rounded.
    let mut a16 = gpu(&Tensor::zeros(&[4]));
    let b32 = gpu_f32(&Tensor::zeros(&[4]));
    assert!(ops::add_inplace(&mut a16, &b32).is_err());
    assert!(ops::add(&a16, &b32).is_err());
}

// ---------------------------------------------------------------------------------------
// LoRA's device ops.

/// The same op on a bf16 and an f32 copy of `x`.
fn both_dtypes(x: &Tensor) -> [(Tensor, &'static str); 2] {
    [(gpu(x), "bf16"), (gpu_f32(x), "f32")]
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn columns_add_into_columns_and_transpose_match_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(106);
    // Stacked q/k/v of qwen05 (896 + 2·128) and slices at odd offsets; empty ranges.
    for (t, width, col0, n) in [
        (5, 1152, 0, 896),
        (5, 1152, 896, 128),
        (5, 1152, 1024, 128),
        (33, 77, 13, 50),
        (1, 1, 0, 1),
        (4, 9, 9, 0),
        (0, 8, 2, 3),
    ] {
        let x = rand_tensor(&mut rng, &[t, width], -2.0, 2.0);
        let delta = rand_tensor(&mut rng, &[t, n], -2.0, 2.0);
        let want_cols = ops::columns(&x, col0, n).unwrap();
        let mut want_y = x.clone();
        ops::add_into_columns(&mut want_y, col0, &delta).unwrap();
        for ((gx, dtype), (gd, _)) in both_dtypes(&x).into_iter().zip(both_dtypes(&delta)) {
            let what = format!("{dtype} {t}x{width} [{col0}, +{n})");
            let cols = ops::columns(&gx, col0, n).unwrap();
            assert_eq!(cols.dtype(), gx.dtype());
            // A copy: exact.
            assert_eq!(host(&cols), host(&want_cols), "columns {what}");
            let mut y = gx.clone();
            ops::add_into_columns(&mut y, col0, &gd).unwrap();
            // f32: the same add (exact); bf16: the sum rounded once.
            assert_close(&format!("add_into_columns {what}"), &y, &want_y, 0.0, 1.0);
            assert_eq!(
                host(&gx),
                host(&x),
                "add_into_columns wrote through a clone"
            );
        }
    }
    // R × N with N the vocabulary (the embedding pair's A), tiles cut by both edges, 0 sizes.
    for (r, n) in [
        (16, 151_936),
        (37, 70),
        (1, 1),
        (1, 33),
        (33, 1),
        (0, 5),
        (5, 0),
    ] {
        let x = rand_tensor(&mut rng, &[r, n], -2.0, 2.0);
        let want = ops::transpose(&x).unwrap();
        for (gx, dtype) in both_dtypes(&x) {
            let got = ops::transpose(&gx).unwrap();
            assert_eq!((got.shape(), got.dtype()), (&[n, r][..], gx.dtype()));
            assert_eq!(host(&got), host(&want), "transpose {dtype} {r}x{n}");
        }
    }
    let err = ops::columns(&gpu(&Tensor::zeros(&[2, 4])), 3, 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[2, 4]"), "{err}");
    let mut y = gpu(&Tensor::zeros(&[2, 4]));
    assert!(ops::add_into_columns(&mut y, 0, &gpu_f32(&Tensor::zeros(&[2, 2]))).is_err());
}

fn keys() -> Vec<DropoutKey> {
    vec![
        DropoutKey {
            p: 0.05,
            seed: 42,
            step: 0,
            layer: Some(0),
            module: 1,
        },
        DropoutKey {
            p: 0.05,
            seed: 42,
            step: 99,
            layer: Some(41),
            module: 7,
        },
        DropoutKey {
            p: 0.5,
            seed: u64::MAX,
            step: 1 << 40,
            layer: None,
            module: 8,
        },
        DropoutKey {
            p: 0.0,
            seed: 3,
            step: 3,
            layer: Some(3),
            module: 3,
        },
    ]
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dropout_masks_are_bit_identical_on_both_devices() {
    let _gpu = gpu_lock();
    for key in keys() {
        for (rows, cols) in [(1, 1), (3, 7), (37, 896), (3, 1_000_003), (0, 5)] {
            let want = ops::dropout_mask(&key, rows, cols, Device::Cpu).unwrap();
            let got = ops::dropout_mask(&key, rows, cols, GPU).unwrap();
            assert_eq!((got.shape(), got.dtype()), (&[rows, cols][..], DType::F32));
            let (g, w) = (host(&got), host(&want));
            let first_bad = g
                .iter()
                .zip(&w)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(
                first_bad.is_none(),
                "{key:?} {rows}x{cols}: element {first_bad:?} differs"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn apply_dropout_and_its_backward_match_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(107);
    for key in keys() {
        for shape in [vec![1usize, 1], vec![5, 13], vec![64, 896], vec![3, 4, 5]] {
            let x = rand_tensor(&mut rng, &shape, -3.0, 3.0);
            let want = ops::apply_dropout(&x, &key).unwrap();
            let want_back = ops::apply_dropout_backward(&x, &key).unwrap();
            assert_eq!(host(&want), host(&want_back));
            for (gx, dtype) in both_dtypes(&x) {
                let what = format!("{dtype} {shape:?} {key:?}");
                let got = ops::apply_dropout(&gx, &key).unwrap();
                let back = ops::apply_dropout_backward(&gx, &key).unwrap();
                assert_eq!((got.shape(), got.dtype()), (&shape[..], gx.dtype()));
                // One f32 multiply by the same multiplier: exact in f32, rounded once in bf16.
                assert_close(&format!("apply_dropout {what}"), &got, &want, 0.0, 1.0);
                assert_close(&format!("backward {what}"), &back, &want, 0.0, 1.0);
                // Dropped elements are exactly 0 on both devices.
                for (i, (&g, &w)) in host(&got).iter().zip(&host(&want)).enumerate() {
                    assert_eq!(g == 0.0, w == 0.0, "{what}: element {i}");
                }
            }
        }
    }
    let bad = DropoutKey {
        p: 1.0,
        ..keys()[0]
    };
    assert!(ops::apply_dropout(&gpu(&Tensor::zeros(&[2])), &bad).is_err());
    assert!(ops::dropout_mask(&bad, 1, 2, GPU).is_err());
}
