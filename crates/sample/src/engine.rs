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

use engine::ops::TopK;
use rayon::prelude::*;

use crate::candidates::CandidateRow;
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
    /// Runs one step like [`StepModel::step`], but may return only each row's `candidates`
    /// largest logits and its log-sum-exp ([`StepLogits::Candidates`], from
    /// `engine::ops::top_k_candidates`) instead of the whole rows: what a GPU model does so
    /// that [B, V] logits never cross to the host. The engine asks only when every sampling
    /// row can be drawn from that many (1 ≤ `candidates` ≤ min(V, `engine::ops::MAX_TOP_K`)).
    /// The default returns the full rows.
    fn step_top(&mut self, batch: &StepBatch, _candidates: usize) -> Result<StepLogits> {
        self.step(batch).map(StepLogits::Full)
    }
    /// The whole logits [B, V] of the last step, after [`StepModel::step_top`] returned
    /// candidates: for the rare rows they cannot decide (a tie at the top-k cut, NaN).
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
                let mut work: Vec<(SeqId, &mut SequenceState, CandidateRow<'_>)> = self
                    .seqs
                    .iter_mut()
                    .filter_map(|(id, e)| {
                        row_of.get(id).map(|&b| {
                            let row = CandidateRow {
                                values: &top.values[b * k..(b + 1) * k],
                                ids: &top.ids[b * k..(b + 1) * k],
                                lse: top.lse[b],
                            };
                            (*id, &mut e.state, row)
                        })
                    })
                    .collect();
                let undecided: Vec<SeqId> = work
                    .par_iter_mut()
                    .map(|(id, state, row)| {
                        Ok(state.step_candidates(*row, vocab)?.is_none().then_some(*id))
                    })
                    .collect::<Result<Vec<Option<SeqId>>>>()?
                    .into_iter()
                    .flatten()
                    .collect();
                if !undecided.is_empty() {
                    let full = self.model.last_full_logits()?;
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
    /// steps only a few distinct values (ties at every cut), on others many; a few −inf.
    /// With `candidates` it answers `step_top` as a GPU runner does, from the CPU op.
    struct HashModel {
        candidates: bool,
        last: Option<Vec<f32>>,
        candidate_steps: usize,
        full_copies: usize,
    }

    impl HashModel {
        fn new(candidates: bool) -> Self {
            Self {
                candidates,
                last: None,
                candidate_steps: 0,
                full_copies: 0,
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
                let distinct = if h.is_multiple_of(16) { 6 } else { 1 << 20 };
                out.extend((0..VOCAB as u64).map(|v| {
                    let r = mix(h ^ (v << 20));
                    if r.is_multiple_of(97) {
                        f32::NEG_INFINITY
                    } else {
                        (r % distinct) as f32 / distinct as f32 * 12.0
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
        fn last_full_logits(&mut self) -> Result<Vec<f32>> {
            self.full_copies += 1;
            Ok(self.last.take().expect("a candidates step kept its logits"))
        }
    }

    /// Runs `params` (two samples of each on three prompts) to completion; returns each
    /// sequence by tag.
    fn run(model: HashModel, params: &[SamplingParams]) -> (Vec<SequenceState>, HashModel) {
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
        (seqs, engine.model)
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
            let (want, _) = run(HashModel::new(false), params);
            let (got, model) = run(HashModel::new(true), params);
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let what = format!("scenario {n}, sequence {i}");
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
            if n == 0 {
                // Most steps ran on candidates; tie-heavy rows needed the whole row sometimes.
                assert!(model.candidate_steps >= 10, "{}", model.candidate_steps);
                assert!(model.full_copies >= 1);
                assert!(2 * model.full_copies < model.candidate_steps);
            } else {
                // A penalty row in every step until it finishes: the whole rows until then.
                assert!(model.candidate_steps < 30, "{}", model.candidate_steps);
            }
        }
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
