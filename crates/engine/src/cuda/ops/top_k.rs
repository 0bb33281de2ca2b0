//! Each row's top k logits and lse on the GPU (kernels/top_k.cu), then a single download of
//! the [B, k] values and ids and the [B] lse — the only bytes that cross.
//!
//! The kernels read each row once (k ≤ 32; ⌈k / 32⌉ times above): every thread keeps its own
//! best few in registers, the block merges them. [`plan`] picks the list length per thread
//! and how many blocks share a row: one when the batch fills the GPU (B = 256 rows of a
//! decode step), more when it does not (B = 1 would leave all but one SM idle), in which case
//! each block ranks a slice into a scratch buffer and a second kernel merges the slices.
//!
//! The launch and the download are apart ([`queue`], [`QueuedTopK::fetch`]): the sampler can
//! queue the ranking behind the forward and wait once, and a CUDA graph that captured the
//! launch rewrites the same output buffer on every replay, which a later fetch reads.

use std::sync::Arc;

use crate::cuda::arena::DeviceBuffer;
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::ops::{f32_ptr, to_i32};
use crate::ops::TopK;
use crate::{EngineError, Result, Tensor};

/// Every kernel of kernels/top_k.cu (`Module::TopK`'s list).
pub(crate) const KERNELS: &[&str] = &[
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

/// One instantiation of the kernels: (LIST, THREADS of the rows kernel, its name, the merge
/// kernel's name). LIST and THREADS must match `TOP_K_KERNELS(LIST, THREADS, UNROLL)` in the
/// source. Two blocks per SM cap registers at 64 a thread with 512 threads: lists of 16 and
/// 32 need more (ptxas spills), so they run 256 threads with up to 128.
const LISTS: [(usize, u32, &str, &str); 4] = [
    (2, 512, "top_k_rows_k2", "top_k_merge_k2"),
    (8, 512, "top_k_rows_k8", "top_k_merge_k8"),
    (16, 256, "top_k_rows_k16", "top_k_merge_k16"),
    (32, 256, "top_k_rows_k32", "top_k_merge_k32"),
];
/// MERGE_THREADS in the source.
const MERGE_THREADS: u32 = 128;
/// Blocks of the rows kernel resident per SM (its `__launch_bounds__`): the grid aims at
/// this many per SM.
const BLOCKS_PER_SM: usize = 2;
/// No slice shorter than this: a block costs a few µs of merging whatever its length.
const MIN_SLICE: usize = 4096;
/// The merge kernel ranks slices × k ≤ 64 × 128 candidates per row.
const MAX_SLICES: usize = 64;

/// How one ranking is launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Candidates each thread keeps (LIST); k > LIST takes ⌈k / LIST⌉ passes.
    pub(crate) list: usize,
    /// Block size of the rows kernel.
    pub(crate) threads: u32,
    pub(crate) rows_kernel: &'static str,
    pub(crate) merge_kernel: &'static str,
    /// Blocks per row; 1 means no merge kernel.
    pub(crate) slices: usize,
    /// Logits per slice (the last may be shorter), a multiple of 4 so that every slice of an
    /// aligned row starts on a float4.
    pub(crate) slice_len: usize,
}

/// The launch for B rows of V logits, top k (1 ≤ k ≤ V), on a GPU with `sm_count` SMs.
pub(crate) fn plan(b: usize, v: usize, k: usize, sm_count: usize) -> Plan {
    let (list, threads, rows_kernel, merge_kernel) = LISTS
        .iter()
        .copied()
        .find(|l| l.0 >= k)
        .unwrap_or(LISTS[LISTS.len() - 1]);
    // Enough blocks for every SM when the rows alone are too few; B ≥ 2·SMs gets one each.
    let want = (BLOCKS_PER_SM * sm_count / b.max(1)).max(1);
    let slices = want.min(MAX_SLICES).min((v / MIN_SLICE).max(1));
    let slice_len = v.div_ceil(slices).next_multiple_of(4);
    Plan {
        list,
        threads,
        rows_kernel,
        merge_kernel,
        slices: v.div_ceil(slice_len),
        slice_len,
    }
}

/// A launched ranking and the buffer it writes: values [B, k] f32, then ids [B, k] u32,
/// then lse [B] f32, one download.
pub(crate) struct QueuedTopK {
    backend: Arc<CudaBackend>,
    out: DeviceBuffer, // [B·(2k + 1)] words
    /// The slices' candidates when rows are split ([B·S·(2k + 3)] words), held as long as
    /// `out`: a captured graph's replays write it again, so no other buffer may take it.
    _scratch: Option<DeviceBuffer>,
    b: usize,
    k: usize,
}

impl std::fmt::Debug for QueuedTopK {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QueuedTopK(B {}, k {}, {:?})", self.b, self.k, self.out)
    }
}

impl QueuedTopK {
    /// Downloads the buffer as it is now (waiting for the stream first) and splits it.
    pub(crate) fn fetch(&self) -> Result<TopK> {
        let (b, k) = (self.b, self.k);
        if b == 0 {
            return Ok(TopK {
                k,
                ..TopK::default()
            });
        }
        let mut host = vec![0u32; b * (2 * k + 1)];
        self.backend.download(&self.out, &mut host)?;
        let lse = host[2 * b * k..]
            .iter()
            .map(|&w| f32::from_bits(w))
            .collect();
        let ids = host[b * k..2 * b * k].to_vec();
        let values = host[..b * k].iter().map(|&w| f32::from_bits(w)).collect();
        Ok(TopK {
            k,
            values,
            ids,
            lse,
        })
    }
}

/// Queues the ranking of logits: [B, V] f32 on the device, already shape- and k-checked by
/// `ops::top_k_candidates_queued`. Nothing waits: the stream orders the kernels after the
/// work that writes the logits, and the arena keeps their memory from being reused before
/// the kernels have read it (see `cuda::arena`).
pub(crate) fn queue(
    backend: &Arc<CudaBackend>,
    logits: &Tensor,
    b: usize,
    v: usize,
    k: usize,
) -> Result<QueuedTopK> {
    const OP: &str = "top_k_candidates";
    let pl = f32_ptr(OP, "logits", logits)?;
    let words = b * (2 * k + 1);
    let out = backend.alloc(words * 4)?;
    let mut scratch = None;
    if b > 0 {
        let p = plan(b, v, k, backend.sm_count() as usize);
        let rows = u32::try_from(b).map_err(|_| EngineError::Arg {
            op: OP,
            msg: format!("B = {b} rows exceed the kernel's grid"),
        })?;
        let (pv, pi, ps) = (
            out.ptr(),
            out.ptr() + (b * k * 4) as u64,
            out.ptr() + (2 * b * k * 4) as u64,
        );
        let (v64, k32, len64) = (v as i64, to_i32(OP, "k", k)?, p.slice_len as i64);
        let rows_kernel = backend.kernel(Module::TopK, p.rows_kernel)?;
        if p.slices == 1 {
            // SAFETY: logits hold B·V f32; the output buffer B·(2k + 1) words, split as above.
            unsafe {
                backend.launch(
                    &rows_kernel,
                    (rows, 1, 1),
                    (p.threads, 1, 1),
                    0,
                    &mut params![pl, pv, pi, ps, v64, k32, len64],
                )
            }?;
        } else {
            // Per slice: values [B, S, k], ids [B, S, k], (max, sum, nan) [B, S, 3].
            let parts = b * p.slices;
            let buf = scratch.insert(backend.alloc(parts * (2 * k + 3) * 4)?);
            let (sv, si, ss) = (
                buf.ptr(),
                buf.ptr() + (parts * k * 4) as u64,
                buf.ptr() + (2 * parts * k * 4) as u64,
            );
            let slices32 = to_i32(OP, "slices", p.slices)?;
            let merge_kernel = backend.kernel(Module::TopK, p.merge_kernel)?;
            // SAFETY: logits hold B·V f32 and the slices cover [0, V); the scratch buffer
            // B·S·(2k + 3) words and the output B·(2k + 1), split as above.
            unsafe {
                backend.launch(
                    &rows_kernel,
                    (rows, p.slices as u32, 1),
                    (p.threads, 1, 1),
                    0,
                    &mut params![pl, sv, si, ss, v64, k32, len64],
                )?;
                backend.launch(
                    &merge_kernel,
                    (rows, 1, 1),
                    (MERGE_THREADS, 1, 1),
                    0,
                    &mut params![sv, si, ss, pv, pi, ps, slices32, k32],
                )
            }?;
        }
    }
    Ok(QueuedTopK {
        backend: backend.clone(),
        out,
        _scratch: scratch,
        b,
        k,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::compile_without_spills;
    use crate::ops::MAX_TOP_K;
    use crate::test_util::Rng;
    use crate::test_util::assert_cubin_has_kernels;

    #[test]
    fn plan_list_lengths_and_slices() {
        // k → the smallest list that holds it; above 32, passes of 32.
        let lists: Vec<usize> = [1, 2, 3, 8, 9, 16, 17, 32, 33, 128]
            .iter()
            .map(|&k| plan(256, 128_256, k, 132).list)
            .collect();
        assert_eq!(lists, [2, 2, 8, 8, 16, 16, 32, 32, 32, 32]);
        // A decode batch of 256 fills 132 SMs with one block per row.
        let p = plan(256, 128_256, 6, 132);
        assert_eq!((p.slices, p.slice_len, p.threads), (1, 128_256, 512));
        // One row: 64 slices of 4008 < MIN_SLICE are too short; 31 of 4140.
        let p = plan(1, 128_256, 6, 132);
        assert_eq!((p.slices, p.slice_len), (31, 4140));
        // 8 rows of 256k: 33 slices each, 264 blocks.
        let p = plan(8, 256_000, 65, 132);
        assert_eq!((p.slices, p.slice_len, p.threads), (33, 7760, 256));
        // A short row is never split.
        assert_eq!(plan(1, 5000, 2, 132).slices, 1);
        assert_eq!(plan(1, 1, 1, 132).slices, 1);
        for (b, v, sm) in [
            (1, 256_000, 132),
            (3, 100_003, 132),
            (2, 9000, 1000),
            (64, 4099, 8),
        ] {
            for k in [1, 6, 65, MAX_TOP_K] {
                let p = plan(b, v, k, sm);
                // The slices cover the row, none empty, none past the merge's bound.
                assert!((1..=MAX_SLICES).contains(&p.slices), "{p:?}");
                assert!(
                    p.slice_len.is_multiple_of(4) && (p.slices - 1) * p.slice_len < v,
                    "{p:?}"
                );
                assert!(p.slices * p.slice_len >= v, "{p:?}");
                assert!(p.slices == 1 || p.slice_len >= MIN_SLICE, "{p:?}");
                assert!(KERNELS.contains(&p.rows_kernel) && KERNELS.contains(&p.merge_kernel));
            }
        }
    }

    /// A host model of the kernels, step for step (kernels/top_k.cu): which thread visits
    /// which logit (head, float4 steps of UNROLL, tail), each thread's list with the stale
    /// cut of a step, the warp and block merges, the passes above LIST, the slices and their
    /// merge, the online sum. It checks the algorithm, not the CUDA text: the GPU tests
    /// (tests/cuda_top_k.rs) check that.
    mod model {
        use super::super::{MERGE_THREADS, Plan};
        use crate::ops::TopK;

        const NO_ID: u32 = u32::MAX;

        /// UNROLL of `TOP_K_KERNELS(LIST, THREADS, UNROLL)`: float4 loads per thread per step.
        const UNROLL: usize = 4;

        fn ranks_before(a: (f32, u32), b: (f32, u32)) -> bool {
            a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
        }

        fn nan_to_neg_inf(x: f32) -> f32 {
            if x.is_nan() { f32::NEG_INFINITY } else { x }
        }

        /// Candidates<LIST>: sorted, padded with (−inf, NO_ID).
        #[derive(Clone)]
        struct List(Vec<(f32, u32)>);

        impl List {
            fn new(len: usize) -> List {
                List(vec![(f32::NEG_INFINITY, NO_ID); len])
            }
            fn last(&self) -> (f32, u32) {
                self.0[self.0.len() - 1]
            }
            fn offer(&mut self, c: (f32, u32)) {
                if !ranks_before(c, self.last()) {
                    return;
                }
                let at = self.0.iter().position(|&e| ranks_before(c, e)).unwrap();
                self.0.insert(at, c);
                self.0.pop();
            }
            fn pop(&mut self) {
                self.0.remove(0);
                self.0.push((f32::NEG_INFINITY, NO_ID));
            }
        }

        /// OnlineSum, in f32 with the same formulas.
        #[derive(Clone, Copy)]
        struct Sum {
            max: f32,
            sum: f32,
            nan: bool,
        }

        impl Sum {
            fn new() -> Sum {
                Sum {
                    max: f32::MIN,
                    sum: 0.0,
                    nan: false,
                }
            }
            fn add(&mut self, x: f32) {
                self.nan |= x.is_nan();
                let hi = self.max.max(x);
                let e = (self.max.min(x) - hi).exp();
                self.sum = if x > self.max {
                    self.sum.mul_add(e, 1.0)
                } else {
                    self.sum + e
                };
                self.max = hi;
            }
            fn merge(&mut self, o: Sum) {
                let hi = self.max.max(o.max);
                self.sum = self.sum * (self.max - hi).exp() + o.sum * (o.max - hi).exp();
                self.max = hi;
                self.nan |= o.nan;
            }
            fn lse(&self, first: f32) -> f32 {
                if self.nan {
                    f32::NAN
                } else if first.is_infinite() {
                    first
                } else {
                    self.max + self.sum.ln()
                }
            }
        }

        /// block_top: consumes the threads' lists, returns the block's first `take`.
        fn block_top(lists: &mut [List], take: usize) -> Vec<(f32, u32)> {
            let best = |heads: &mut dyn Iterator<Item = (f32, u32)>| {
                heads
                    .reduce(|a, b| if ranks_before(b, a) { b } else { a })
                    .unwrap()
            };
            let mut warps = Vec::new();
            for warp in lists.chunks_mut(32) {
                let mut mine = Vec::new();
                for _ in 0..take {
                    let w = best(&mut warp.iter().map(|l| l.0[0]));
                    mine.push(w);
                    for l in warp.iter_mut().filter(|l| l.0[0].1 == w.1) {
                        l.pop();
                    }
                }
                warps.push(mine);
            }
            // Warp 0: a cursor per warp's list; past its end a list reads as padding.
            let pad = (f32::NEG_INFINITY, NO_ID);
            let mut at = vec![0; warps.len()];
            let mut out = Vec::new();
            for _ in 0..take {
                let heads: Vec<(f32, u32)> = (0..warps.len())
                    .map(|w| if at[w] < take { warps[w][at[w]] } else { pad })
                    .collect();
                let w = best(&mut heads.iter().copied());
                for (a, h) in at.iter_mut().zip(&heads) {
                    if *a < take && h.1 == w.1 {
                        *a += 1;
                    }
                }
                out.push(w);
            }
            out
        }

        /// scan + block_top for one pass over row[lo, lo + n) whose first logit sits at byte
        /// `addr` of an aligned allocation; `visits` counts each logit's visits.
        #[allow(clippy::too_many_arguments)]
        fn pass(
            row: &[f32],
            addr: usize,
            lo: usize,
            n: usize,
            p: &Plan,
            take: usize,
            after: Option<(f32, u32)>,
            sums: &mut [Sum],
            visits: &mut [u32],
        ) -> Vec<(f32, u32)> {
            let threads = p.threads as usize;
            let mut lists = vec![List::new(p.list); threads];
            let in_pass = |c: (f32, u32)| after.is_none_or(|a| ranks_before(a, c));
            let mut visit = |t: usize, j: usize, stale: Option<(f32, u32)>| {
                let x = row[lo + j];
                visits[lo + j] += 1;
                if after.is_none() {
                    sums[t].add(x);
                }
                let c = (nan_to_neg_inf(x), (lo + j) as u32);
                let beats = stale.is_none_or(|s| ranks_before(c, s));
                (in_pass(c) && beats).then_some(c)
            };
            let head = n.min((16 - addr % 16) % 16 / 4);
            let quads = (n - head) / 4;
            let tail = head + 4 * quads;
            for (t, list) in lists.iter_mut().enumerate() {
                if t < head
                    && let Some(c) = visit(t, t, None)
                {
                    list.offer(c);
                }
                let mut q = t;
                while q < quads {
                    // One step: every logit tested against the list's last entry as it was
                    // when the step began, the hits offered afterwards.
                    let stale = list.last();
                    let mut hits = Vec::new();
                    for u in 0..UNROLL {
                        let quad = q + u * threads;
                        if quad >= quads {
                            continue;
                        }
                        for e in 0..4 {
                            hits.extend(visit(t, head + 4 * quad + e, Some(stale)));
                        }
                    }
                    for c in hits {
                        list.offer(c);
                    }
                    q += UNROLL * threads;
                }
                if t + tail < n
                    && let Some(c) = visit(t, tail + t, None)
                {
                    list.offer(c);
                }
            }
            block_top(&mut lists, take)
        }

        /// The kernels' result for logits [b, v] under plan `p`.
        pub(crate) fn top_k(data: &[f32], b: usize, v: usize, k: usize, p: &Plan) -> TopK {
            let mut out = TopK {
                k,
                ..TopK::default()
            };
            for r in 0..b {
                let row = &data[r * v..(r + 1) * v];
                let mut visits = vec![0u32; v];
                let mut cands = Vec::new();
                let mut stats = Vec::new();
                for s in 0..p.slices {
                    let lo = s * p.slice_len;
                    let n = p.slice_len.min(v - lo);
                    let mut sums = vec![Sum::new(); p.threads as usize];
                    let mut after = None;
                    let mut picks = Vec::new();
                    for done in (0..k).step_by(p.list) {
                        let take = p.list.min(k - done);
                        let addr = 4 * (r * v + lo);
                        let got = pass(row, addr, lo, n, p, take, after, &mut sums, &mut visits);
                        after = got.last().copied();
                        picks.extend(got);
                    }
                    let mut total = Sum::new();
                    sums.iter().for_each(|s| total.merge(*s));
                    cands.push(picks);
                    stats.push(total);
                }
                // Each logit once per pass: ⌈k / LIST⌉ passes.
                let passes = k.div_ceil(p.list) as u32;
                assert!(visits.iter().all(|&c| c == passes), "row {r}: {visits:?}");
                let (top, lse) = if p.slices == 1 {
                    let top = cands.pop().unwrap();
                    let lse = stats[0].lse(top[0].0);
                    (top, lse)
                } else {
                    merge(&cands, &stats, k, p.list)
                };
                out.values.extend(top.iter().map(|c| c.0));
                out.ids.extend(top.iter().map(|c| c.1));
                out.lse.push(lse);
            }
            out
        }

        /// merge_slices for one row.
        fn merge(
            cands: &[Vec<(f32, u32)>],
            stats: &[Sum],
            k: usize,
            list: usize,
        ) -> (Vec<(f32, u32)>, f32) {
            let all: Vec<(f32, u32)> = cands.concat();
            let mut after: Option<(f32, u32)> = None;
            let mut top = Vec::new();
            for done in (0..k).step_by(list) {
                let mut lists = vec![List::new(list); MERGE_THREADS as usize];
                for (j, &c) in all.iter().enumerate() {
                    if after.is_none_or(|a| ranks_before(a, c)) {
                        lists[j % MERGE_THREADS as usize].offer(c);
                    }
                }
                let got = block_top(&mut lists, list.min(k - done));
                after = got.last().copied();
                top.extend(got);
            }
            let mut total = Sum::new();
            stats.iter().for_each(|s| total.merge(*s));
            let lse = total.lse(top[0].0);
            (top, lse)
        }
    }

    /// The model against the CPU reference: ids and values exactly, lse as the GPU tests
    /// allow (5e-6 relative), on rows full of ties, NaN and infinities, sorted rows, at
    /// every list length, with and without slices.
    #[test]
    fn the_kernels_algorithm_matches_the_cpu_reference() {
        let mut rng = Rng::new(5);
        let ninf = f32::NEG_INFINITY;
        // (B, V, k, SMs): SMs small or large to force one slice or many.
        let cases = [
            (3, 1, 1, 132),
            (4, 31, 31, 132),
            (2, 1000, 6, 132),
            (2, 4099, 65, 132),
            (1, 20_011, 2, 132),
            (1, 20_011, 9, 132),
            (2, 40_000, 33, 132),
            (1, 30_000, MAX_TOP_K, 132),
            (3, 9_001, 17, 1),
            (3, 100_003, 17, 132),
            (1, 256_000, 6, 132),
        ];
        for (case, &(b, v, k, sm)) in cases.iter().enumerate() {
            let p = plan(b, v, k, sm);
            for kind in 0..5 {
                let data: Vec<f32> = (0..b * v)
                    .map(|i| match kind {
                        // Few distinct values: ties at every cut, across threads and slices.
                        0 => rng.below(5) as f32 * 0.5 - 1.0,
                        1 => rng.uniform(-15.0, 15.0),
                        // Ascending: every logit enters a list.
                        2 => (i % v) as f32 * 1e-3,
                        // Mostly −inf, a few finite, one NaN per row (the lse turns NaN).
                        3 if i % v == v / 2 && v > 1 => f32::NAN,
                        3 if rng.below(50) == 0 => rng.below(3) as f32,
                        3 => ninf,
                        // +inf and −0.0 / 0.0 ties.
                        _ if rng.below(997) == 0 => f32::INFINITY,
                        _ => [0.0, -0.0, -1.0][rng.below(3)],
                    })
                    .collect();
                let t = crate::Tensor::from_vec(data.clone(), &[b, v]).unwrap();
                let want = crate::ops::top_k_candidates(&t, k).unwrap();
                let got = model::top_k(&data, b, v, k, &p);
                let what = format!("case {case} kind {kind} {p:?}");
                assert_eq!(got.ids, want.ids, "{what}");
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.values), bits(&want.values), "{what}");
                for (r, (&g, &w)) in got.lse.iter().zip(&want.lse).enumerate() {
                    let ok = if w.is_finite() {
                        (g as f64 - w as f64).abs() <= 5e-6 * (w as f64).abs().max(1.0)
                    } else {
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
                    };
                    assert!(ok, "{what}: lse row {r}: got {g}, want {w}");
                }
            }
        }
    }

    /// Compiles the module with ptxas statistics (no GPU needed): every kernel is there and
    /// none spills; each kernel's registers are printed.
    #[test]
    fn kernels_compile_without_spills() {
        let Some(compiled) = compile_without_spills(Module::TopK) else {
            return;
        };
        assert_cubin_has_kernels(&compiled.cubin, KERNELS);
    }
}
