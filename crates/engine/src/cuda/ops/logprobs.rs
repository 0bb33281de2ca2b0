//! Chunked token log-probs on the GPU: per vocabulary chunk, a cuBLASLt GEMM writes f32
//! logits for a block of tokens into one scratch buffer, and kernels/logprobs.cu folds them
//! into each token's online softmax state (soft-cap included). Only the scratch ever holds
//! logits: [T × V] never exists.
//!
//! Chunking: the vocabulary chunk is the caller's; the token chunk is the caller's or larger,
//! up to a 256 MiB scratch, because a 64-row GEMM leaves most of a GPU idle (the CPU default
//! suits the CPU). Results do not depend on the chunking.

use std::sync::Arc;

use super::{bf16_ptr, empty};
use crate::cuda::blas::{Gemm, OutType};
use crate::cuda::device::{CudaBackend, params};
use crate::cuda::kernels::Module;
use crate::cuda::ops::elementwise::softcap_f32;
use crate::cuda::storage::{CudaStorage, DType};
use crate::ops::{LogProbChunks, TokenStats, check_lm_head};
use crate::{EngineError, Result, Tensor};

/// Scratch budget for one chunk of f32 logits, in elements (256 MiB).
const SCRATCH_ELEMS: usize = 64 << 20;

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
    if v > u32::MAX as usize {
        return Err(EngineError::Arg {
            op: OP,
            msg: format!("vocabulary of {v} exceeds u32 token ids"),
        });
    }
    let (ph, pw) = (bf16_ptr(OP, "hidden", hidden)?, bf16_ptr(OP, "head", head)?);
    if t == 0 {
        return Ok(TokenStats::default());
    }
    let vc = chunks.vocab.min(v).max(1);
    let tc = chunks.tokens.max(SCRATCH_ELEMS / vc).min(t).max(1);

    // Per-token state, struct of arrays: m, s, sl, suml, best, tgt (f32) then arg (u32).
    let state = backend.alloc(7 * t * 4)?;
    let at = |i: usize| state.ptr() + (i * t * 4) as u64;
    let (m, s, sl, suml, best, tgt, arg) = (at(0), at(1), at(2), at(3), at(4), at(5), at(6));
    let targets_dev = backend.upload(targets)?;
    let scratch = backend.alloc(tc * vc * 4)?;
    let (scratch_ptr, targets_ptr) = (scratch.ptr(), targets_dev.ptr());

    let init = backend.kernel(Module::Logprobs, "logprob_init")?;
    let chunk = backend.kernel(Module::Logprobs, "logprob_chunk")?;
    let finish = backend.kernel(Module::Logprobs, "logprob_finish")?;
    let n = t as i64;
    let blocks = t.div_ceil(256) as u32;
    // SAFETY: the state buffer holds 7·T words.
    unsafe {
        backend.launch(
            &init,
            (blocks, 1, 1),
            (256, 1, 1),
            0,
            &mut params![m, s, sl, suml, best, arg, tgt, n],
        )
    }?;
    let cap = final_softcap.unwrap_or(0.0);
    for t0 in (0..t).step_by(tc) {
        let rows = tc.min(t - t0);
        let off = (t0 * 4) as u64;
        let (cm, cs, csl, csuml, cbest, carg, ctgt) = (
            m + off,
            s + off,
            sl + off,
            suml + off,
            best + off,
            arg + off,
            tgt + off,
        );
        let ctargets = targets_ptr + off;
        for v0 in (0..v).step_by(vc) {
            let cols = vc.min(v - v0);
            let g = Gemm {
                rows,
                cols,
                k: c,
                x: ph + (t0 * c * 2) as u64,
                ld_x: c,
                w: pw + (v0 * c * 2) as u64,
                ld_w: c,
                out: scratch_ptr,
                ld_out: cols,
                out_type: OutType::F32,
                bias: None,
            };
            // SAFETY: hidden rows t0..t0+rows and head rows v0..v0+cols are in bounds; the
            // scratch holds tc·vc ≥ rows·cols f32.
            unsafe { backend.gemm(&g) }?;
            let (vc64, v0u) = (cols as i64, v0 as u32);
            // SAFETY: the scratch holds rows·cols logits; state and targets are offset to the
            // chunk's first token and hold `rows` more entries.
            unsafe {
                backend.launch(
                    &chunk,
                    (rows as u32, 1, 1),
                    (256, 1, 1),
                    0,
                    &mut params![
                        scratch_ptr,
                        ctargets,
                        cm,
                        cs,
                        csl,
                        csuml,
                        cbest,
                        carg,
                        ctgt,
                        vc64,
                        v0u,
                        cap
                    ],
                )
            }?;
        }
    }
    // Results: logp, entropy, mean (f32) into one buffer.
    let results = backend.alloc(3 * t * 4)?;
    let (logp, entropy, mean) = (
        results.ptr(),
        results.ptr() + (t * 4) as u64,
        results.ptr() + (2 * t * 4) as u64,
    );
    let vocab = v as f32;
    // SAFETY: results holds 3·T f32; the state 7·T words.
    unsafe {
        backend.launch(
            &finish,
            (blocks, 1, 1),
            (256, 1, 1),
            0,
            &mut params![logp, entropy, mean, m, s, sl, suml, tgt, n, vocab],
        )
    }?;
    let mut host = vec![0.0f32; 3 * t];
    backend.download(&results, &mut host)?;
    let mut argmax = vec![0u32; 7 * t];
    backend.download(&state, &mut argmax)?;
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
    let g = Gemm {
        rows: b,
        cols: v,
        k: c,
        x: ph,
        ld_x: c,
        w: pw,
        ld_w: c,
        out: po,
        ld_out: v,
        out_type: OutType::F32,
        bias: None,
    };
    // SAFETY: hidden holds B·C, head V·C bf16, out B·V f32.
    unsafe { backend.gemm(&g) }?;
    if let Some(cap) = final_softcap {
        softcap_f32(backend, po, b * v, cap)?;
    }
    Ok(out)
}
