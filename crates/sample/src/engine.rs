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

use rayon::prelude::*;

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
    /// Forgets anything the model keeps per sequence (finished or preempted). The blocks of
    /// the sequence may be handed to another sequence in the next step.
    fn free(&mut self, _seq: SeqId) {}
    /// Where the model's step time went, in a line for the run's summary (None: not
    /// measured).
    fn time_summary(&self) -> Option<String> {
        None
    }
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
}

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
        let logits = self.model.step(&batch)?;
        let rows = batch.seqs.len();
        if logits.len() != rows * self.vocab {
            return Err(SampleError::LogitsShape {
                got: logits.len(),
                rows,
                vocab: self.vocab,
            });
        }
        self.stats.steps += 1;
        self.stats.computed_tokens += batch.ids.len() as u64;

        // Sequences whose last position was computed sample their next token.
        let mut row_of: HashMap<SeqId, usize> = HashMap::new();
        for (b, s) in batch.seqs.iter().enumerate() {
            if self.seqs[&s.seq].state.num_tokens() == s.start + s.len {
                row_of.insert(s.seq, b);
            }
        }
        let vocab = self.vocab;
        let mut work: Vec<(&mut SequenceState, &[f32])> = self
            .seqs
            .iter_mut()
            .filter_map(|(id, e)| {
                row_of
                    .get(id)
                    .map(|&b| (&mut e.state, &logits[b * vocab..(b + 1) * vocab]))
            })
            .collect();
        work.par_iter_mut()
            .map(|(state, row)| state.step(row).map(drop))
            .collect::<Result<Vec<()>>>()?;
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
