//! `ops::top_k_candidates` (queued and fetched, also from a replayed CUDA graph) and
//! `ops::logits_at_least` on the GPU against the CPU reference (its own test binary,
//! `engine-cuda_top_k` in bench/gpu's .gpu/bin).
//!
//! Ids and values must match exactly: the kernels only compare and copy logits, so any
//! difference is a bug, ties included. The lse is an f32 sum of up to 10⁵ exps on the GPU
//! (online: rescaled as the max grows) against an f64 one on the CPU: within a few 1e-6
//! relative.
//!
//! The kernels come per list length (k ≤ 2, 8, 16, 32; passes of 32 above) and split a row
//! over several blocks when the batch is small: the shapes below cover every list length,
//! both sides of each, one and several passes, one and many slices, rows that start off a
//! 16-byte boundary (odd V), and slices whose candidates are all −inf or hold the NaN.
//!
//! Build here with `cargo test --release -p engine --test cuda_top_k --no-run`; run on the
//! GPU machine with `--include-ignored`.

use engine::Tensor;
use engine::cuda::{Arch, CudaBackend, KernelCache, Library, Module};
use engine::ops::{self, MAX_TOP_K, TopK};

mod common;
use common::{GPU, Rng, gpu_lock, rand_tensor};

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

/// `n` values drawn from `distinct` evenly spaced levels in [−half, half).
fn quantized(rng: &mut Rng, n: usize, distinct: usize, half: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.below(distinct) as f32 / distinct as f32) * 2.0 * half - half)
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn top_k_matches_the_cpu_reference() {
    let _lock = gpu_lock();
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
            let data = quantized(&mut rng, b * v, distinct, 15.0);
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
    let _lock = gpu_lock();
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

/// Every list length and both sides of it, one pass and several, one slice and many.
#[test]
#[ignore = "needs a CUDA GPU"]
fn top_k_every_list_length_pass_and_split() {
    let _lock = gpu_lock();
    let mut rng = Rng(17);
    let ks = [1, 2, 3, 6, 8, 9, 16, 17, 31, 32, 33, 64, 65, 100, MAX_TOP_K];
    // (B, V): one row over many slices, a few rows over a few, rows of one block each.
    let shapes = [(1, 256_000), (3, 100_003), (40, 4099), (300, 1000)];
    for (b, v) in shapes {
        for (n, &k) in ks.iter().enumerate() {
            // Alternately ties everywhere and (nearly) distinct values.
            let distinct = if n % 2 == 0 { 7 } else { 1 << 20 };
            let data = quantized(&mut rng, b * v, distinct, 10.0);
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

/// Rows sorted ascending (every logit enters some thread's list), descending, and constant
/// (every pick a tie, decided by id alone), over one and many slices.
#[test]
#[ignore = "needs a CUDA GPU"]
fn top_k_sorted_and_constant_rows() {
    let _lock = gpu_lock();
    for (b, v) in [(3, 200_001), (6, 4099)] {
        for k in [2, 6, 16, 32, 65] {
            let data: Vec<f32> = (0..b * v)
                .map(|i| {
                    let (r, j) = (i / v, (i % v) as f32);
                    match r % 3 {
                        0 => j * 1e-3,
                        1 => -j * 1e-3,
                        _ => 0.5,
                    }
                })
                .collect();
            check(&format!("sorted B {b} V {v} k {k}"), data, b, v, k);
        }
    }
}

/// NaN, ±inf and −inf-only stretches where rows are split: a slice whose candidates are all
/// −inf, a NaN in one slice and +inf in another (lse NaN), a row of −inf but for a few.
#[test]
#[ignore = "needs a CUDA GPU"]
fn top_k_infinities_and_nan_across_slices() {
    let _lock = gpu_lock();
    let (b, v) = (4, 150_001);
    let mut data = vec![f32::NEG_INFINITY; b * v];
    // Row 0: NaN near the end, +inf near the start.
    data[..v]
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i % 11) as f32);
    data[v - 3] = f32::NAN;
    data[17] = f32::INFINITY;
    // Row 1: −inf but for 3 finite logits in the middle (k > 3: −inf ids follow in order).
    data[v + 75_000] = 1.0;
    data[v + 75_001] = -2.0;
    data[v + 75_002] = 1.0;
    // Row 2: two +inf far apart, the rest −0.0 / 0.0 / −inf.
    for (i, x) in data[2 * v..3 * v].iter_mut().enumerate() {
        *x = [0.0, -0.0, f32::NEG_INFINITY][i % 3];
    }
    data[2 * v + 5] = f32::INFINITY;
    data[3 * v - 1] = f32::INFINITY;
    // Row 3: all NaN (orders as −inf; lse NaN).
    data[3 * v..].fill(f32::NAN);
    for k in [2, 6, 9, 33, MAX_TOP_K] {
        check(
            &format!("infinities across slices, k {k}"),
            data.clone(),
            b,
            v,
            k,
        );
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Ids, values and lse bit for bit: both results come from the same device kernel.
fn assert_same_top_k(what: &str, got: &TopK, want: &TopK) {
    assert_eq!(got.k, want.k, "{what}");
    assert_eq!(got.ids, want.ids, "{what}: ids");
    assert_eq!(bits(&got.values), bits(&want.values), "{what}: values");
    assert_eq!(bits(&got.lse), bits(&want.lse), "{what}: lse");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn queued_top_k_fetches_in_any_order_and_again() {
    let _lock = gpu_lock();
    let mut rng = Rng(11);
    let shapes = [(3, 1000, 6), (5, 32_000, 65), (1, 7, 7)];
    let mut queued = Vec::new();
    for (b, v, k) in shapes {
        let data: Vec<f32> = (0..b * v)
            .map(|_| rng.below(50) as f32 * 0.5 - 12.0)
            .collect();
        let cpu = Tensor::from_vec(data, &[b, v]).unwrap();
        let want = ops::top_k_candidates(&cpu, k).unwrap();
        let dev = cpu.to_device_f32(GPU).unwrap();
        let pending = ops::top_k_candidates_queued(&dev, k).unwrap();
        assert_eq!((pending.rows(), pending.k()), (b, k));
        // The logits may go as soon as the kernel is queued (the arena is stream-ordered).
        drop(dev);
        queued.push((format!("B {b} V {v} k {k}"), pending, want));
    }
    // Fetched last-queued first, each twice.
    for (what, pending, want) in queued.iter().rev() {
        let got = pending.fetch().unwrap();
        assert_eq!(got.ids, want.ids, "{what}: ids");
        assert_eq!(bits(&got.values), bits(&want.values), "{what}: values");
        assert_same_top_k(what, &pending.fetch().unwrap(), &got);
    }
}

/// A graph that captured the LM head and the queued ranking: each replay rewrites the
/// ranking's output buffer, and `fetch` after the replay reads the new result. The second
/// shape splits its rows over several blocks: the slices' scratch is captured too.
#[test]
#[ignore = "needs a CUDA GPU"]
fn queued_top_k_fetches_a_replayed_graphs_result() {
    let _lock = gpu_lock();
    replayed_graph(4, 64, 5000, 9);
    replayed_graph(2, 64, 64_000, 6);
}

fn replayed_graph(b: usize, c: usize, v: usize, k: usize) {
    let backend = CudaBackend::get(0).unwrap();
    let mut rng = Rng(12);
    let mut hidden = rand_tensor(&mut rng, &[b, c], -1.0, 1.0)
        .to_device(GPU)
        .unwrap();
    let head = rand_tensor(&mut rng, &[v, c], -1.0, 1.0)
        .to_device(GPU)
        .unwrap();
    let delta = rand_tensor(&mut rng, &[b, c], -1.0, 1.0)
        .to_device(GPU)
        .unwrap();
    let pool = backend.graph_pool();
    let (graph, (logits, pending)) = backend
        .capture(&pool, || -> engine::Result<_> {
            // The soft-cap saturates many logits at exactly ±0.2: ties at the top.
            let logits = ops::logits(&hidden, &head, Some(0.2))?;
            let pending = ops::top_k_candidates_queued(&logits, k)?;
            Ok((logits, pending))
        })
        .unwrap();
    let mut previous: Option<TopK> = None;
    for replay in 0..3 {
        if replay > 0 {
            // Queued before the replay, on the same stream: the graph reads the new hidden.
            ops::add_inplace(&mut hidden, &delta).unwrap();
        }
        graph.launch().unwrap();
        let got = pending.fetch().unwrap();
        // The reference: the CPU op on the logits this replay wrote.
        let host = Tensor::from_vec(logits.to_vec().unwrap(), &[b, v]).unwrap();
        let want = ops::top_k_candidates(&host, k).unwrap();
        let what = format!("B {b} V {v} k {k} replay {replay}");
        assert_eq!(got.ids, want.ids, "{what}: ids");
        assert_eq!(bits(&got.values), bits(&want.values), "{what}: values");
        for (r, (&g, &w)) in got.lse.iter().zip(&want.lse).enumerate() {
            let ok = (g as f64 - w as f64).abs() <= 5e-6 * (w as f64).abs().max(1.0);
            assert!(ok, "{what}: lse row {r}: got {g}, want {w}");
        }
        if let Some(p) = &previous {
            assert_ne!(
                bits(&p.lse),
                bits(&got.lse),
                "{what}: the result did not change"
            );
        }
        previous = Some(got);
    }
}

fn check_at_least(what: &str, data: Vec<f32>, b: usize, v: usize, rows: &[usize], t: &[f32]) {
    let cpu = Tensor::from_vec(data, &[b, v]).unwrap();
    let dev = cpu.to_device_f32(GPU).unwrap();
    for cap in [0, 1, 5, 64, 3000, v + 1] {
        let want = ops::logits_at_least(&cpu, rows, t, cap).unwrap();
        let got = ops::logits_at_least(&dev, rows, t, cap).unwrap();
        assert_eq!(got.len(), want.len(), "{what} cap {cap}");
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            let split = |x: &Option<Vec<(u32, f32)>>| {
                x.as_ref()
                    .map(|r| r.iter().map(|&(i, y)| (i, y.to_bits())).collect::<Vec<_>>())
            };
            assert_eq!(
                split(g),
                split(w),
                "{what} cap {cap}: entry {j} (row {})",
                rows[j]
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn logits_at_least_matches_the_cpu_reference() {
    let _lock = gpu_lock();
    let mut rng = Rng(13);
    // V under a warp, not a multiple of 32, just past one block of 1024, real vocabularies.
    for (b, v) in [(3, 5), (4, 1000), (2, 1025), (5, 32_000), (3, 256_000)] {
        for distinct in [3usize, 50, 1 << 20] {
            let data: Vec<f32> = (0..b * v)
                .map(|_| rng.below(distinct) as f32 / distinct as f32 * 60.0 - 30.0)
                .collect();
            // Every row, some twice, in a shuffled order; thresholds at values the row
            // holds (ties), near its top, and at the ends.
            let mut rows: Vec<usize> = (0..b).chain(0..b.min(2)).collect();
            rows.reverse();
            let t: Vec<f32> = rows
                .iter()
                .enumerate()
                .map(|(j, &r)| match j % 4 {
                    0 => data[r * v + rng.below(v)],
                    1 => data[r * v..(r + 1) * v]
                        .iter()
                        .copied()
                        .fold(f32::MIN, f32::max),
                    2 => 29.0,
                    _ => -30.0,
                })
                .collect();
            check_at_least(
                &format!("B {b} V {v} distinct {distinct}"),
                data,
                b,
                v,
                &rows,
                &t,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn logits_at_least_infinities_nan_and_saturation() {
    let _lock = gpu_lock();
    let (b, v) = (4, 3001);
    let mut data = vec![0.25f32; b * v];
    // Row 0: NaNs never qualify, whatever the threshold.
    data.iter_mut()
        .take(v)
        .step_by(7)
        .for_each(|x| *x = f32::NAN);
    // Row 1: all −inf but one +inf.
    data[v..2 * v].fill(f32::NEG_INFINITY);
    data[v + 1777] = f32::INFINITY;
    // Row 2: −0.0 and 0.0 alternate (equal as f32).
    for (i, x) in data[2 * v..3 * v].iter_mut().enumerate() {
        *x = if i % 2 == 0 { -0.0 } else { 0.0 };
    }
    // Row 3: a soft-capped row, many logits saturated at exactly the cap.
    for (i, x) in data[3 * v..].iter_mut().enumerate() {
        *x = if i % 13 == 5 {
            30.0
        } else {
            (i % 50) as f32 * 0.5
        };
    }
    let rows = [0, 0, 1, 1, 1, 2, 2, 3, 3];
    let t = [
        0.25,
        f32::NAN,
        f32::NEG_INFINITY,
        f32::INFINITY,
        0.0,
        0.0,
        -0.0,
        30.0,
        24.5,
    ];
    check_at_least("infinities, NaN, signed zeros", data, b, v, &rows, &t);
}

/// The top_k module, every kernel in it, compiles through NVRTC for sm_90 (no GPU needed;
/// runs wherever libnvrtc loads).
#[test]
fn top_k_kernels_compile_for_sm_90() {
    if !Library::Nvrtc.is_present() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but libnvrtc cannot be loaded"
        );
        eprintln!("skipped: libnvrtc not found (set LD_LIBRARY_PATH to run this test)");
        return;
    }
    let arch = Arch::parse("sm_90").unwrap();
    let (cubin, _, _) = KernelCache::disabled()
        .load_or_compile(Module::TopK, arch, false)
        .unwrap_or_else(|e| panic!("{e}"));
    let kernels = [
        "top_k_rows_k2",
        "top_k_merge_k2",
        "top_k_rows_k8",
        "top_k_merge_k8",
        "top_k_rows_k16",
        "top_k_merge_k16",
        "top_k_rows_k32",
        "top_k_merge_k32",
        "logits_at_least_f32",
    ];
    for name in kernels {
        // Symbol names sit NUL-separated in the CUBIN's ELF string table.
        let needle = [b"\0", name.as_bytes(), b"\0"].concat();
        assert!(
            cubin.windows(needle.len()).any(|w| w == needle.as_slice()),
            "the CUBIN has no kernel named {name}"
        );
    }
}
