//! Causal multi-head attention with GQA, sliding window and logit soft-cap.
//!
//! The CPU path is exact softmax attention (no online rescaling): per (head, block of query
//! rows) one gemm gives the block's scores against the keys the block can see, each row takes
//! its max-subtracted softmax in f32 over its visible keys, and a second gemm sums the values.
//! Work is split into such tasks for rayon; each task owns a contiguous slice of a head-major
//! `[H, Tq, D]` buffer, which is transposed to `[Tq, H, D]` at the end (cheap next to the
//! scores, and no unsafe sharing).
//!
//! [`attention_backward`] takes the forward's inputs, its `out` and `lse`, and dL/d`out`, and
//! returns dq, dk, dv (on a GPU: cuda/ops/attention_backward.rs). On the CPU it recomputes the
//! probabilities from `lse` in two passes built the same way: (head, query block) tasks for
//! dq, then (kv head, key block) tasks for dk and dv, so every task again writes only its own
//! rows.
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
    let (tq, _, dims) = check_inputs(OP, q, k, v, layout, params)?;
    let Dims { h, hkv: _, d } = dims;
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

    Ok(AttentionOut {
        out: Tensor::from_vec(to_token_major(&out_hm, tq, h, d), &[tq, h, d])?,
        lse: Tensor::from_vec(lse, &[h, tq])?,
    })
}

/// The shape rules for q, k, v and the layout, and the parameter rules: what the forward and
/// the backward both accept. Returns (Tq, Tkv, dims).
fn check_inputs(
    op: &'static str,
    q: &Tensor, // [Tq, H, D]
    k: &Tensor, // [Tkv, Hkv, D]
    v: &Tensor, // [Tkv, Hkv, D]
    layout: &SeqLayout,
    params: &AttentionParams,
) -> Result<(usize, usize, Dims)> {
    let [tq, h, d] = q.dims(op, "q: [Tq, H, D]")?;
    let [tkv, hkv, dk] = k.dims(op, "k: [Tkv, Hkv, D]")?;
    if dk != d || hkv == 0 || h % hkv != 0 {
        return Err(EngineError::Shape {
            op,
            expected: format!("k: [Tkv, Hkv, {d}] with Hkv dividing H = {h}"),
            got: k.shape().to_vec(),
        });
    }
    v.expect_shape(op, &[tkv, hkv, d])?;
    layout.validate(op, tq, tkv)?;
    check_params(op, params)?;
    Ok((tq, tkv, Dims { h, hkv, d }))
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
    let first_key = |pos: usize| first_visible_key(params.window, pos);
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
    head_dots(
        scores,
        (q_blk, h * d),
        (&k[kv_off..], hkv * d),
        [rows, span, d],
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
    weighted_rows(
        task.out,
        scores,
        (&v[kv_off..], hkv * d),
        [rows, d, span],
        false,
        1.0,
        par,
    );
    for (out, &z) in task.out.chunks_exact_mut(d.max(1)).zip(&denom[..rows]) {
        out.iter_mut().for_each(|o| *o /= z);
    }
}

/// The first key position a query at `pos` sees: 0, or with a window W the first of the W
/// positions ending at `pos` (q_pos − k_pos < W).
fn first_visible_key(window: Option<usize>, pos: usize) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

/// [heads, T, D] → [T, heads, D]: the ops' tasks write head-major slices, callers want
/// token-major tensors.
fn to_token_major(head_major: &[f32], t: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; t * heads * d];
    if heads > 0 && d > 0 {
        out.par_chunks_mut(heads * d)
            .enumerate()
            .for_each(|(row, dst)| {
                for (head, dst) in dst.chunks_exact_mut(d).enumerate() {
                    let src = (head * t + row) * d;
                    dst.copy_from_slice(&head_major[src..src + d]);
                }
            });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// The gradients of [`attention`]'s inputs. All are assigned, none accumulated into: a caller
/// that has other gradients for the same tensors adds them itself.
pub struct AttentionGrads {
    pub dq: Tensor, // [Tq, H, D]
    pub dk: Tensor, // [Tkv, Hkv, D]
    pub dv: Tensor, // [Tkv, Hkv, D]
}

/// Rows per task of each backward pass (the M of its products).
#[derive(Clone, Copy, Debug)]
struct BackwardBlocks {
    /// Query rows per dQ task.
    queries: usize,
    /// Key rows per dK/dV task.
    keys: usize,
}

/// Larger than the forward's [`Q_BLOCK`]: each task packs a span of keys (or queries and
/// their output gradients) for two products, and measured on 2 cores (T = 1024–2048, D 64–128)
/// 128-row blocks ran the backward about twice as fast as 32-row ones. Short sequences still
/// give H × B tasks.
const BACKWARD_BLOCKS: BackwardBlocks = BackwardBlocks {
    queries: 128,
    keys: 128,
};

/// The input gradients of [`attention`], from its inputs, its saved `out` and `lse` and the
/// gradient `d_out` of its output.
///
/// Flash-attention's math, with the probabilities recomputed from `lse` instead of stored.
/// Per query row i (one head) and visible key j, with x = scale·q_i·k_j and
/// s = c·tanh(x/c) (s = x without a soft-cap):
///
/// - P_ij = exp(s_ij − lse_i), dP_ij = dO_i·V_j, Δ_i = Σ_j P_ij·dP_ij = dO_i·O_i;
/// - dS_ij = P_ij·(dP_ij − Δ_i) (the softmax Jacobian), then through the cap
///   dX_ij = dS_ij·(1 − tanh²(x/c)) = dS_ij·(1 − (s_ij/c)²);
/// - dQ_i = scale·Σ_j dX_ij·K_j, dK_j = scale·Σ_i dX_ij·Q_i, dV_j = Σ_i P_ij·dO_i, where the
///   sums for a kv head also run over all query heads of its group (GQA).
///
/// Masked pairs contribute nothing. dQ sums over keys and dK/dV over queries, so the CPU path
/// makes two passes, each writing only its own rows: rayon tasks over (head, query block) for
/// dQ, then over (kv head, key block) for dK and dV. Both recompute the scores (seven products
/// where a fused kernel needs five) but need no shared writes and no [T × T] buffer.
///
/// Accepts exactly what the forward accepts. On the GPU (kernels/attention_backward.cu) q, k,
/// v, `out` and `d_out` are bf16 and `lse` f32, as the GPU forward returns them; dq, dk and
/// dv come back bf16, and head dims above 256 are [`EngineError::Unsupported`] there.
#[allow(clippy::too_many_arguments)] // The forward's inputs, its saved outputs, their gradient.
pub fn attention_backward(
    q: &Tensor,     // [Tq, H, D]
    k: &Tensor,     // [Tkv, Hkv, D]
    v: &Tensor,     // [Tkv, Hkv, D]
    out: &Tensor,   // [Tq, H, D], the forward's output
    lse: &Tensor,   // [H, Tq], the forward's logsumexp
    d_out: &Tensor, // [Tq, H, D]
    layout: &SeqLayout,
    params: &AttentionParams,
) -> Result<AttentionGrads> {
    attention_backward_in_blocks(q, k, v, out, lse, d_out, layout, params, BACKWARD_BLOCKS)
}

/// [`attention_backward`] with the task sizes as an argument, so tests can put block edges
/// inside short sequences.
#[allow(clippy::too_many_arguments)]
fn attention_backward_in_blocks(
    q: &Tensor,     // [Tq, H, D]
    k: &Tensor,     // [Tkv, Hkv, D]
    v: &Tensor,     // [Tkv, Hkv, D]
    out: &Tensor,   // [Tq, H, D]
    lse: &Tensor,   // [H, Tq]
    d_out: &Tensor, // [Tq, H, D]
    layout: &SeqLayout,
    params: &AttentionParams,
    blocks: BackwardBlocks,
) -> Result<AttentionGrads> {
    const OP: &str = "attention_backward";
    let tensors = [
        ("q", q),
        ("k", k),
        ("v", v),
        ("out", out),
        ("lse", lse),
        ("d_out", d_out),
    ];
    let gpu = cuda_ops::device_of(OP, &tensors)?;
    // One set of rules for both devices, checked here; the GPU launcher only repeats the shape
    // guards its kernels rely on and adds its own rules (dtypes, D ≤ 256).
    let (tq, tkv, dims) = check_inputs(OP, q, k, v, layout, params)?;
    let Dims { h, hkv, d } = dims;
    expect_named(OP, "out", "[Tq, H, D]", out, &[tq, h, d])?;
    expect_named(OP, "lse", "[H, Tq]", lse, &[h, tq])?;
    expect_named(OP, "d_out", "[Tq, H, D]", d_out, &[tq, h, d])?;
    if let Some(gpu) = gpu {
        return cuda_ops::attention_backward::attention_backward(
            &gpu, q, k, v, out, lse, d_out, layout, params,
        );
    }
    if tq == 0 || h == 0 || d == 0 {
        // No query, or nothing to differentiate: every gradient is zero (or empty).
        return Ok(AttentionGrads {
            dq: Tensor::zeros(&[tq, h, d]),
            dk: Tensor::zeros(&[tkv, hkv, d]),
            dv: Tensor::zeros(&[tkv, hkv, d]),
        });
    }
    let (o, d_o) = (out.as_slice()?, d_out.as_slice()?);

    // Δ = dO·O per row, the softmax Jacobian's row term, shared by both passes.
    let mut delta = vec![0.0f32; h * tq]; // [H, Tq]
    delta
        .par_chunks_mut(tq)
        .enumerate()
        .for_each(|(head, row)| {
            for (t, dl) in row.iter_mut().enumerate() {
                let at = (t * h + head) * d;
                *dl = o[at..at + d]
                    .iter()
                    .zip(&d_o[at..at + d])
                    .map(|(o, g)| o * g)
                    .sum();
            }
        });
    let ins = BackwardInputs {
        q: q.as_slice()?,
        k: k.as_slice()?,
        v: v.as_slice()?,
        d_out: d_o,
        lse: lse.as_slice()?,
        delta: &delta,
        tq,
        dims,
        params,
    };

    // Pass 1, dQ: tasks in (head, sequence, block) order, the memory order of [H, Tq, D].
    let mut dq_hm = vec![0.0f32; h * tq * d]; // [H, Tq, D]
    let mut tasks = Vec::new();
    let mut dq_rest = dq_hm.as_mut_slice();
    for head in 0..h {
        for b in 0..layout.num_seqs() {
            let (q0, q1) = (layout.q_starts[b], layout.q_starts[b + 1]);
            let (k0, k1) = (layout.kv_starts[b], layout.kv_starts[b + 1]);
            for i0 in (0..q1 - q0).step_by(blocks.queries) {
                let rows = blocks.queries.min(q1 - q0 - i0);
                let (dq, rest) = std::mem::take(&mut dq_rest).split_at_mut(rows * d);
                dq_rest = rest;
                tasks.push(QueryBlock {
                    head,
                    q_row0: q0 + i0,
                    pos0: (k1 - k0) - (q1 - q0) + i0,
                    kv_start: k0,
                    dq,
                });
            }
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, task| {
            query_block_grads(task, scratch, &ins)
        });

    // Pass 2, dK and dV: tasks in (kv head, sequence, block) order, the memory order of
    // [Hkv, Tkv, D]. Keys of a sequence with no queries keep zero gradients.
    let mut dk_hm = vec![0.0f32; hkv * tkv * d]; // [Hkv, Tkv, D]
    let mut dv_hm = vec![0.0f32; hkv * tkv * d]; // [Hkv, Tkv, D]
    let mut tasks = Vec::new();
    let (mut dk_rest, mut dv_rest) = (dk_hm.as_mut_slice(), dv_hm.as_mut_slice());
    for kv_head in 0..hkv {
        for b in 0..layout.num_seqs() {
            let (q0, q1) = (layout.q_starts[b], layout.q_starts[b + 1]);
            let (k0, k1) = (layout.kv_starts[b], layout.kv_starts[b + 1]);
            for j0 in (0..k1 - k0).step_by(blocks.keys) {
                let cols = blocks.keys.min(k1 - k0 - j0);
                let (dk, rest) = std::mem::take(&mut dk_rest).split_at_mut(cols * d);
                dk_rest = rest;
                let (dv, rest) = std::mem::take(&mut dv_rest).split_at_mut(cols * d);
                dv_rest = rest;
                tasks.push(KeyBlock {
                    kv_head,
                    k_row0: k0 + j0,
                    kpos0: j0,
                    q_start: q0,
                    qpos0: (k1 - k0) - (q1 - q0),
                    q_len: q1 - q0,
                    dk,
                    dv,
                });
            }
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, task| {
            key_block_grads(task, scratch, &ins)
        });

    Ok(AttentionGrads {
        dq: Tensor::from_vec(to_token_major(&dq_hm, tq, h, d), &[tq, h, d])?,
        dk: Tensor::from_vec(to_token_major(&dk_hm, tkv, hkv, d), &[tkv, hkv, d])?,
        dv: Tensor::from_vec(to_token_major(&dv_hm, tkv, hkv, d), &[tkv, hkv, d])?,
    })
}

/// Checks a tensor's shape, naming the tensor and the meaning of its dims in the error.
fn expect_named(
    op: &'static str,
    name: &str,
    legend: &str,
    t: &Tensor,
    expected: &[usize],
) -> Result<()> {
    if t.shape() != expected {
        return Err(EngineError::Shape {
            op,
            expected: format!("{name}: {legend} = {expected:?}"),
            got: t.shape().to_vec(),
        });
    }
    Ok(())
}

/// What every backward task reads.
struct BackwardInputs<'a> {
    q: &'a [f32],     // [Tq, H, D]
    k: &'a [f32],     // [Tkv, Hkv, D]
    v: &'a [f32],     // [Tkv, Hkv, D]
    d_out: &'a [f32], // [Tq, H, D]
    lse: &'a [f32],   // [H, Tq]
    delta: &'a [f32], // [H, Tq]
    tq: usize,
    dims: Dims,
    params: &'a AttentionParams,
}

/// Per-thread buffers for a task's two score-shaped matrices.
#[derive(Default)]
struct Scratch {
    probs: Vec<f32>,
    grads: Vec<f32>,
}

impl Scratch {
    /// Both buffers sized for an [m × n] block (their contents are overwritten by gemm).
    fn sized(&mut self, len: usize) -> (&mut [f32], &mut [f32]) {
        self.probs.resize(len, 0.0);
        self.grads.resize(len, 0.0);
        (&mut self.probs[..len], &mut self.grads[..len])
    }
}

/// P and dX of one visible (query, key) pair from its scaled score x = scale·q·k, its
/// dP = dO·v, and the query row's lse and Δ (see [`attention_backward`]).
#[inline]
fn pair_grad(x: f32, dp: f32, lse: f32, delta: f32, softcap: Option<f32>) -> (f32, f32) {
    match softcap {
        None => {
            let p = (x - lse).exp();
            (p, p * (dp - delta))
        }
        Some(c) => {
            // The forward's cap, tanh(x/c)·c, so P agrees with the lse it saved.
            let t = (x / c).tanh();
            let p = (t * c - lse).exp();
            (p, p * (dp - delta) * (1.0 - t * t))
        }
    }
}

/// A dQ task: up to `blocks.queries` consecutive query rows of one sequence, one head.
struct QueryBlock<'a> {
    head: usize,
    /// Packed row of the block's first query.
    q_row0: usize,
    /// Key position (within its sequence) of the block's first query.
    pos0: usize,
    /// Packed row of the sequence's first key.
    kv_start: usize,
    dq: &'a mut [f32], // [rows, D], head-major slice
}

/// dQ of one block: X = scale·Q·Kᵀ and dP = dO·Vᵀ over the keys the block sees, dX
/// elementwise, then dQ = scale·dX·K.
fn query_block_grads(task: QueryBlock<'_>, scratch: &mut Scratch, ins: &BackwardInputs<'_>) {
    let Dims { h, hkv, d } = ins.dims;
    let params = ins.params;
    let rows = task.dq.len() / d;
    let kv_head = task.head / (h / hkv);
    // Keys the block can see: from the first row's first key to the last row's own position.
    let lo = first_visible_key(params.window, task.pos0);
    let span = task.pos0 + rows - lo;
    let (scores, grads) = scratch.sized(rows * span);
    let q_off = (task.q_row0 * h + task.head) * d;
    let kv_off = ((task.kv_start + lo) * hkv + kv_head) * d;
    let stats = task.head * ins.tq + task.q_row0;
    let (lse, delta) = (&ins.lse[stats..], &ins.delta[stats..]);
    let par = Parallelism::None;
    // dst[rows × span] = scale · lhs_blk[rows × D] · rhs_spanᵀ[D × span]
    let block_x_keys = |dst: &mut [f32], lhs: &[f32], rhs: &[f32], scale: f32| {
        let (lhs, rhs) = ((&lhs[q_off..], h * d), (&rhs[kv_off..], hkv * d));
        head_dots(dst, lhs, rhs, [rows, span, d], scale, par)
    };
    block_x_keys(scores, ins.q, ins.k, params.scale);
    block_x_keys(grads, ins.d_out, ins.v, 1.0);
    for (r, (x_row, g_row)) in scores
        .chunks_exact(span)
        .zip(grads.chunks_exact_mut(span))
        .enumerate()
    {
        let pos = task.pos0 + r;
        let (a, b) = (first_visible_key(params.window, pos) - lo, pos + 1 - lo);
        g_row[..a].fill(0.0);
        g_row[b..].fill(0.0);
        for (g, &x) in g_row[a..b].iter_mut().zip(&x_row[a..b]) {
            *g = pair_grad(x, *g, lse[r], delta[r], params.softcap).1;
        }
    }
    // dQ[rows × D] = scale · dX[rows × span] · K_span[span × D]
    weighted_rows(
        task.dq,
        grads,
        (&ins.k[kv_off..], hkv * d),
        [rows, d, span],
        false,
        params.scale,
        par,
    );
}

/// A dK/dV task: up to `blocks.keys` consecutive keys of one sequence, one kv head.
struct KeyBlock<'a> {
    kv_head: usize,
    /// Packed row of the block's first key.
    k_row0: usize,
    /// Position of the block's first key within its sequence.
    kpos0: usize,
    /// Packed row of the sequence's first query.
    q_start: usize,
    /// Position of the sequence's first query (kv_len − q_len).
    qpos0: usize,
    q_len: usize,
    dk: &'a mut [f32], // [cols, D], head-major slice
    dv: &'a mut [f32], // [cols, D], head-major slice
}

/// dK and dV of one key block, summed over the query heads of its group: per head, Xᵀ and
/// dPᵀ over the queries that see the block, P and dX elementwise, then dV += Pᵀ·dO and
/// dK += scale·dXᵀ·Q.
fn key_block_grads(task: KeyBlock<'_>, scratch: &mut Scratch, ins: &BackwardInputs<'_>) {
    let Dims { h, hkv, d } = ins.dims;
    let params = ins.params;
    let cols = task.dk.len() / d;
    let group = h / hkv;
    // Queries that see some key of the block: at or after its first key and, with a window,
    // fewer than W positions after its last key.
    let q_end = task.qpos0 + task.q_len;
    let p_lo = task.kpos0.max(task.qpos0);
    let p_hi = params.window.map_or(q_end, |w| {
        q_end.min((task.kpos0 + cols - 1).saturating_add(w))
    });
    if p_lo >= p_hi {
        return; // No query sees these keys: their gradients stay zero.
    }
    let span = p_hi - p_lo;
    let (probs, grads) = scratch.sized(cols * span);
    let k_off = (task.k_row0 * hkv + task.kv_head) * d;
    let q_row0 = task.q_start + (p_lo - task.qpos0);
    let par = Parallelism::None;
    for head in task.kv_head * group..(task.kv_head + 1) * group {
        let q_off = (q_row0 * h + head) * d;
        let stats = head * ins.tq + q_row0;
        let (lse, delta) = (
            &ins.lse[stats..stats + span],
            &ins.delta[stats..stats + span],
        );
        // dst[cols × span] = scale · lhs_blk[cols × D] · rhs_spanᵀ[D × span]
        let keys_x_block = |dst: &mut [f32], lhs: &[f32], rhs: &[f32], scale: f32| {
            let (lhs, rhs) = ((&lhs[k_off..], hkv * d), (&rhs[q_off..], h * d));
            head_dots(dst, lhs, rhs, [cols, span, d], scale, par)
        };
        keys_x_block(probs, ins.k, ins.q, params.scale);
        keys_x_block(grads, ins.v, ins.d_out, 1.0);
        for (c, (p_row, g_row)) in probs
            .chunks_exact_mut(span)
            .zip(grads.chunks_exact_mut(span))
            .enumerate()
        {
            // Key j is seen by query positions j ..< j + W.
            let j = task.kpos0 + c;
            let a = j.saturating_sub(p_lo).min(span);
            let b = params
                .window
                .map_or(span, |w| j.saturating_add(w).saturating_sub(p_lo).min(span))
                .max(a);
            for row in [&mut *p_row, &mut *g_row] {
                row[..a].fill(0.0);
                row[b..].fill(0.0);
            }
            for r in a..b {
                (p_row[r], g_row[r]) =
                    pair_grad(p_row[r], g_row[r], lse[r], delta[r], params.softcap);
            }
        }
        // dst[cols × D] += scale · lhs[cols × span] · rhs_span[span × D]
        let accumulate_block = |dst: &mut [f32], lhs: &[f32], rhs: &[f32], scale: f32| {
            let rhs = (&rhs[q_off..], h * d);
            weighted_rows(dst, lhs, rhs, [cols, d, span], true, scale, par)
        };
        accumulate_block(task.dv, probs, ins.d_out, 1.0);
        accumulate_block(task.dk, grads, ins.q, params.scale);
    }
}

/// dst[m × n] = scale · a[m × D] · b[n × D]ᵀ: the dot products of m rows of one head with
/// n rows of another, each head's rows `stride` elements apart in its packed [T, heads, D]
/// tensor; dst dense. Attention's scores (and, in the backward, their gradients).
fn head_dots(
    dst: &mut [f32],
    (a, a_stride): (&[f32], usize),
    (b, b_stride): (&[f32], usize),
    [m, n, d]: [usize; 3],
    scale: f32,
    par: Parallelism,
) {
    gemm_strided(
        Strided::rows(dst, n),
        StridedRef::rows(a, a_stride),
        StridedRef::transposed(b, b_stride),
        [m, n, d],
        false,
        scale,
        par,
    );
}

/// dst[m × D] = (dst if `accumulate`) + scale · w[m × n] · rows[n × D]: weighted sums of n
/// rows of one head (`stride` elements apart in its packed [T, heads, D] tensor); w and dst
/// dense. Attention's output (and, in the backward, dQ, dK and dV).
fn weighted_rows(
    dst: &mut [f32],
    w: &[f32],
    (rows, stride): (&[f32], usize),
    [m, d, n]: [usize; 3],
    accumulate: bool,
    scale: f32,
    par: Parallelism,
) {
    gemm_strided(
        Strided::rows(dst, d),
        StridedRef::rows(w, n),
        StridedRef::rows(rows, stride),
        [m, d, n],
        accumulate,
        scale,
        par,
    );
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{Rng, assert_close};

    /// What the naive references need to know, with the parameters in f64.
    struct Geometry<'a> {
        layout: &'a SeqLayout,
        h: usize,
        hkv: usize,
        d: usize,
        scale: f64,
        window: Option<usize>,
        softcap: Option<f64>,
    }

    impl Geometry<'_> {
        fn new(
            layout: &SeqLayout,
            (h, hkv, d): (usize, usize, usize),
            p: AttentionParams,
        ) -> Geometry<'_> {
            Geometry {
                layout,
                h,
                hkv,
                d,
                scale: p.scale as f64,
                window: p.window,
                softcap: p.softcap.map(|c| c as f64),
            }
        }
    }

    /// Direct f64 attention of query `i` of sequence `b`, head `head`: (out row [D], lse).
    fn naive_row(
        g: &Geometry<'_>,
        (q, k, v): (&[f64], &[f64], &[f64]),
        b: usize,
        head: usize,
        i: usize,
    ) -> (Vec<f64>, f64) {
        let (h, hkv, d) = (g.h, g.hkv, g.d);
        let (q0, q1) = (g.layout.q_starts[b], g.layout.q_starts[b + 1]);
        let (k0, k1) = (g.layout.kv_starts[b], g.layout.kv_starts[b + 1]);
        let (q_len, kv_len) = (q1 - q0, k1 - k0);
        let kv_head = head / (h / hkv);
        let p = kv_len - q_len + i;
        let allowed: Vec<usize> = (0..kv_len)
            .filter(|&j| j <= p && g.window.is_none_or(|w| p - j < w))
            .collect();
        let s: Vec<f64> = allowed
            .iter()
            .map(|&j| {
                let mut acc = 0.0;
                for x in 0..d {
                    acc += q[((q0 + i) * h + head) * d + x] * k[((k0 + j) * hkv + kv_head) * d + x];
                }
                let s = acc * g.scale;
                g.softcap.map_or(s, |c| (s / c).tanh() * c)
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|s| (s - m).exp()).sum();
        let mut out = vec![0.0f64; d];
        for (&j, &sj) in allowed.iter().zip(&s) {
            let p = (sj - m).exp() / z;
            for x in 0..d {
                out[x] += p * v[((k0 + j) * hkv + kv_head) * d + x];
            }
        }
        (out, m + z.ln())
    }

    /// Direct f64 attention over the whole layout: (out [Tq, H, D], lse [H, Tq]).
    fn naive(g: &Geometry<'_>, qkv: (&[f64], &[f64], &[f64])) -> (Vec<f64>, Vec<f64>) {
        let (h, d) = (g.h, g.d);
        let tq = *g.layout.q_starts.last().unwrap();
        let mut out = vec![0.0f64; tq * h * d];
        let mut lse = vec![0.0f64; h * tq];
        for b in 0..g.layout.num_seqs() {
            let q0 = g.layout.q_starts[b];
            for head in 0..h {
                for i in 0..g.layout.q_starts[b + 1] - q0 {
                    let (o, l) = naive_row(g, qkv, b, head, i);
                    out[((q0 + i) * h + head) * d..][..d].copy_from_slice(&o);
                    lse[head * tq + q0 + i] = l;
                }
            }
        }
        (out, lse)
    }

    fn to_f64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&x| x as f64).collect()
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
            &Geometry::new(&layout, (h, hkv, d), params),
            (&to_f64(&q), &to_f64(&k), &to_f64(&v)),
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

    // ---- backward ----

    /// Σ over `rows` (sequence, head, query index) of dO_row · out_row: the loss whose
    /// gradient `attention_backward` computes when handed `d_out`.
    fn naive_loss(
        g: &Geometry<'_>,
        qkv: (&[f64], &[f64], &[f64]),
        d_out: &[f64],
        rows: &[(usize, usize, usize)],
    ) -> f64 {
        let (h, d) = (g.h, g.d);
        rows.iter()
            .map(|&(b, head, i)| {
                let (o, _) = naive_row(g, qkv, b, head, i);
                let at = ((g.layout.q_starts[b] + i) * h + head) * d;
                o.iter()
                    .zip(&d_out[at..at + d])
                    .map(|(o, g)| o * g)
                    .sum::<f64>()
            })
            .sum()
    }

    /// The sequence whose packed range `starts[b]..starts[b+1]` holds row `t`.
    fn seq_of(starts: &[usize], t: usize) -> usize {
        (0..starts.len() - 1)
            .find(|&b| starts[b] <= t && t < starts[b + 1])
            .unwrap()
    }

    /// (dq, dk, dv) of [`naive_loss`] over all rows by central differences, step `eps`. Each
    /// element's difference recomputes only the rows it can change: its own row for q, every
    /// row of its sequence in its group's heads for k and v.
    fn finite_difference_grads(
        g: &Geometry<'_>,
        (q, k, v): (&[f64], &[f64], &[f64]),
        d_out: &[f64],
        eps: f64,
    ) -> [Vec<f64>; 3] {
        let (h, hkv, d) = (g.h, g.hkv, g.d);
        let layout = g.layout;
        let central = |x: &[f64], at: usize, loss: &dyn Fn(&[f64]) -> f64| {
            let mut x = x.to_vec();
            x[at] += eps;
            let up = loss(&x);
            x[at] -= 2.0 * eps;
            let down = loss(&x);
            (up - down) / (2.0 * eps)
        };
        let dq = (0..q.len())
            .map(|at| {
                let (t, head) = (at / (h * d), at / d % h);
                let b = seq_of(&layout.q_starts, t);
                let rows = [(b, head, t - layout.q_starts[b])];
                central(q, at, &|q| naive_loss(g, (q, k, v), d_out, &rows))
            })
            .collect();
        let kv_rows = |at: usize| {
            let (t, kv_head) = (at / (hkv * d), at / d % hkv);
            let b = seq_of(&layout.kv_starts, t);
            let group = h / hkv;
            let q_len = layout.q_starts[b + 1] - layout.q_starts[b];
            let mut rows = Vec::new();
            for head in kv_head * group..(kv_head + 1) * group {
                rows.extend((0..q_len).map(|i| (b, head, i)));
            }
            rows
        };
        let dk = (0..k.len())
            .map(|at| {
                let rows = kv_rows(at);
                central(k, at, &|k| naive_loss(g, (q, k, v), d_out, &rows))
            })
            .collect();
        let dv = (0..v.len())
            .map(|at| {
                let rows = kv_rows(at);
                central(v, at, &|v| naive_loss(g, (q, k, v), d_out, &rows))
            })
            .collect();
        [dq, dk, dv]
    }

    /// Runs forward and backward on random inputs and compares the gradients with central
    /// differences of the f64 reference, and the forward's lse with the reference's.
    fn check_backward(
        seed: u64,
        layout: &SeqLayout,
        (h, hkv, d): (usize, usize, usize),
        params: AttentionParams,
    ) {
        let mut rng = Rng::new(seed);
        let tq = *layout.q_starts.last().unwrap();
        let tkv = *layout.kv_starts.last().unwrap();
        let q = rng.vec(tq * h * d, -2.0, 2.0);
        let k = rng.vec(tkv * hkv * d, -2.0, 2.0);
        let v = rng.vec(tkv * hkv * d, -1.0, 1.0);
        let d_out = rng.vec(tq * h * d, -1.0, 1.0);
        let (qt, kt, vt) = (
            Tensor::from_vec(q.clone(), &[tq, h, d]).unwrap(),
            Tensor::from_vec(k.clone(), &[tkv, hkv, d]).unwrap(),
            Tensor::from_vec(v.clone(), &[tkv, hkv, d]).unwrap(),
        );
        let d_out_t = Tensor::from_vec(d_out.clone(), &[tq, h, d]).unwrap();
        let fwd = attention(&qt, &kt, &vt, layout, &params).unwrap();
        let backward = |blocks| {
            let grads = attention_backward_in_blocks(
                &qt, &kt, &vt, &fwd.out, &fwd.lse, &d_out_t, layout, &params, blocks,
            )
            .unwrap();
            assert_eq!(grads.dq.shape(), &[tq, h, d]);
            assert_eq!(grads.dk.shape(), &[tkv, hkv, d]);
            assert_eq!(grads.dv.shape(), &[tkv, hkv, d]);
            (blocks, grads)
        };
        // The production task sizes, and small odd ones that put query- and key-block edges
        // (unaligned with each other) inside every longer sequence.
        let runs = [
            backward(BACKWARD_BLOCKS),
            backward(BackwardBlocks {
                queries: 5,
                keys: 7,
            }),
        ];

        let g = Geometry::new(layout, (h, hkv, d), params);
        let (q, k, v, d_out) = (to_f64(&q), to_f64(&k), to_f64(&v), to_f64(&d_out));
        let what = format!("layout {layout:?} (H, Hkv, D) ({h}, {hkv}, {d}) {params:?}");
        // The backward recomputes P = exp(s − lse): the saved lse must be the f64 one.
        let (_, want_lse) = naive(&g, (&q, &k, &v));
        assert_close(
            &format!("lse, {what}"),
            fwd.lse.as_slice().unwrap(),
            &want_lse,
            1e-5,
            1e-6,
        );
        // In f64 a step of 1e-5 leaves truncation (eps² times a third derivative) and rounding
        // (1e-16 / eps) errors near 1e-10: exact for f32's purposes. What remains is the
        // backward's f32 rounding (products of O(1) values summed over up to 256 terms, and the
        // cancellation in dP − Δ): at most 8e-7 measured over these cases, against gradients of
        // O(0.1–1); 5e-6 + 1e-5·|want| leaves room for other SIMD widths in gemm.
        let want = finite_difference_grads(&g, (&q, &k, &v), &d_out, 1e-5);
        for (blocks, grads) in &runs {
            let got = [&grads.dq, &grads.dk, &grads.dv];
            for ((name, got), want) in ["dq", "dk", "dv"].iter().zip(got).zip(&want) {
                assert_close(
                    &format!("{name}, {blocks:?}, {what}"),
                    got.as_slice().unwrap(),
                    want,
                    5e-6,
                    1e-5,
                );
            }
        }
    }

    fn params_for(d: usize, window: Option<usize>, softcap: Option<f32>) -> AttentionParams {
        AttentionParams {
            scale: 1.0 / (d as f32).sqrt(),
            window,
            softcap,
        }
    }

    #[test]
    fn backward_prefill_gqa_matches_finite_differences() {
        // Sequences of 1 to 40 tokens; H/Hkv = 2; head_dim 12 (not a multiple of 8).
        let layout = SeqLayout::prefill(&[5, 1, 40, 17]);
        for (window, softcap) in [
            (None, None),
            (Some(6), None),
            (None, Some(0.7)),
            (Some(20), Some(1.5)),
        ] {
            check_backward(21, &layout, (4, 2, 12), params_for(12, window, softcap));
        }
    }

    #[test]
    fn backward_without_grouping_matches_finite_differences() {
        // H == Hkv, odd head_dim, a scale that is not head_dim^-1/2 (as with Gemma-2's
        // query_pre_attn_scalar); a window of 1 (each query sees only itself, so dq = dk = 0
        // and dv = d_out) and a narrow window with a cap.
        let layout = SeqLayout::prefill(&[9, 33]);
        for (window, softcap) in [(None, None), (Some(1), None), (Some(3), Some(2.0))] {
            let params = AttentionParams {
                scale: 0.3,
                window,
                softcap,
            };
            check_backward(22, &layout, (3, 3, 13), params);
        }
    }

    #[test]
    fn backward_head_dim_256_matches_finite_differences() {
        let layout = SeqLayout::prefill(&[3, 6]);
        for (window, softcap) in [(None, None), (Some(2), Some(1.5))] {
            check_backward(23, &layout, (2, 1, 256), params_for(256, window, softcap));
        }
    }

    #[test]
    fn backward_with_cached_keys_matches_finite_differences() {
        // q_len < kv_len: a chunk after cached keys, a whole prefill, a sequence with no
        // queries (its keys get zero gradients), and a decode row after 36 cached keys (with a
        // window, the first key blocks see no query at all).
        let layout = SeqLayout {
            q_starts: vec![0, 3, 13, 13, 14],
            kv_starts: vec![0, 9, 19, 23, 60],
        };
        for (window, softcap) in [(None, None), (Some(6), Some(1.0)), (Some(4), None)] {
            check_backward(24, &layout, (4, 2, 12), params_for(12, window, softcap));
        }
        // 20 queries after 130 cached keys: production-sized blocks get an edge inside the
        // sequence too (the first key block holds only cached keys).
        let long = SeqLayout {
            q_starts: vec![0, 20],
            kv_starts: vec![0, 150],
        };
        for (window, softcap) in [(None, None), (Some(30), Some(1.0))] {
            check_backward(25, &long, (2, 1, 4), params_for(4, window, softcap));
        }
    }

    #[test]
    fn backward_of_empty_inputs_is_empty_or_zero() {
        let params = params_for(4, None, None);
        let empty = Tensor::zeros(&[0, 2, 4]);
        let lse = Tensor::zeros(&[2, 0]);
        let none = SeqLayout::prefill(&[]);
        let g = attention_backward(&empty, &empty, &empty, &empty, &lse, &empty, &none, &params)
            .unwrap();
        assert_eq!(g.dq.shape(), &[0, 2, 4]);
        assert_eq!(g.dk.shape(), &[0, 2, 4]);
        // Cached keys but no query this step: all key gradients are zero.
        let kv = Tensor::from_vec(vec![1.0; 5 * 2 * 4], &[5, 2, 4]).unwrap();
        let layout = SeqLayout {
            q_starts: vec![0, 0],
            kv_starts: vec![0, 5],
        };
        let g =
            attention_backward(&empty, &kv, &kv, &empty, &lse, &empty, &layout, &params).unwrap();
        assert_eq!(g.dk.shape(), &[5, 2, 4]);
        assert!(g.dk.as_slice().unwrap().iter().all(|&x| x == 0.0));
        assert!(g.dv.as_slice().unwrap().iter().all(|&x| x == 0.0));
    }

    #[test]
    fn backward_bad_inputs_are_errors() {
        let params = params_for(8, None, None);
        let (tq, h, hkv, d) = (4, 6, 2, 8);
        let q = Tensor::zeros(&[tq, h, d]);
        let kv = Tensor::zeros(&[tq, hkv, d]);
        let ok = SeqLayout::prefill(&[1, 3]);
        let fwd = attention(&q, &kv, &kv, &ok, &params).unwrap();
        let (out, lse) = (&fwd.out, &fwd.lse);
        // Every call below varies one argument of this valid one.
        let run = |k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, d_out: &Tensor| {
            attention_backward(&q, k, v, out, lse, d_out, &ok, &params)
        };
        assert!(run(&kv, &kv, out, lse, out).is_ok());
        let shape_err = |r: Result<AttentionGrads>, name: &str| match r {
            Err(EngineError::Shape { expected, .. }) => {
                assert!(expected.contains(name), "{expected} should name {name}")
            }
            Err(e) => panic!("{name}: expected a shape error, got {e}"),
            Ok(_) => panic!("{name}: expected a shape error, got gradients"),
        };
        // The saved tensors and the output gradient: wrong rows, wrong rank, lse transposed.
        let bad_rows = Tensor::zeros(&[tq + 1, h, d]);
        shape_err(run(&kv, &kv, &bad_rows, lse, out), "out");
        shape_err(run(&kv, &kv, out, lse, &bad_rows), "d_out");
        shape_err(
            run(&kv, &kv, out, lse, &Tensor::zeros(&[tq, h * d])),
            "d_out",
        );
        shape_err(run(&kv, &kv, out, &Tensor::zeros(&[tq, h]), out), "lse");
        shape_err(run(&kv, &kv, out, &Tensor::zeros(&[h * tq]), out), "lse");
        // The forward's own rules: H not a multiple of Hkv, v unlike k.
        let k4 = Tensor::zeros(&[tq, 4, d]);
        shape_err(run(&k4, &k4, out, lse, out), "k");
        assert!(matches!(
            run(&kv, &Tensor::zeros(&[tq, hkv, d + 1]), out, lse, out),
            Err(EngineError::Shape { .. })
        ));
        // Layouts and parameters the forward refuses.
        let arg_err = |layout: &SeqLayout, p: &AttentionParams| {
            matches!(
                attention_backward(&q, &kv, &kv, out, lse, out, layout, p),
                Err(EngineError::Arg { .. })
            )
        };
        let more_queries = SeqLayout {
            q_starts: vec![0, 2, 4],
            kv_starts: vec![0, 1, 4],
        };
        assert!(arg_err(&more_queries, &params));
        assert!(arg_err(&SeqLayout::prefill(&[1, 2]), &params));
        for p in [
            AttentionParams {
                window: Some(0),
                ..params
            },
            AttentionParams {
                softcap: Some(-1.0),
                ..params
            },
            AttentionParams {
                scale: f32::INFINITY,
                ..params
            },
        ] {
            assert!(arg_err(&ok, &p), "{p:?}");
        }
    }
}
