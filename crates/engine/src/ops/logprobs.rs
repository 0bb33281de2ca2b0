//! Log-probs of target tokens under `softcap(hidden · headᵀ [+ u · bᵀ])`, and their gradient,
//! computed in chunks so a [T × V] logits tensor never exists: an online logsumexp over
//! vocabulary chunks.
//!
//! Forward: each rayon task takes `chunks.tokens` rows of `hidden` and walks the vocabulary in
//! slices of `chunks.vocab` rows of `head`: one gemm gives the [tokens × vocab] logits tile
//! (the only scratch), a second adds the optional low-rank term u · bᵀ (LoRA on the LM head),
//! the soft-cap is applied in place, and each row's running statistics are updated — max m,
//! s = Σ e^(l−m), u = Σ e^(l−m)·l, Σ l, the argmax and the target's logit. When the max
//! grows, s and u are rescaled by e^(m_old − m_new). At the end lse = m + ln s,
//! log p = l_target − lse, entropy = lse − u/s, mean logit = Σ l / V.
//!
//! Backward ([`token_logprobs_backward`]): rows whose upstream gradient is 0 (prompt tokens
//! under a completion mask) are dropped first. A forward pass over the remaining rows gives
//! each row's lse; a second pass recomputes each tile and turns it into dz in place:
//! p = e^(l − lse), dl = g·(onehot(target) − p), and through the soft-cap l = c·tanh(z/c),
//! dz = dl·(1 − (l/c)²). Then d_hidden += dz · head, d_u += dz · b and d_b += dzᵀ · u. The
//! second pass runs one task per group of token chunks; d_hidden and d_u rows belong to one
//! group, and d_b, a sum over all rows, gets one [V, R] partial per group, summed in group
//! order at the end (no shared writes, deterministic for a given thread count).
//!
//! On a GPU (cuda/ops/logprobs.rs) the same two passes run with cuBLASLt GEMMs and the
//! kernels of kernels/logprobs.cu; [`check_call`] holds the argument rules both devices apply.
use std::sync::Arc;

use gemm::Parallelism;
use rayon::prelude::*;

use super::linear::{Strided, StridedRef, gemm_strided, matmul_nt};
use crate::cuda::CudaBackend;
use crate::cuda::ops as cuda_ops;
use crate::cuda::ops::logprobs::Call;
use crate::{EngineError, Result, Tensor};

/// Chunk sizes over tokens and vocabulary; their product bounds the scratch memory.
#[derive(Clone, Copy, Debug)]
pub struct LogProbChunks {
    pub tokens: usize,
    pub vocab: usize,
}

impl Default for LogProbChunks {
    fn default() -> Self {
        LogProbChunks {
            tokens: 64,
            vocab: 8192,
        }
    }
}

/// Per-token statistics of the next-token distribution. All [T].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenStats {
    /// log p(target).
    pub logp: Vec<f32>,
    /// Entropy of the distribution (nats).
    pub entropy: Vec<f32>,
    /// Mean of the (capped) logits over the vocabulary.
    pub mean_logit: Vec<f32>,
    /// Most likely token; ties go to the lowest id.
    pub argmax: Vec<u32>,
}

/// The low-rank term of LoRA on the LM head: the logits gain `u · bᵀ` before the soft-cap.
#[derive(Clone, Copy, Debug)]
pub struct LowRank<'a> {
    /// [T, R]: scaling · hidden · Aᵀ (the caller applies LoRA A, dropout and the scaling).
    pub u: &'a Tensor,
    /// [V, R]: LoRA B.
    pub b: &'a Tensor,
}

/// Gradients of Σ_t g_t · log p_t(target_t). Assigned (fresh tensors), not accumulated.
#[derive(Clone, Debug)]
pub struct LogProbGrads {
    /// [T, C]; rows with g = 0 are exactly 0.
    pub d_hidden: Tensor,
    /// Present when the low-rank term is.
    pub d_low_rank: Option<LowRankGrads>,
}

/// Gradients of the low-rank term's operands.
#[derive(Clone, Debug)]
pub struct LowRankGrads {
    /// [T, R]; rows with g = 0 are exactly 0.
    pub d_u: Tensor,
    /// [V, R].
    pub d_b: Tensor,
}

/// hidden: [T, C] (after the final norm), head: [V, C], targets: [T] (each < V).
/// Logits are `softcap(hidden · headᵀ)` with soft-cap tanh(x/c)·c when `final_softcap` is set.
pub fn token_logprobs(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[u32],
    final_softcap: Option<f32>,
    chunks: LogProbChunks,
) -> Result<TokenStats> {
    if let Some(gpu) = cuda_ops::device_of("token_logprobs", &[("hidden", hidden), ("head", head)])?
    {
        return cuda_ops::logprobs::token_logprobs(
            &gpu,
            hidden,
            head,
            targets,
            final_softcap,
            chunks,
        );
    }
    const OP: &str = "token_logprobs";
    let call = check_call(OP, hidden, head, None, targets, final_softcap, chunks)?;
    Ok(Operands::new(&call)?.token_stats())
}

/// [`token_logprobs`] with an optional low-rank term: logits are
/// `softcap(hidden · headᵀ + u · bᵀ)`, u: [T, R], b: [V, R]. Without the term, this is
/// [`token_logprobs`]. On the GPU every operand is bf16 (f32 logits inside).
pub fn token_logprobs_low_rank(
    hidden: &Tensor,
    head: &Tensor,
    low_rank: Option<LowRank<'_>>,
    targets: &[u32],
    final_softcap: Option<f32>,
    chunks: LogProbChunks,
) -> Result<TokenStats> {
    if low_rank.is_none() {
        return token_logprobs(hidden, head, targets, final_softcap, chunks);
    }
    const OP: &str = "token_logprobs_low_rank";
    let gpu = device_of(OP, hidden, head, low_rank)?;
    let call = check_call(OP, hidden, head, low_rank, targets, final_softcap, chunks)?;
    if let Some(gpu) = gpu {
        return cuda_ops::logprobs::token_logprobs_low_rank(&gpu, &call);
    }
    Ok(Operands::new(&call)?.token_stats())
}

/// Gradient of Σ_t d_logp[t] · log p_t(targets[t]) under the logits of
/// [`token_logprobs_low_rank`], with respect to hidden [T, C] and, when `low_rank` is given,
/// u [T, R] and b [V, R]. `head` gets no gradient (it is frozen; LoRA trains A and B through
/// u and b). d_logp: [T], finite; rows where it is 0 cost nothing on the CPU (on the GPU they
/// are computed, as zeros). On the GPU the operands are bf16; d_hidden comes back bf16, d_u
/// and d_b f32.
pub fn token_logprobs_backward(
    d_logp: &[f32],
    hidden: &Tensor,
    head: &Tensor,
    low_rank: Option<LowRank<'_>>,
    targets: &[u32],
    final_softcap: Option<f32>,
    chunks: LogProbChunks,
) -> Result<LogProbGrads> {
    const OP: &str = "token_logprobs_backward";
    let gpu = device_of(OP, hidden, head, low_rank)?;
    let call = check_call(OP, hidden, head, low_rank, targets, final_softcap, chunks)?;
    let t = call.dims[0];
    if d_logp.len() != t {
        return Err(EngineError::Arg {
            op: OP,
            msg: format!(
                "{} upstream gradients (d_logp) for {t} hidden rows",
                d_logp.len(),
            ),
        });
    }
    if let Some((row, g)) = d_logp.iter().enumerate().find(|(_, g)| !g.is_finite()) {
        return Err(EngineError::Arg {
            op: OP,
            msg: format!("upstream gradient d_logp[{row}] is {g}; it must be finite"),
        });
    }
    if let Some(gpu) = gpu {
        return cuda_ops::logprobs::token_logprobs_backward(&gpu, d_logp, &call);
    }
    let all = Operands::new(&call)?;

    let active: Vec<usize> = (0..all.t).filter(|&i| d_logp[i] != 0.0).collect();
    let kept = KeptRows::gather(&all, d_logp, &active);
    let ops = all.with_rows(&kept);
    let lse: Vec<f64> = ops.row_stats().iter().map(RowStats::lse).collect();
    let (d_hid, d_u, d_b) = ops.gradients(&kept.d_logp, &lse);

    let (c, r) = (all.c, all.low_rank.as_ref().map_or(0, |lr| lr.r));
    let d_hidden = Tensor::from_vec(scatter_rows(&d_hid, c, &active, all.t), &[all.t, c])?;
    let d_low_rank = match all.low_rank {
        Some(_) => Some(LowRankGrads {
            d_u: Tensor::from_vec(scatter_rows(&d_u, r, &active, all.t), &[all.t, r])?,
            d_b: Tensor::from_vec(d_b, &[all.v, r])?,
        }),
        None => None,
    };
    Ok(LogProbGrads {
        d_hidden,
        d_low_rank,
    })
}

/// Full logits for a few rows (sampling): hidden [B, C], head [V, C] → [B, V], soft-capped.
pub fn logits(hidden: &Tensor, head: &Tensor, final_softcap: Option<f32>) -> Result<Tensor> {
    if let Some(gpu) = cuda_ops::device_of("logits", &[("hidden", hidden), ("head", head)])? {
        return cuda_ops::logprobs::logits(&gpu, hidden, head, final_softcap);
    }
    const OP: &str = "logits";
    let (b, v, c) = check_head(OP, hidden, head, final_softcap)?;
    let mut out = vec![0.0f32; b * v]; // [B, V]
    matmul_nt(
        &mut out,
        hidden.as_slice()?,
        head.as_slice()?,
        [b, v, c],
        false,
        Parallelism::Rayon(0),
    );
    if let Some(cap) = final_softcap {
        out.par_chunks_mut(1 << 14)
            .for_each(|ch| ch.iter_mut().for_each(|l| *l = softcap(*l, cap)));
    }
    Tensor::from_vec(out, &[b, v])
}

/// Shapes and soft-cap shared by both entry points and the CUDA launchers: returns
/// (rows, V, C).
pub(crate) fn check_head(
    op: &'static str,
    hidden: &Tensor,
    head: &Tensor,
    final_softcap: Option<f32>,
) -> Result<(usize, usize, usize)> {
    let [t, c] = hidden.dims(op, "hidden: [T, C]")?;
    let [v, ch] = head.dims(op, "head: [V, C]")?;
    if ch != c || v == 0 {
        return Err(EngineError::Shape {
            op,
            expected: format!("head: [V ≥ 1, {c}] (C from hidden)"),
            got: head.shape().to_vec(),
        });
    }
    if let Some(cap) = final_softcap
        && !(cap.is_finite() && cap > 0.0)
    {
        return Err(EngineError::Arg {
            op,
            msg: format!("final soft-cap must be positive and finite, got {cap}"),
        });
    }
    Ok((t, v, c))
}

/// The GPU the operands live on (None on the CPU); operands split across devices are the
/// usual mismatch error naming them.
fn device_of(
    op: &'static str,
    hidden: &Tensor,
    head: &Tensor,
    low_rank: Option<LowRank<'_>>,
) -> Result<Option<Arc<CudaBackend>>> {
    let mut inputs = vec![("hidden", hidden), ("head", head)];
    if let Some(lr) = low_rank {
        inputs.extend([("u", lr.u), ("b", lr.b)]);
    }
    cuda_ops::device_of(op, &inputs)
}

/// Every argument rule of a call, shared by the CPU path and the CUDA launchers: shapes,
/// soft-cap, targets (one per row, each < V), chunk sizes ≥ 1 and the low-rank shapes.
/// Returns the call with its [T, V, C, R] (R = 0 without a low-rank term), for either device.
fn check_call<'a>(
    op: &'static str,
    hidden: &'a Tensor,
    head: &'a Tensor,
    low_rank: Option<LowRank<'a>>,
    targets: &'a [u32],
    final_softcap: Option<f32>,
    chunks: LogProbChunks,
) -> Result<Call<'a>> {
    let (t, v, c) = check_head(op, hidden, head, final_softcap)?;
    if targets.len() != t {
        return Err(EngineError::Arg {
            op,
            msg: format!("{} targets for {t} hidden rows", targets.len()),
        });
    }
    if let Some(&bad) = targets.iter().find(|&&id| id as usize >= v) {
        return Err(EngineError::Index {
            op,
            index: bad as usize,
            limit: v,
        });
    }
    if chunks.tokens == 0 || chunks.vocab == 0 {
        return Err(EngineError::Arg {
            op,
            msg: format!("chunk sizes must be ≥ 1, got {chunks:?}"),
        });
    }
    let r = match low_rank {
        Some(lr) => check_low_rank(op, lr, t, v)?,
        None => 0,
    };
    Ok(Call {
        hidden,
        head,
        low_rank,
        targets,
        final_softcap,
        chunks,
        dims: [t, v, c, r],
    })
}

/// tanh(x / c) · c, in HF's order of operations.
fn softcap(x: f32, c: f32) -> f32 {
    (x / c).tanh() * c
}

/// Tasks of the outer rayon loop → parallelism inside each task's gemms: with too few tasks
/// to occupy every thread, let gemm split each tile instead.
fn inner_parallelism(tasks: usize) -> Parallelism {
    if tasks >= rayon::current_num_threads() {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// The checked CPU operands of one call; every loop over logits tiles reads from here.
struct Operands<'a> {
    hidden: &'a [f32], // [T, C]
    head: &'a [f32],   // [V, C]
    low_rank: Option<LowRankRows<'a>>,
    targets: &'a [u32], // [T]
    final_softcap: Option<f32>,
    chunks: LogProbChunks,
    t: usize,
    v: usize,
    c: usize,
}

/// The low-rank operands as slices.
#[derive(Clone, Copy)]
struct LowRankRows<'a> {
    u: &'a [f32], // [T, R]
    b: &'a [f32], // [V, R]
    r: usize,
}

impl<'a> Operands<'a> {
    /// The operands of a call that [`check_call`] has passed.
    fn new(call: &Call<'a>) -> Result<Operands<'a>> {
        let Call {
            hidden,
            head,
            low_rank,
            targets,
            final_softcap,
            chunks,
            dims: [t, v, c, r],
        } = *call;
        let low_rank = match low_rank {
            Some(lr) => Some(LowRankRows {
                u: lr.u.as_slice()?,
                b: lr.b.as_slice()?,
                r,
            }),
            None => None,
        };
        Ok(Operands {
            hidden: hidden.as_slice()?,
            head: head.as_slice()?,
            low_rank,
            targets,
            final_softcap,
            chunks,
            t,
            v,
            c,
        })
    }

    /// The same call restricted to the rows `kept` holds (gathered from this one).
    fn with_rows<'b>(&self, kept: &'b KeptRows) -> Operands<'b>
    where
        'a: 'b,
    {
        Operands {
            hidden: &kept.hidden,
            low_rank: self.low_rank.map(|lr| LowRankRows { u: &kept.u, ..lr }),
            targets: &kept.targets,
            t: kept.targets.len(),
            ..*self
        }
    }

    /// Token chunk; larger than the data would only enlarge the scratch.
    fn tc(&self) -> usize {
        self.chunks.tokens.min(self.t.max(1))
    }

    /// Vocabulary chunk, likewise.
    fn vc(&self) -> usize {
        self.chunks.vocab.min(self.v)
    }

    fn token_stats(&self) -> TokenStats {
        let rows = self.row_stats();
        let mut out = TokenStats {
            logp: Vec::with_capacity(self.t),
            entropy: Vec::with_capacity(self.t),
            mean_logit: Vec::with_capacity(self.t),
            argmax: Vec::with_capacity(self.t),
        };
        for st in &rows {
            let lse = st.lse();
            out.logp.push((st.target_logit as f64 - lse) as f32);
            out.entropy
                .push((lse - st.sum_exp_logit / st.sum_exp) as f32);
            out.mean_logit.push((st.sum_logit / self.v as f64) as f32);
            out.argmax.push(st.argmax as u32);
        }
        out
    }

    /// The forward core: each row's statistics over the whole vocabulary, one rayon task per
    /// token chunk.
    fn row_stats(&self) -> Vec<RowStats> {
        let tc = self.tc();
        let mut rows = vec![RowStats::default(); self.t];
        let inner = inner_parallelism(self.t.div_ceil(tc));
        rows.par_chunks_mut(tc)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (chunk, stats)| {
                let (t0, n) = (chunk * tc, stats.len());
                let tgt = &self.targets[t0..t0 + n];
                self.sweep_vocab(t0, n, scratch, inner, |v0, w, logits| {
                    for ((st, row), &target) in
                        stats.iter_mut().zip(logits.chunks_exact(w)).zip(tgt)
                    {
                        st.update(row, v0, target as usize);
                    }
                });
            });
        rows
    }

    /// Walks the vocabulary in chunks for rows `t0..t0 + n` (n ≤ the token chunk), handing
    /// each capped logits tile [n, w] of ids `v0..v0 + w` to `visit(v0, w, tile)`, which may
    /// overwrite it.
    fn sweep_vocab(
        &self,
        t0: usize,
        n: usize,
        scratch: &mut Vec<f32>,
        inner: Parallelism,
        mut visit: impl FnMut(usize, usize, &mut [f32]),
    ) {
        let (c, v, vc) = (self.c, self.v, self.vc());
        scratch.resize(self.tc() * vc, 0.0);
        let hid = &self.hidden[t0 * c..(t0 + n) * c]; // [n, C]
        for v0 in (0..v).step_by(vc) {
            let w = vc.min(v - v0);
            let tile = &mut scratch[..n * w]; // [n, w]
            let head = &self.head[v0 * c..(v0 + w) * c]; // [w, C]
            matmul_nt(tile, hid, head, [n, w, c], false, inner);
            if let Some(LowRankRows { u, b, r }) = self.low_rank {
                let (u, b) = (&u[t0 * r..(t0 + n) * r], &b[v0 * r..(v0 + w) * r]); // [n, R], [w, R]
                matmul_nt(tile, u, b, [n, w, r], true, inner);
            }
            if let Some(cap) = self.final_softcap {
                tile.iter_mut().for_each(|l| *l = softcap(*l, cap));
            }
            visit(v0, w, tile);
        }
    }

    /// The gradient pass, given each row's upstream gradient g [T] and lse [T]: returns
    /// d_hidden [T, C], d_u [T, R] and d_b [V, R] (the last two empty without a low-rank
    /// term).
    fn gradients(&self, g: &[f32], lse: &[f64]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (t, c, v) = (self.t, self.c, self.v);
        let r = self.low_rank.as_ref().map_or(0, |lr| lr.r);
        let (mut d_hid, mut d_u) = (vec![0.0f32; t * c], vec![0.0f32; t * r]);
        let mut d_b = vec![0.0f32; v * r];
        if t == 0 {
            return (d_hid, d_u, d_b);
        }
        // As many groups of whole token chunks as threads: each group owns its rows of d_hid
        // and d_u and sums its own d_b partial, so memory for partials is threads × V × R.
        let tc = self.tc();
        let n_chunks = t.div_ceil(tc);
        let group_rows = tc * n_chunks.div_ceil(rayon::current_num_threads());
        let groups: Vec<_> = split_rows(&mut d_hid, c, t, group_rows)
            .into_iter()
            .zip(split_rows(&mut d_u, r, t, group_rows))
            .enumerate()
            .collect();
        let inner = inner_parallelism(groups.len());
        let partials: Vec<Vec<f32>> = groups
            .into_par_iter()
            .map_init(Vec::new, |scratch, (group, (dh, du))| {
                let g0 = group * group_rows;
                let mut d_b = vec![0.0f32; v * r];
                for t0 in (g0..t.min(g0 + group_rows)).step_by(tc) {
                    let n = tc.min(t - t0);
                    let dh = &mut dh[(t0 - g0) * c..(t0 - g0 + n) * c]; // [n, C]
                    let du = &mut du[(t0 - g0) * r..(t0 - g0 + n) * r]; // [n, R]
                    self.sweep_vocab(t0, n, scratch, inner, |v0, w, tile| {
                        self.tile_to_dz(tile, t0, v0, w, g, lse);
                        self.accumulate_tile(tile, t0, v0, w, dh, du, &mut d_b, inner);
                    });
                }
                d_b
            })
            .collect();
        for part in &partials {
            d_b.iter_mut().zip(part).for_each(|(acc, &p)| *acc += p);
        }
        (d_hid, d_u, d_b)
    }

    /// Capped logits tile [n, w] (rows t0.., ids v0..) → dz, the gradient with respect to the
    /// logits before the soft-cap, in place.
    fn tile_to_dz(&self, tile: &mut [f32], t0: usize, v0: usize, w: usize, g: &[f32], lse: &[f64]) {
        for (i, row) in tile.chunks_exact_mut(w).enumerate() {
            let (gi, lse, target) = (g[t0 + i], lse[t0 + i], self.targets[t0 + i] as usize);
            for (j, l) in row.iter_mut().enumerate() {
                let p = ((*l as f64 - lse) as f32).exp();
                let onehot = if v0 + j == target { 1.0 } else { 0.0 };
                let dl = gi * (onehot - p);
                *l = match self.final_softcap {
                    // d(c·tanh(z/c))/dz = 1 − tanh² = 1 − (l/c)².
                    Some(cap) => {
                        let s = *l / cap;
                        dl * (1.0 - s * s)
                    }
                    None => dl,
                };
            }
        }
    }

    /// Folds one dz tile [n, w] (rows t0.., ids v0..) into the row-owned gradients
    /// dh [n, C] and du [n, R] and into this group's d_b partial [V, R].
    #[allow(clippy::too_many_arguments)]
    fn accumulate_tile(
        &self,
        dz: &[f32],
        t0: usize,
        v0: usize,
        w: usize,
        dh: &mut [f32],
        du: &mut [f32],
        d_b: &mut [f32],
        inner: Parallelism,
    ) {
        let (n, c) = (dz.len() / w, self.c);
        // dst [n, width] += dz [n, w] · the tile's `width`-wide rows [w, width] of `per_id`.
        let add_dz_times = |dst: &mut [f32], per_id: &[f32], width: usize| {
            let rows = &per_id[v0 * width..(v0 + w) * width];
            gemm_strided(
                Strided::rows(dst, width),
                StridedRef::rows(dz, w),
                StridedRef::rows(rows, width),
                [n, width, w],
                true,
                1.0,
                inner,
            )
        };
        // dh [n, C] += dz [n, w] · head [w, C].
        add_dz_times(dh, self.head, c);
        let Some(LowRankRows { u, b, r }) = self.low_rank else {
            return;
        };
        // du [n, R] += dz [n, w] · b [w, R].
        add_dz_times(du, b, r);
        // d_b [w, R] += dzᵀ [w, n] · u [n, R]; dzᵀ(j, i) is dz[i·w + j].
        let dz_t = StridedRef::transposed(dz, w);
        let d_b = Strided::rows(&mut d_b[v0 * r..(v0 + w) * r], r);
        let u = &u[t0 * r..(t0 + n) * r];
        gemm_strided(
            d_b,
            dz_t,
            StridedRef::rows(u, r),
            [w, r, n],
            true,
            1.0,
            inner,
        );
    }
}

/// Checks u [T, R] and b [V, R] against the T of hidden and the V of head; returns R.
fn check_low_rank(op: &'static str, low_rank: LowRank<'_>, t: usize, v: usize) -> Result<usize> {
    let [tu, r] = low_rank.u.dims(op, "u: [T, R]")?;
    if tu != t {
        return Err(EngineError::Shape {
            op,
            expected: format!("u: [{t}, R] (T from hidden)"),
            got: low_rank.u.shape().to_vec(),
        });
    }
    if low_rank.b.shape() != [v, r] {
        return Err(EngineError::Shape {
            op,
            expected: format!("b: [{v}, {r}] (V from head, R from u)"),
            got: low_rank.b.shape().to_vec(),
        });
    }
    Ok(r)
}

/// The rows of a backward call that have a nonzero upstream gradient, copied contiguous so
/// the chunk loops see a dense batch.
struct KeptRows {
    hidden: Vec<f32>,  // [K, C]
    u: Vec<f32>,       // [K, R], empty without a low-rank term
    targets: Vec<u32>, // [K]
    d_logp: Vec<f32>,  // [K]
}

impl KeptRows {
    fn gather(all: &Operands<'_>, d_logp: &[f32], rows: &[usize]) -> KeptRows {
        let gather = |src: &[f32], width: usize| -> Vec<f32> {
            rows.iter()
                .flat_map(|&i| &src[i * width..(i + 1) * width])
                .copied()
                .collect()
        };
        KeptRows {
            hidden: gather(all.hidden, all.c),
            u: all.low_rank.map_or(Vec::new(), |lr| gather(lr.u, lr.r)),
            targets: rows.iter().map(|&i| all.targets[i]).collect(),
            d_logp: rows.iter().map(|&i| d_logp[i]).collect(),
        }
    }
}

/// The inverse of the gather: `src` [K, width] rows to rows `rows` of a zero [t, width].
fn scatter_rows(src: &[f32], width: usize, rows: &[usize], t: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; t * width];
    for (k, &i) in rows.iter().enumerate() {
        out[i * width..(i + 1) * width].copy_from_slice(&src[k * width..(k + 1) * width]);
    }
    out
}

/// Splits a [t, width] buffer into consecutive blocks of `rows` rows (the last may be
/// shorter); unlike `chunks_mut`, it also works for width 0 (one empty block per group).
fn split_rows(mut buf: &mut [f32], width: usize, t: usize, rows: usize) -> Vec<&mut [f32]> {
    (0..t)
        .step_by(rows)
        .map(|t0| {
            let (block, rest) = std::mem::take(&mut buf).split_at_mut(rows.min(t - t0) * width);
            buf = rest;
            block
        })
        .collect()
}

/// One row's running statistics over the vocabulary seen so far.
///
/// The sums are f64: a row sums up to ~256k terms, and the cost is small next to the gemm.
#[derive(Clone, Debug)]
struct RowStats {
    max: f32,
    /// Σ e^(l − max).
    sum_exp: f64,
    /// Σ e^(l − max) · l.
    sum_exp_logit: f64,
    /// Σ l.
    sum_logit: f64,
    argmax: usize,
    target_logit: f32,
}

impl Default for RowStats {
    fn default() -> Self {
        RowStats {
            max: f32::NEG_INFINITY,
            sum_exp: 0.0,
            sum_exp_logit: 0.0,
            sum_logit: 0.0,
            argmax: 0,
            target_logit: f32::NAN,
        }
    }
}

impl RowStats {
    /// ln Σ e^l over the whole vocabulary, once every chunk is folded in.
    fn lse(&self) -> f64 {
        self.max as f64 + self.sum_exp.ln()
    }

    /// Folds in the logits of vocabulary ids `v0..v0 + row.len()`.
    fn update(&mut self, row: &[f32], v0: usize, target: usize) {
        // Chunk max and its first position: a strict `>` keeps the lowest id on ties, and
        // chunks arrive in increasing id order, so the merge below does too.
        let (mut cmax, mut cpos) = (f32::NEG_INFINITY, 0);
        for (j, &l) in row.iter().enumerate() {
            if l > cmax {
                (cmax, cpos) = (l, j);
            }
        }
        if cmax > self.max {
            if self.sum_exp > 0.0 {
                let r = ((self.max - cmax) as f64).exp();
                self.sum_exp *= r;
                self.sum_exp_logit *= r;
            }
            self.max = cmax;
            self.argmax = v0 + cpos;
        }
        let m = self.max;
        let (mut s, mut u, mut sum) = (0.0f64, 0.0f64, 0.0f64);
        for &l in row {
            let e = (l - m).exp() as f64;
            s += e;
            u += e * l as f64;
            sum += l as f64;
        }
        self.sum_exp += s;
        self.sum_exp_logit += u;
        self.sum_logit += sum;
        if (v0..v0 + row.len()).contains(&target) {
            self.target_logit = row[target - v0];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{Rng, assert_close};

    /// Per-row (log p(target), entropy, mean logit, argmax) of an f64 reference.
    type Stats = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<u32>);

    /// Full f64 logits and log-softmax statistics per row, without a low-rank term.
    fn naive(hidden: &[f32], head: &[f32], targets: &[u32], cap: Option<f64>, c: usize) -> Stats {
        let f64s = |x: &[f32]| x.iter().map(|&x| x as f64).collect::<Vec<_>>();
        Naive {
            hidden: f64s(hidden),
            head: f64s(head),
            low_rank: None,
            targets: targets.to_vec(),
            cap,
            c,
            r: 0,
        }
        .stats()
    }

    /// The op's statistics against the reference's: log-probs, entropy and mean within
    /// 1e-5 + 1e-6·|want| (logits are O(4) f32 dot products, ≈1e-6 error, and logsumexp
    /// adds a few ulps), the argmax exactly.
    #[track_caller]
    fn assert_stats_close(what: &str, s: &TokenStats, (lp, ent, mean, arg): &Stats) {
        assert_close(&format!("logp {what}"), &s.logp, lp, 1e-5, 1e-6);
        assert_close(&format!("entropy {what}"), &s.entropy, ent, 1e-5, 1e-6);
        assert_close(&format!("mean {what}"), &s.mean_logit, mean, 1e-5, 1e-6);
        assert_eq!(&s.argmax, arg, "argmax {what}");
    }

    #[test]
    fn chunked_stats_match_full_log_softmax() {
        let mut rng = Rng::new(12);
        let (t, v, c) = (37, 1003, 19);
        let hidden = rng.vec(t * c, -1.0, 1.0);
        let head = rng.vec(v * c, -1.0, 1.0);
        let targets: Vec<u32> = (0..t).map(|_| rng.below(v) as u32).collect();
        let ht = Tensor::from_vec(hidden.clone(), &[t, c]).unwrap();
        let wt = Tensor::from_vec(head.clone(), &[v, c]).unwrap();
        for cap in [None, Some(2.5f32)] {
            let want = naive(&hidden, &head, &targets, cap.map(|c| c as f64), c);
            // Vocab chunks of 1, a non-divisor, exactly V, and past V; token chunks of 1,
            // a non-divisor and past T.
            for (tokens, vocab) in [(1, 1), (5, 64), (16, 1003), (64, 5000), (37, 100)] {
                let s = token_logprobs(&ht, &wt, &targets, cap, LogProbChunks { tokens, vocab })
                    .unwrap();
                assert_stats_close(&format!("cap {cap:?} chunks {tokens}×{vocab}"), &s, &want);
            }
        }
    }

    #[test]
    fn argmax_ties_go_to_the_lowest_id() {
        // Rows of head repeat, so logits tie exactly; the tied maxima straddle chunk edges.
        let c = 3;
        let base = [[0.1f32, 0.2, 0.3], [1.0, -1.0, 0.5], [0.3, 0.2, 0.1]];
        let pattern = [0usize, 2, 1, 0, 1, 2, 1, 1];
        let head: Vec<f32> = pattern.iter().flat_map(|&p| base[p]).collect();
        let wt = Tensor::from_vec(head, &[pattern.len(), c]).unwrap();
        let hidden = Tensor::from_vec(vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0], &[2, c]).unwrap();
        // Row 0 picks x → max 1.0 at ids 2, 4, 6, 7; row 1 picks z → max 0.5 at the same ids
        // (base[0] gives 0.3 at ids 0 and 3).
        for vocab in [1, 2, 3, 5, 8, 100] {
            let s = token_logprobs(
                &hidden,
                &wt,
                &[0, 0],
                None,
                LogProbChunks { tokens: 1, vocab },
            )
            .unwrap();
            assert_eq!(s.argmax, vec![2, 2], "vocab chunk {vocab}");
        }
    }

    #[test]
    fn uniform_logits_have_known_values() {
        // All-zero hidden: every logit is 0, so p = 1/V, entropy = ln V, mean 0, argmax 0.
        let (t, v, c) = (3, 10, 4);
        let s = token_logprobs(
            &Tensor::zeros(&[t, c]),
            &Tensor::from_vec(vec![0.5; v * c], &[v, c]).unwrap(),
            &[9, 0, 4],
            Some(30.0),
            LogProbChunks {
                tokens: 2,
                vocab: 3,
            },
        )
        .unwrap();
        let ln_v = (v as f32).ln();
        for i in 0..t {
            assert!((s.logp[i] + ln_v).abs() < 1e-6);
            assert!((s.entropy[i] - ln_v).abs() < 1e-6);
            assert_eq!(s.mean_logit[i], 0.0);
            assert_eq!(s.argmax[i], 0);
        }
    }

    #[test]
    fn logits_match_f64_reference() {
        let mut rng = Rng::new(13);
        let (b, v, c) = (3, 517, 33);
        let hidden = rng.vec(b * c, -1.0, 1.0);
        let head = rng.vec(v * c, -1.0, 1.0);
        let ht = Tensor::from_vec(hidden.clone(), &[b, c]).unwrap();
        let wt = Tensor::from_vec(head.clone(), &[v, c]).unwrap();
        for cap in [None, Some(3.0f32)] {
            let got = logits(&ht, &wt, cap).unwrap();
            assert_eq!(got.shape(), &[b, v]);
            let want: Vec<f64> = hidden
                .chunks(c)
                .flat_map(|r| {
                    head.chunks(c).map(move |w| {
                        let l: f64 = r.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
                        cap.map_or(l, |c| (l / c as f64).tanh() * c as f64)
                    })
                })
                .collect();
            assert_close("logits", got.as_slice().unwrap(), &want, 5e-6, 1e-6);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let h = Tensor::zeros(&[2, 4]);
        let w = Tensor::zeros(&[10, 4]);
        let ch = LogProbChunks::default();
        match token_logprobs(&h, &w, &[1, 10], None, ch) {
            Err(EngineError::Index { index, limit, .. }) => assert_eq!((index, limit), (10, 10)),
            other => panic!("expected an index error, got {other:?}"),
        }
        assert!(matches!(
            token_logprobs(&h, &w, &[1], None, ch),
            Err(EngineError::Arg { .. })
        ));
        let zero = LogProbChunks {
            tokens: 0,
            vocab: 8,
        };
        assert!(matches!(
            token_logprobs(&h, &w, &[1, 2], None, zero),
            Err(EngineError::Arg { .. })
        ));
        let zero = LogProbChunks {
            tokens: 8,
            vocab: 0,
        };
        assert!(matches!(
            token_logprobs(&h, &w, &[1, 2], None, zero),
            Err(EngineError::Arg { .. })
        ));
        assert!(matches!(
            token_logprobs(&h, &w, &[1, 2], Some(0.0), ch),
            Err(EngineError::Arg { .. })
        ));
        let w5 = Tensor::zeros(&[10, 5]);
        assert!(matches!(
            token_logprobs(&h, &w5, &[1, 2], None, ch),
            Err(EngineError::Shape { .. })
        ));
        assert!(matches!(
            logits(&h, &w5, None),
            Err(EngineError::Shape { .. })
        ));
        let empty_vocab = Tensor::zeros(&[0, 4]);
        assert!(matches!(
            logits(&h, &empty_vocab, None),
            Err(EngineError::Shape { .. })
        ));
        // No rows is not an error: empty statistics.
        let s = token_logprobs(&Tensor::zeros(&[0, 4]), &w, &[], None, ch).unwrap();
        assert!(s.logp.is_empty());
    }

    /// f64 operands for the independent reference of the low-rank forward and its gradient.
    struct Naive {
        hidden: Vec<f64>,                       // [T, C]
        head: Vec<f64>,                         // [V, C]
        low_rank: Option<(Vec<f64>, Vec<f64>)>, // u [T, R], b [V, R]
        targets: Vec<u32>,                      // [T]
        cap: Option<f64>,
        c: usize,
        r: usize,
    }

    impl Naive {
        /// Full f64 logits row by row: softcap(hidden · headᵀ + u · bᵀ).
        fn logits(&self) -> Vec<Vec<f64>> {
            let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
            (0..self.targets.len())
                .map(|i| {
                    let x = &self.hidden[i * self.c..(i + 1) * self.c];
                    self.head
                        .chunks(self.c)
                        .enumerate()
                        .map(|(j, w)| {
                            let mut l = dot(x, w);
                            if let Some((u, b)) = &self.low_rank {
                                let r = self.r;
                                l += dot(&u[i * r..(i + 1) * r], &b[j * r..(j + 1) * r]);
                            }
                            self.cap.map_or(l, |c| (l / c).tanh() * c)
                        })
                        .collect()
                })
                .collect()
        }

        /// (log p(target), entropy, mean logit, argmax) per row.
        fn stats(&self) -> Stats {
            let (mut lp, mut ent, mut mean, mut arg) = (vec![], vec![], vec![], vec![]);
            for (logits, &tgt) in self.logits().iter().zip(&self.targets) {
                let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
                lp.push(logits[tgt as usize] - lse);
                ent.push(
                    -logits
                        .iter()
                        .map(|l| (l - lse).exp() * (l - lse))
                        .sum::<f64>(),
                );
                mean.push(logits.iter().sum::<f64>() / logits.len() as f64);
                arg.push(logits.iter().position(|&l| l == m).unwrap() as u32);
            }
            (lp, ent, mean, arg)
        }

        /// Σ_t g_t · log p_t.
        fn loss(&self, g: &[f32]) -> f64 {
            self.stats()
                .0
                .iter()
                .zip(g)
                .map(|(lp, &g)| lp * g as f64)
                .sum()
        }

        /// Central finite differences of [`Naive::loss`] with respect to every element of
        /// the operand `pick` selects.
        fn finite_diff(&mut self, g: &[f32], pick: fn(&mut Naive) -> &mut Vec<f64>) -> Vec<f64> {
            // f64 loss: step h leaves O(h²) truncation and O(1e-16 / h) rounding, both far
            // below the f32 errors under test.
            const H: f64 = 1e-4;
            (0..pick(self).len())
                .map(|k| {
                    let x = pick(self)[k];
                    pick(self)[k] = x + H;
                    let up = self.loss(g);
                    pick(self)[k] = x - H;
                    let down = self.loss(g);
                    pick(self)[k] = x;
                    (up - down) / (2.0 * H)
                })
                .collect()
        }
    }

    /// A random problem: f32 tensors and their exact f64 copies.
    struct Problem {
        hidden: Tensor,
        head: Tensor,
        u: Tensor,
        b: Tensor,
        targets: Vec<u32>,
        naive: Naive,
    }

    impl Problem {
        fn new(seed: u64, (t, v, c, r): (usize, usize, usize, usize), with_u: bool) -> Problem {
            let mut rng = Rng::new(seed);
            let hidden = rng.vec(t * c, -1.0, 1.0);
            let head = rng.vec(v * c, -1.0, 1.0);
            let u = rng.vec(t * r, -1.0, 1.0);
            let b = rng.vec(v * r, -1.0, 1.0);
            let targets: Vec<u32> = (0..t).map(|_| rng.below(v) as u32).collect();
            let f64s = |x: &[f32]| x.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let naive = Naive {
                hidden: f64s(&hidden),
                head: f64s(&head),
                low_rank: with_u.then(|| (f64s(&u), f64s(&b))),
                targets: targets.clone(),
                cap: None,
                c,
                r,
            };
            Problem {
                hidden: Tensor::from_vec(hidden, &[t, c]).unwrap(),
                head: Tensor::from_vec(head, &[v, c]).unwrap(),
                u: Tensor::from_vec(u, &[t, r]).unwrap(),
                b: Tensor::from_vec(b, &[v, r]).unwrap(),
                targets,
                naive,
            }
        }

        fn low_rank(&self) -> Option<LowRank<'_>> {
            self.naive.low_rank.as_ref().map(|_| LowRank {
                u: &self.u,
                b: &self.b,
            })
        }
    }

    #[test]
    fn low_rank_forward_matches_f64_reference() {
        let mut p = Problem::new(21, (29, 517, 13, 4), true);
        for cap in [None, Some(2.0f32)] {
            p.naive.cap = cap.map(f64::from);
            let want = p.naive.stats();
            for (tokens, vocab) in [(1, 1), (4, 64), (7, 517), (64, 5000)] {
                let ch = LogProbChunks { tokens, vocab };
                let s =
                    token_logprobs_low_rank(&p.hidden, &p.head, p.low_rank(), &p.targets, cap, ch)
                        .unwrap();
                // Logits are O(4) sums of 17 f32 products (≈1e-6 error), as in the test above.
                assert_stats_close(&format!("cap {cap:?} chunks {tokens}×{vocab}"), &s, &want);
            }
        }
    }

    #[test]
    fn low_rank_none_or_zero_b_is_token_logprobs_bit_for_bit() {
        let p = Problem::new(22, (19, 301, 11, 3), true);
        // LoRA's B starts at zero, so a fresh adapter must leave the statistics untouched.
        let zero_b = Tensor::zeros(&[301, 3]);
        for cap in [None, Some(1.5f32)] {
            for (tokens, vocab) in [(1, 7), (8, 100), (64, 8192)] {
                let ch = LogProbChunks { tokens, vocab };
                let plain = token_logprobs(&p.hidden, &p.head, &p.targets, cap, ch).unwrap();
                let none =
                    token_logprobs_low_rank(&p.hidden, &p.head, None, &p.targets, cap, ch).unwrap();
                assert_eq!(none, plain, "None, cap {cap:?} chunks {tokens}×{vocab}");
                let lr = Some(LowRank {
                    u: &p.u,
                    b: &zero_b,
                });
                let zero =
                    token_logprobs_low_rank(&p.hidden, &p.head, lr, &p.targets, cap, ch).unwrap();
                assert_eq!(zero, plain, "zero b, cap {cap:?} chunks {tokens}×{vocab}");
            }
        }
    }

    /// Runs the backward at several chunk shapes and thread counts and checks it against
    /// finite differences of the f64 reference.
    fn check_backward_against_finite_differences(p: &mut Problem, g: &[f32], cap: Option<f32>) {
        p.naive.cap = cap.map(f64::from);
        let want_hidden = p.naive.finite_diff(g, |n| &mut n.hidden);
        let want_low_rank = p.naive.low_rank.is_some().then(|| {
            (
                p.naive
                    .finite_diff(g, |n| &mut n.low_rank.as_mut().unwrap().0),
                p.naive
                    .finite_diff(g, |n| &mut n.low_rank.as_mut().unwrap().1),
            )
        });
        let what = format!("cap {cap:?} low rank {}", want_low_rank.is_some());
        // Token chunks of 1, a non-divisor of T and past T; vocab chunks of 1, a non-divisor,
        // exactly V and past V. Thread counts change the groups that split the d_b sum.
        for (tokens, vocab, threads) in
            [(1, 1, 1), (4, 16, 3), (3, 203, 2), (64, 1000, 7), (2, 7, 5)]
        {
            let ch = LogProbChunks { tokens, vocab };
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool
                .install(|| {
                    token_logprobs_backward(
                        g,
                        &p.hidden,
                        &p.head,
                        p.low_rank(),
                        &p.targets,
                        cap,
                        ch,
                    )
                })
                .unwrap();
            let what = format!("{what} chunks {tokens}×{vocab} threads {threads}");
            // f32 sums of ≤ 203 terms of size ≤ |g|·|head| ≈ 1 against finite differences
            // good to ≈ 1e-9; gradients are up to 0.7 and the largest error seen was 2.5e-7.
            let (abs, rel) = (1e-6, 1e-5);
            let d_hidden = got.d_hidden.as_slice().unwrap();
            assert_close(
                &format!("d_hidden {what}"),
                d_hidden,
                &want_hidden,
                abs,
                rel,
            );
            match (&got.d_low_rank, &want_low_rank) {
                (Some(grads), Some((d_u, d_b))) => {
                    let got_u = grads.d_u.as_slice().unwrap();
                    assert_close(&format!("d_u {what}"), got_u, d_u, abs, rel);
                    let got_b = grads.d_b.as_slice().unwrap();
                    assert_close(&format!("d_b {what}"), got_b, d_b, abs, rel);
                }
                (None, None) => {}
                _ => panic!("{what}: low-rank gradients present iff the term is"),
            }
            // Rows with no upstream gradient are skipped: exactly zero, not just small.
            let c = p.naive.c;
            for (i, _) in g.iter().enumerate().filter(|(_, g)| **g == 0.0) {
                assert!(d_hidden[i * c..(i + 1) * c].iter().all(|&x| x == 0.0));
                if let Some(grads) = &got.d_low_rank {
                    let r = p.naive.r;
                    let du = &grads.d_u.as_slice().unwrap()[i * r..(i + 1) * r];
                    assert!(du.iter().all(|&x| x == 0.0), "{what}: d_u row {i}");
                }
            }
        }
    }

    /// Upstream gradients for 11 rows: a masked prompt (rows 0..3), a masked row inside, and
    /// mixed signs, as DPO gives chosen and rejected rows.
    fn upstream(rng: &mut Rng, t: usize) -> Vec<f32> {
        (0..t)
            .map(|i| {
                if i < 3 || i == 7 {
                    0.0
                } else {
                    rng.uniform(-1.0, 1.0)
                }
            })
            .collect()
    }

    #[test]
    fn backward_matches_finite_differences() {
        // T = 11 and V = 203 are not multiples of the chunk sizes above.
        let shape = (11, 203, 7, 3);
        let g = upstream(&mut Rng::new(30), shape.0);
        for with_u in [false, true] {
            for cap in [None, Some(1.5f32)] {
                let mut p = Problem::new(31, shape, with_u);
                check_backward_against_finite_differences(&mut p, &g, cap);
            }
        }
    }

    #[test]
    fn backward_with_a_soft_cap_that_saturates() {
        // Larger logits (hidden in ±1, C = 24, so |logit| up to ~8) against a cap of 1: tanh
        // is deep in its flat part, where 1 − (l/c)² is small and easy to get wrong.
        let shape = (11, 97, 24, 2);
        let g = upstream(&mut Rng::new(32), shape.0);
        let mut p = Problem::new(33, shape, true);
        check_backward_against_finite_differences(&mut p, &g, Some(1.0));
    }

    #[test]
    fn backward_with_no_upstream_gradient_is_zero() {
        let p = Problem::new(34, (5, 40, 6, 2), true);
        let ch = LogProbChunks {
            tokens: 2,
            vocab: 9,
        };
        let got = token_logprobs_backward(
            &[0.0; 5],
            &p.hidden,
            &p.head,
            p.low_rank(),
            &p.targets,
            Some(3.0),
            ch,
        )
        .unwrap();
        assert_eq!(got.d_hidden.shape(), &[5, 6]);
        assert!(got.d_hidden.as_slice().unwrap().iter().all(|&x| x == 0.0));
        let grads = got.d_low_rank.unwrap();
        assert_eq!(grads.d_u.shape(), &[5, 2]);
        assert_eq!(grads.d_b.shape(), &[40, 2]);
        assert!(grads.d_u.as_slice().unwrap().iter().all(|&x| x == 0.0));
        assert!(grads.d_b.as_slice().unwrap().iter().all(|&x| x == 0.0));
        // No rows at all: empty gradients of the right shapes.
        let none =
            token_logprobs_backward(&[], &Tensor::zeros(&[0, 6]), &p.head, None, &[], None, ch)
                .unwrap();
        assert_eq!(none.d_hidden.shape(), &[0, 6]);
        assert!(none.d_low_rank.is_none());
    }

    #[test]
    fn bad_low_rank_and_backward_inputs_are_errors() {
        let (h, w) = (Tensor::zeros(&[2, 4]), Tensor::zeros(&[10, 4]));
        let (u, b) = (Tensor::zeros(&[2, 3]), Tensor::zeros(&[10, 3]));
        let ch = LogProbChunks::default();
        let shape_error = |lr: LowRank<'_>| {
            let fwd = token_logprobs_low_rank(&h, &w, Some(lr), &[1, 2], None, ch);
            let bwd = token_logprobs_backward(&[1.0, 1.0], &h, &w, Some(lr), &[1, 2], None, ch);
            matches!(fwd, Err(EngineError::Shape { .. }))
                && matches!(bwd, Err(EngineError::Shape { .. }))
        };
        let u3 = Tensor::zeros(&[3, 3]); // T from hidden is 2
        let b_r = Tensor::zeros(&[10, 2]); // R from u is 3
        let b_v = Tensor::zeros(&[9, 3]); // V from head is 10
        let u_1d = Tensor::zeros(&[6]);
        assert!(shape_error(LowRank { u: &u3, b: &b }));
        assert!(shape_error(LowRank { u: &u, b: &b_r }));
        assert!(shape_error(LowRank { u: &u, b: &b_v }));
        assert!(shape_error(LowRank { u: &u_1d, b: &b }));
        let lr = Some(LowRank { u: &u, b: &b });
        match token_logprobs_backward(&[1.0], &h, &w, lr, &[1, 2], None, ch) {
            Err(EngineError::Arg { msg, .. }) => assert!(msg.contains("1 upstream"), "{msg}"),
            other => panic!("expected a length error, got {other:?}"),
        }
        match token_logprobs_backward(&[1.0, f32::NAN], &h, &w, lr, &[1, 2], None, ch) {
            Err(EngineError::Arg { msg, .. }) => assert!(msg.contains("d_logp[1]"), "{msg}"),
            other => panic!("expected a non-finite error, got {other:?}"),
        }
        // The checks the forward makes apply to the backward too.
        assert!(matches!(
            token_logprobs_backward(&[1.0, 1.0], &h, &w, lr, &[1, 10], None, ch),
            Err(EngineError::Index { .. })
        ));
        assert!(matches!(
            token_logprobs_backward(&[1.0, 1.0], &h, &w, None, &[1, 2], Some(-1.0), ch),
            Err(EngineError::Arg { .. })
        ));
    }
}
