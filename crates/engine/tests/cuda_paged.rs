//! Paged KV cache on the GPU against the CPU reference: the write of new keys/values, and
//! paged attention through every kernel (split-K decode, tensor-core, scalar) on random
//! block tables, windows, soft-caps, GQA, decode, chunked prefill and model shapes.
//!
//! Inputs are drawn in f32 and rounded to bf16, so the CPU (f32) and the GPU (bf16 pools)
//! hold identical values; the CPU result is the reference (itself equal to packed
//! `ops::attention`, see the engine's unit tests). Tolerances are `abs + rel·U·|want|` with
//! U = 2⁻⁸ (bf16's unit roundoff), stated per check. Pool slots no sequence uses hold NaN,
//! so a kernel that reads a wrong slot fails loudly.
//!
//! Every test needs a GPU: build on the CPU machine with
//! `cargo test --release -p engine --test cuda_paged --no-run` and run the binary on the GPU
//! machine with `--include-ignored` (the kernels' NVRTC compile runs in the cuda_parity
//! binary, which compiles every registered module).

use engine::ops::{self, AttentionOut, AttentionParams, PagedKernel, PagedLayout, SlotMapping};
use engine::{Device, Tensor};

mod common;
use common::{GPU, NonFinite, Rng, gpu, gpu_lock};

/// [`common::assert_close_tensors`] with NaN nowhere: a kernel reading an unused (NaN) pool
/// slot fails.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, abs: f64, rel: f64) {
    common::assert_close_tensors(what, got, want, abs, rel, NonFinite::Fails);
}

fn starts(lens: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut s = vec![0];
    for l in lens {
        s.push(s.last().unwrap() + l);
    }
    s
}

// ---------------------------------------------------------------------------------------
// The KV write.

#[test]
#[ignore = "needs a CUDA GPU"]
fn kv_write_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(31);
    // Rows of 512, 128, 1024 elements (16-byte path) and 12 (element path).
    for (hkv, d) in [(8, 64), (2, 64), (4, 256), (1, 12)] {
        for bs in [16, 5] {
            let nb = 13;
            let row = hkv * d;
            let mut cpu_k = ops::kv_pool(nb, bs, hkv, d, Device::Cpu).unwrap();
            let mut cpu_v = cpu_k.clone();
            let mut gpu_k = ops::kv_pool(nb, bs, hkv, d, GPU).unwrap();
            let mut gpu_v = ops::kv_pool(nb, bs, hkv, d, GPU).unwrap();
            assert!(gpu_k.to_vec().unwrap().iter().all(|&x| x == 0.0));
            // Two writes: the second overwrites some slots of the first.
            for (round, t) in [(0, 40), (1, 25)] {
                let perm = rng.shuffled(nb * bs);
                let slots: Vec<i32> = (0..t)
                    .map(|i| if i % 7 == 3 { -1 } else { perm[i] as i32 })
                    .collect();
                let slots = SlotMapping::new(slots).unwrap();
                let k = Tensor::from_vec(rng.bf16_vec(t * row, -2.0, 2.0), &[t, hkv, d]).unwrap();
                let v = Tensor::from_vec(rng.bf16_vec(t * row, -2.0, 2.0), &[t, hkv, d]).unwrap();
                ops::paged_kv_write(&mut cpu_k, &mut cpu_v, &k, &v, &slots).unwrap();
                // A clone taken before the write must not see it (copy-on-write).
                let before = gpu_k.clone();
                let before_vals = before.to_vec().unwrap();
                ops::paged_kv_write(&mut gpu_k, &mut gpu_v, &gpu(&k), &gpu(&v), &slots).unwrap();
                assert_eq!(before.to_vec().unwrap(), before_vals, "clone changed");
                let what = format!("hkv {hkv} d {d} bs {bs} round {round}");
                // Copies of bf16-exact values: equal to the bit.
                assert_eq!(gpu_k.to_vec().unwrap(), cpu_k.to_vec().unwrap(), "k {what}");
                assert_eq!(gpu_v.to_vec().unwrap(), cpu_v.to_vec().unwrap(), "v {what}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Paged attention.

/// A step over random paged pools: CPU and GPU copies of the same bf16-exact values.
struct Case {
    layout: PagedLayout,
    q: Tensor,      // [Tq, H, D]
    k_pool: Tensor, // [NB, BS, Hkv, D], CPU
    v_pool: Tensor,
}

/// Sequences (q_len, kv_len) with blocks from a shuffled pool with spare blocks; unused
/// slots hold NaN.
fn make_case(
    rng: &mut Rng,
    seqs: &[(usize, usize)],
    block_size: usize,
    (h, hkv, d): (usize, usize, usize),
) -> Case {
    let needed: usize = seqs.iter().map(|&(_, kv)| kv.div_ceil(block_size)).sum();
    let nb = needed + 5;
    let mut ids = rng.shuffled(nb).into_iter();
    let tables: Vec<Vec<u32>> = seqs
        .iter()
        .map(|&(_, kv)| ids.by_ref().take(kv.div_ceil(block_size)).collect())
        .collect();
    let q_starts = starts(seqs.iter().map(|s| s.0));
    let kv_lens: Vec<usize> = seqs.iter().map(|s| s.1).collect();
    let layout = PagedLayout::from_tables(block_size, &q_starts, &kv_lens, &tables).unwrap();
    let row = hkv * d;
    let (mut kp, mut vp) = (
        vec![f32::NAN; nb * block_size * row],
        vec![f32::NAN; nb * block_size * row],
    );
    for (b, table) in tables.iter().enumerate() {
        for pos in 0..kv_lens[b] {
            let s = table[pos / block_size] as usize * block_size + pos % block_size;
            kp[s * row..(s + 1) * row].copy_from_slice(&rng.bf16_vec(row, -2.0, 2.0));
            vp[s * row..(s + 1) * row].copy_from_slice(&rng.bf16_vec(row, -1.0, 1.0));
        }
    }
    let tq = layout.num_queries();
    let shape = [nb, block_size, hkv, d];
    Case {
        layout,
        q: Tensor::from_vec(rng.bf16_vec(tq * h * d, -2.0, 2.0), &[tq, h, d]).unwrap(),
        k_pool: Tensor::from_vec(kp, &shape).unwrap(),
        v_pool: Tensor::from_vec(vp, &shape).unwrap(),
    }
}

/// Output tolerance of a kernel: the decode and scalar kernels keep P in f32 (abs 5e-4, then
/// one bf16 rounding of the output); tensor cores multiply V by P rounded to bf16 (relative
/// 2⁻⁹ per weight, |v| ≤ 1): abs 4e-3. Auto may use either.
fn out_abs(kernel: PagedKernel) -> f64 {
    match kernel {
        PagedKernel::Simple | PagedKernel::DecodeChunk(_) => 5e-4,
        PagedKernel::Auto | PagedKernel::TensorCore => 4e-3,
    }
}

fn check_kernels(what: &str, c: &Case, params: &AttentionParams, kernels: &[PagedKernel]) {
    let want = ops::paged_attention(&c.q, &c.k_pool, &c.v_pool, &c.layout, params).unwrap();
    let (q, kp, vp) = (gpu(&c.q), gpu(&c.k_pool), gpu(&c.v_pool));
    for &kernel in kernels {
        let got: AttentionOut = ops::paged_attention_with(&q, &kp, &vp, &c.layout, params, kernel)
            .unwrap_or_else(|e| panic!("{what} {kernel:?}: {e}"));
        let w = format!("{what} {kernel:?}");
        // DecodeChunk sends sequences with more than 8 GQA rows to the tensor cores.
        let abs = if matches!(kernel, PagedKernel::DecodeChunk(_)) && max_rows(c) > 8 {
            4e-3
        } else {
            out_abs(kernel)
        };
        assert_close(&format!("{w} out"), &got.out, &want.out, abs, 1.05);
        // Scores in f32 from the same bf16 inputs: the logsumexp agrees to f32 noise.
        assert_close(&format!("{w} lse"), &got.lse, &want.lse, 1e-3, 0.0);
    }
}

/// The most GQA rows (q_len · H/Hkv) of any sequence of the case.
fn max_rows(c: &Case) -> usize {
    let [_, h, _] = c.q.shape().try_into().unwrap();
    let hkv = c.k_pool.shape()[2];
    let s = c.layout.q_starts();
    (0..c.layout.num_seqs())
        .map(|b| (s[b + 1] - s[b]) * (h / hkv))
        .max()
        .unwrap_or(0)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn paged_attention_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(32);
    // (H, Hkv, D): GQA groups 4 (decode r4), 7 (r8), 2 (r2), MHA (r2), 16 (decode through
    // the tensor cores), every head dim with kernels.
    let heads = [
        (8, 2, 64),
        (14, 2, 64),
        (8, 4, 256),
        (4, 1, 128),
        (2, 2, 64),
        (16, 1, 64),
    ];
    // (q_len, kv_len): decode on and off block edges and long enough to split; a mixed
    // step of decodes, small and large chunks, a sequence without queries; a whole prefill.
    let layouts: [&[(usize, usize)]; 3] = [
        &[(1, 1), (1, 16), (1, 17), (1, 300), (1, 1500)],
        &[(1, 40), (7, 40), (64, 200), (0, 30), (2, 9)],
        &[(130, 130)],
    ];
    let kernels = [
        PagedKernel::Auto,
        PagedKernel::DecodeChunk(32),
        PagedKernel::DecodeChunk(1000),
        PagedKernel::TensorCore,
        PagedKernel::Simple,
    ];
    for &(h, hkv, d) in &heads {
        for seqs in layouts {
            for bs in [16, 7] {
                let c = make_case(&mut rng, seqs, bs, (h, hkv, d));
                for (window, softcap) in [
                    (None, None),
                    (Some(16), None),
                    (Some(100), Some(2.0)),
                    (None, Some(2.0)),
                ] {
                    let params = AttentionParams {
                        scale: 1.0 / (d as f32).sqrt(),
                        window,
                        softcap,
                    };
                    let what =
                        format!("h{h}/{hkv} d{d} bs{bs} {seqs:?} w{window:?} cap{softcap:?}");
                    check_kernels(&what, &c, &params, &kernels);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn head_dims_without_fast_kernels_use_the_scalar_one() {
    let _gpu = gpu_lock();
    let mut rng = Rng(33);
    // Head dims 80 and 20 (not a multiple of 8) have no decode or tensor-core kernel.
    for dims in [(4, 2, 80), (2, 1, 20)] {
        let c = make_case(&mut rng, &[(1, 50), (5, 33)], 16, dims);
        let params = AttentionParams {
            scale: 0.1,
            window: Some(20),
            softcap: Some(5.0),
        };
        let what = format!("{dims:?}");
        check_kernels(
            &what,
            &c,
            &params,
            &[PagedKernel::Auto, PagedKernel::Simple],
        );
        let (q, kp, vp) = (gpu(&c.q), gpu(&c.k_pool), gpu(&c.v_pool));
        let r =
            ops::paged_attention_with(&q, &kp, &vp, &c.layout, &params, PagedKernel::TensorCore);
        assert!(r.is_err(), "{what}: TensorCore ran");
        // Inputs split across devices are an error, not a panic.
        match ops::paged_attention(&c.q, &kp, &vp, &c.layout, &params) {
            Err(e) => assert!(e.to_string().contains("one device"), "{e}"),
            Ok(_) => panic!("q on the CPU with pools on the GPU ran"),
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn paged_attention_at_model_shapes_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(34);
    // (name, H, Hkv, D, scale, window, softcap): llama1b, qwen05, gemma2b (window 4096 and
    // soft-cap 50, query_pre_attn_scalar 256).
    let shapes = [
        ("llama1b", 32, 8, 64, 0.125, None, None),
        ("qwen05", 14, 2, 64, 0.125, None, None),
        ("gemma2b", 8, 4, 256, 1.0 / 16.0, Some(4096), Some(50.0)),
    ];
    for (name, h, hkv, d, scale, window, softcap) in shapes {
        // A decode batch of 64 with contexts up to 700 and two past the window; then a
        // mixed step: decodes beside a 256-token chunk after 4300 cached positions.
        let mut decode: Vec<(usize, usize)> = (0..62).map(|_| (1, 1 + rng.below(700))).collect();
        decode.extend([(1, 4097), (1, 5000)]);
        let mixed: Vec<(usize, usize)> = vec![(1, 333), (256, 4556), (1, 4200), (1, 9)];
        for seqs in [decode, mixed] {
            let c = make_case(&mut rng, &seqs, 16, (h, hkv, d));
            let params = AttentionParams {
                scale,
                window,
                softcap,
            };
            check_kernels(
                &format!("{name} B{}", seqs.len()),
                &c,
                &params,
                &[
                    PagedKernel::Auto,
                    PagedKernel::TensorCore,
                    PagedKernel::Simple,
                ],
            );
        }
    }
}

/// Sequences grown step by step on both devices as a generation engine does: blocks taken
/// from a shuffled free list as they are needed, new keys/values written through
/// `layout.slots()`, then attention — a prefill chunk, a second chunk, then decode steps.
#[test]
#[ignore = "needs a CUDA GPU"]
fn write_then_attend_loop_matches_cpu() {
    let _gpu = gpu_lock();
    let mut rng = Rng(35);
    let (h, hkv, d, bs, nb) = (32, 8, 64, 16, 64);
    let params = AttentionParams {
        scale: 0.125,
        window: None,
        softcap: None,
    };
    let mut free = rng.shuffled(nb);
    let mut cpu_k = ops::kv_pool(nb, bs, hkv, d, Device::Cpu).unwrap();
    let mut cpu_v = cpu_k.clone();
    let mut gpu_k = ops::kv_pool(nb, bs, hkv, d, GPU).unwrap();
    let mut gpu_v = ops::kv_pool(nb, bs, hkv, d, GPU).unwrap();
    let batch = 6;
    let mut tables: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut lens = vec![0usize; batch];
    let mut steps: Vec<Vec<usize>> = vec![vec![40, 7, 1, 100, 16, 3], vec![30, 9, 2, 5, 1, 14]];
    steps.extend(std::iter::repeat_n(vec![1; batch], 20));
    for (step, new) in steps.iter().enumerate() {
        for b in 0..batch {
            while tables[b].len() * bs < lens[b] + new[b] {
                tables[b].push(free.pop().unwrap());
            }
            lens[b] += new[b];
        }
        let layout =
            PagedLayout::from_tables(bs, &starts(new.iter().copied()), &lens, &tables).unwrap();
        let tq = layout.num_queries();
        let row = hkv * d;
        let k = Tensor::from_vec(rng.bf16_vec(tq * row, -2.0, 2.0), &[tq, hkv, d]).unwrap();
        let v = Tensor::from_vec(rng.bf16_vec(tq * row, -1.0, 1.0), &[tq, hkv, d]).unwrap();
        let q = Tensor::from_vec(rng.bf16_vec(tq * h * d, -2.0, 2.0), &[tq, h, d]).unwrap();
        ops::paged_kv_write(&mut cpu_k, &mut cpu_v, &k, &v, layout.slots()).unwrap();
        ops::paged_kv_write(&mut gpu_k, &mut gpu_v, &gpu(&k), &gpu(&v), layout.slots()).unwrap();
        let want = ops::paged_attention(&q, &cpu_k, &cpu_v, &layout, &params).unwrap();
        // The same layout twice: the second call reuses its device copy.
        for _ in 0..2 {
            let got = ops::paged_attention(&gpu(&q), &gpu_k, &gpu_v, &layout, &params).unwrap();
            assert_close(&format!("step {step} out"), &got.out, &want.out, 4e-3, 1.05);
            assert_close(&format!("step {step} lse"), &got.lse, &want.lse, 1e-3, 0.0);
        }
    }
}
