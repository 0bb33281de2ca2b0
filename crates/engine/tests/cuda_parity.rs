//! CUDA backend against the CPU reference: every op on random inputs at several shapes.
//!
//! Inputs are drawn in f32 and rounded to bf16 first, so the CPU (f32) and the GPU (bf16
//! storage) see identical values; the CPU result is the reference. Tolerances are stated per
//! test as `abs + rel·U·|want|` with U = 2⁻⁸, bf16's unit roundoff: a GPU output stored in
//! bf16 is at best the reference rounded once (rel = 1).
//!
//! Tests that need a GPU are `#[ignore = "needs a CUDA GPU"]`. Build this binary on the CPU
//! machine with `cargo test --release -p engine --test cuda_parity --no-run` and run it on
//! the GPU machine with `--include-ignored`. The NVRTC test runs everywhere libnvrtc loads
//! (and must, when CI is set).

use engine::cuda::{
    Arch, AttentionKernel, CudaBackend, DType, KernelCache, Library, Module, Origin,
    attention_with, compile_all,
};
use engine::ops::{self, Activation, AttentionParams, LogProbChunks, Rope, RopeScaling, SeqLayout};
use engine::{Device, Tensor};

mod common;
use common::{GPU, NonFinite, Rng, bf16_round, gpu, gpu_lock, llama3, rand_tensor, seq_layout};

/// [`common::assert_close_tensors`]; NaN against NaN and equal infinities pass.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, abs: f64, rel: f64) {
    common::assert_close_tensors(what, got, want, abs, rel, NonFinite::SameIsEqual);
}

fn assert_close_slices(what: &str, got: &[f32], want: &[f32], abs: f64, rel: f64) {
    common::assert_close_slices(what, got, want, abs, rel, NonFinite::SameIsEqual);
}

// ---------------------------------------------------------------------------------------
// Without a GPU: NVRTC and the missing-library path.

#[test]
fn every_kernel_compiles_for_sm_90() {
    if !Library::Nvrtc.is_present() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but libnvrtc cannot be loaded: install nvidia-cuda-nvrtc==13.0.88 and put \
             its nvidia/cu13/lib on LD_LIBRARY_PATH"
        );
        eprintln!("skipped: libnvrtc not found (set LD_LIBRARY_PATH to run this test)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("prefer-kernels-test-{}", std::process::id()));
    let cache = KernelCache::new(Some(dir.clone()));
    let arch = Arch::parse("sm_90").unwrap();
    let first = compile_all(arch, &cache).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.len(), Module::ALL.len());
    for r in &first {
        assert_eq!(r.origin, Origin::Compiled, "{:?}", r.module);
        assert!(r.cubin_bytes > 0);
        assert!(
            r.path.as_ref().is_some_and(|p| p.exists()),
            "{:?} not cached",
            r.module
        );
        eprintln!(
            "{:12} {:7} bytes {:6.2} s {}",
            r.module.name(),
            r.cubin_bytes,
            r.seconds,
            r.warnings
        );
    }
    // A second pass reads every CUBIN back from the cache.
    let second = compile_all(arch, &cache).unwrap();
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(b.origin, Origin::Cached, "{:?}", b.module);
        assert_eq!(a.cubin_bytes, b.cubin_bytes);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_driver_is_an_error_not_a_panic() {
    if Library::Driver.is_present() {
        eprintln!("skipped: libcuda is present");
        return;
    }
    let err = Tensor::zeros(&[2]).to_device(GPU).unwrap_err().to_string();
    assert!(err.contains("libcuda.so not found"), "{err}");
}

// ---------------------------------------------------------------------------------------
// On the GPU.

#[test]
#[ignore = "needs a CUDA GPU"]
fn backend_reports_the_device() {
    let _gpu = gpu_lock();
    let b = CudaBackend::get(0).unwrap();
    eprintln!("{} ({}), {} SMs", b.name(), b.arch(), b.sm_count());
    assert!(b.arch().major >= 8, "bf16 mma.sync needs sm_80 or newer");
    let err = Tensor::zeros(&[1])
        .to_device(Device::Cuda(999))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cuda:999"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn transfers_round_to_bf16_and_back() {
    let _gpu = gpu_lock();
    let halfway = 1.0f32 + 2f32.powi(-8); // ties to even: 1.0
    let data = vec![
        0.0,
        -0.0,
        1.0,
        halfway,
        1.2345,
        -2.5e-3,
        1e30,
        f32::INFINITY,
    ];
    let t = Tensor::from_vec(data.clone(), &[2, 4]).unwrap();
    let g = gpu(&t);
    assert_eq!(g.device(), GPU);
    assert_eq!(g.dtype(), DType::Bf16);
    assert_eq!(g.shape(), &[2, 4]);
    let want: Vec<f32> = data.iter().map(|&x| bf16_round(x)).collect();
    assert_eq!(g.to_vec().unwrap(), want);
    assert_eq!(
        g.to_device(Device::Cpu).unwrap().as_slice().unwrap(),
        want.as_slice()
    );
    assert!(g.as_slice().is_err(), "a GPU tensor has no host slice");
    let bits: Vec<u16> = want
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect();
    let raw = Tensor::from_bf16_bits(&bits, &[2, 4], GPU).unwrap();
    assert_eq!(raw.to_vec().unwrap(), want);
    // Reshape shares the buffer.
    assert_eq!(g.reshape(&[8]).unwrap().to_vec().unwrap(), want);
    let empty = gpu(&Tensor::zeros(&[0, 3]));
    assert_eq!(empty.to_vec().unwrap(), Vec::<f32>::new());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn elementwise_ops_match_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(1);
    for n in [1, 7, 8, 1000, 3 * 4096 + 5] {
        let a = rand_tensor(&mut rng, &[n], -4.0, 4.0);
        let b = rand_tensor(&mut rng, &[n], -4.0, 4.0);
        // One f32 add or multiply of bf16 values, rounded once to bf16.
        assert_close(
            "add",
            &ops::add(&gpu(&a), &gpu(&b)).unwrap(),
            &ops::add(&a, &b).unwrap(),
            0.0,
            1.0,
        );
        assert_close(
            "scale",
            &ops::scale(&gpu(&a), 0.7).unwrap(),
            &ops::scale(&a, 0.7).unwrap(),
            0.0,
            1.0,
        );
        // In place, with copy-on-write: a clone sharing the buffer keeps its values.
        let mut acc = gpu(&a);
        let shared = acc.clone();
        ops::add_inplace(&mut acc, &gpu(&b)).unwrap();
        assert_close("add_inplace", &acc, &ops::add(&a, &b).unwrap(), 0.0, 1.0);
        assert_eq!(
            shared.to_vec().unwrap(),
            a.to_vec().unwrap(),
            "the shared clone changed"
        );
    }
    let err = ops::add(&gpu(&Tensor::zeros(&[2])), &gpu(&Tensor::zeros(&[3]))).unwrap_err();
    assert!(err.to_string().contains("add"), "{err}");
    let mixed = ops::add(&gpu(&Tensor::zeros(&[2])), &Tensor::zeros(&[2])).unwrap_err();
    assert!(
        mixed.to_string().contains("cuda:0") && mixed.to_string().contains("cpu"),
        "{mixed}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(2);
    for (v, c, t) in [(300, 64, 5), (1000, 896, 17), (50, 37, 3)] {
        let table = rand_tensor(&mut rng, &[v, c], -1.0, 1.0);
        let mut ids: Vec<u32> = (0..t).map(|_| rng.below(v) as u32).collect();
        ids[0] = 0;
        ids[t - 1] = (v - 1) as u32;
        for scale in [1.0, bf16_round((c as f32).sqrt())] {
            let want = ops::embedding(&table, &ids, scale).unwrap();
            let got = ops::embedding(&gpu(&table), &ids, scale).unwrap();
            assert_close(
                &format!("embedding v{v} c{c} s{scale}"),
                &got,
                &want,
                0.0,
                1.0,
            );
        }
        let err = ops::embedding(&gpu(&table), &[v as u32], 1.0).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rms_norm_and_fused_residual_match_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(3);
    for (t, c) in [(1, 64), (7, 896), (5, 2304), (3, 100), (2, 3584)] {
        for offset in [0.0, 1.0] {
            let x = rand_tensor(&mut rng, &[t, c], -2.0, 2.0);
            let r = rand_tensor(&mut rng, &[t, c], -2.0, 2.0);
            let w = rand_tensor(&mut rng, &[c], -1.0, 1.0);
            // f32 math, one rounding to bf16 at the end (the sum of squares may differ in
            // its last bits: abs 1e-5).
            let want = ops::rms_norm(&x, &w, 1e-6, offset).unwrap();
            let got = ops::rms_norm(&gpu(&x), &gpu(&w), 1e-6, offset).unwrap();
            assert_close(
                &format!("rms_norm {t}x{c} +{offset}"),
                &got,
                &want,
                1e-5,
                1.05,
            );

            // Fused: the sum is exactly bf16(x + r); the norm is of that rounded sum.
            let sum_cpu = ops::add(&x, &r).unwrap();
            let sum_bf16 = gpu(&sum_cpu).to_device(Device::Cpu).unwrap();
            let (sum, normed) =
                ops::add_rms_norm(&gpu(&x), &gpu(&r), &gpu(&w), 1e-6, offset).unwrap();
            assert_eq!(
                sum.to_vec().unwrap(),
                sum_bf16.to_vec().unwrap(),
                "add_rms_norm sum"
            );
            let want = ops::rms_norm(&sum_bf16, &w, 1e-6, offset).unwrap();
            assert_close(
                &format!("add_rms_norm {t}x{c} +{offset}"),
                &normed,
                &want,
                1e-5,
                1.05,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(4);
    for (t, heads, d, theta, scaling) in [
        (5, 4, 64, 10_000.0, RopeScaling::Default),
        (9, 2, 128, 500_000.0, llama3()),
        (3, 2, 256, 10_000.0, RopeScaling::Default),
        (4, 3, 80, 1_000_000.0, RopeScaling::Linear { factor: 4.0 }),
    ] {
        let rope = Rope::new(d, theta, &scaling);
        let positions: Vec<u32> = (0..t).map(|_| rng.below(8192) as u32).collect();
        let x = rand_tensor(&mut rng, &[t, heads, d], -1.0, 1.0);
        let mut want = x.clone();
        ops::rope(&mut want, &positions, &rope).unwrap();
        let mut got = gpu(&x);
        let untouched = got.clone();
        ops::rope(&mut got, &positions, &rope).unwrap();
        // Same f32 angle, accurate sin/cos on both sides, one bf16 rounding.
        assert_close(&format!("rope d{d}"), &got, &want, 1e-5, 1.05);
        assert_eq!(
            untouched.to_vec().unwrap(),
            x.to_vec().unwrap(),
            "rope wrote through a shared clone"
        );

        // The fused QKV split: q, k rotated, v copied.
        let (h, hkv) = (heads, 1);
        let qkv = rand_tensor(&mut rng, &[t, (h + 2 * hkv) * d], -1.0, 1.0);
        let positions = engine::Indices::from(&positions[..]);
        let (wq, wk, wv) = ops::rope_qkv_split(&qkv, h, hkv, &positions, &rope).unwrap();
        let (gq, gk, gv) = ops::rope_qkv_split(&gpu(&qkv), h, hkv, &positions, &rope).unwrap();
        assert_close("rope_qkv_split q", &gq, &wq, 1e-5, 1.05);
        assert_close("rope_qkv_split k", &gk, &wk, 1e-5, 1.05);
        assert_eq!(
            gv.to_vec().unwrap(),
            wv.to_vec().unwrap(),
            "rope_qkv_split v"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gated_activations_match_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(5);
    for (t, i) in [(1, 8), (3, 13), (2, 4864)] {
        for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
            let gate = rand_tensor(&mut rng, &[t, i], -6.0, 6.0);
            let up = rand_tensor(&mut rng, &[t, i], -2.0, 2.0);
            let want = ops::gated_activation(&gate, &up, act).unwrap();
            let got = ops::gated_activation(&gpu(&gate), &gpu(&up), act).unwrap();
            // f32 transcendental functions differ by a few ulps; one bf16 rounding.
            assert_close(&format!("{act:?} {t}x{i}"), &got, &want, 1e-5, 1.05);
            let gu = rand_tensor(&mut rng, &[t, 2 * i], -6.0, 6.0);
            let want = ops::gated_activation_packed(&gu, act).unwrap();
            let got = ops::gated_activation_packed(&gpu(&gu), act).unwrap();
            assert_close(&format!("packed {act:?} {t}x{i}"), &got, &want, 1e-5, 1.05);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(6);
    for (t, k, n) in [
        (1, 64, 64),
        (7, 896, 4864),
        (33, 40, 33),
        (128, 2048, 512),
        (5, 0, 3),
    ] {
        let x = rand_tensor(&mut rng, &[t, k], -1.0, 1.0);
        let w = rand_tensor(&mut rng, &[n, k], -0.1, 0.1);
        let b = rand_tensor(&mut rng, &[n], -1.0, 1.0);
        for bias in [None, Some(&b)] {
            let want = ops::linear(&x, &w, bias).unwrap();
            let gb = bias.map(gpu);
            let got = ops::linear(&gpu(&x), &gpu(&w), gb.as_ref()).unwrap();
            // f32 accumulation in another order (≈ √K·2⁻²⁴·Σ|xw|), then one bf16 rounding.
            assert_close(
                &format!("linear {t}x{k}x{n} bias {}", bias.is_some()),
                &got,
                &want,
                2e-3,
                1.05,
            );
        }
    }
}

struct AttnCase {
    h: usize,
    hkv: usize,
    d: usize,
    q_lens: Vec<usize>,
    kv_lens: Vec<usize>,
    window: Option<usize>,
    softcap: Option<f32>,
}

fn run_attention_case(rng: &mut Rng, c: &AttnCase, kernels: &[AttentionKernel]) {
    let (layout, tq, tkv) = seq_layout(&c.q_lens, &c.kv_lens);
    let q = rand_tensor(rng, &[tq, c.h, c.d], -2.0, 2.0);
    let k = rand_tensor(rng, &[tkv, c.hkv, c.d], -2.0, 2.0);
    let v = rand_tensor(rng, &[tkv, c.hkv, c.d], -1.0, 1.0);
    let params = AttentionParams {
        scale: 1.0 / (c.d as f32).sqrt(),
        window: c.window,
        softcap: c.softcap,
    };
    let want = ops::attention(&q, &k, &v, &layout, &params).unwrap();
    let (gq, gk, gv) = (gpu(&q), gpu(&k), gpu(&v));
    for &kernel in kernels {
        let got = attention_with(&gq, &gk, &gv, &layout, &params, kernel).unwrap();
        let what = format!(
            "{kernel:?} h{}/{} d{} q{:?} kv{:?} w{:?} cap{:?}",
            c.h, c.hkv, c.d, c.q_lens, c.kv_lens, c.window, c.softcap
        );
        assert_eq!(got.lse.dtype(), DType::F32);
        // Tensor cores multiply V by P rounded to bf16 (relative 2⁻⁹ per weight, |v| ≤ 1),
        // then the output is rounded once: abs 4e-3. The scalar kernel keeps P in f32.
        let abs = if kernel == AttentionKernel::Simple {
            5e-4
        } else {
            4e-3
        };
        assert_close(&format!("{what} out"), &got.out, &want.out, abs, 1.05);
        // Scores in f32 from the same bf16 inputs: the logsumexp agrees to f32 noise.
        assert_close(&format!("{what} lse"), &got.lse, &want.lse, 1e-3, 0.0);
    }
    // Auto picks one of the two; the public op runs it.
    let auto = ops::attention(&gq, &gk, &gv, &layout, &params).unwrap();
    assert_close("auto out", &auto.out, &want.out, 4e-3, 1.05);
}

/// Every kernel that can run head dim `d`: each tensor-core instance and the scalar one.
fn kernels_for(d: usize) -> Vec<AttentionKernel> {
    let mut k = vec![
        AttentionKernel::TensorCoreMTiles(1),
        AttentionKernel::Simple,
    ];
    if [64, 80, 96].contains(&d) {
        k.push(AttentionKernel::TensorCoreMTiles(2));
    }
    k
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(7);
    // (H, Hkv, D): MHA, GQA groups 4 and 8, MQA, every tensor-core head dim.
    let heads = [
        (7, 1, 64),
        (2, 2, 64),
        (8, 2, 64),
        (16, 2, 64),
        (4, 1, 128),
        (4, 2, 256),
        (2, 1, 80),
        (2, 2, 96),
    ];
    // (q_lens, kv_lens): prefill of one or several sequences (lengths off the 64-row tile),
    // decode (one query each), and chunked prefill (queries are the last keys).
    let layouts: [(Vec<usize>, Vec<usize>); 6] = [
        (vec![1], vec![1]),
        (vec![17], vec![17]),
        (vec![100, 3, 130], vec![100, 3, 130]),
        (vec![257], vec![257]),
        (vec![1, 1, 1], vec![1, 37, 200]),
        (vec![5, 64], vec![20, 200]),
    ];
    for &(h, hkv, d) in &heads {
        for (q_lens, kv_lens) in &layouts {
            for window in [None, Some(1), Some(16), Some(100)] {
                for softcap in [None, Some(2.0)] {
                    let case = AttnCase {
                        h,
                        hkv,
                        d,
                        q_lens: q_lens.clone(),
                        kv_lens: kv_lens.clone(),
                        window,
                        softcap,
                    };
                    run_attention_case(&mut rng, &case, &kernels_for(d));
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_without_a_tensor_core_instance_uses_the_scalar_kernel() {
    let _gpu = gpu_lock();
    let mut rng = Rng(8);
    for d in [40, 8, 200] {
        let case = AttnCase {
            h: 3,
            hkv: 1,
            d,
            q_lens: vec![33, 2],
            kv_lens: vec![33, 40],
            window: Some(10),
            softcap: Some(5.0),
        };
        run_attention_case(
            &mut rng,
            &case,
            &[AttentionKernel::Simple, AttentionKernel::Auto],
        );
        let l = SeqLayout::prefill(&[4]);
        let z = gpu(&Tensor::zeros(&[4, 1, d]));
        let p = AttentionParams {
            scale: 1.0,
            window: None,
            softcap: None,
        };
        assert!(attention_with(&z, &z, &z, &l, &p, AttentionKernel::TensorCore).is_err());
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_at_model_shapes_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(9);
    // llama1b-like (H 32 / Hkv 8 / D 64) and gemma2b-like (8 / 4 / 256, soft-cap 50,
    // window 512 < T so the window edge is crossed), two sequences of 1024 and 700.
    for (h, hkv, d, window, softcap) in
        [(32, 8, 64, None, None), (8, 4, 256, Some(512), Some(50.0))]
    {
        let case = AttnCase {
            h,
            hkv,
            d,
            q_lens: vec![1024, 700],
            kv_lens: vec![1024, 700],
            window,
            softcap,
        };
        run_attention_case(&mut rng, &case, &kernels_for(d));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn token_logprobs_and_logits_match_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(10);
    for (t, c, v) in [(1, 64, 1000), (37, 136, 2053), (300, 64, 5000)] {
        for cap in [None, Some(3.0)] {
            let hidden = rand_tensor(&mut rng, &[t, c], -1.0, 1.0);
            let head = rand_tensor(&mut rng, &[v, c], -0.5, 0.5);
            let targets: Vec<u32> = (0..t).map(|_| rng.below(v) as u32).collect();
            let logits_cpu = ops::logits(&hidden, &head, cap).unwrap();
            let (gh, gw) = (gpu(&hidden), gpu(&head));
            let logits_gpu = ops::logits(&gh, &gw, cap).unwrap();
            assert_eq!(logits_gpu.dtype(), DType::F32);
            // f32 accumulation of the same bf16 products, in another order.
            assert_close("logits", &logits_gpu, &logits_cpu, 1e-4, 0.01);
            for chunks in [
                LogProbChunks {
                    tokens: 8,
                    vocab: 128,
                },
                LogProbChunks::default(),
            ] {
                let want = ops::token_logprobs(&hidden, &head, &targets, cap, chunks).unwrap();
                let got = ops::token_logprobs(&gh, &gw, &targets, cap, chunks).unwrap();
                let what = format!("t{t} c{c} v{v} cap{cap:?} {chunks:?}");
                assert_close_slices(&format!("{what} logp"), &got.logp, &want.logp, 5e-4, 0.03);
                assert_close_slices(
                    &format!("{what} entropy"),
                    &got.entropy,
                    &want.entropy,
                    5e-4,
                    0.03,
                );
                assert_close_slices(
                    &format!("{what} mean"),
                    &got.mean_logit,
                    &want.mean_logit,
                    1e-5,
                    0.01,
                );
                // Argmax agrees unless the top two logits are within f32 noise.
                let l = logits_cpu.to_vec().unwrap();
                for (i, (&g, &w)) in got.argmax.iter().zip(&want.argmax).enumerate() {
                    let row = &l[i * v..(i + 1) * v];
                    assert!(
                        g == w || (row[g as usize] - row[w as usize]).abs() < 1e-4,
                        "{what} argmax[{i}]: got {g}, want {w}"
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_repeated_forward_stops_allocating() {
    let _gpu = gpu_lock();
    // The arena must serve a steady-state loop from its cache: no cuMemAlloc after the
    // first iteration.
    let mut rng = Rng(11);
    let backend = CudaBackend::get(0).unwrap();
    let x = gpu(&rand_tensor(&mut rng, &[64, 256], -1.0, 1.0));
    let w = gpu(&rand_tensor(&mut rng, &[512, 256], -0.1, 0.1));
    let g = gpu(&rand_tensor(&mut rng, &[256], -1.0, 1.0));
    let layout = SeqLayout::prefill(&[40, 24]);
    let params = AttentionParams {
        scale: 0.125,
        window: None,
        softcap: None,
    };
    let step = || {
        let n = ops::rms_norm(&x, &g, 1e-6, 0.0).unwrap();
        let y = ops::linear(&n, &w, None).unwrap(); // [64, 512]
        let q = y.reshape(&[64, 8, 64]).unwrap();
        let a = ops::attention(&q, &q, &q, &layout, &params).unwrap();
        let o = ops::add(&a.out, &q).unwrap();
        o.to_vec().unwrap();
    };
    step();
    let before = backend.memory_stats().driver_allocs;
    for _ in 0..5 {
        step();
    }
    assert_eq!(
        backend.memory_stats().driver_allocs,
        before,
        "the hot loop allocated"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn f32_outputs_are_rejected_where_bf16_is_needed() {
    let _gpu = gpu_lock();
    let l = SeqLayout::prefill(&[2]);
    let q = gpu(&Tensor::zeros(&[2, 1, 64]));
    let p = AttentionParams {
        scale: 1.0,
        window: None,
        softcap: None,
    };
    let lse = ops::attention(&q, &q, &q, &l, &p).unwrap().lse; // [1, 2] f32
    let err = ops::rms_norm(&lse, &gpu(&Tensor::zeros(&[2])), 1e-6, 0.0).unwrap_err();
    assert!(err.to_string().contains("bf16"), "{err}");
}
