//! `ops::attention_backward` on the GPU against the CPU reference.
//!
//! Every case draws bf16-exact q, k, v and d_out, runs the GPU forward, and hands its own
//! bf16 `out` and f32 `lse` to both backwards, so the CPU (f32) and the GPU see identical
//! numbers and only the backward kernels differ. Tolerance per gradient tensor:
//! |got − want| ≤ TOL·max|want| + 1e-4 + 1.05·U·|want| (U = 2⁻⁸): the last term is the one
//! rounding of each output to bf16; 1e-4 is a floor for gradients that are zero in exact
//! arithmetic (a window of 1: dP = Δ, so dS is only rounding noise, ~1e-6, on both devices);
//! TOL covers the kernels' own rounding:
//! - tensor cores (head dims 64, 80, 96, 128, 256) multiply with P and dS rounded to bf16
//!   (relative 2⁻⁹ per term, random signs over up to a few hundred terms): expected well under
//!   1e-2 of the largest gradient; TOL = 2e-2.
//! - the scalar kernels (other head dims) keep P and dS in f32: only f32 summation order and
//!   expf differ from the CPU; TOL = 2e-3.
//!
//! Tests that need a GPU are `#[ignore = "needs a CUDA GPU"]`: build with
//! `cargo test --release -p engine --test cuda_attention_backward --no-run`, run on the GPU
//! machine with `--include-ignored`. The module's NVRTC compile is checked without a GPU by
//! cuda_parity's `every_kernel_compiles_for_sm_90` and by the launcher's
//! `kernels_compile_without_spills`.

use engine::cuda::DType;
use engine::ops::{self, AttentionGrads, AttentionParams, SeqLayout};
use engine::{Device, EngineError, Tensor};

mod common;
use common::{GPU, NonFinite, Rng, gpu, gpu_lock, max_abs, rand_tensor, seq_layout, starts};

/// Head dims with a tensor-core instance (kernels/attention_backward.cu).
const TENSOR_CORE_DIMS: [usize; 5] = [64, 80, 96, 128, 256];

struct Case {
    h: usize,
    hkv: usize,
    d: usize,
    q_lens: Vec<usize>,
    kv_lens: Vec<usize>,
    params: AttentionParams,
}

impl Case {
    /// H query heads over Hkv kv heads of size D, on sequences of `q_lens` queries over
    /// `kv_lens` keys.
    fn new(
        [h, hkv, d]: [usize; 3],
        (q_lens, kv_lens): (&[usize], &[usize]),
        params: AttentionParams,
    ) -> Case {
        Case {
            h,
            hkv,
            d,
            q_lens: q_lens.to_vec(),
            kv_lens: kv_lens.to_vec(),
            params,
        }
    }
}

fn prefill(lens: &[usize]) -> (Vec<usize>, Vec<usize>) {
    (lens.to_vec(), lens.to_vec())
}

fn params(d: usize, window: Option<usize>, softcap: Option<f32>) -> AttentionParams {
    AttentionParams {
        scale: 1.0 / (d as f32).sqrt(),
        window,
        softcap,
    }
}

/// Runs one case (see the file header) and returns the GPU gradients.
fn check(rng: &mut Rng, c: &Case) -> AttentionGrads {
    let (layout, tq, tkv) = seq_layout(&c.q_lens, &c.kv_lens);
    let q = rand_tensor(rng, &[tq, c.h, c.d], -2.0, 2.0);
    let k = rand_tensor(rng, &[tkv, c.hkv, c.d], -2.0, 2.0);
    let v = rand_tensor(rng, &[tkv, c.hkv, c.d], -1.0, 1.0);
    let d_out = rand_tensor(rng, &[tq, c.h, c.d], -1.0, 1.0);
    let (gq, gk, gv, gdo) = (gpu(&q), gpu(&k), gpu(&v), gpu(&d_out));
    let p = &c.params;
    let fwd = ops::attention(&gq, &gk, &gv, &layout, p).unwrap();
    assert_eq!(fwd.lse.dtype(), DType::F32);
    let out = fwd.out.to_device(Device::Cpu).unwrap();
    let lse = fwd.lse.to_device(Device::Cpu).unwrap();
    let want = ops::attention_backward(&q, &k, &v, &out, &lse, &d_out, &layout, p).unwrap();
    let got = ops::attention_backward(&gq, &gk, &gv, &fwd.out, &fwd.lse, &gdo, &layout, p).unwrap();

    let tol = if TENSOR_CORE_DIMS.contains(&c.d) {
        2e-2
    } else {
        2e-3
    };
    let what = format!(
        "h{}/{} d{} q{:?} kv{:?} {:?}",
        c.h, c.hkv, c.d, c.q_lens, c.kv_lens, c.params
    );
    for (name, got, want, shape) in [
        ("dq", &got.dq, &want.dq, [tq, c.h, c.d]),
        ("dk", &got.dk, &want.dk, [tkv, c.hkv, c.d]),
        ("dv", &got.dv, &want.dv, [tkv, c.hkv, c.d]),
    ] {
        assert_eq!(got.device(), GPU, "{name}");
        assert_eq!(got.dtype(), DType::Bf16, "{name}");
        assert_eq!(got.shape(), &shape, "{name}");
        let (g, w) = (got.to_vec().unwrap(), want.to_vec().unwrap());
        let max = max_abs(&w);
        let worst = g
            .iter()
            .zip(&w)
            .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
        eprintln!(
            "{what} {name}: max |err| / max |want| = {:.2e}",
            worst / max.max(f64::MIN_POSITIVE)
        );
        common::assert_close_slices(
            &format!("{what} {name}"),
            &g,
            &w,
            tol * max + 1e-4,
            1.05,
            NonFinite::Fails,
        );
    }
    got
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn backward_of_prefill_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(31);
    // Sequences of 1, 7, 64 and 200 tokens (off and on the 64-row tiles); GQA group 4 and
    // MHA; every tensor-core head dim.
    let (q_lens, kv_lens) = prefill(&[1, 7, 64, 200]);
    for (h, hkv) in [(8, 2), (4, 4)] {
        for d in TENSOR_CORE_DIMS {
            for (window, softcap) in [
                (None, None),
                (Some(16), None),
                (None, Some(2.0)),
                (Some(100), Some(1.5)),
                (Some(1), None),
            ] {
                let case = Case::new([h, hkv, d], (&q_lens, &kv_lens), params(d, window, softcap));
                check(&mut rng, &case);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn backward_with_cached_keys_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(32);
    // q_len < kv_len: a chunk after cached keys, a long chunk, a decode row, a sequence with
    // keys but no queries (its keys get zero gradients), a short prefill; with a window the
    // first key tiles of the long sequences see no query at all.
    let q_lens = vec![5, 64, 1, 0, 3];
    let kv_lens = vec![20, 200, 37, 9, 3];
    for (h, hkv, d) in [
        (8, 2, 64),
        (4, 1, 128),
        (2, 2, 256),
        (6, 3, 80),
        (24, 8, 24),
    ] {
        for (window, softcap) in [(None, None), (Some(6), Some(1.0)), (Some(50), None)] {
            let case = Case::new([h, hkv, d], (&q_lens, &kv_lens), params(d, window, softcap));
            let got = check(&mut rng, &case);
            // The sequence without queries: its dk and dv rows are exactly zero.
            let kv_starts = starts(&kv_lens);
            let rows = kv_starts[3] * hkv * d..kv_starts[4] * hkv * d;
            for g in [&got.dk, &got.dv] {
                let g = g.to_vec().unwrap();
                assert!(g[rows.clone()].iter().all(|&x| x == 0.0));
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn backward_at_head_dims_without_tensor_cores_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(33);
    let (q_lens, kv_lens) = prefill(&[1, 7, 64, 200]);
    for d in [8, 24, 40, 100, 200] {
        for (h, hkv) in [(8, 2), (3, 3)] {
            for (window, softcap) in [(None, None), (Some(16), Some(2.0))] {
                let case = Case::new([h, hkv, d], (&q_lens, &kv_lens), params(d, window, softcap));
                check(&mut rng, &case);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn backward_at_model_shapes_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(34);
    let (q_lens, kv_lens) = prefill(&[300, 77]);
    // qwen05 (14 / 2 heads of 64), llama1b (32 / 8 of 64), gemma-2 (8 / 4 of 256, scale
    // 256^-1/2 from query_pre_attn_scalar, soft-cap 50; its 4096 window, and a 128 one that
    // cuts these lengths).
    let gemma = |window| AttentionParams {
        scale: 1.0 / 16.0,
        window: Some(window),
        softcap: Some(50.0),
    };
    for (h, hkv, d, p) in [
        (14, 2, 64, params(64, None, None)),
        (32, 8, 64, params(64, None, None)),
        (8, 4, 256, gemma(4096)),
        (8, 4, 256, gemma(128)),
    ] {
        let case = Case::new([h, hkv, d], (&q_lens, &kv_lens), p);
        check(&mut rng, &case);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn backward_is_deterministic() {
    // No atomics: two runs on the same inputs agree bit for bit.
    let _gpu = gpu_lock();
    let mut rng = Rng(35);
    let layout = SeqLayout::prefill(&[130, 70]);
    for (h, hkv, d) in [(8, 2, 64), (4, 2, 256), (4, 2, 24)] {
        let q = gpu(&rand_tensor(&mut rng, &[200, h, d], -2.0, 2.0));
        let k = gpu(&rand_tensor(&mut rng, &[200, hkv, d], -2.0, 2.0));
        let v = gpu(&rand_tensor(&mut rng, &[200, hkv, d], -1.0, 1.0));
        let d_out = gpu(&rand_tensor(&mut rng, &[200, h, d], -1.0, 1.0));
        let p = params(d, Some(50), Some(2.0));
        let fwd = ops::attention(&q, &k, &v, &layout, &p).unwrap();
        let run = || {
            let g = ops::attention_backward(&q, &k, &v, &fwd.out, &fwd.lse, &d_out, &layout, &p)
                .unwrap();
            [g.dq, g.dk, g.dv].map(|t| t.to_vec().unwrap())
        };
        let (a, b) = (run(), run());
        for (x, y) in a.iter().zip(&b) {
            let same = x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "d{d}: two runs differ");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn backward_of_empty_inputs_is_empty_or_zero() {
    let _gpu = gpu_lock();
    let p = params(64, None, None);
    let empty = gpu(&Tensor::zeros(&[0, 2, 64]));
    let lse = Tensor::zeros(&[2, 0]).to_device_f32(GPU).unwrap();
    let g = ops::attention_backward(
        &empty,
        &empty,
        &empty,
        &empty,
        &lse,
        &empty,
        &SeqLayout::prefill(&[]),
        &p,
    )
    .unwrap();
    assert_eq!(g.dq.shape(), &[0, 2, 64]);
    assert_eq!(g.dk.shape(), &[0, 2, 64]);
    // Keys cached from earlier steps, no query now: their gradients are zero.
    let kv = gpu(&Tensor::from_vec(vec![1.0; 5 * 2 * 64], &[5, 2, 64]).unwrap());
    let layout = SeqLayout {
        q_starts: vec![0, 0],
        kv_starts: vec![0, 5],
    };
    let g = ops::attention_backward(&empty, &kv, &kv, &empty, &lse, &empty, &layout, &p).unwrap();
    for t in [&g.dk, &g.dv] {
        assert_eq!(t.shape(), &[5, 2, 64]);
        assert_eq!(t.dtype(), DType::Bf16);
        assert!(t.to_vec().unwrap().iter().all(|&x| x == 0.0));
    }
}

/// The error of a call expected to fail (AttentionGrads has no Debug for `unwrap_err`).
fn error_of(r: engine::Result<AttentionGrads>) -> EngineError {
    match r {
        Err(e) => e,
        Ok(_) => panic!("expected an error, got gradients"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn backward_refuses_bad_gpu_inputs() {
    let _gpu = gpu_lock();
    let p = params(64, None, None);
    let layout = SeqLayout::prefill(&[3]);
    let q = gpu(&Tensor::zeros(&[3, 2, 64]));
    let lse = Tensor::zeros(&[2, 3]).to_device_f32(GPU).unwrap();
    let run = |lse: &Tensor, d_out: &Tensor| {
        ops::attention_backward(&q, &q, &q, &q, lse, d_out, &layout, &p)
    };
    assert!(run(&lse, &q).is_ok());
    // lse rounded to bf16 would shift every probability: refused, naming it.
    let err = error_of(run(&gpu(&Tensor::zeros(&[2, 3])), &q));
    assert!(
        matches!(err, EngineError::Arg { .. }) && err.to_string().contains("lse"),
        "{err}"
    );
    // A CPU tensor among GPU ones.
    let err = error_of(run(&lse, &Tensor::zeros(&[3, 2, 64])));
    assert!(err.to_string().contains("d_out"), "{err}");
    // The CPU path's shape rules apply on the GPU too: lse transposed.
    let err = error_of(run(&Tensor::zeros(&[3, 2]).to_device_f32(GPU).unwrap(), &q));
    assert!(matches!(err, EngineError::Shape { .. }), "{err}");
    // Head dims above 256 have no kernel.
    let big = gpu(&Tensor::zeros(&[3, 2, 264]));
    let err = error_of(ops::attention_backward(
        &big, &big, &big, &big, &lse, &big, &layout, &p,
    ));
    assert!(matches!(err, EngineError::Unsupported { .. }), "{err}");
}
