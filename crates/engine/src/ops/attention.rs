//! Causal multi-head attention with GQA, sliding window and logit soft-cap.
//!
//! The CPU path is exact softmax attention (no online rescaling): per (head, block of query
//! rows) one gemm gives the block's scores against the keys the block can see, each row takes
//! its max-subtracted softmax in f32 over its visible keys, and a second gemm sums the values. Work is split into such tasks for
//! rayon; each task owns a contiguous slice of a head-major `[H, Tq, D]` buffer, which is
//! transposed to `[Tq, H, D]` at the end (cheap next to the scores, and no unsafe sharing).
use gemm::Parallelism;
use rayon::prelude::*;

use super::linear::{Strided, StridedRef, gemm_strided};
use crate::cuda::AttentionKernel;
use crate::cuda::ops as cuda_ops;
use crate::{EngineError, Result, Tensor};

/// Where each sequence's queries and keys sit in the packed tensors.
///
/// Sequence `b` has queries `q_starts[b]..q_starts[b+1]` and keys/values
/// `kv_starts[b]..kv_starts[b+1]`; its queries are the *last* `q_len` positions of its
/// `kv_len` keys (prefill: q_len == kv_len; decode with a cache: q_len == 1). So query `i`
/// of sequence `b` sits at position `kv_len - q_len + i` and attends to keys `0..=` that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    pub q_starts: Vec<usize>,  // [B + 1]
    pub kv_starts: Vec<usize>, // [B + 1]
}

impl SeqLayout {
    /// Prefill of whole sequences with the given lengths (queries == keys).
    pub fn prefill(lens: &[usize]) -> SeqLayout {
        let mut starts = Vec::with_capacity(lens.len() + 1);
        let mut end = 0;
        starts.push(end);
        for l in lens {
            end += l;
            starts.push(end);
        }
        SeqLayout {
            q_starts: starts.clone(),
            kv_starts: starts,
        }
    }

    /// Number of sequences B.
    pub fn num_seqs(&self) -> usize {
        self.q_starts.len().saturating_sub(1)
    }

    /// Checks that the layout describes `tq` packed queries and `tkv` packed keys: equal
    /// entry counts, starts at 0, monotone, ends equal to the tensor lengths, and
    /// q_len ≤ kv_len for every sequence.
    pub fn validate(&self, op: &'static str, tq: usize, tkv: usize) -> Result<()> {
        let arg = |msg: String| Err(EngineError::Arg { op, msg });
        if self.q_starts.is_empty() || self.q_starts.len() != self.kv_starts.len() {
            return arg(format!(
                "layout has {} q_starts and {} kv_starts; both need B + 1 ≥ 1 entries",
                self.q_starts.len(),
                self.kv_starts.len()
            ));
        }
        if self.q_starts[0] != 0 || self.kv_starts[0] != 0 {
            return arg(format!(
                "layout must start at 0, got q_starts[0] = {} and kv_starts[0] = {}",
                self.q_starts[0], self.kv_starts[0]
            ));
        }
        for b in 0..self.num_seqs() {
            let (q0, q1) = (self.q_starts[b], self.q_starts[b + 1]);
            let (k0, k1) = (self.kv_starts[b], self.kv_starts[b + 1]);
            if q1 < q0 || k1 < k0 {
                return arg(format!(
                    "sequence {b}: starts decrease (q {q0} → {q1}, kv {k0} → {k1})"
                ));
            }
            if q1 - q0 > k1 - k0 {
                return arg(format!(
                    "sequence {b}: {} queries but only {} keys (queries are the last keys' positions)",
                    q1 - q0,
                    k1 - k0
                ));
            }
        }
        let (q_end, kv_end) = (
            self.q_starts[self.num_seqs()],
            self.kv_starts[self.num_seqs()],
        );
        if q_end != tq || kv_end != tkv {
            return arg(format!(
                "layout ends at {q_end} queries and {kv_end} keys, tensors have {tq} and {tkv}"
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    /// Multiplies q·k (HF: head_dim^-1/2, or query_pre_attn_scalar^-1/2 for Gemma-2).
    pub scale: f32,
    /// Sliding window W: a query at position p attends to keys k with p - k < W.
    pub window: Option<usize>,
    /// Logit soft-cap c: scores become tanh(s / c) · c before the mask.
    pub softcap: Option<f32>,
}

pub struct AttentionOut {
    pub out: Tensor, // [Tq, H, D]
    /// Natural-log logsumexp of each query row's scaled, capped, masked scores; backward needs it.
    pub lse: Tensor, // [H, Tq]
}

/// Query rows per task (the M of its two gemms): larger blocks amortise packing each key/value
/// span over more rows, smaller ones give rayon more tasks and waste less on masked corners.
const Q_BLOCK: usize = 32;

/// q: [Tq, H, D], k, v: [Tkv, Hkv, D] with H % Hkv == 0 (query head h reads kv head h / (H/Hkv)).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    params: &AttentionParams,
) -> Result<AttentionOut> {
    if let Some(gpu) = cuda_ops::device_of("attention", &[("q", q), ("k", k), ("v", v)])? {
        return cuda_ops::attention::attention(
            &gpu,
            q,
            k,
            v,
            layout,
            params,
            AttentionKernel::Auto,
        );
    }
    const OP: &str = "attention";
    let [tq, h, d] = q.dims(OP, "q: [Tq, H, D]")?;
    let [tkv, hkv, dk] = k.dims(OP, "k: [Tkv, Hkv, D]")?;
    if dk != d || hkv == 0 || h % hkv != 0 {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("k: [Tkv, Hkv, {d}] with Hkv dividing H = {h}"),
            got: k.shape().to_vec(),
        });
    }
    v.expect_shape(OP, &[tkv, hkv, d])?;
    layout.validate(OP, tq, tkv)?;
    check_params(OP, params)?;

    let dims = Dims { h, hkv, d };
    let (q, k, v) = (q.as_slice()?, k.as_slice()?, v.as_slice()?);
    let mut out_hm = vec![0.0f32; h * tq * d]; // [H, Tq, D]
    let mut lse = vec![0.0f32; h * tq]; // [H, Tq]

    // Tasks in (head, sequence, block) order, which is the memory order of [H, Tq, ...], so
    // each task's slices are split off the front of what remains.
    let mut tasks = Vec::new();
    let (mut out_rest, mut lse_rest) = (out_hm.as_mut_slice(), lse.as_mut_slice());
    for head in 0..h {
        for b in 0..layout.num_seqs() {
            let (q0, q1) = (layout.q_starts[b], layout.q_starts[b + 1]);
            let (k0, k1) = (layout.kv_starts[b], layout.kv_starts[b + 1]);
            for i0 in (0..q1 - q0).step_by(Q_BLOCK) {
                let rows = Q_BLOCK.min(q1 - q0 - i0);
                let (o, rest) = std::mem::take(&mut out_rest).split_at_mut(rows * d);
                out_rest = rest;
                let (l, rest) = std::mem::take(&mut lse_rest).split_at_mut(rows);
                lse_rest = rest;
                tasks.push(Block {
                    head,
                    q_row0: q0 + i0,
                    // Position of the block's first query among the sequence's keys.
                    pos0: (k1 - k0) - (q1 - q0) + i0,
                    kv_start: k0,
                    out: o,
                    lse: l,
                });
            }
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(Vec::new, |scores, task| {
            attend_block(task, scores, q, k, v, dims, params)
        });

    // [H, Tq, D] → [Tq, H, D].
    let mut out = vec![0.0f32; tq * h * d];
    if d > 0 {
        out.par_chunks_mut(h * d).enumerate().for_each(|(t, row)| {
            for (head, dst) in row.chunks_exact_mut(d).enumerate() {
                let src = (head * tq + t) * d;
                dst.copy_from_slice(&out_hm[src..src + d]);
            }
        });
    }
    Ok(AttentionOut {
        out: Tensor::from_vec(out, &[tq, h, d])?,
        lse: Tensor::from_vec(lse, &[h, tq])?,
    })
}

/// The parameter rules, shared with the CUDA launcher.
pub(crate) fn check_params(op: &'static str, p: &AttentionParams) -> Result<()> {
    let arg = |msg: String| Err(EngineError::Arg { op, msg });
    if !p.scale.is_finite() {
        return arg(format!("scale must be finite, got {}", p.scale));
    }
    if p.window == Some(0) {
        return arg("a sliding window of 0 lets a query see no key; use None or W ≥ 1".into());
    }
    if let Some(c) = p.softcap
        && !(c.is_finite() && c > 0.0)
    {
        return arg(format!("soft-cap must be positive and finite, got {c}"));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    hkv: usize,
    d: usize,
}

/// One task: up to [`Q_BLOCK`] consecutive query rows of one sequence, one head.
struct Block<'a> {
    head: usize,
    /// Packed row of the block's first query.
    q_row0: usize,
    /// Key position (within its sequence) of the block's first query.
    pos0: usize,
    /// Packed row of the sequence's first key.
    kv_start: usize,
    out: &'a mut [f32], // [rows, D], head-major slice
    lse: &'a mut [f32], // [rows]
}

fn attend_block(
    task: Block<'_>,
    scores: &mut Vec<f32>,
    q: &[f32], // [Tq, H, D]
    k: &[f32], // [Tkv, Hkv, D]
    v: &[f32], // [Tkv, Hkv, D]
    Dims { h, hkv, d }: Dims,
    params: &AttentionParams,
) {
    let rows = task.lse.len();
    let kv_head = task.head / (h / hkv);
    let first_key = |pos: usize| params.window.map_or(0, |w| (pos + 1).saturating_sub(w));
    // Keys the block can see: from the first row's first key to the last row's own position.
    let lo = first_key(task.pos0);
    let span = task.pos0 + rows - lo;
    scores.clear();
    scores.resize(rows * span, 0.0);
    // The block's queries and the span's keys/values as strided matrices (row strides H·D
    // and Hkv·D), so both products run through gemm without gathering copies.
    let q_blk = &q[(task.q_row0 * h + task.head) * d..];
    let kv_off = ((task.kv_start + lo) * hkv + kv_head) * d;
    let par = Parallelism::None;

    // scores[rows × span] = scale · Q_blk · K_spanᵀ (the masked corners are computed and then
    // ignored: at most a Q_BLOCK² triangle per edge).
    gemm_strided(
        Strided {
            data: scores,
            row: span,
            col: 1,
        },
        StridedRef {
            data: q_blk,
            row: h * d,
            col: 1,
        },
        StridedRef {
            data: &k[kv_off..],
            row: 1,
            col: hkv * d,
        },
        [rows, span, d],
        false,
        params.scale,
        par,
    );
    // Soft-cap, then the softmax numerators in place (0 outside each row's visible keys),
    // and each row's logsumexp.
    let mut denom = [0.0f32; Q_BLOCK];
    for (r, row) in scores.chunks_exact_mut(span).enumerate() {
        let pos = task.pos0 + r;
        let (a, b) = (first_key(pos) - lo, pos + 1 - lo);
        row[..a].fill(0.0);
        row[b..].fill(0.0);
        let vis = &mut row[a..b];
        if let Some(c) = params.softcap {
            vis.iter_mut().for_each(|s| *s = (*s / c).tanh() * c);
        }
        let m = vis.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for s in vis.iter_mut() {
            *s = (*s - m).exp();
            sum += *s as f64;
        }
        denom[r] = sum as f32;
        task.lse[r] = m + (sum as f32).ln();
    }
    // out[rows × D] = P · V_span, then normalised row by row.
    gemm_strided(
        Strided {
            data: task.out,
            row: d,
            col: 1,
        },
        StridedRef {
            data: scores,
            row: span,
            col: 1,
        },
        StridedRef {
            data: &v[kv_off..],
            row: hkv * d,
            col: 1,
        },
        [rows, d, span],
        false,
        1.0,
        par,
    );
    for (out, &z) in task.out.chunks_exact_mut(d.max(1)).zip(&denom[..rows]) {
        out.iter_mut().for_each(|o| *o /= z);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{Rng, assert_close};

    /// Direct f64 attention over the same layout: (out [Tq, H, D], lse [H, Tq]).
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        layout: &SeqLayout,
        (h, hkv, d): (usize, usize, usize),
        scale: f64,
        window: Option<usize>,
        softcap: Option<f64>,
    ) -> (Vec<f64>, Vec<f64>) {
        let tq = *layout.q_starts.last().unwrap();
        let mut out = vec![0.0f64; tq * h * d];
        let mut lse = vec![0.0f64; h * tq];
        for b in 0..layout.num_seqs() {
            let (q0, q1) = (layout.q_starts[b], layout.q_starts[b + 1]);
            let (k0, k1) = (layout.kv_starts[b], layout.kv_starts[b + 1]);
            let (q_len, kv_len) = (q1 - q0, k1 - k0);
            for head in 0..h {
                let g = head / (h / hkv);
                for i in 0..q_len {
                    let p = kv_len - q_len + i;
                    let allowed: Vec<usize> = (0..kv_len)
                        .filter(|&j| j <= p && window.is_none_or(|w| p - j < w))
                        .collect();
                    let s: Vec<f64> = allowed
                        .iter()
                        .map(|&j| {
                            let mut acc = 0.0;
                            for x in 0..d {
                                acc += q[((q0 + i) * h + head) * d + x] as f64
                                    * k[((k0 + j) * hkv + g) * d + x] as f64;
                            }
                            let s = acc * scale;
                            softcap.map_or(s, |c| (s / c).tanh() * c)
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|s| (s - m).exp()).sum();
                    lse[head * tq + q0 + i] = m + z.ln();
                    for (&j, &sj) in allowed.iter().zip(&s) {
                        let p = (sj - m).exp() / z;
                        for x in 0..d {
                            out[((q0 + i) * h + head) * d + x] +=
                                p * v[((k0 + j) * hkv + g) * d + x] as f64;
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    fn check(
        seed: u64,
        layout: SeqLayout,
        (h, hkv, d): (usize, usize, usize),
        window: Option<usize>,
        softcap: Option<f32>,
    ) {
        let mut rng = Rng::new(seed);
        let tq = *layout.q_starts.last().unwrap();
        let tkv = *layout.kv_starts.last().unwrap();
        let q = rng.vec(tq * h * d, -2.0, 2.0);
        let k = rng.vec(tkv * hkv * d, -2.0, 2.0);
        let v = rng.vec(tkv * hkv * d, -1.0, 1.0);
        let params = AttentionParams {
            scale: 1.0 / (d as f32).sqrt(),
            window,
            softcap,
        };
        let got = attention(
            &Tensor::from_vec(q.clone(), &[tq, h, d]).unwrap(),
            &Tensor::from_vec(k.clone(), &[tkv, hkv, d]).unwrap(),
            &Tensor::from_vec(v.clone(), &[tkv, hkv, d]).unwrap(),
            &layout,
            &params,
        )
        .unwrap();
        assert_eq!(got.out.shape(), &[tq, h, d]);
        assert_eq!(got.lse.shape(), &[h, tq]);
        let (want_out, want_lse) = naive(
            &q,
            &k,
            &v,
            &layout,
            (h, hkv, d),
            params.scale as f64,
            window,
            softcap.map(|c| c as f64),
        );
        // Scores are O(3) sums of d f32 products and the outputs convex combinations of
        // values in [-1, 1]: f32 rounding leaves a few 1e-7; 1e-5 leaves room for exp/tanh.
        let what = format!("layout {layout:?} window {window:?} softcap {softcap:?}");
        assert_close(
            &format!("out, {what}"),
            got.out.as_slice().unwrap(),
            &want_out,
            1e-5,
            0.0,
        );
        assert_close(
            &format!("lse, {what}"),
            got.lse.as_slice().unwrap(),
            &want_lse,
            1e-5,
            1e-6,
        );
    }

    #[test]
    fn prefill_matches_f64_reference() {
        // Sequences shorter than, equal to and longer than a query block (70 spans three);
        // H/Hkv = 3 and head_dim 20.
        let layout = SeqLayout::prefill(&[5, 1, 32, 70, 17]);
        for (window, softcap) in [
            (None, None),
            (Some(6), None),
            (None, Some(1.0)),
            (Some(40), Some(0.7)),
        ] {
            check(7, layout.clone(), (6, 2, 20), window, softcap);
        }
        // Multi-head attention without grouping, an odd head_dim.
        check(8, SeqLayout::prefill(&[9, 33]), (3, 3, 13), Some(1), None);
    }

    #[test]
    fn decode_matches_f64_reference() {
        // One query per sequence at the end of its cache.
        let layout = SeqLayout {
            q_starts: vec![0, 1, 2, 3],
            kv_starts: vec![0, 7, 8, 48],
        };
        for (window, softcap) in [(None, None), (Some(5), Some(1.5))] {
            check(9, layout.clone(), (6, 2, 24), window, softcap);
        }
    }

    #[test]
    fn chunked_prefill_matches_f64_reference() {
        // q_len < kv_len (a chunk after cached keys), a whole prefill, and a sequence with no
        // queries this step.
        let layout = SeqLayout {
            q_starts: vec![0, 3, 13, 13, 53],
            kv_starts: vec![0, 9, 19, 23, 103],
        };
        for (window, softcap) in [(None, None), (Some(6), Some(1.0)), (Some(45), None)] {
            check(10, layout.clone(), (6, 2, 20), window, softcap);
        }
    }

    #[test]
    fn empty_batch_and_empty_queries() {
        let empty = Tensor::zeros(&[0, 2, 4]);
        let params = AttentionParams {
            scale: 0.5,
            window: None,
            softcap: None,
        };
        let r = attention(&empty, &empty, &empty, &SeqLayout::prefill(&[]), &params).unwrap();
        assert_eq!(r.out.shape(), &[0, 2, 4]);
        assert_eq!(r.lse.shape(), &[2, 0]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let params = AttentionParams {
            scale: 0.5,
            window: None,
            softcap: None,
        };
        let q = Tensor::zeros(&[4, 6, 8]);
        let kv = Tensor::zeros(&[4, 2, 8]);
        let ok = SeqLayout::prefill(&[1, 3]);
        assert!(attention(&q, &kv, &kv, &ok, &params).is_ok());
        let shape_err = |r: Result<AttentionOut>| matches!(r, Err(EngineError::Shape { .. }));
        let arg_err = |r: Result<AttentionOut>| matches!(r, Err(EngineError::Arg { .. }));
        // H not a multiple of Hkv; head dims differ; v unlike k; a rank-2 q.
        let k4 = Tensor::zeros(&[4, 4, 8]);
        assert!(shape_err(attention(&q, &k4, &k4, &ok, &params)));
        let k7 = Tensor::zeros(&[4, 2, 7]);
        assert!(shape_err(attention(&q, &k7, &k7, &ok, &params)));
        assert!(shape_err(attention(
            &q,
            &kv,
            &Tensor::zeros(&[3, 2, 8]),
            &ok,
            &params
        )));
        assert!(shape_err(attention(
            &Tensor::zeros(&[4, 48]),
            &kv,
            &kv,
            &ok,
            &params
        )));
        // Layouts: decreasing starts, more queries than keys, wrong ends, unequal entry
        // counts, not starting at 0, empty.
        let bad = [
            SeqLayout {
                q_starts: vec![0, 3, 2, 4],
                kv_starts: vec![0, 3, 2, 4],
            },
            SeqLayout {
                q_starts: vec![0, 2, 4],
                kv_starts: vec![0, 1, 4],
            },
            SeqLayout::prefill(&[1, 2]),
            SeqLayout {
                q_starts: vec![0, 4],
                kv_starts: vec![0, 1, 4],
            },
            SeqLayout {
                q_starts: vec![1, 4],
                kv_starts: vec![1, 4],
            },
            SeqLayout {
                q_starts: vec![],
                kv_starts: vec![],
            },
        ];
        for layout in &bad {
            assert!(
                arg_err(attention(&q, &kv, &kv, layout, &params)),
                "{layout:?}"
            );
        }
        // Parameters: a zero window, a non-positive soft-cap, a NaN scale.
        for p in [
            AttentionParams {
                window: Some(0),
                ..params
            },
            AttentionParams {
                softcap: Some(0.0),
                ..params
            },
            AttentionParams {
                softcap: Some(-1.0),
                ..params
            },
            AttentionParams {
                scale: f32::NAN,
                ..params
            },
        ] {
            assert!(arg_err(attention(&q, &kv, &kv, &ok, &p)), "{p:?}");
        }
    }
}
