//! Each row's k largest logits and its log-sum-exp: the few numbers sampling needs, so a
//! [B, V] logits tensor on a GPU never has to cross to the host.
//!
//! Order: value descending, ties to the lower id — a strict total order, so the result is
//! unique and a host top-N for N ≤ k is its prefix. NaN orders as −inf; a row holding any
//! NaN gets a NaN lse, so the caller can tell the row is bad. `lse = max + ln Σ e^(l − max)`
//! over the raw logits (±inf when the max is), so `value − lse` is a raw log-prob.
//!
//! The CPU reference sorts each row; the CUDA kernel (kernels/top_k.cu) reads each row once,
//! each thread keeping its best few in registers (passes of 32 above k = 32). Both return host arrays: the result is small by design.
//!
//! [`top_k_candidates_queued`] splits the op in two: on a GPU it only queues the kernel (the
//! host does not wait), and [`PendingTopK::fetch`] downloads the result later — as often as
//! asked, so a CUDA graph that captured the launch can be replayed and fetched again. On the
//! CPU the result is computed at once and `fetch` hands out copies of it.

use rayon::prelude::*;

use crate::cuda::ops as cuda_ops;
use crate::{EngineError, Result, Tensor};

/// The largest k the op takes (above 32 the kernel reads the row once per 32 picks).
pub const MAX_TOP_K: usize = 128;

/// The top candidates of every row, on the host.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TopK {
    /// Candidates per row.
    pub k: usize,
    pub values: Vec<f32>, // [B, k], each row in the op's order
    pub ids: Vec<u32>,    // [B, k]
    pub lse: Vec<f32>,    // [B]
}

/// A [`top_k_candidates`] result that may still be computing on the device.
#[derive(Debug)]
pub struct PendingTopK {
    rows: usize,
    k: usize,
    state: Pending,
}

#[derive(Debug)]
enum Pending {
    /// Computed on the CPU already.
    Host(TopK),
    /// Queued on a GPU; its output buffer is owned here.
    Device(cuda_ops::top_k::QueuedTopK),
}

impl PendingTopK {
    /// B: the rows ranked.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Candidates per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The result, on the host. On a GPU this waits for the stream and downloads the output
    /// buffer as it is now: after a replay of a CUDA graph that captured the kernel, a second
    /// `fetch` returns the replay's result.
    pub fn fetch(&self) -> Result<TopK> {
        match &self.state {
            Pending::Host(top) => Ok(top.clone()),
            Pending::Device(queued) => queued.fetch(),
        }
    }
}

/// logits: [B, V] f32 → each row's `k` largest (1 ≤ k ≤ min(V, [`MAX_TOP_K`])) and its lse.
pub fn top_k_candidates(logits: &Tensor, k: usize) -> Result<TopK> {
    top_k_candidates_queued(logits, k)?.fetch()
}

/// [`top_k_candidates`], queued: on a GPU the kernel is launched and nothing waits for it
/// (read the result with [`PendingTopK::fetch`]); on the CPU it is computed now.
pub fn top_k_candidates_queued(logits: &Tensor, k: usize) -> Result<PendingTopK> {
    const OP: &str = "top_k_candidates";
    let [b, v] = logits.dims(OP, "logits: [B, V]")?;
    check_k(OP, k, v)?;
    let state = match cuda_ops::device_of(OP, &[("logits", logits)])? {
        Some(gpu) => Pending::Device(cuda_ops::top_k::queue(&gpu, logits, b, v, k)?),
        None => Pending::Host(cpu_top_k(logits, b, v, k)?),
    };
    Ok(PendingTopK { rows: b, k, state })
}

/// The CPU reference of [`top_k_candidates`] on logits [b, v].
fn cpu_top_k(logits: &Tensor, b: usize, v: usize, k: usize) -> Result<TopK> {
    let data = logits.as_slice()?;
    let rows: Vec<(Vec<(u32, f32)>, f32)> = data
        .par_chunks(v.max(1))
        .take(b)
        .map(|row| (row_top_k(row, k), row_lse(row)))
        .collect();
    let mut out = TopK {
        k,
        values: Vec::with_capacity(b * k),
        ids: Vec::with_capacity(b * k),
        lse: Vec::with_capacity(b),
    };
    for (top, lse) in rows {
        out.ids.extend(top.iter().map(|c| c.0));
        out.values.extend(top.iter().map(|c| c.1));
        out.lse.push(lse);
    }
    Ok(out)
}

/// k must be a pick the row can supply, and ids must fit the kernel's u32 (with one value
/// left over for "none").
pub(crate) fn check_k(op: &'static str, k: usize, v: usize) -> Result<()> {
    if k == 0 || k > v || k > MAX_TOP_K {
        return Err(EngineError::Arg {
            op,
            msg: format!("k = {k}: expected 1 ≤ k ≤ min(V = {v}, {MAX_TOP_K})"),
        });
    }
    if v >= u32::MAX as usize {
        return Err(EngineError::Arg {
            op,
            msg: format!("V = {v} does not fit the kernel's 32-bit token ids"),
        });
    }
    Ok(())
}

fn nan_to_neg_inf(x: f32) -> f32 {
    if x.is_nan() { f32::NEG_INFINITY } else { x }
}

/// The row's `k` first (id, value) in the op's order, values with NaN as −inf.
fn row_top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, nan_to_neg_inf(x)))
        .collect();
    // No NaN is left, so partial_cmp is total here; -0.0 and 0.0 tie, as in the kernel.
    let order = |a: &(u32, f32), b: &(u32, f32)| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    };
    if k < all.len() {
        all.select_nth_unstable_by(k - 1, order);
        all.truncate(k);
    }
    all.sort_unstable_by(order);
    all
}

/// ln Σ e^l over the row, in f64 (the reference for the kernel's f32 sums).
fn row_lse(row: &[f32]) -> f32 {
    if row.iter().any(|x| x.is_nan()) {
        return f32::NAN;
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    (max as f64 + sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    /// The naive definition: sort every (value, id) pair with a comparator written out
    /// separately from the op's, take the first k; lse by a plain f64 loop.
    fn naive(row: &[f32], k: usize) -> (Vec<u32>, Vec<f32>, f64) {
        let mut ids: Vec<u32> = (0..row.len() as u32).collect();
        let key = |i: u32| {
            let x = row[i as usize];
            if x.is_nan() { f32::NEG_INFINITY } else { x }
        };
        ids.sort_by(|&a, &b| {
            if key(a) > key(b) {
                std::cmp::Ordering::Less
            } else if key(a) < key(b) {
                std::cmp::Ordering::Greater
            } else {
                a.cmp(&b)
            }
        });
        ids.truncate(k);
        let vals = ids.iter().map(|&i| key(i)).collect();
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        (ids, vals, lse)
    }

    #[test]
    fn matches_a_naive_sort_on_rows_with_ties() {
        let mut rng = Rng::new(41);
        for case in 0..60 {
            let (b, v) = (1 + rng.below(5), 1 + rng.below(700));
            // Few distinct values on most rows: many ties, straddling the cut.
            let distinct = [3usize, 20, 1 << 20][case % 3];
            let data: Vec<f32> = (0..b * v)
                .map(|_| rng.below(distinct) as f32 / distinct as f32 * 12.0 - 6.0)
                .collect();
            let k = 1 + rng.below(v.min(MAX_TOP_K));
            let t = Tensor::from_vec(data.clone(), &[b, v]).unwrap();
            let got = top_k_candidates(&t, k).unwrap();
            assert_eq!((got.k, got.values.len(), got.ids.len()), (k, b * k, b * k));
            for (r, row) in data.chunks(v).enumerate() {
                let (ids, vals, lse) = naive(row, k);
                assert_eq!(
                    &got.ids[r * k..(r + 1) * k],
                    ids.as_slice(),
                    "case {case} row {r}"
                );
                assert_eq!(&got.values[r * k..(r + 1) * k], vals.as_slice());
                assert!(
                    (got.lse[r] as f64 - lse).abs() <= 1e-6 * lse.abs().max(1.0),
                    "case {case} row {r}: lse {} vs {lse}",
                    got.lse[r]
                );
            }
        }
    }

    #[test]
    fn infinities_and_nan() {
        let ninf = f32::NEG_INFINITY;
        let data = vec![
            ninf,
            1.0,
            f32::NAN,
            1.0, // a NaN: last in order, lse NaN
            ninf,
            ninf,
            ninf,
            ninf, // all −inf: ids in order, lse −inf
            0.5,
            f32::INFINITY,
            ninf,
            2.0, // +inf first, lse +inf
        ];
        let t = Tensor::from_vec(data, &[3, 4]).unwrap();
        let got = top_k_candidates(&t, 4).unwrap();
        assert_eq!(got.ids, vec![1, 3, 0, 2, 0, 1, 2, 3, 1, 3, 0, 2]);
        assert_eq!(&got.values[..4], &[1.0, 1.0, ninf, ninf]);
        assert!(got.lse[0].is_nan());
        assert_eq!(got.lse[1], ninf);
        assert_eq!(got.lse[2], f32::INFINITY);
    }

    #[test]
    fn queued_fetches_what_the_op_returns_as_often_as_asked() {
        let mut rng = Rng::new(3);
        let (b, v, k) = (3, 257, 5);
        let data: Vec<f32> = (0..b * v).map(|_| rng.below(40) as f32 - 20.0).collect();
        let t = Tensor::from_vec(data.clone(), &[b, v]).unwrap();
        let pending = top_k_candidates_queued(&t, k).unwrap();
        assert_eq!((pending.rows(), pending.k()), (b, k));
        // The CPU result is computed at once: it does not depend on the input afterwards.
        drop(t);
        let first = pending.fetch().unwrap();
        assert_eq!(first, pending.fetch().unwrap());
        let again = Tensor::from_vec(data, &[b, v]).unwrap();
        assert_eq!(first, top_k_candidates(&again, k).unwrap());
        // An empty batch: no rows, k as asked.
        let empty = top_k_candidates_queued(&Tensor::zeros(&[0, 4]), 2).unwrap();
        assert_eq!((empty.rows(), empty.k()), (0, 2));
        let got = empty.fetch().unwrap();
        assert!(got.values.is_empty() && got.ids.is_empty() && got.lse.is_empty());
        assert_eq!(got.k, 2);
    }

    #[test]
    fn k_out_of_range_is_an_error() {
        let t = Tensor::zeros(&[2, 5]);
        for k in [0, 6] {
            let e = top_k_candidates(&t, k).unwrap_err().to_string();
            assert!(e.contains("expected 1 ≤ k"), "{e}");
        }
        let wide = Tensor::zeros(&[1, 200]);
        assert!(top_k_candidates(&wide, MAX_TOP_K + 1).is_err());
        assert!(top_k_candidates(&Tensor::zeros(&[5]), 1).is_err());
    }
}
