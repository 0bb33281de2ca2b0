//! Chunked token log-probs on the GPU, and their gradient: per vocabulary chunk, cuBLASLt
//! writes f32 logits for a block of tokens into one scratch buffer (`hidden · headᵀ`, plus the
//! low-rank term `u · bᵀ` of LoRA on the LM head accumulated into the same buffer by a second
//! GEMM), and kernels/logprobs.cu folds them into each token's online softmax state (soft-cap
//! included). Only the scratch ever holds logits: [T × V] never exists.
//!
//! Backward ([`token_logprobs_backward`]): a statistics pass as above gives each row's
//! lse = m + log s; a second pass recomputes each logits chunk, turns it into dz (bf16, the
//! GEMM operand type) and folds it into the gradients with three GEMMs:
//! d_hidden += dz · head_chunk, d_u += dz · b_chunk (f32, accumulated over vocabulary chunks)
//! and d_b_chunk (+)= dzᵀ · u (f32, accumulated over token chunks). d_hidden accumulates in an
//! f32 buffer of one token chunk and is rounded to bf16 when the chunk is done. Output dtypes:
//! d_hidden bf16 (an activation gradient), d_u and d_b f32 (they lead to LoRA's parameter
//! gradients). Rows with no upstream gradient are not skipped (the trainer passes scored rows
//! only): their dz is written as exact zeros, so their gradient rows are zero.
//!
//! Chunking: the vocabulary chunk is the caller's; the token chunk is the caller's or larger,
//! up to a 256 MiB scratch, because a 64-row GEMM leaves most of a GPU idle (the CPU default
//! suits the CPU). Results do not depend on the chunking beyond f32 summation order.

use std::sync::Arc;

use super::{bf16_ptr, empty, f32_ptr, grid_stride};
use crate::cuda::DeviceBuffer;
use crate::cuda::blas::{Gemm, OutType};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::ops::elementwise::softcap_f32;
use crate::cuda::storage::{CudaStorage, DType};
use crate::ops::{LogProbChunks, LogProbGrads, LowRank, LowRankGrads, TokenStats, check_lm_head};
use crate::{EngineError, Result, Tensor};

/// The kernels of kernels/logprobs.cu, for `Module::kernels`.
pub(crate) const KERNELS: &[&str] = &[
    "logprob_init",
    "logprob_chunk",
    "logprob_finish",
    "logprob_grad_chunk",
    "logprob_cast_bf16",
];

/// Scratch budget for one chunk, in bytes (256 MiB): the forward's f32 logits; the
/// backward's f32 logits, bf16 dz and f32 d_hidden rows.
const SCRATCH_BYTES: usize = 256 << 20;

/// Threads per block of the one-block-per-row kernels.
const ROW_THREADS: u32 = 256;

pub(crate) fn token_logprobs(
    backend: &Arc<CudaBackend>,
    hidden: &Tensor,
    head: &Tensor,
    targets: &[u32],
    final_softcap: Option<f32>,
    chunks: LogProbChunks,
) -> Result<TokenStats> {
    const OP: &str = "token_logprobs";
    let (t, v, c) = check_lm_head(OP, hidden, head, final_softcap)?;
    if targets.len() != t {
        return Err(EngineError::Arg {
            op: OP,
            msg: format!("{} targets for {t} hidden rows", targets.len()),
        });
    }
    if let Some(&bad) = targets.iter().find(|&&id| id as usize >= v) {
        return Err(EngineError::Index {
            op: OP,
            index: bad as usize,
            limit: v,
        });
    }
    if chunks.tokens == 0 || chunks.vocab == 0 {
        return Err(EngineError::Arg {
            op: OP,
            msg: format!("chunk sizes must be ≥ 1, got {chunks:?}"),
        });
    }
    let ops = Operands::new(OP, hidden, head, None, final_softcap, [t, v, c, 0])?;
    ops.token_stats(backend, targets, chunks)
}

/// One call of the low-rank forward or of the backward, its arguments checked by
/// `crate::ops` (shapes, soft-cap, targets, chunk sizes; the rules both devices share).
pub(crate) struct Call<'a> {
    pub(crate) hidden: &'a Tensor, // [T, C] bf16
    pub(crate) head: &'a Tensor,   // [V, C] bf16
    /// u [T, R] and b [V, R], bf16.
    pub(crate) low_rank: Option<LowRank<'a>>,
    pub(crate) targets: &'a [u32], // [T]
    pub(crate) final_softcap: Option<f32>,
    pub(crate) chunks: LogProbChunks,
    /// [T, V, C, R] (R = 0 without the low-rank term).
    pub(crate) dims: [usize; 4],
}

impl Call<'_> {
    fn operands(&self, op: &'static str) -> Result<Operands> {
        Operands::new(
            op,
            self.hidden,
            self.head,
            self.low_rank,
            self.final_softcap,
            self.dims,
        )
    }
}

/// [`token_logprobs`] with the low-rank term: logits `softcap(hidden · headᵀ + u · bᵀ)`.
pub(crate) fn token_logprobs_low_rank(
    backend: &Arc<CudaBackend>,
    call: &Call<'_>,
) -> Result<TokenStats> {
    let ops = call.operands("token_logprobs_low_rank")?;
    ops.token_stats(backend, call.targets, call.chunks)
}

/// Gradient of Σ_t d_logp[t] · log p_t(targets[t]) with respect to hidden and, with the
/// low-rank term, u and b (see the module doc). d_logp: [T], checked by `crate::ops` (length
/// T, finite).
pub(crate) fn token_logprobs_backward(
    backend: &Arc<CudaBackend>,
    d_logp: &[f32],
    call: &Call<'_>,
) -> Result<LogProbGrads> {
    const OP: &str = "token_logprobs_backward";
    let ops = call.operands(OP)?;
    let [t, v, c, r] = call.dims;
    let grads = |d_hidden, d_u, d_b| LogProbGrads {
        d_hidden,
        d_low_rank: call.low_rank.map(|_| LowRankGrads { d_u, d_b }),
    };
    if d_logp.iter().all(|&g| g == 0.0) {
        // Nothing to propagate (T = 0 included): every gradient is exactly zero.
        let zeros = |shape: &[usize], dtype| -> Result<Tensor> {
            let len = shape.iter().product();
            Ok(Tensor::from_cuda(
                shape,
                CudaStorage::zeroed(backend, len, dtype)?,
            ))
        };
        return Ok(grads(
            zeros(&[t, c], DType::Bf16)?,
            zeros(&[t, r], DType::F32)?,
            zeros(&[v, r], DType::F32)?,
        ));
    }
    let d_hidden = empty(backend, &[t, c], DType::Bf16)?; // [T, C]
    let d_u = empty(backend, &[t, r], DType::F32)?; // [T, R]
    let d_b = empty(backend, &[v, r], DType::F32)?; // [V, R]
    let out = GradPtrs {
        d_hidden: bf16_ptr(OP, "d_hidden", &d_hidden)?,
        d_u: f32_ptr(OP, "d_u", &d_u)?,
        d_b: f32_ptr(OP, "d_b", &d_b)?,
    };
    ops.gradients(backend, d_logp, call.targets, call.chunks, out)?;
    Ok(grads(d_hidden, d_u, d_b))
}

/// Full soft-capped logits for a few rows: hidden [B, C], head [V, C] → [B, V] f32.
pub(crate) fn logits(
    backend: &Arc<CudaBackend>,
    hidden: &Tensor,
    head: &Tensor,
    final_softcap: Option<f32>,
) -> Result<Tensor> {
    const OP: &str = "logits";
    let (b, v, c) = check_lm_head(OP, hidden, head, final_softcap)?;
    let (ph, pw) = (bf16_ptr(OP, "hidden", hidden)?, bf16_ptr(OP, "head", head)?);
    let out = empty(backend, &[b, v], DType::F32)?;
    if b == 0 || v == 0 {
        return Ok(out);
    }
    if c == 0 {
        // Every logit is an empty sum (and softcap(0) = 0).
        return Ok(Tensor::from_cuda(
            &[b, v],
            CudaStorage::zeroed(backend, b * v, DType::F32)?,
        ));
    }
    let po = out.cuda().map(|s| s.ptr()).unwrap_or(0);
    let g = Gemm::nt([b, v, c], ph, pw, po, OutType::F32);
    // SAFETY: hidden holds B·C, head V·C bf16, out B·V f32.
    unsafe { backend.gemm(&g) }?;
    if let Some(cap) = final_softcap {
        softcap_f32(backend, po, b * v, cap)?;
    }
    Ok(out)
}

/// The device addresses of one call's checked operands, with its dimensions.
struct Operands {
    hidden: u64, // [T, C] bf16
    head: u64,   // [V, C] bf16
    /// u [T, R] and b [V, R], bf16.
    low_rank: Option<(u64, u64)>,
    /// The soft-cap, or 0 for none (the kernels' convention).
    cap: f32,
    t: usize,
    v: usize,
    c: usize,
    r: usize,
}

/// Where the backward writes: d_hidden [T, C] bf16, d_u [T, R] f32, d_b [V, R] f32.
struct GradPtrs {
    d_hidden: u64,
    d_u: u64,
    d_b: u64,
}

/// The per-token online state of kernels/logprobs.cu, struct of arrays: m, s, sl, suml, best,
/// tgt (f32) then arg (u32), each [T].
struct OnlineState {
    buf: DeviceBuffer,
    t: usize,
}

impl OnlineState {
    /// Array `i` (0 m, 1 s, 2 sl, 3 suml, 4 best, 5 tgt, 6 arg), from token `t0` on.
    fn at(&self, i: usize, t0: usize) -> u64 {
        self.buf.ptr() + ((i * self.t + t0) * 4) as u64
    }
}

impl Operands {
    /// Checks dtypes (every operand bf16 on the GPU) and that token ids fit the kernels' u32.
    fn new(
        op: &'static str,
        hidden: &Tensor,
        head: &Tensor,
        low_rank: Option<LowRank<'_>>,
        final_softcap: Option<f32>,
        [t, v, c, r]: [usize; 4],
    ) -> Result<Operands> {
        if v > u32::MAX as usize {
            return Err(EngineError::Arg {
                op,
                msg: format!("vocabulary of {v} exceeds u32 token ids"),
            });
        }
        let low_rank = match low_rank {
            Some(lr) => Some((bf16_ptr(op, "u", lr.u)?, bf16_ptr(op, "b", lr.b)?)),
            None => None,
        };
        Ok(Operands {
            hidden: bf16_ptr(op, "hidden", hidden)?,
            head: bf16_ptr(op, "head", head)?,
            low_rank,
            cap: final_softcap.unwrap_or(0.0),
            t,
            v,
            c,
            r,
        })
    }

    /// Whether no GEMM writes a logits chunk (C = 0 and no rank): its scratch must then start
    /// zeroed, as every logit is an empty sum.
    fn logits_are_zero(&self) -> bool {
        self.c == 0 && (self.low_rank.is_none() || self.r == 0)
    }

    /// A scratch of `elems` f32 for logits chunks (zeroed when no GEMM will write it).
    fn logits_scratch(&self, backend: &CudaBackend, elems: usize) -> Result<DeviceBuffer> {
        Ok(if self.logits_are_zero() {
            backend.alloc_zeroed(elems * 4)?
        } else {
            backend.alloc(elems * 4)?
        })
    }

    /// Queues the uncapped f32 logits of rows t0..t0 + rows and ids v0..v0 + cols into
    /// `scratch` [rows, cols]: hidden · headᵀ, then + u · bᵀ by a second GEMM with beta = 1.
    fn logits_chunk(
        &self,
        backend: &CudaBackend,
        scratch: u64,
        [t0, rows]: [usize; 2],
        [v0, cols]: [usize; 2],
    ) -> Result<()> {
        let (c, r) = (self.c, self.r);
        let mut written = false;
        if c > 0 {
            let h = self.hidden + (t0 * c * 2) as u64; // [rows, C]
            let w = self.head + (v0 * c * 2) as u64; // [cols, C]
            let g = Gemm::nt([rows, cols, c], h, w, scratch, OutType::F32);
            // SAFETY: hidden rows t0..t0+rows and head rows v0..v0+cols are in bounds (the
            // callers' loops stay within T and V); the scratch holds ≥ rows·cols f32.
            unsafe { backend.gemm(&g) }?;
            written = true;
        }
        if let Some((u, b)) = self.low_rank
            && r > 0
        {
            let u = u + (t0 * r * 2) as u64; // [rows, R]
            let b = b + (v0 * r * 2) as u64; // [cols, R]
            let g = Gemm::nt([rows, cols, r], u, b, scratch, OutType::F32).accumulating(written);
            // SAFETY: as above, for u [T, R] and b [V, R].
            unsafe { backend.gemm(&g) }?;
        }
        Ok(())
    }

    /// The token chunk for a scratch of `bytes_per_row` per token row: the caller's, or more
    /// rows up to the budget, never more than T.
    fn token_chunk(&self, chunks: LogProbChunks, bytes_per_row: usize) -> usize {
        chunks
            .tokens
            .max(SCRATCH_BYTES / bytes_per_row.max(1))
            .min(self.t)
            .max(1)
    }

    /// The statistics pass: every row's online state over the whole vocabulary, with the
    /// logits chunks going through `scratch` (≥ tc·vc f32).
    fn row_stats(
        &self,
        backend: &CudaBackend,
        targets: &DeviceBuffer,
        scratch: u64,
        [tc, vc]: [usize; 2],
    ) -> Result<OnlineState> {
        let t = self.t;
        let state = OnlineState {
            buf: backend.alloc(7 * t * 4)?,
            t,
        };
        let init = backend.kernel(Module::Logprobs, "logprob_init")?;
        let chunk = backend.kernel(Module::Logprobs, "logprob_chunk")?;
        let (m, s, sl, suml, best, tgt, arg) = (
            state.at(0, 0),
            state.at(1, 0),
            state.at(2, 0),
            state.at(3, 0),
            state.at(4, 0),
            state.at(5, 0),
            state.at(6, 0),
        );
        let n = t as i64;
        // SAFETY: the state buffer holds 7·T words.
        unsafe {
            backend.launch(
                &init,
                (t.div_ceil(256) as u32, 1, 1),
                (256, 1, 1),
                0,
                &mut params![m, s, sl, suml, best, arg, tgt, n],
            )
        }?;
        let cap = self.cap;
        for t0 in (0..t).step_by(tc) {
            let rows = tc.min(t - t0);
            let (cm, cs, csl, csuml, cbest, ctgt, carg) = (
                state.at(0, t0),
                state.at(1, t0),
                state.at(2, t0),
                state.at(3, t0),
                state.at(4, t0),
                state.at(5, t0),
                state.at(6, t0),
            );
            let ctargets = targets.ptr() + (t0 * 4) as u64;
            for v0 in (0..self.v).step_by(vc) {
                let cols = vc.min(self.v - v0);
                self.logits_chunk(backend, scratch, [t0, rows], [v0, cols])?;
                let (vc64, v0u) = (cols as i64, v0 as u32);
                // SAFETY: the scratch holds rows·cols logits; state and targets are offset to
                // the chunk's first token and hold `rows` more entries.
                unsafe {
                    backend.launch_1d(
                        &chunk,
                        rows as u32,
                        ROW_THREADS,
                        &mut params![
                            scratch, ctargets, cm, cs, csl, csuml, cbest, carg, ctgt, vc64, v0u,
                            cap
                        ],
                    )
                }?;
            }
        }
        Ok(state)
    }

    /// The forward: statistics over the vocabulary, then logp, entropy, mean logit, argmax.
    fn token_stats(
        &self,
        backend: &CudaBackend,
        targets: &[u32],
        chunks: LogProbChunks,
    ) -> Result<TokenStats> {
        let t = self.t;
        if t == 0 {
            return Ok(TokenStats::default());
        }
        let vc = chunks.vocab.min(self.v).max(1);
        let tc = self.token_chunk(chunks, vc * 4);
        let targets_dev = backend.upload(targets)?;
        let scratch = self.logits_scratch(backend, tc * vc)?;
        let state = self.row_stats(backend, &targets_dev, scratch.ptr(), [tc, vc])?;

        // Results: logp, entropy, mean (f32) into one buffer.
        let results = backend.alloc(3 * t * 4)?;
        let (logp, entropy, mean) = (
            results.ptr(),
            results.ptr() + (t * 4) as u64,
            results.ptr() + (2 * t * 4) as u64,
        );
        let (m, s, sl, suml, tgt) = (
            state.at(0, 0),
            state.at(1, 0),
            state.at(2, 0),
            state.at(3, 0),
            state.at(5, 0),
        );
        let (n, vocab) = (t as i64, self.v as f32);
        let finish = backend.kernel(Module::Logprobs, "logprob_finish")?;
        // SAFETY: results holds 3·T f32; the state 7·T words.
        unsafe {
            backend.launch(
                &finish,
                (t.div_ceil(256) as u32, 1, 1),
                (256, 1, 1),
                0,
                &mut params![logp, entropy, mean, m, s, sl, suml, tgt, n, vocab],
            )
        }?;
        let mut host = vec![0.0f32; 3 * t];
        backend.download(&results, &mut host)?;
        let mut argmax = vec![0u32; 7 * t];
        backend.download(&state.buf, &mut argmax)?;
        let argmax = argmax.split_off(6 * t);
        let mean_logit = host.split_off(2 * t);
        let entropy = host.split_off(t);
        Ok(TokenStats {
            logp: host,
            entropy,
            mean_logit,
            argmax,
        })
    }

    /// The backward's two passes (T ≥ 1), writing every element of `out`.
    fn gradients(
        &self,
        backend: &CudaBackend,
        d_logp: &[f32],
        targets: &[u32],
        chunks: LogProbChunks,
        out: GradPtrs,
    ) -> Result<()> {
        let (t, v, c) = (self.t, self.v, self.c);
        let r = if self.low_rank.is_some() { self.r } else { 0 };
        let vc = chunks.vocab.min(v).max(1);
        // Per token row: f32 logits and bf16 dz of one vocabulary chunk, f32 d_hidden.
        let tc = self.token_chunk(chunks, vc * 6 + c * 4);
        let targets_dev = backend.upload(targets)?;
        let g_dev = backend.upload(d_logp)?;
        let scratch = self.logits_scratch(backend, tc * vc)?; // [tc, vc] f32
        let state = self.row_stats(backend, &targets_dev, scratch.ptr(), [tc, vc])?;
        let dz = backend.alloc(tc * vc * 2)?; // [tc, vc] bf16
        let dh_acc = backend.alloc(tc * c * 4)?; // [tc, C] f32
        let grad = backend.kernel(Module::Logprobs, "logprob_grad_chunk")?;
        let cast = backend.kernel(Module::Logprobs, "logprob_cast_bf16")?;
        let (scratch, dz, dh_acc) = (scratch.ptr(), dz.ptr(), dh_acc.ptr());
        let cap = self.cap;
        for t0 in (0..t).step_by(tc) {
            let rows = tc.min(t - t0);
            let (ctargets, cg) = (
                targets_dev.ptr() + (t0 * 4) as u64,
                g_dev.ptr() + (t0 * 4) as u64,
            );
            let (cm, cs) = (state.at(0, t0), state.at(1, t0));
            for v0 in (0..v).step_by(vc) {
                let cols = vc.min(v - v0);
                self.logits_chunk(backend, scratch, [t0, rows], [v0, cols])?;
                let (vc64, v0u) = (cols as i64, v0 as u32);
                // SAFETY: scratch and dz hold ≥ rows·cols elements; targets, g, m and s are
                // offset to the chunk's first token and hold `rows` more entries.
                unsafe {
                    backend.launch_1d(
                        &grad,
                        rows as u32,
                        ROW_THREADS,
                        &mut params![scratch, dz, ctargets, cg, cm, cs, vc64, v0u, cap],
                    )
                }?;
                // The first vocabulary chunk assigns the row-owned sums, later ones add.
                let more = v0 > 0;
                if c > 0 {
                    // dh [rows, C] (+)= dz [rows, cols] · head [cols, C].
                    let w = self.head + (v0 * c * 2) as u64;
                    let g = Gemm::nn([rows, c, cols], dz, w, dh_acc, OutType::F32);
                    // SAFETY: dz holds rows·cols bf16, head rows v0..v0+cols exist, dh_acc
                    // holds tc·C ≥ rows·C f32.
                    unsafe { backend.gemm(&g.accumulating(more)) }?;
                }
                if let Some((u, b)) = self.low_rank
                    && r > 0
                {
                    // d_u [rows, R] (+)= dz [rows, cols] · b [cols, R].
                    let b = b + (v0 * r * 2) as u64;
                    let du = out.d_u + (t0 * r * 4) as u64;
                    let g = Gemm::nn([rows, r, cols], dz, b, du, OutType::F32);
                    // SAFETY: b rows v0..v0+cols and d_u rows t0..t0+rows are in bounds.
                    unsafe { backend.gemm(&g.accumulating(more)) }?;
                    // d_b [cols, R] (+)= dzᵀ [cols, rows] · u [rows, R]: the first token chunk
                    // assigns every vocabulary row, later ones add.
                    let u = u + (t0 * r * 2) as u64;
                    let db = out.d_b + (v0 * r * 4) as u64;
                    let g = Gemm::tn([cols, r, rows], dz, u, db, OutType::F32);
                    // SAFETY: u rows t0..t0+rows and d_b rows v0..v0+cols are in bounds.
                    unsafe { backend.gemm(&g.accumulating(t0 > 0)) }?;
                }
            }
            if c > 0 {
                let n = rows * c;
                let dst = out.d_hidden + (t0 * c * 2) as u64;
                let n64 = n as i64;
                // SAFETY: dh_acc holds rows·C f32 (all written: v ≥ 1 chunk assigned them);
                // d_hidden rows t0..t0+rows hold rows·C bf16.
                unsafe {
                    backend.launch_1d(
                        &cast,
                        grid_stride(backend, n, 256),
                        256,
                        &mut params![dst, dh_acc, n64],
                    )
                }?;
            }
        }
        // The f32 buffers go back to the stream-ordered arena here, behind the queued work.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::compile_without_spills;
    use crate::test_util::assert_cubin_has_kernels;

    /// Compiles the module with ptxas statistics (no GPU needed): every kernel is there and
    /// none spills.
    #[test]
    fn kernels_compile_without_spills() {
        let Some(compiled) = compile_without_spills(Module::Logprobs) else {
            return;
        };
        assert_cubin_has_kernels(&compiled.cubin, KERNELS);
    }
}
