//! A batch of examples → one packed (padding-free) batch for the engine, with the tokens
//! and positions TRL's collator and loss would use.
//!
//! TRL 1.16's `DataCollatorForPreference.torch_call` builds, for N examples, 2N sequences in
//! the order [chosen_0 … chosen_{N-1}, rejected_0 … rejected_{N-1}], each `prompt_ids +
//! completion_ids` with a completion mask (0 on the prompt, 1 on the completion), cuts each
//! to `max_length` (keep_start: the first tokens; keep_end: the last), then right-pads them
//! into one [2N, max len] tensor. `_compute_loss` sets `labels = input_ids` where the
//! completion mask is 1 (-100 elsewhere, padding included), and the fused LM head scores
//! position t against `labels[t + 1]`. So a position counts when the *next* token is a
//! completion token: the last position of a sequence never counts, and under keep_end a
//! completion token cut to position 0 counts in the completion mask but has no log-prob.
//!
//! We keep the sequences unpadded, back to back. The two counts TRL uses differ exactly
//! there: `completion_tokens` is `completion_mask.sum(1)` (IPO's and sigmoid_norm's
//! length), `scored_tokens` is `completion_mask[:, 1:].sum(1)` (the tokens summed into
//! logps; entropy, mean logits and token accuracy average over these).

use crate::error::{Result, TrainError};

use super::build::{DpoExample, ExampleConfig, Truncation};

/// 2N sequences packed back to back; see the module doc. Legend: T = total tokens,
/// S = 2N sequences, N here = pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedBatch {
    pub input_ids: Vec<u32>,           // [T]
    pub seq_lens: Vec<usize>,          // [S] chosen 0..N, then rejected 0..N; sums to T
    pub targets: Vec<u32>,             // [T] the next token in its sequence; 0 on a last position
    pub weights: Vec<f32>,             // [T] 1 where the next token's log-prob counts, else 0
    pub completion_tokens: Vec<usize>, // [S] completion-mask tokens after truncation
    pub scored_tokens: Vec<usize>,     // [S] positions with weight 1
}

impl PackedBatch {
    /// N: the pairs in the batch.
    pub fn pairs(&self) -> usize {
        self.seq_lens.len() / 2
    }

    /// TRL's `num_tokens` increment for this batch: the padded batch's attention-mask sum,
    /// i.e. every real token.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }

    /// The width TRL's padded tensor would have (the longest sequence).
    pub fn padded_len(&self) -> usize {
        self.seq_lens.iter().copied().max().unwrap_or(0)
    }

    /// Start of each sequence in the packed arrays, and the end (T) last: [S + 1].
    pub fn offsets(&self) -> Vec<usize> {
        let mut at = 0;
        let mut out = Vec::with_capacity(self.seq_lens.len() + 1);
        out.push(0);
        for &len in &self.seq_lens {
            at += len;
            out.push(at);
        }
        out
    }

    /// The model's sparse form: only the positions whose next token counts.
    pub fn train_batch(&self) -> model::TrainBatch {
        let rows: Vec<usize> = (0..self.weights.len())
            .filter(|&t| self.weights[t] != 0.0)
            .collect();
        model::TrainBatch {
            ids: self.input_ids.clone(),
            lens: self.seq_lens.clone(),
            targets: rows.iter().map(|&t| self.targets[t]).collect(),
            rows,
        }
    }

    /// For each scored row of [`PackedBatch::train_batch`], in order, the sequence it
    /// belongs to ([N scored] → 0..S): how per-token log-probs sum into per-sequence ones.
    pub fn scored_sequences(&self) -> Vec<usize> {
        self.scored_tokens
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| std::iter::repeat_n(s, n))
            .collect()
    }
}

/// Packs `examples` (one batch, in order) as TRL's collator would, cutting to `config`'s
/// `max_length` with its truncation mode.
pub fn pack(examples: &[&DpoExample], config: &ExampleConfig) -> Result<PackedBatch> {
    config.validate()?;
    if examples.is_empty() {
        return Err(TrainError::Arg {
            what: "batch",
            msg: "no examples to pack".into(),
        });
    }
    let sides = [false, true].map(|rejected| {
        examples.iter().map(move |ex| {
            let completion = if rejected {
                &ex.rejected_ids
            } else {
                &ex.chosen_ids
            };
            (&ex.prompt_ids, completion)
        })
    });
    let total: usize = examples
        .iter()
        .map(|ex| {
            let cut = |n: usize| config.max_length.map_or(n, |m| n.min(m));
            let p = ex.prompt_ids.len();
            cut(p + ex.chosen_ids.len()) + cut(p + ex.rejected_ids.len())
        })
        .sum();
    let mut out = PackedBatch {
        input_ids: Vec::with_capacity(total),
        seq_lens: Vec::with_capacity(2 * examples.len()),
        targets: Vec::with_capacity(total),
        weights: Vec::with_capacity(total),
        completion_tokens: Vec::with_capacity(2 * examples.len()),
        scored_tokens: Vec::with_capacity(2 * examples.len()),
    };
    for (prompt, completion) in sides.into_iter().flatten() {
        let len = prompt.len() + completion.len();
        // The kept window [start, end) of prompt ++ completion.
        let (start, end) = match (config.max_length, config.truncation) {
            (Some(max), Truncation::KeepStart) if len > max => (0, max),
            (Some(max), Truncation::KeepEnd) if len > max => (len - max, len),
            _ => (0, len),
        };
        let token = |i: usize| {
            if i < prompt.len() {
                prompt[i]
            } else {
                completion[i - prompt.len()]
            }
        };
        let in_completion = |i: usize| i >= prompt.len();
        let mut scored = 0;
        for i in start..end {
            out.input_ids.push(token(i));
            let counts = i + 1 < end && in_completion(i + 1);
            out.targets.push(if i + 1 < end { token(i + 1) } else { 0 });
            out.weights.push(if counts { 1.0 } else { 0.0 });
            scored += usize::from(counts);
        }
        out.seq_lens.push(end - start);
        out.completion_tokens
            .push((start..end).filter(|&i| in_completion(i)).count());
        out.scored_tokens.push(scored);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &[u32], c: &[u32], r: &[u32]) -> DpoExample {
        DpoExample {
            row: 0,
            prompt_ids: p.to_vec(),
            chosen_ids: c.to_vec(),
            rejected_ids: r.to_vec(),
        }
    }

    fn cfg(max_length: Option<usize>, truncation: Truncation) -> ExampleConfig {
        ExampleConfig {
            max_length,
            truncation,
            ..ExampleConfig::default()
        }
    }

    /// TRL's doc example for DataCollatorForPreference, packed.
    #[test]
    fn trl_docstring_example() {
        let a = ex(&[1, 2, 3], &[4, 5], &[6]);
        let b = ex(&[7, 8], &[9], &[10, 11]);
        let p = pack(&[&a, &b], &cfg(None, Truncation::KeepStart)).unwrap();
        assert_eq!(p.seq_lens, vec![5, 3, 4, 4]);
        assert_eq!(
            p.input_ids,
            vec![1, 2, 3, 4, 5, 7, 8, 9, 1, 2, 3, 6, 7, 8, 10, 11]
        );
        assert_eq!(p.completion_tokens, vec![2, 1, 1, 2]);
        assert_eq!(p.scored_tokens, vec![2, 1, 1, 2]);
        // completion_mask [0,0,0,1,1] → weights at t where mask[t+1] = 1: [0,0,1,1,0].
        assert_eq!(&p.weights[..5], &[0.0, 0.0, 1.0, 1.0, 0.0]);
        assert_eq!(&p.targets[..5], &[2, 3, 4, 5, 0]);
        assert_eq!(p.num_tokens(), 16);
        assert_eq!(p.padded_len(), 5);
        assert_eq!(p.pairs(), 2);
        assert_eq!(p.offsets(), vec![0, 5, 8, 12, 16]);
        let tb = p.train_batch();
        assert_eq!(tb.rows, vec![2, 3, 6, 10, 13, 14]);
        assert_eq!(tb.targets, vec![4, 5, 9, 6, 10, 11]);
        assert_eq!(p.scored_sequences(), vec![0, 0, 1, 2, 3, 3]);
    }

    /// Naive reference: TRL's padded tensors built with Python's slice semantics, then
    /// labels shifted; compared with the packed form for every max_length and mode.
    #[test]
    fn matches_padded_reference_for_all_cuts() {
        let examples = [
            ex(&[2, 10, 11, 12], &[20, 21, 22, 1], &[30, 1]),
            ex(&[2], &[40, 41, 1], &[50, 51, 52, 53, 54, 1]),
            ex(&[2, 60, 61, 62, 63, 64, 65], &[70, 1], &[80, 81, 1]),
        ];
        let refs: Vec<&DpoExample> = examples.iter().collect();
        for truncation in [Truncation::KeepStart, Truncation::KeepEnd] {
            for max in (1..=12).map(Some).chain([None]) {
                let p = pack(&refs, &cfg(max, truncation)).unwrap();
                let offsets = p.offsets();
                let mut s = 0;
                for rejected in [false, true] {
                    for e in &examples {
                        let c = if rejected {
                            &e.rejected_ids
                        } else {
                            &e.chosen_ids
                        };
                        let mut ids: Vec<u32> = e.prompt_ids.iter().chain(c).copied().collect();
                        let mut mask: Vec<u8> = std::iter::repeat_n(0, e.prompt_ids.len())
                            .chain(std::iter::repeat_n(1, c.len()))
                            .collect();
                        if let Some(m) = max {
                            let n = ids.len();
                            let (a, b) = match truncation {
                                Truncation::KeepStart => (0, n.min(m)),
                                Truncation::KeepEnd => (n.saturating_sub(m), n),
                            };
                            ids = ids[a..b].to_vec();
                            mask = mask[a..b].to_vec();
                        }
                        let got = offsets[s]..offsets[s + 1];
                        assert_eq!(&p.input_ids[got.clone()], ids.as_slice());
                        let labels: Vec<Option<u32>> = ids
                            .iter()
                            .zip(&mask)
                            .map(|(&id, &m)| (m == 1).then_some(id))
                            .collect();
                        for (k, t) in got.clone().enumerate() {
                            let next = labels.get(k + 1).copied().flatten();
                            assert_eq!(p.weights[t], if next.is_some() { 1.0 } else { 0.0 });
                            if let Some(id) = next {
                                assert_eq!(p.targets[t], id);
                            }
                        }
                        let mask_sum: usize = mask.iter().map(|&m| m as usize).sum();
                        assert_eq!(p.completion_tokens[s], mask_sum);
                        assert_eq!(
                            p.scored_tokens[s],
                            mask.iter().skip(1).map(|&m| m as usize).sum::<usize>()
                        );
                        s += 1;
                    }
                }
                assert_eq!(s, 6);
            }
        }
    }

    #[test]
    fn keep_end_completion_at_position_zero_has_no_log_prob() {
        let e = ex(&[2, 3, 4], &[5, 6, 7], &[8]);
        let p = pack(&[&e], &cfg(Some(2), Truncation::KeepEnd)).unwrap();
        assert_eq!(p.input_ids, vec![6, 7, 4, 8]);
        assert_eq!(p.completion_tokens, vec![2, 1]);
        assert_eq!(p.scored_tokens, vec![1, 1]);
        assert_eq!(p.weights, vec![1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn empty_batch_is_an_error() {
        let e = pack(&[], &ExampleConfig::default()).unwrap_err();
        assert_eq!(e.to_string(), "batch: no examples to pack");
    }
}
