//! The generation engine: many sequences advanced together, one model step at a time.
//!
//! A model plugs in through [`StepModel`]: it owns a paged KV pool of the geometry it
//! reports ([`KvGeometry`]) and runs a [`StepBatch`], in which sequences in prefill (whole
//! prompts or chunks of them) and sequences decoding one token sit side by side, packed end
//! to end. For each sequence the batch gives the new tokens, their positions and the block
//! table that says where every position of the sequence lives in the pool; the model writes
//! the new tokens' keys and values there, attends over all the sequence's positions, and
//! returns the logits of the sequence's last new token. This is the shape of a paged
//! attention kernel's arguments (the CUDA path), and of the model crate's
//! `forward_cached(ids, positions, layout, cache)`, whose queries are the last `q_len` of
//! each sequence's `kv_len` positions.
//!
//! [`Engine`] owns the sequences ([`SequenceState`]s) and a scheduler (see `scheduler.rs`
//! for continuous batching, chunked prefill, paged-KV admission and preemption by
//! recompute). Each [`Engine::step`]: schedule → run the model → sample every sequence whose
//! last position was computed (in parallel; each sequence draws from its own RNG, so the
//! batch it ran in does not change what it samples) → hand back the sequences that
//! finished, and free their blocks.
//!
//! On a GPU the model ranks each row on the device and only the top candidates cross to the
//! host (`StepModel::step_top`). A row they cannot decide (a tie at the top-k cut) asks the
//! model for its tokens at or above a threshold (`StepModel::logits_at_least`), and only
//! what that cannot decide either copies the whole logits (`StepModel::last_full_logits`);
//! [`EngineStats`] counts each way.
//!
//! `n > 1` samples of one prompt are independent sequences that each prefill the prompt
//! (no prefix sharing): simple, and what the recompute preemption needs anyway.
//!
//! ## Example
//! ```no_run
//! # fn demo<M: sample::StepModel>(model: M, seqs: Vec<sample::NewSequence>) -> sample::Result<()> {
//! use sample::{Engine, EngineConfig};
//! let mut engine = Engine::new(model, EngineConfig::default())?;
//! for (row, seq) in seqs.into_iter().enumerate() {
//!     engine.add(row, seq)?;
//! }
//! while engine.has_unfinished() {
//!     for done in engine.step()? {
//!         println!("row {}: {:?}", done.tag, done.seq.text());
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;

use engine::ops::{RowTokens, TopK};
use rayon::prelude::*;

use crate::candidates::{CandidateRow, RowSlice, slice_threshold};
use crate::error::{Result, SampleError};
use crate::kv_blocks::BlockManager;
use crate::scheduler::{Limits, Schedule, Scheduler};
use crate::sequence::{NewSequence, SequenceState};

/// Identifies a sequence in the engine and in the model's [`StepBatch`]es. Never reused
/// within an engine.
pub type SeqId = u64;

/// The KV pool as the model allocated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    /// Token positions per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
}

/// One sequence's part of a [`StepBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStep {
    pub seq: SeqId,
    /// Positions already cached: the position of the first new token.
    pub start: usize,
    /// New tokens in this step (q_len); the sequence then has `start + len` (kv_len) cached.
    pub len: usize,
    /// Blocks holding positions `0 .. start + len`, in order: position p is slot
    /// `p % block_size` of block `block_table[p / block_size]`.
    pub block_table: Vec<u32>,
}

/// The tokens of one step: each sequence's new tokens, packed end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepBatch {
    pub ids: Vec<u32>,       // [T]
    pub positions: Vec<u32>, // [T]
    pub seqs: Vec<SeqStep>,  // [B], in the order of their tokens in `ids`
    pub block_size: usize,
}

impl StepBatch {
    /// Whether every sequence computes exactly one new token (a decode step).
    pub fn is_decode(&self) -> bool {
        self.seqs.iter().all(|s| s.len == 1)
    }

    /// Where each sequence's new tokens start in `ids`, plus the end: [B + 1].
    pub fn q_starts(&self) -> Vec<usize> {
        prefix_sums(self.seqs.iter().map(|s| s.len))
    }

    /// Where each sequence's positions start when all of them (cached and new) are packed
    /// end to end, plus the end: [B + 1].
    pub fn kv_starts(&self) -> Vec<usize> {
        prefix_sums(self.seqs.iter().map(|s| s.start + s.len))
    }
}

fn prefix_sums(lens: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut out = vec![0];
    let mut end = 0;
    for l in lens {
        end += l;
        out.push(end);
    }
    out
}

/// A model the engine can drive.
pub trait StepModel {
    /// V: the length of a logits row.
    fn vocab_size(&self) -> usize;
    /// The most positions a sequence may have (prompt + output).
    fn max_model_len(&self) -> usize;
    /// The KV pool the model allocated; the engine hands out exactly these blocks.
    fn kv_geometry(&self) -> KvGeometry;
    /// Runs one step: stores the keys and values of every new token in the blocks its
    /// sequence's table names, and returns the logits of each sequence's last new token,
    /// [B, V] in the batch's sequence order (raw: no temperature, no processing).
    fn step(&mut self, batch: &StepBatch) -> Result<Vec<f32>>;
    /// Runs one step like [`StepModel::step`], but may return only each row's `candidates`
    /// largest logits and its log-sum-exp ([`StepLogits::Candidates`], from
    /// `engine::ops::top_k_candidates`) instead of the whole rows: what a GPU model does so
    /// that [B, V] logits never cross to the host. The engine asks only when every sampling
    /// row can be drawn from that many (1 ≤ `candidates` ≤ min(V, `engine::ops::MAX_TOP_K`)).
    /// The default returns the full rows.
    fn step_top(&mut self, batch: &StepBatch, _candidates: usize) -> Result<StepLogits> {
        self.step(batch).map(StepLogits::Full)
    }
    /// For rows of the last step, after [`StepModel::step_top`] returned candidates: every
    /// token whose raw logit is ≥ the row's threshold, in id order, with its logit — `None`
    /// for a row with more than `cap` of them. `rows` index the step's batch (B) and pair
    /// with `thresholds`; the answer has one entry per row, in their order. This decides a
    /// row whose candidates tie at the top-k cut without the whole logits crossing to the
    /// host: a GPU model answers with `engine::ops::logits_at_least` on the step's device
    /// logits, and must keep them for [`StepModel::last_full_logits`], which may follow.
    /// `Ok(None)` (the default): not available, the engine copies the whole logits instead.
    fn logits_at_least(
        &mut self,
        _rows: &[usize],
        _thresholds: &[f32],
        _cap: usize,
    ) -> Result<Option<Vec<Option<RowTokens>>>> {
        Ok(None)
    }
    /// The whole logits [B, V] of the last step, after [`StepModel::step_top`] returned
    /// candidates: for the rare rows they cannot decide (NaN or ±inf, or a tie at the top-k
    /// cut that [`StepModel::logits_at_least`] did not settle).
    fn last_full_logits(&mut self) -> Result<Vec<f32>> {
        Err(SampleError::EngineConfig {
            name: "last_full_logits",
            msg: "this model returns full logits from every step; nothing was kept".into(),
        })
    }
    /// Forgets anything the model keeps per sequence (finished or preempted). The blocks of
    /// the sequence may be handed to another sequence in the next step.
    fn free(&mut self, _seq: SeqId) {}
    /// Where the model's step time went, in a line for the run's summary (None: not
    /// measured).
    fn time_summary(&self) -> Option<String> {
        None
    }
}

/// What a step hands the sampler.
#[derive(Debug, Clone, PartialEq)]
pub enum StepLogits {
    /// Every row whole: [B, V].
    Full(Vec<f32>),
    /// Each row's `k` largest logits (value descending, ties to the lower id) and lse.
    Candidates(TopK),
}

/// A boxed model is a model: a caller picks the runner (CPU or GPU) at run time.
impl<M: StepModel + ?Sized> StepModel for Box<M> {
    fn vocab_size(&self) -> usize {
        (**self).vocab_size()
    }
    fn max_model_len(&self) -> usize {
        (**self).max_model_len()
    }
    fn kv_geometry(&self) -> KvGeometry {
        (**self).kv_geometry()
    }
    fn step(&mut self, batch: &StepBatch) -> Result<Vec<f32>> {
        (**self).step(batch)
    }
    fn step_top(&mut self, batch: &StepBatch, candidates: usize) -> Result<StepLogits> {
        (**self).step_top(batch, candidates)
    }
    fn logits_at_least(
        &mut self,
        rows: &[usize],
        thresholds: &[f32],
        cap: usize,
    ) -> Result<Option<Vec<Option<RowTokens>>>> {
        (**self).logits_at_least(rows, thresholds, cap)
    }
    fn last_full_logits(&mut self) -> Result<Vec<f32>> {
        (**self).last_full_logits()
    }
    fn free(&mut self, seq: SeqId) {
        (**self).free(seq)
    }
    fn time_summary(&self) -> Option<String> {
        (**self).time_summary()
    }
}

/// Step limits (vLLM's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens in one step; longer prompts are prefilled in chunks.
    pub max_num_batched_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        // vLLM's defaults for offline generation.
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
        }
    }
}

/// A sequence that finished, with the tag it was added with.
pub struct Finished<T> {
    pub tag: T,
    pub seq: SequenceState,
}

/// Counters since the engine started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub steps: u64,
    /// Positions computed (prefill, recompute and decode), i.e. tokens fed to the model.
    pub computed_tokens: u64,
    /// Tokens sampled.
    pub generated_tokens: u64,
    /// Sequences that lost their cache to make room (each is recomputed later).
    pub preemptions: u64,
    pub finished: u64,
    /// Steps sampled from each row's top candidates (`StepModel::step_top` answered with
    /// candidates), not from whole rows.
    pub candidate_steps: u64,
    /// Rows of candidate steps that the candidates could not decide (ties at the top-k cut)
    /// and a slice of the row at or above the cut did (`StepModel::logits_at_least`).
    pub rows_resolved_on_device: u64,
    /// Candidate steps that copied the whole logits [B, V] for rows neither the candidates
    /// nor a slice could decide, and how many rows were sampled from those copies.
    pub full_copies: u64,
    pub full_copy_rows: u64,
}

/// The most tokens a row's slice may hold (`StepModel::logits_at_least`); a row with more
/// takes the whole logits. 4096 (id, logit) pairs are 32 KiB, against 1 MiB for a whole row
/// of a 256k vocabulary, and cover the soft-cap saturation that ties gemma-2's top logits.
pub(crate) const SLICE_CAP: usize = 4096;

struct Entry<T> {
    tag: T,
    state: SequenceState,
}

pub struct Engine<M, T> {
    model: M,
    vocab: usize,
    max_model_len: usize,
    scheduler: Scheduler,
    seqs: HashMap<SeqId, Entry<T>>,
    next_id: SeqId,
    stats: EngineStats,
}

impl<M: StepModel, T> Engine<M, T> {
    pub fn new(model: M, config: EngineConfig) -> Result<Self> {
        let kv = model.kv_geometry();
        let checks: [(&'static str, usize); 5] = [
            ("block_size", kv.block_size),
            ("num_blocks", kv.num_blocks),
            ("max_num_seqs", config.max_num_seqs),
            ("max_num_batched_tokens", config.max_num_batched_tokens),
            ("vocab_size", model.vocab_size()),
        ];
        if let Some((name, _)) = checks.iter().find(|(_, v)| *v == 0) {
            return Err(SampleError::EngineConfig {
                name,
                msg: "must be at least 1".into(),
            });
        }
        if model.max_model_len() == 0 {
            return Err(SampleError::EngineConfig {
                name: "max_model_len",
                msg: "must be at least 1".into(),
            });
        }
        let limits = Limits {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
        };
        Ok(Self {
            vocab: model.vocab_size(),
            max_model_len: model.max_model_len(),
            scheduler: Scheduler::new(limits, BlockManager::new(kv.block_size, kv.num_blocks)),
            model,
            seqs: HashMap::new(),
            next_id: 0,
            stats: EngineStats::default(),
        })
    }

    /// Queues a sequence. Its context limit becomes the model's (or its own, if smaller).
    /// Fails when the prompt is longer than the model's context, or when the sequence at
    /// its longest could not fit in the KV pool even alone.
    pub fn add(&mut self, tag: T, mut new: NewSequence) -> Result<SeqId> {
        let max_len = new
            .max_model_len
            .map_or(self.max_model_len, |m| m.min(self.max_model_len));
        new.max_model_len = Some(max_len);
        let prompt = new.prompt_ids.len();
        if prompt > max_len {
            return Err(SampleError::PromptTooLong {
                len: prompt,
                max_model_len: max_len,
            });
        }
        if let Some(&id) = new.prompt_ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(SampleError::TokenOutOfRange {
                what: "prompt",
                token_id: id,
                vocab: self.vocab,
            });
        }
        // The cache holds every position but the last sampled token's.
        let max_out = new.params.max_tokens.map_or(usize::MAX, |m| m as usize);
        let max_out = max_out.min(max_len - prompt).max(1);
        let cached = (prompt + max_out - 1).max(prompt);
        let blocks = self.scheduler.blocks();
        if blocks.blocks_for(cached) > blocks.num_blocks() {
            return Err(SampleError::KvCacheTooSmall {
                tokens: cached,
                needed: blocks.blocks_for(cached),
                block_size: blocks.block_size(),
                total: blocks.num_blocks(),
            });
        }
        let state = SequenceState::new(new)?;
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, Entry { tag, state });
        self.scheduler.add(id);
        Ok(id)
    }

    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Sequences added and not finished yet.
    pub fn num_unfinished(&self) -> usize {
        self.seqs.len()
    }

    /// Sequences waiting for their (first or recomputed) prefill.
    pub fn num_waiting(&self) -> usize {
        self.scheduler.num_waiting()
    }

    pub fn num_running(&self) -> usize {
        self.scheduler.num_running()
    }

    /// KV blocks that no sequence holds.
    pub fn num_free_blocks(&self) -> usize {
        self.scheduler.blocks().num_free()
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    /// One step: schedule, run the model, sample. Returns the sequences that finished in
    /// it, in batch order. A model error, or a logits row the sampler rejects (NaN), stops
    /// the engine: the step's state is not rolled back.
    pub fn step(&mut self) -> Result<Vec<Finished<T>>> {
        if self.seqs.is_empty() {
            return Ok(Vec::new());
        }
        let seqs = &self.seqs;
        let schedule = self
            .scheduler
            .schedule(|id| seqs.get(&id).map_or(0, |e| e.state.num_tokens()))?;
        for &p in &schedule.preempted {
            self.model.free(p);
        }
        self.stats.preemptions += schedule.preempted.len() as u64;
        let batch = self.build_batch(&schedule);
        // Sequences whose last position is computed in this step sample their next token.
        let mut row_of: HashMap<SeqId, usize> = HashMap::new();
        for (b, s) in batch.seqs.iter().enumerate() {
            if self.seqs[&s.seq].state.num_tokens() == s.start + s.len {
                row_of.insert(s.seq, b);
            }
        }
        // Candidates when every sampling row can be drawn from its top few logits.
        let vocab = self.vocab;
        let candidates = row_of.keys().try_fold(1usize, |n, id| {
            self.seqs[id]
                .state
                .candidates_needed(vocab)
                .map(|m| n.max(m))
        });
        let logits = match candidates {
            Some(n) => self.model.step_top(&batch, n.min(vocab))?,
            None => StepLogits::Full(self.model.step(&batch)?),
        };
        let rows = batch.seqs.len();
        self.stats.steps += 1;
        self.stats.computed_tokens += batch.ids.len() as u64;

        match logits {
            StepLogits::Full(logits) => self.sample_full(&row_of, &logits, rows, None)?,
            StepLogits::Candidates(top) => {
                let k = top.k;
                if top.values.len() != rows * k
                    || top.ids.len() != rows * k
                    || top.lse.len() != rows
                {
                    return Err(SampleError::LogitsShape {
                        got: top.values.len(),
                        rows,
                        vocab: k,
                    });
                }
                self.stats.candidate_steps += 1;
                let undecided = self.sample_candidates(&row_of, &top, None)?;
                let undecided = self.resolve_on_device(&row_of, &top, undecided)?;
                if !undecided.is_empty() {
                    let full = self.model.last_full_logits()?;
                    self.stats.full_copies += 1;
                    self.stats.full_copy_rows += undecided.len() as u64;
                    self.sample_full(&row_of, &full, rows, Some(&undecided))?;
                }
            }
        }
        self.stats.generated_tokens += row_of.len() as u64;

        let mut finished = Vec::new();
        for s in &batch.seqs {
            if row_of.contains_key(&s.seq) && self.seqs[&s.seq].state.is_finished() {
                self.scheduler.finish(s.seq);
                self.model.free(s.seq);
                if let Some(e) = self.seqs.remove(&s.seq) {
                    finished.push(Finished {
                        tag: e.tag,
                        seq: e.state,
                    });
                }
            }
        }
        self.stats.finished += finished.len() as u64;
        Ok(finished)
    }

    /// Samples the sequences of `row_of` from their device candidates `top` — only those in
    /// `slices`, each with its row's slice, when given; returns the ones that could not be
    /// decided, untouched.
    fn sample_candidates(
        &mut self,
        row_of: &HashMap<SeqId, usize>,
        top: &TopK,
        slices: Option<&HashMap<SeqId, RowSlice<'_>>>,
    ) -> Result<Vec<SeqId>> {
        let vocab = self.vocab;
        let mut work: Vec<(SeqId, &mut SequenceState, CandidateRow<'_>)> = self
            .seqs
            .iter_mut()
            .filter(|(id, _)| slices.is_none_or(|s| s.contains_key(id)))
            .filter_map(|(id, e)| {
                row_of.get(id).map(|&b| {
                    let row = CandidateRow {
                        slice: slices.and_then(|s| s.get(id).copied()),
                        ..CandidateRow::of(top, b)
                    };
                    (*id, &mut e.state, row)
                })
            })
            .collect();
        Ok(work
            .par_iter_mut()
            .map(|(id, state, row)| {
                Ok(state.step_candidates(*row, vocab)?.is_none().then_some(*id))
            })
            .collect::<Result<Vec<Option<SeqId>>>>()?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Decides what it can of the `undecided` rows of a candidate step from slices of the
    /// rows at or above their cut (`StepModel::logits_at_least`); returns the rest.
    fn resolve_on_device(
        &mut self,
        row_of: &HashMap<SeqId, usize>,
        top: &TopK,
        undecided: Vec<SeqId>,
    ) -> Result<Vec<SeqId>> {
        let vocab = self.vocab;
        // (sequence, batch row, threshold) of each row a slice can decide.
        let asks: Vec<(SeqId, usize, f32)> = undecided
            .iter()
            .filter_map(|id| {
                let b = *row_of.get(id)?;
                let params = self.seqs.get(id)?.state.params();
                let t = slice_threshold(CandidateRow::of(top, b), params, vocab)?;
                Some((*id, b, t))
            })
            .collect();
        if asks.is_empty() {
            return Ok(undecided);
        }
        let rows: Vec<usize> = asks.iter().map(|a| a.1).collect();
        let thresholds: Vec<f32> = asks.iter().map(|a| a.2).collect();
        let Some(answers) = self.model.logits_at_least(&rows, &thresholds, SLICE_CAP)? else {
            return Ok(undecided);
        };
        if answers.len() != asks.len() {
            return Err(SampleError::EngineConfig {
                name: "logits_at_least",
                msg: format!(
                    "the model answered {} rows for {} asked",
                    answers.len(),
                    asks.len()
                ),
            });
        }
        let slices: HashMap<SeqId, RowSlice<'_>> = asks
            .iter()
            .zip(&answers)
            .filter_map(|(&(id, _, threshold), tokens)| {
                let tokens = tokens.as_deref()?;
                Some((id, RowSlice { threshold, tokens }))
            })
            .collect();
        let left = self.sample_candidates(row_of, top, Some(&slices))?;
        self.stats.rows_resolved_on_device += (slices.len() - left.len()) as u64;
        Ok(undecided
            .into_iter()
            .filter(|id| !slices.contains_key(id) || left.contains(id))
            .collect())
    }

    /// Samples the sequences of `row_of` (only those in `only`, when given) from the whole
    /// logits rows [rows, V] of the step.
    fn sample_full(
        &mut self,
        row_of: &HashMap<SeqId, usize>,
        logits: &[f32], // [B, V]
        rows: usize,
        only: Option<&[SeqId]>,
    ) -> Result<()> {
        let vocab = self.vocab;
        if logits.len() != rows * vocab {
            return Err(SampleError::LogitsShape {
                got: logits.len(),
                rows,
                vocab,
            });
        }
        let mut work: Vec<(&mut SequenceState, &[f32])> = self
            .seqs
            .iter_mut()
            .filter(|(id, _)| only.is_none_or(|o| o.contains(id)))
            .filter_map(|(id, e)| {
                row_of
                    .get(id)
                    .map(|&b| (&mut e.state, &logits[b * vocab..(b + 1) * vocab]))
            })
            .collect();
        work.par_iter_mut()
            .map(|(state, row)| state.step(row).map(drop))
            .collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    /// Steps until every sequence has finished; returns them in the order they finished.
    pub fn run_to_completion(&mut self) -> Result<Vec<Finished<T>>> {
        let mut out = Vec::new();
        while self.has_unfinished() {
            out.extend(self.step()?);
        }
        Ok(out)
    }

    fn build_batch(&self, schedule: &Schedule) -> StepBatch {
        let total: usize = schedule.entries.iter().map(|e| e.len).sum();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut seqs = Vec::with_capacity(schedule.entries.len());
        for e in &schedule.entries {
            let state = &self.seqs[&e.seq].state;
            let (prompt, output) = (state.prompt_ids(), state.output_ids());
            for p in e.start..e.start + e.len {
                ids.push(if p < prompt.len() {
                    prompt[p]
                } else {
                    output[p - prompt.len()]
                });
                positions.push(p as u32);
            }
            seqs.push(SeqStep {
                seq: e.seq,
                start: e.start,
                len: e.len,
                block_table: self.scheduler.table(e.seq).to_vec(),
            });
        }
        StepBatch {
            ids,
            positions,
            seqs,
            block_size: self.scheduler.blocks().block_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::params::SamplingParams;
    use crate::sampler::Sampler;
    use crate::stop::StopTokens;
    use crate::test_util::fixture_tokenizer;

    const VOCAB: usize = 1003;
    const EOS: u32 = 1;

    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A model whose logits hash each sequence's context length and last token: on some
    /// steps only a few distinct values (ties at every cut), on some soft-capped logits with
    /// many exactly at the cap (gemma-2's saturation), on others many values; a few −inf.
    /// With `candidates` it answers `step_top` as a GPU runner does, from the CPU op, and
    /// with `slices` (its own cap on a slice) `logits_at_least`, from the CPU op too.
    struct HashModel {
        candidates: bool,
        slices: Option<usize>,
        last: Option<Vec<f32>>,
        candidate_steps: usize,
        slice_rows: usize,
        full_copies: usize,
    }

    impl HashModel {
        fn new(candidates: bool) -> Self {
            Self {
                candidates,
                slices: None,
                last: None,
                candidate_steps: 0,
                slice_rows: 0,
                full_copies: 0,
            }
        }

        fn with_slices(cap: usize) -> Self {
            Self {
                slices: Some(cap),
                ..Self::new(true)
            }
        }
    }

    impl StepModel for HashModel {
        fn vocab_size(&self) -> usize {
            VOCAB
        }
        fn max_model_len(&self) -> usize {
            256
        }
        fn kv_geometry(&self) -> KvGeometry {
            KvGeometry {
                block_size: 4,
                num_blocks: 400,
            }
        }
        fn step(&mut self, batch: &StepBatch) -> Result<Vec<f32>> {
            let q = batch.q_starts();
            let mut out = Vec::with_capacity(batch.seqs.len() * VOCAB);
            for (b, s) in batch.seqs.iter().enumerate() {
                let h = mix(((s.start + s.len) as u64) << 32 ^ batch.ids[q[b + 1] - 1] as u64);
                let distinct = match h % 16 {
                    0 => 6,
                    1 => 60,
                    _ => 1 << 20,
                };
                // Soft-capped at 12 (tanh(x) · 12 of x in [0, 12)): a quarter of the logits
                // saturate at exactly 12.
                let saturated = h % 16 == 2;
                out.extend((0..VOCAB as u64).map(|v| {
                    let r = mix(h ^ (v << 20));
                    let x = (r % distinct) as f32 / distinct as f32 * 12.0;
                    if r.is_multiple_of(97) {
                        f32::NEG_INFINITY
                    } else if saturated {
                        x.tanh() * 12.0
                    } else {
                        x
                    }
                }));
            }
            Ok(out)
        }
        fn step_top(&mut self, batch: &StepBatch, candidates: usize) -> Result<StepLogits> {
            let full = self.step(batch)?;
            if !self.candidates {
                return Ok(StepLogits::Full(full));
            }
            let t = engine::Tensor::from_vec(full.clone(), &[batch.seqs.len(), VOCAB])
                .map_err(SampleError::model)?;
            let top = engine::ops::top_k_candidates(&t, candidates).map_err(SampleError::model)?;
            self.last = Some(full);
            self.candidate_steps += 1;
            Ok(StepLogits::Candidates(top))
        }
        fn logits_at_least(
            &mut self,
            rows: &[usize],
            thresholds: &[f32],
            cap: usize,
        ) -> Result<Option<Vec<Option<RowTokens>>>> {
            let Some(own_cap) = self.slices else {
                return Ok(None);
            };
            let last = self
                .last
                .as_ref()
                .expect("a candidates step kept its logits");
            let t = engine::Tensor::from_vec(last.clone(), &[last.len() / VOCAB, VOCAB])
                .map_err(SampleError::model)?;
            self.slice_rows += rows.len();
            engine::ops::logits_at_least(&t, rows, thresholds, cap.min(own_cap))
                .map(Some)
                .map_err(SampleError::model)
        }
        fn last_full_logits(&mut self) -> Result<Vec<f32>> {
            self.full_copies += 1;
            Ok(self.last.take().expect("a candidates step kept its logits"))
        }
    }

    /// Runs `params` (two samples of each on three prompts) to completion; returns each
    /// sequence by tag, the model and the engine's counters.
    fn run(
        model: HashModel,
        params: &[SamplingParams],
    ) -> (Vec<SequenceState>, HashModel, EngineStats) {
        let mut engine = Engine::new(
            model,
            EngineConfig {
                max_num_seqs: 7,
                max_num_batched_tokens: 40,
            },
        )
        .unwrap();
        let mut tag = 0;
        for p in params {
            let p = Arc::new(p.clone().validate().unwrap());
            for prompt in [vec![5u32, 6, 7], vec![9; 20], vec![300, 2, 44, 8]] {
                for i in 0..2 {
                    let new = NewSequence {
                        params: p.clone(),
                        prompt_ids: prompt.clone(),
                        tokenizer: fixture_tokenizer(),
                        stop_tokens: Arc::new(StopTokens::new(&p, Some(EOS), &[])),
                        rng: Sampler::new(3).rng_for(&p, tag, i),
                        max_model_len: None,
                    };
                    engine.add(tag, new).unwrap();
                    tag += 1;
                }
            }
        }
        let mut done: Vec<Finished<u64>> = engine.run_to_completion().unwrap();
        done.sort_by_key(|f| f.tag);
        let seqs = done.into_iter().map(|f| f.seq).collect();
        let stats = engine.stats();
        (seqs, engine.model, stats)
    }

    /// The same tokens, log-probs within f32 rounding, the same top log-prob ids.
    fn assert_same_outputs(what: &str, got: &[SequenceState], want: &[SequenceState]) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let what = format!("{what}, sequence {i}");
            assert_eq!(g.output_ids(), w.output_ids(), "{what}");
            for (a, b) in g.token_logprobs().iter().zip(w.token_logprobs()) {
                assert!(
                    (a - b).abs() <= 2e-6 * b.abs().max(1.0),
                    "{what}: {a} vs {b}"
                );
            }
            assert_eq!(g.top_logprobs().len(), w.top_logprobs().len(), "{what}");
            for (a, b) in g.top_logprobs().iter().zip(w.top_logprobs()) {
                let ids = |x: &[(u32, f32)]| x.iter().map(|t| t.0).collect::<Vec<_>>();
                assert_eq!(ids(a), ids(b), "{what}");
                for (x, y) in a.iter().zip(b) {
                    assert!((x.1 - y.1).abs() <= 2e-6 * y.1.abs().max(1.0), "{what}");
                }
            }
        }
    }

    /// The engine samples from device-style candidates exactly what it samples from whole
    /// rows: same tokens, log-probs within f32 rounding, same top log-prob ids — falling back
    /// to the whole row where the candidates cannot decide (ties at the cut) or the
    /// parameters need it (min_tokens while it lasts, penalties).
    #[test]
    fn candidate_steps_sample_what_full_steps_sample() {
        let base = SamplingParams {
            max_tokens: Some(12),
            ..Default::default()
        };
        let with = |f: &dyn Fn(&mut SamplingParams)| {
            let mut p = base.clone();
            f(&mut p);
            p
        };
        let scenarios = [
            vec![
                with(&|p| p.temperature = 0.0),
                with(&|p| {
                    (p.temperature, p.top_k, p.top_p) = (0.7, 5, 0.8);
                }),
                with(&|p| {
                    (p.temperature, p.top_k, p.logprobs) = (1.0, 20, Some(3));
                }),
                with(&|p| {
                    (p.temperature, p.top_k, p.logprobs) = (1.3, 2, Some(9));
                }),
                with(&|p| {
                    (p.temperature, p.top_k, p.min_tokens) = (0.9, 64, 4);
                }),
            ],
            vec![
                with(&|p| {
                    (p.temperature, p.top_k) = (0.7, 5);
                }),
                with(&|p| {
                    (p.temperature, p.top_k, p.repetition_penalty) = (0.7, 5, 1.3);
                }),
            ],
        ];
        for (n, params) in scenarios.iter().enumerate() {
            let (want, _, _) = run(HashModel::new(false), params);
            let (got, model, stats) = run(HashModel::new(true), params);
            assert_same_outputs(&format!("scenario {n}"), &got, &want);
            // Without slices, every undecided row copies the whole logits.
            assert_eq!(stats.rows_resolved_on_device, 0);
            assert_eq!(stats.full_copies, model.full_copies as u64);
            assert_eq!(stats.candidate_steps, model.candidate_steps as u64);
            if n == 0 {
                // Most steps ran on candidates; tie-heavy rows needed the whole row sometimes,
                // and most rows never did.
                assert!(model.candidate_steps >= 10, "{}", model.candidate_steps);
                assert!(model.full_copies >= 1);
                assert!(model.full_copies < model.candidate_steps, "{stats:?}");
                assert!(
                    4 * stats.full_copy_rows < stats.generated_tokens,
                    "{stats:?}"
                );
            } else {
                // A penalty row in every step until it finishes: the whole rows until then.
                assert!(model.candidate_steps < 30, "{}", model.candidate_steps);
            }
        }
    }

    /// Rows whose candidates tie at the cut (few distinct values, soft-cap saturation) are
    /// decided from slices of the rows at or above the cut, as the whole rows decide them;
    /// only rows whose slice passes its cap copy the whole logits.
    #[test]
    fn ties_at_the_cut_are_resolved_on_device_as_whole_rows_resolve_them() {
        let base = SamplingParams {
            max_tokens: Some(16),
            ..Default::default()
        };
        let with = |f: &dyn Fn(&mut SamplingParams)| {
            let mut p = base.clone();
            f(&mut p);
            p
        };
        let params = [
            with(&|p| {
                (p.temperature, p.logprobs) = (0.0, Some(2));
            }),
            // The reference workflow's settings (T 0.001, raised to 0.01).
            with(&|p| {
                (p.temperature, p.top_k, p.top_p) = (0.001, 5, 0.8);
            }),
            with(&|p| {
                (p.temperature, p.top_k, p.top_p) = (0.7, 5, 0.8);
            }),
            with(&|p| {
                (p.temperature, p.top_k, p.logprobs) = (1.0, 20, Some(3));
            }),
            with(&|p| {
                (p.temperature, p.top_k) = (1.7, 2);
            }),
        ];
        let (want, _, _) = run(HashModel::new(false), &params);

        // Slices of any size: no row needs the whole logits.
        let (got, model, stats) = run(HashModel::with_slices(usize::MAX), &params);
        assert_same_outputs("unlimited slices", &got, &want);
        assert!(stats.rows_resolved_on_device >= 10, "{stats:?}");
        assert_eq!((stats.full_copies, model.full_copies), (0, 0), "{stats:?}");
        assert_eq!(stats.rows_resolved_on_device, model.slice_rows as u64);

        // Slices of at most 100 tokens: saturated rows (about 250 at the cap) and rows of 6
        // distinct values (about 165 each) copy the whole logits; 60 distinct values do not.
        let (got, model, stats) = run(HashModel::with_slices(100), &params);
        assert_same_outputs("slices of 100", &got, &want);
        assert!(stats.rows_resolved_on_device >= 1, "{stats:?}");
        assert!(stats.full_copies >= 1, "{stats:?}");
        assert_eq!(stats.full_copies, model.full_copies as u64);
        assert!(stats.full_copy_rows >= stats.full_copies);
        assert_eq!(
            stats.rows_resolved_on_device + stats.full_copy_rows,
            model.slice_rows as u64,
            "{stats:?}"
        );
    }

    #[test]
    fn batch_starts_are_prefix_sums() {
        let b = StepBatch {
            ids: vec![1, 2, 3, 4, 5],
            positions: vec![0, 1, 2, 7, 3],
            seqs: vec![
                SeqStep {
                    seq: 0,
                    start: 0,
                    len: 3,
                    block_table: vec![0],
                },
                SeqStep {
                    seq: 4,
                    start: 7,
                    len: 1,
                    block_table: vec![1, 2],
                },
                SeqStep {
                    seq: 2,
                    start: 3,
                    len: 1,
                    block_table: vec![3],
                },
            ],
            block_size: 4,
        };
        assert_eq!(b.q_starts(), vec![0, 3, 4, 5]);
        assert_eq!(b.kv_starts(), vec![0, 3, 11, 15]);
    }
}
