//! Log-probs of target tokens under `softcap(hidden · headᵀ)`, computed in chunks so a
//! [T × V] logits tensor never exists: an online logsumexp over vocabulary chunks.
//!
//! Each rayon task takes `chunks.tokens` rows of `hidden` and walks the vocabulary in slices
//! of `chunks.vocab` rows of `head`: one gemm gives the [tokens × vocab] logits block (the
//! only scratch), the soft-cap is applied in place, and each row's running statistics are
//! updated — max m, s = Σ e^(l−m), u = Σ e^(l−m)·l, Σ l, the argmax and the target's logit.
//! When the max grows, s and u are rescaled by e^(m_old − m_new). At the end
//! lse = m + ln s, log p = l_target − lse, entropy = lse − u/s, mean logit = Σ l / V.
use gemm::Parallelism;
use rayon::prelude::*;

use super::linear::matmul_nt;
use crate::cuda::ops as cuda_ops;
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
    let (t, v, c) = check_head(OP, hidden, head, final_softcap)?;
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
    // Chunks larger than the data would only enlarge the scratch.
    let tc = chunks.tokens.min(t.max(1));
    let vc = chunks.vocab.min(v);
    let (hidden, head) = (hidden.as_slice()?, head.as_slice()?);

    let mut rows = vec![RowStats::default(); t];
    // Too few token chunks to occupy every thread: let gemm split each block instead.
    let inner = if t.div_ceil(tc) >= rayon::current_num_threads() {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    };
    rows.par_chunks_mut(tc)
        .enumerate()
        .for_each_init(Vec::new, |block, (chunk, stats)| {
            let (t0, n) = (chunk * tc, stats.len());
            let hid = &hidden[t0 * c..(t0 + n) * c]; // [n, C]
            let tgt = &targets[t0..t0 + n];
            block.resize(tc * vc, 0.0);
            for v0 in (0..v).step_by(vc) {
                let w = vc.min(v - v0);
                let logits = &mut block[..n * w]; // [n, w]
                matmul_nt(
                    logits,
                    hid,
                    &head[v0 * c..(v0 + w) * c],
                    [n, w, c],
                    false,
                    inner,
                );
                if let Some(cap) = final_softcap {
                    logits.iter_mut().for_each(|l| *l = softcap(*l, cap));
                }
                for ((st, row), &target) in stats.iter_mut().zip(logits.chunks_exact(w)).zip(tgt) {
                    st.update(row, v0, target as usize);
                }
            }
        });

    let mut out = TokenStats {
        logp: Vec::with_capacity(t),
        entropy: Vec::with_capacity(t),
        mean_logit: Vec::with_capacity(t),
        argmax: Vec::with_capacity(t),
    };
    for st in &rows {
        let lse = st.max as f64 + st.sum_exp.ln();
        out.logp.push((st.target_logit as f64 - lse) as f32);
        out.entropy
            .push((lse - st.sum_exp_logit / st.sum_exp) as f32);
        out.mean_logit.push((st.sum_logit / v as f64) as f32);
        out.argmax.push(st.argmax as u32);
    }
    Ok(out)
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

/// tanh(x / c) · c, in HF's order of operations.
fn softcap(x: f32, c: f32) -> f32 {
    (x / c).tanh() * c
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

    /// Full f64 logits and log-softmax statistics per row: (logp, entropy, mean, argmax).
    fn naive(
        hidden: &[f32],
        head: &[f32],
        targets: &[u32],
        cap: Option<f64>,
        c: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<u32>) {
        let v = head.len() / c;
        let (mut lp, mut ent, mut mean, mut arg) = (vec![], vec![], vec![], vec![]);
        for (row, &tgt) in hidden.chunks(c).zip(targets) {
            let logits: Vec<f64> = head
                .chunks(c)
                .map(|w| {
                    let l: f64 = row.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
                    cap.map_or(l, |c| (l / c).tanh() * c)
                })
                .collect();
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
            lp.push(logits[tgt as usize] - lse);
            ent.push(
                -logits
                    .iter()
                    .map(|l| (l - lse).exp() * (l - lse))
                    .sum::<f64>(),
            );
            mean.push(logits.iter().sum::<f64>() / v as f64);
            arg.push(logits.iter().position(|&l| l == m).unwrap() as u32);
        }
        (lp, ent, mean, arg)
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
            let (lp, ent, mean, arg) = naive(&hidden, &head, &targets, cap.map(|c| c as f64), c);
            // Vocab chunks of 1, a non-divisor, exactly V, and past V; token chunks of 1,
            // a non-divisor and past T.
            for (tokens, vocab) in [(1, 1), (5, 64), (16, 1003), (64, 5000), (37, 100)] {
                let s = token_logprobs(&ht, &wt, &targets, cap, LogProbChunks { tokens, vocab })
                    .unwrap();
                // Logits are O(4) f32 dot products (≈1e-6 error); logsumexp adds a few ulps.
                let what = format!("cap {cap:?} chunks {tokens}×{vocab}");
                assert_close(&format!("logp {what}"), &s.logp, &lp, 1e-5, 1e-6);
                assert_close(&format!("entropy {what}"), &s.entropy, &ent, 1e-5, 1e-6);
                assert_close(&format!("mean {what}"), &s.mean_logit, &mean, 1e-5, 1e-6);
                assert_eq!(s.argmax, arg, "argmax {what}");
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
}
