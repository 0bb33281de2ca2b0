//! What the model side hands the loss layer for one batch of N preference pairs: per
//! sequence, sums over its completion tokens (never per-token arrays).
//!
//! "Completion tokens" are the label positions TRL scores: the tokens after the prompt,
//! EOS included (TRL's `completion_mask` shifted by one). Every sum below runs over them.

use crate::error::{Result, TrainError};

/// One completion sequence (the chosen or the rejected one of a pair).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeqStats {
    /// Σ log π(label) under the policy (adapter on).
    pub logps: f64,
    /// The reference log-probs as TRL takes them from its batch (`ref_chosen_logps`): the
    /// same sum under the base model (adapter off) — LD-weighted like the policy's
    /// (shared part + ld_alpha · tail part) when `ld_alpha` is set.
    pub ref_logps: f64,
    /// Number of completion tokens.
    pub tokens: u64,
    /// TRL's unshifted completion-mask count, which `ipo` and `sigmoid_norm` divide by, where
    /// it differs from `tokens`: one more when the completion starts at position 0 (no
    /// prompt token before it, so its first token has no log-prob). `None`: `tokens`.
    pub mask_tokens: Option<u64>,
    /// `ld_alpha` only: Σ log π(label) over the completion tokens past the pair's shared
    /// length, min(chosen tokens, rejected tokens) — the part LD-DPO down-weights.
    pub tail_logps: Option<f64>,
    /// `use_weighting` (WPO) only: Σ log Σ_v π(v)², the log of each position's summed
    /// squared probabilities over the vocabulary.
    pub log_sum_sq_probs: Option<f64>,
    /// Metrics: Σ of each position's mean logit over the vocabulary (`logits/*`).
    pub mean_logits: f64,
    /// Metrics: Σ of each position's entropy of π (`entropy`).
    pub entropy: f64,
    /// Metrics: completion tokens whose label is the argmax of the logits, the first index
    /// on ties (`mean_token_accuracy`; read for chosen sequences only, as TRL does).
    pub top1: u64,
    /// Metrics: attention-mask tokens of the row, prompt and completion (`num_tokens`).
    pub attention_tokens: u64,
}

/// One batch: `chosen[i]` and `rejected[i]` are pair i.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairBatch {
    pub chosen: Vec<SeqStats>,   // [N]
    pub rejected: Vec<SeqStats>, // [N]
}

impl PairBatch {
    /// Number of pairs N.
    pub fn len(&self) -> usize {
        self.chosen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }

    /// The pair's shared length: LD-DPO's boundary between a sequence's shared and tail
    /// completion tokens, min(chosen tokens, rejected tokens).
    pub fn shared_len(&self, pair: usize) -> u64 {
        self.chosen[pair].tokens.min(self.rejected[pair].tokens)
    }

    /// Checks what the loss relies on; errors name the sequence (`chosen[3].tail_logps`).
    pub(crate) fn check(&self, need_tail: bool, need_wpo: bool) -> Result<()> {
        if self.chosen.len() != self.rejected.len() {
            return Err(bad(format!(
                "{} chosen sequences but {} rejected: pairs need one of each",
                self.chosen.len(),
                self.rejected.len()
            )));
        }
        if self.chosen.is_empty() {
            return Err(bad("no pairs in the batch".to_string()));
        }
        for (side, seqs) in [("chosen", &self.chosen), ("rejected", &self.rejected)] {
            for (i, s) in seqs.iter().enumerate() {
                let at = |field: &str| format!("{side}[{i}].{field}");
                for (field, v) in [
                    ("logps", s.logps),
                    ("ref_logps", s.ref_logps),
                    ("mean_logits", s.mean_logits),
                    ("entropy", s.entropy),
                ] {
                    if !v.is_finite() {
                        return Err(bad(format!(
                            "{} is {v}: expected a finite number",
                            at(field)
                        )));
                    }
                }
                if let Some(m) = s.mask_tokens
                    && m < s.tokens
                {
                    return Err(bad(format!(
                        "{} = {m} is below its {} completion tokens",
                        at("mask_tokens"),
                        s.tokens
                    )));
                }
                if s.top1 > s.tokens {
                    return Err(bad(format!(
                        "{} = {} exceeds its {} completion tokens",
                        at("top1"),
                        s.top1,
                        s.tokens
                    )));
                }
                if need_tail {
                    match s.tail_logps {
                        None => {
                            return Err(bad(format!(
                                "{} is missing: ld_alpha needs each sequence's tail log-prob sum",
                                at("tail_logps")
                            )));
                        }
                        Some(v) if !v.is_finite() => {
                            return Err(bad(format!(
                                "{} is {v}: expected a finite number",
                                at("tail_logps")
                            )));
                        }
                        Some(_) => {}
                    }
                }
                if need_wpo {
                    match s.log_sum_sq_probs {
                        None => {
                            return Err(bad(format!(
                                "{} is missing: use_weighting needs each sequence's Σ log Σ_v p_v²",
                                at("log_sum_sq_probs")
                            )));
                        }
                        Some(v) if !v.is_finite() => {
                            return Err(bad(format!(
                                "{} is {v}: expected a finite number",
                                at("log_sum_sq_probs")
                            )));
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        Ok(())
    }
}

fn bad(msg: String) -> TrainError {
    TrainError::Arg { what: "batch", msg }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(tokens: u64) -> SeqStats {
        SeqStats {
            logps: -1.0,
            ref_logps: -1.5,
            tokens,
            ..SeqStats::default()
        }
    }

    fn msg(r: Result<()>) -> String {
        match r {
            Err(TrainError::Arg { what: "batch", msg }) => msg,
            other => panic!("expected a batch error, got {other:?}"),
        }
    }

    #[test]
    fn a_well_formed_batch_passes() {
        let b = PairBatch {
            chosen: vec![seq(3), seq(5)],
            rejected: vec![seq(4), seq(2)],
        };
        b.check(false, false).unwrap();
        assert_eq!((b.len(), b.shared_len(0), b.shared_len(1)), (2, 3, 2));
    }

    #[test]
    fn errors_name_the_sequence_and_field() {
        let mut b = PairBatch {
            chosen: vec![seq(3)],
            rejected: vec![seq(4), seq(1)],
        };
        assert!(msg(b.check(false, false)).contains("1 chosen sequences but 2 rejected"));
        b.rejected.pop();
        b.rejected[0].ref_logps = f64::NAN;
        assert_eq!(
            msg(b.check(false, false)),
            "rejected[0].ref_logps is NaN: expected a finite number"
        );
        b.rejected[0].ref_logps = -2.0;
        assert!(msg(b.check(true, false)).starts_with("chosen[0].tail_logps is missing"));
        assert!(msg(b.check(false, true)).starts_with("chosen[0].log_sum_sq_probs is missing"));
        b.chosen[0].mask_tokens = Some(2);
        assert!(msg(b.check(false, false)).starts_with("chosen[0].mask_tokens = 2 is below"));
        b.chosen[0].mask_tokens = Some(4);
        b.check(false, false).unwrap();
        b.chosen[0].top1 = 4;
        assert!(msg(b.check(false, false)).starts_with("chosen[0].top1 = 4 exceeds"));
        assert!(msg(PairBatch::default().check(false, false)).contains("no pairs"));
    }
}
