//! CUDA linear backward (cuBLASLt with transposed operands) and the chunked log-prob forward
//! and backward with LoRA's low-rank term, against the CPU reference.
//!
//! Inputs are drawn in f32 and rounded to bf16 first, so the CPU (f32) and the GPU (bf16
//! storage, f32 accumulation) see identical values; the CPU result is the reference (it is
//! itself checked against finite differences of f64 models in the crate's unit tests).
//!
//! Tolerances, stated per test:
//! - GEMM gradients: the products of bf16 values are exact in f32, so the only differences
//!   are f32 summation order (≈ 1e-6 of the largest element) and, for bf16 outputs, one
//!   rounding (rel = 1.05 units of U = 2⁻⁸): `abs = 1e-3 · max|want|`.
//! - Log-prob statistics: f32 logits in another summation order: `1e-3` absolute.
//! - Log-prob gradients: the GPU rounds dz (the logits' gradient) to bf16 for the GEMMs that
//!   consume it, as a bf16 autograd does; a numpy model of exactly that rounding on these
//!   shapes gave at most 5.1e-3 · max|want| elementwise (d_hidden, which is also rounded to
//!   bf16 on output) and 2.8e-3 relative in norm. Bounds: `1e-2 · max|want|` elementwise and
//!   `6e-3` in norm — a dropped or misplaced term is O(1) in norm.
//!
//! Every GPU test is `#[ignore = "needs a CUDA GPU"]`: build on the CPU machine with
//! `cargo test --release -p engine --test cuda_linear_backward --no-run`, run on the GPU
//! machine with `--include-ignored`.

use engine::cuda::DType;
use engine::ops::{self, LogProbChunks, LowRank};
use engine::{EngineError, Tensor};

mod common;
use common::{GPU, NonFinite, Rng, gpu, gpu_lock, max_abs, rand_tensor};

/// Elementwise `|got − want| ≤ frac · max|want| + rel·U·|want|`, after checking the device,
/// dtype and shape of `got`.
fn assert_scaled(what: &str, got: &Tensor, want: &Tensor, dtype: DType, frac: f64, rel: f64) {
    assert_eq!(got.device(), GPU, "{what}: device");
    assert_eq!(got.dtype(), dtype, "{what}: dtype");
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (g, w) = (got.to_vec().unwrap(), want.to_vec().unwrap());
    let abs = frac * max_abs(&w);
    common::assert_close_slices(what, &g, &w, abs, rel, NonFinite::Fails);
}

/// ‖got − want‖ / ‖want‖ ≤ bound (skipped when want is exactly zero: the elementwise check
/// then demands exact zeros).
fn assert_norm_close(what: &str, got: &Tensor, want: &Tensor, bound: f64) {
    let (g, w) = (got.to_vec().unwrap(), want.to_vec().unwrap());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in g.iter().zip(&w) {
        diff += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    if norm == 0.0 {
        return;
    }
    let rel = (diff / norm).sqrt();
    eprintln!("{what}: relative norm error {rel:.3e}");
    assert!(
        rel <= bound,
        "{what}: relative norm error {rel:.3e} > {bound:.1e}"
    );
}

// ---------------------------------------------------------------------------------------
// Linear backward.

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_backward_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(101);
    // (T, N, K): single elements, sizes that are not multiples of 8 or 16, a qwen05 MLP
    // shape, and empty dimensions (each gradient of an empty sum is zeros).
    for (t, n, k) in [
        (1, 1, 1),
        (7, 13, 33),
        (33, 40, 17),
        (129, 896, 136),
        (1024, 896, 4864),
        (300, 4864, 896),
        (5, 0, 3),
        (0, 4, 5),
        (3, 4, 0),
    ] {
        let dy = rand_tensor(&mut rng, &[t, n], -1.0, 1.0);
        let w = rand_tensor(&mut rng, &[n, k], -0.1, 0.1);
        let x = rand_tensor(&mut rng, &[t, k], -1.0, 1.0);
        let what = format!("T{t} N{n} K{k}");
        let (gdy, gw, gx) = (gpu(&dy), gpu(&w), gpu(&x));

        let want = ops::linear_backward_input(&dy, &w).unwrap();
        let got = ops::linear_backward_input(&gdy, &gw).unwrap();
        assert_scaled(&format!("dx {what}"), &got, &want, DType::Bf16, 1e-3, 1.05);

        let want = ops::linear_backward_weight(&dy, &x).unwrap();
        let got = ops::linear_backward_weight(&gdy, &gx).unwrap();
        assert_scaled(&format!("dw {what}"), &got, &want, DType::F32, 1e-3, 0.0);

        let want = ops::bias_backward(&dy).unwrap();
        let got = ops::bias_backward(&gdy).unwrap();
        assert_scaled(&format!("db {what}"), &got, &want, DType::F32, 1e-3, 0.0);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_backward_on_the_gpu_refuses_bad_inputs() {
    let _gpu = gpu_lock();
    let dy = gpu(&Tensor::zeros(&[2, 3]));
    // Shapes: the same checks as on the CPU.
    let bad = [
        ops::linear_backward_input(&dy, &gpu(&Tensor::zeros(&[4, 5]))),
        ops::linear_backward_weight(&dy, &gpu(&Tensor::zeros(&[3, 5]))),
        ops::bias_backward(&gpu(&Tensor::zeros(&[6]))),
    ];
    for (i, r) in bad.into_iter().enumerate() {
        assert!(
            matches!(r, Err(EngineError::Shape { .. })),
            "case {i}: {r:?}"
        );
    }
    // dy must be bf16 on the GPU; an f32 one is named in the error.
    let dy32 = Tensor::zeros(&[2, 3]).to_device_f32(GPU).unwrap();
    let err = ops::linear_backward_input(&dy32, &gpu(&Tensor::zeros(&[3, 5])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dy") && err.contains("bf16"), "{err}");
    // Mixed devices are an error naming both tensors.
    let err = ops::linear_backward_weight(&dy, &Tensor::zeros(&[2, 5]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dy is on cuda:0 but x is on cpu"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Token log-probs with the low-rank term.

/// One random log-prob problem, bf16-exact, on the CPU.
struct Problem {
    hidden: Tensor, // [T, C]
    head: Tensor,   // [V, C]
    u: Tensor,      // [T, R]
    b: Tensor,      // [V, R]
    targets: Vec<u32>,
}

impl Problem {
    /// Logits of O(1..10): hidden in ±1, head in ±`head_scale`, u in ±1, b in ±0.5.
    fn new(rng: &mut Rng, (t, c, v, r): Shape, head_scale: f32) -> Self {
        Problem {
            hidden: rand_tensor(rng, &[t, c], -1.0, 1.0),
            head: rand_tensor(rng, &[v, c], -head_scale, head_scale),
            u: rand_tensor(rng, &[t, r], -1.0, 1.0),
            b: rand_tensor(rng, &[v, r], -0.5, 0.5),
            targets: (0..t).map(|_| rng.below(v) as u32).collect(),
        }
    }

    fn on_gpu(&self) -> Problem {
        Problem {
            hidden: gpu(&self.hidden),
            head: gpu(&self.head),
            u: gpu(&self.u),
            b: gpu(&self.b),
            targets: self.targets.clone(),
        }
    }

    fn low_rank(&self, with: bool) -> Option<LowRank<'_>> {
        with.then_some(LowRank {
            u: &self.u,
            b: &self.b,
        })
    }

    /// The problem's shape and one setting, for messages.
    fn describe(&self, with_u: bool, cap: Option<f32>, chunks: LogProbChunks) -> String {
        let (t, c) = (self.hidden.shape()[0], self.hidden.shape()[1]);
        let (v, r) = (self.head.shape()[0], self.u.shape()[1]);
        format!("T{t} C{c} V{v} R{r} cap {cap:?} low rank {with_u} {chunks:?}")
    }
}

/// `op` on the CPU problem (the reference) and on its GPU copy: (want, got).
fn on_both<T>(p: &Problem, g: &Problem, op: impl Fn(&Problem) -> T) -> (T, T) {
    (op(p), op(g))
}

/// (T, C, V, R).
type Shape = (usize, usize, usize, usize);

/// Problems and their head scale: odd sizes, one vocabulary id, C = 0 (the logits are the
/// low-rank term alone), R = 0, a larger head scale (logits up to ~30), and a larger
/// vocabulary.
const SHAPES: &[(Shape, f32)] = &[
    ((11, 24, 203, 3), 0.5),
    ((6, 13, 40, 4), 0.5),
    ((37, 136, 2053, 5), 0.5),
    ((300, 64, 5000, 16), 0.5),
    ((64, 136, 1000, 16), 2.0),
    ((5, 8, 1, 2), 0.5),
    ((6, 0, 40, 4), 0.5),
    ((7, 16, 50, 0), 0.5),
    ((256, 256, 32000, 16), 0.25),
];

/// Chunkings: one token and a vocabulary chunk of 7, chunks that divide nothing, and the
/// default. On the GPU they give several vocabulary chunks; the token chunk is widened to the
/// scratch budget there (see `BUDGET_SHAPE` for several GPU token chunks).
const CHUNKS: &[LogProbChunks] = &[
    LogProbChunks {
        tokens: 1,
        vocab: 7,
    },
    LogProbChunks {
        tokens: 8,
        vocab: 128,
    },
    LogProbChunks {
        tokens: 3,
        vocab: 1000,
    },
    LogProbChunks {
        tokens: 64,
        vocab: 8192,
    },
];

/// The small chunkings are slow on large shapes (thousands of tiny GEMMs): skip those pairs.
fn worth_running(t: usize, v: usize, chunks: LogProbChunks) -> bool {
    t.div_ceil(chunks.tokens) * v.div_ceil(chunks.vocab) <= 20_000
}

/// The GPU forward against the CPU's on one problem, one setting.
fn check_forward(p: &Problem, g: &Problem, with_u: bool, cap: Option<f32>, chunks: LogProbChunks) {
    let what = p.describe(with_u, cap, chunks);
    let (want, got) = on_both(p, g, |x| {
        ops::token_logprobs_low_rank(
            &x.hidden,
            &x.head,
            x.low_rank(with_u),
            &x.targets,
            cap,
            chunks,
        )
        .unwrap()
    });
    let close = |name: &str, got: &[f32], want: &[f32]| {
        let what = format!("{what} {name}");
        common::assert_close_slices(&what, got, want, 1e-3, 0.0, NonFinite::Fails)
    };
    close("logp", &got.logp, &want.logp);
    close("entropy", &got.entropy, &want.entropy);
    close("mean", &got.mean_logit, &want.mean_logit);
    // Argmax agrees unless the top two logits are within f32 noise: the reference's logit of
    // each id decides.
    for (i, (&gi, &wi)) in got.argmax.iter().zip(&want.argmax).enumerate() {
        if gi != wi {
            let logit = |id: u32| reference_logit(p, with_u, cap, i, id as usize);
            assert!(
                (logit(gi) - logit(wi)).abs() < 1e-4,
                "{what} argmax[{i}]: got {gi}, want {wi}"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn token_logprobs_low_rank_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(102);
    for &(shape, scale) in SHAPES {
        let (t, _, v, _) = shape;
        let p = Problem::new(&mut rng, shape, scale);
        let g = p.on_gpu();
        for cap in [None, Some(3.0f32)] {
            for &chunks in CHUNKS.iter().filter(|&&ch| worth_running(t, v, ch)) {
                for with_u in [true, false] {
                    check_forward(&p, &g, with_u, cap, chunks);
                }
            }
        }
    }
}

/// The GPU widens the token chunk up to a 256 MiB scratch, so small `LogProbChunks` do not
/// split the tokens there; a vocabulary chunk this wide does. T = 1000, C = 64:
/// - forward, one vocabulary chunk of 100000: 2²⁸ / (4 · 100000) = 671 rows → 2 token chunks;
/// - backward, 6 bytes per logit plus 4·C per row: 2²⁸ / 600256 = 447 rows → 3 token chunks
///   (447, 447, 106), so d_b accumulates over token chunks; with vocabulary chunks of 50000,
///   2²⁸ / 300256 = 894 rows → 2 token chunks × 2 vocabulary chunks.
const BUDGET_SHAPE: Shape = (1000, 64, 100_000, 16);
const BUDGET_CHUNKS: [LogProbChunks; 2] = [
    LogProbChunks {
        tokens: 64,
        vocab: 1 << 20,
    },
    LogProbChunks {
        tokens: 64,
        vocab: 50_000,
    },
];

#[test]
#[ignore = "needs a CUDA GPU"]
fn token_logprobs_low_rank_over_several_gpu_token_chunks_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(105);
    let p = Problem::new(&mut rng, BUDGET_SHAPE, 0.5);
    let g = p.on_gpu();
    for cap in [None, Some(3.0f32)] {
        for chunks in BUDGET_CHUNKS {
            check_forward(&p, &g, true, cap, chunks);
        }
    }
}

/// One logit of the CPU problem in f64 (for argmax ties).
fn reference_logit(p: &Problem, with_u: bool, cap: Option<f32>, row: usize, id: usize) -> f64 {
    let dot = |a: &Tensor, ra: usize, b: &Tensor, rb: usize| -> f64 {
        let w = a.shape()[1];
        let (a, b) = (a.as_slice().unwrap(), b.as_slice().unwrap());
        (0..w)
            .map(|j| a[ra * w + j] as f64 * b[rb * w + j] as f64)
            .sum()
    };
    let mut l = dot(&p.hidden, row, &p.head, id);
    if with_u {
        l += dot(&p.u, row, &p.b, id);
    }
    cap.map_or(l, |c| (l / c as f64).tanh() * c as f64)
}

// ---------------------------------------------------------------------------------------
// Token log-prob backward.

/// Upstream gradients as DPO gives them: masked prompt rows (0..3), a masked row every 7th,
/// mixed signs elsewhere.
fn upstream(rng: &mut Rng, t: usize) -> Vec<f32> {
    (0..t)
        .map(|i| {
            if i < 3 || i % 7 == 6 {
                0.0
            } else {
                rng.uniform(-1.0, 1.0)
            }
        })
        .collect()
}

/// The GPU backward against the CPU's on one problem, one setting.
fn check_backward(
    p: &Problem,
    g: &Problem,
    d_logp: &[f32],
    with_u: bool,
    cap: Option<f32>,
    chunks: LogProbChunks,
) {
    let what = p.describe(with_u, cap, chunks);
    let (want, got) = on_both(p, g, |x| {
        ops::token_logprobs_backward(
            d_logp,
            &x.hidden,
            &x.head,
            x.low_rank(with_u),
            &x.targets,
            cap,
            chunks,
        )
        .unwrap()
    });
    // Rows without upstream gradient are exactly zero.
    let masked: Vec<usize> = (0..d_logp.len()).filter(|&i| d_logp[i] == 0.0).collect();
    let name = format!("{what} d_hidden");
    assert_gradient(&name, &got.d_hidden, &want.d_hidden, DType::Bf16);
    assert_rows_zero(&name, &got.d_hidden, &masked);
    match (&got.d_low_rank, &want.d_low_rank) {
        (Some(got), Some(want)) => {
            let name = format!("{what} d_u");
            assert_gradient(&name, &got.d_u, &want.d_u, DType::F32);
            assert_rows_zero(&name, &got.d_u, &masked);
            assert_gradient(&format!("{what} d_b"), &got.d_b, &want.d_b, DType::F32);
        }
        (None, None) => assert!(!with_u, "{what}: low-rank gradients missing"),
        _ => panic!("{what}: low-rank gradients present iff the term is"),
    }
}

/// A log-prob gradient against the CPU's (the bounds of the file header): `1e-2 · max|want|`
/// elementwise and `6e-3` in norm.
fn assert_gradient(what: &str, got: &Tensor, want: &Tensor, dtype: DType) {
    assert_scaled(what, got, want, dtype, 1e-2, 0.0);
    assert_norm_close(what, got, want, 6e-3);
}

/// The given rows of a [rows, width] tensor are exactly zero.
fn assert_rows_zero(what: &str, t: &Tensor, rows: &[usize]) {
    let width = t.shape()[1];
    let v = t.to_vec().unwrap();
    for &i in rows {
        let row = &v[i * width..(i + 1) * width];
        assert!(row.iter().all(|&x| x == 0.0), "{what} row {i}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn token_logprobs_backward_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(103);
    for &(shape, scale) in SHAPES {
        let (t, _, v, _) = shape;
        let p = Problem::new(&mut rng, shape, scale);
        let g = p.on_gpu();
        let d_logp = upstream(&mut rng, t);
        // A cap of 1 saturates tanh (logits of several units), where 1 − (l/c)² is small.
        for cap in [None, Some(3.0f32), Some(1.0)] {
            for &chunks in CHUNKS.iter().filter(|&&ch| worth_running(t, v, ch)) {
                for with_u in [true, false] {
                    check_backward(&p, &g, &d_logp, with_u, cap, chunks);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn token_logprobs_backward_over_several_gpu_token_chunks_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(106);
    let p = Problem::new(&mut rng, BUDGET_SHAPE, 0.5);
    let g = p.on_gpu();
    let d_logp = upstream(&mut rng, BUDGET_SHAPE.0);
    for cap in [None, Some(3.0f32)] {
        for chunks in BUDGET_CHUNKS {
            check_backward(&p, &g, &d_logp, true, cap, chunks);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn token_logprobs_backward_edge_cases() {
    let _gpu = gpu_lock();
    let mut rng = Rng(104);
    let p = Problem::new(&mut rng, (5, 24, 40, 3), 0.5);
    let g = p.on_gpu();
    let ch = LogProbChunks {
        tokens: 2,
        vocab: 9,
    };
    // No upstream gradient: exact zeros of the right shapes and dtypes.
    let got = ops::token_logprobs_backward(
        &[0.0; 5],
        &g.hidden,
        &g.head,
        g.low_rank(true),
        &g.targets,
        Some(3.0),
        ch,
    )
    .unwrap();
    assert_eq!(
        (got.d_hidden.shape(), got.d_hidden.dtype()),
        (&[5, 24][..], DType::Bf16)
    );
    assert!(got.d_hidden.to_vec().unwrap().iter().all(|&x| x == 0.0));
    let lr = got.d_low_rank.unwrap();
    assert_eq!((lr.d_u.shape(), lr.d_u.dtype()), (&[5, 3][..], DType::F32));
    assert_eq!((lr.d_b.shape(), lr.d_b.dtype()), (&[40, 3][..], DType::F32));
    assert!(lr.d_u.to_vec().unwrap().iter().all(|&x| x == 0.0));
    assert!(lr.d_b.to_vec().unwrap().iter().all(|&x| x == 0.0));
    // No rows at all.
    let none = ops::token_logprobs_backward(
        &[],
        &gpu(&Tensor::zeros(&[0, 24])),
        &g.head,
        None,
        &[],
        None,
        ch,
    )
    .unwrap();
    assert_eq!(none.d_hidden.shape(), &[0, 24]);
    assert!(none.d_low_rank.is_none());
    // The argument checks are the CPU's: a bad length, a non-finite gradient, a target out
    // of range, a mismatched low-rank shape, an f32 operand.
    let lr = g.low_rank(true);
    let call = |d_logp: &[f32], targets: &[u32], lr: Option<LowRank<'_>>| {
        ops::token_logprobs_backward(d_logp, &g.hidden, &g.head, lr, targets, None, ch)
    };
    let ones = [1.0f32; 5];
    assert!(matches!(
        call(&[1.0], &g.targets, lr),
        Err(EngineError::Arg { .. })
    ));
    let nan = [1.0, f32::NAN, 1.0, 1.0, 1.0];
    assert!(matches!(
        call(&nan, &g.targets, lr),
        Err(EngineError::Arg { .. })
    ));
    assert!(matches!(
        call(&ones, &[0, 1, 2, 3, 40], lr),
        Err(EngineError::Index { .. })
    ));
    let b_bad = gpu(&Tensor::zeros(&[39, 3]));
    let bad_lr = Some(LowRank { u: &g.u, b: &b_bad });
    assert!(matches!(
        call(&ones, &g.targets, bad_lr),
        Err(EngineError::Shape { .. })
    ));
    let u32_ = p.u.to_device_f32(GPU).unwrap();
    let f32_lr = Some(LowRank { u: &u32_, b: &g.b });
    let err = call(&ones, &g.targets, f32_lr).unwrap_err().to_string();
    assert!(err.contains("u must be bf16"), "{err}");
    // A CPU operand among GPU ones is the device-mismatch error.
    let cpu_lr = Some(LowRank { u: &p.u, b: &g.b });
    assert!(matches!(
        call(&ones, &g.targets, cpu_lr),
        Err(EngineError::Arg { .. })
    ));
}
