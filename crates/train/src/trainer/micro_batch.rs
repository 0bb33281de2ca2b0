//! One micro-batch of DPO: pack the pairs, score them under the policy (adapter on) and the
//! reference (adapter off), sum per sequence, take the loss, and back-propagate it.
//!
//! TRL's `_compute_loss` with `precompute_ref_log_probs=False`: the reference pass runs on the
//! same packed batch beside the policy pass, with no gradient.

use engine::ops::TokenStats;
use model::{Checkpointing, Dropout, Lora, Model};

use crate::error::{Result, TrainError};
use crate::examples::{DpoExample, ExampleConfig, PackedBatch, pack};
use crate::loss::{BatchMetrics, DpoLoss, PairBatch, SeqStats};

/// What a micro-batch yields besides the gradients it adds.
#[derive(Clone, Debug)]
pub(crate) struct MicroBatchOut {
    /// TRL's loss of the batch (not divided by the accumulation steps).
    pub loss: f64,
    pub metrics: BatchMetrics,
    /// Pairs in the batch.
    pub pairs: usize,
}

/// The loss of `examples` under `lora`; with `grads`, also adds `grad_scale` × its gradient
/// (transformers divides each micro-batch's loss by the micro-batches of its window).
#[allow(clippy::too_many_arguments)]
pub(crate) fn micro_batch(
    model: &Model,
    lora: &Lora,
    examples: &[&DpoExample],
    config: &ExampleConfig,
    loss: &DpoLoss,
    ld_alpha: Option<f64>,
    dropout: Dropout,
    checkpointing: Checkpointing,
    grads: Option<(&mut Lora, f64)>,
) -> Result<MicroBatchOut> {
    let packed = pack(examples, config)?;
    let batch = packed.train_batch();
    // Nothing to keep when nothing will be back-propagated.
    let checkpointing = match grads {
        Some(_) => checkpointing,
        None => Checkpointing::Recompute,
    };
    let (policy, tape) = model.lora_forward_with(&batch, Some(lora), dropout, checkpointing)?;
    // Evaluation frees the policy's layer inputs before the reference pass runs.
    let tape = grads.as_ref().map(|_| tape);
    let (reference, _) = model.lora_forward(&batch, None, Dropout::Off)?;
    let rows = ScoredRows::new(&packed, &batch.targets);
    let pairs = rows.pair_batch(&packed, &policy, &reference, ld_alpha);
    let out = loss.compute(&pairs)?;
    if let (Some((grads, scale)), Some(tape)) = (grads, tape) {
        let d_logp: Vec<f32> = (0..rows.seq.len())
            .map(|i| {
                let (pair, chosen) = rows.side(i);
                (out.grad.token(&pairs, pair, chosen, rows.k[i]) * scale) as f32
            })
            .collect();
        model.lora_backward(&batch, lora, tape, &d_logp, grads)?;
    }
    Ok(MicroBatchOut {
        loss: out.loss,
        metrics: out.metrics,
        pairs: packed.pairs(),
    })
}

/// For each scored row (a position whose next token is a completion token): its sequence,
/// its index among its sequence's scored rows, and its target.
struct ScoredRows<'a> {
    seq: Vec<usize>, // [N scored] → 0..2P
    k: Vec<u64>,     // [N scored]
    targets: &'a [u32],
    pairs: usize,
}

impl<'a> ScoredRows<'a> {
    fn new(packed: &PackedBatch, targets: &'a [u32]) -> ScoredRows<'a> {
        let seq = packed.scored_sequences();
        let mut k = Vec::with_capacity(seq.len());
        for (i, &s) in seq.iter().enumerate() {
            k.push(if i > 0 && seq[i - 1] == s {
                k[i - 1] + 1
            } else {
                0
            });
        }
        ScoredRows {
            seq,
            k,
            targets,
            pairs: packed.pairs(),
        }
    }

    /// (pair, chosen?) of scored row i: sequences are [chosen 0..P, rejected 0..P].
    fn side(&self, i: usize) -> (usize, bool) {
        let s = self.seq[i];
        if s < self.pairs {
            (s, true)
        } else {
            (s - self.pairs, false)
        }
    }

    /// Per-sequence sums of the policy's and the reference's stats.
    fn pair_batch(
        &self,
        packed: &PackedBatch,
        policy: &TokenStats,
        reference: &TokenStats,
        ld_alpha: Option<f64>,
    ) -> PairBatch {
        let p = self.pairs;
        let mut seqs: Vec<SeqStats> = (0..2 * p)
            .map(|s| SeqStats {
                tokens: packed.scored_tokens[s] as u64,
                mask_tokens: (packed.completion_tokens[s] != packed.scored_tokens[s])
                    .then_some(packed.completion_tokens[s] as u64),
                attention_tokens: packed.seq_lens[s] as u64,
                tail_logps: ld_alpha.map(|_| 0.0),
                ..SeqStats::default()
            })
            .collect();
        // LD-DPO's boundary: a pair's shared length, min(chosen, rejected) scored tokens.
        let shared = |pair: usize| packed.scored_tokens[pair].min(packed.scored_tokens[pair + p]);
        let mut ref_tail = vec![0.0f64; 2 * p];
        for i in 0..self.seq.len() {
            let s = self.seq[i];
            let st = &mut seqs[s];
            let lp = policy.logp[i] as f64;
            st.logps += lp;
            st.ref_logps += reference.logp[i] as f64;
            st.entropy += policy.entropy[i] as f64;
            st.mean_logits += policy.mean_logit[i] as f64;
            st.top1 += u64::from(policy.argmax[i] == self.targets[i]);
            let (pair, _) = self.side(i);
            if ld_alpha.is_some() && self.k[i] >= shared(pair) as u64 {
                *st.tail_logps.get_or_insert(0.0) += lp;
                ref_tail[s] += reference.logp[i] as f64;
            }
        }
        // TRL LD-weights the reference sums too (shared + α · tail).
        if let Some(a) = ld_alpha {
            for (st, tail) in seqs.iter_mut().zip(&ref_tail) {
                st.ref_logps = (st.ref_logps - tail) + a * tail;
            }
        }
        let rejected = seqs.split_off(p);
        PairBatch {
            chosen: seqs,
            rejected,
        }
    }
}

/// An evaluation batch's loss and metrics: the same computation with no gradient and no
/// dropout.
pub(crate) fn eval_batch(
    model: &Model,
    lora: &Lora,
    examples: &[&DpoExample],
    config: &ExampleConfig,
    loss: &DpoLoss,
    ld_alpha: Option<f64>,
) -> Result<MicroBatchOut> {
    if examples.is_empty() {
        return Err(TrainError::Arg {
            what: "evaluation",
            msg: "an empty evaluation batch".into(),
        });
    }
    micro_batch(
        model,
        lora,
        examples,
        config,
        loss,
        ld_alpha,
        Dropout::Off,
        Checkpointing::Recompute,
        None,
    )
}
