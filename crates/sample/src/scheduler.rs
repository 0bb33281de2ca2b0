//! Which tokens of which sequences go into the next model step.
//!
//! vLLM V1's scheduler, without its extras (no prefix caching, no priorities):
//!
//! - **Continuous batching.** Every step first serves the running sequences, oldest first:
//!   one token each for those decoding, the next chunk for those still in prefill. Then, if
//!   budget remains, waiting sequences join (first come, first served) up to
//!   `max_num_seqs`. A sequence that finishes leaves at once and frees its blocks.
//! - **Chunked prefill.** A step carries at most `max_num_batched_tokens` tokens in all; a
//!   prompt that does not fit is cut and continued in the next steps. Only the step that
//!   computes a sequence's last known token yields logits to sample from.
//! - **Paged KV admission.** A sequence is scheduled only when its block table can grow to
//!   hold every position it will have cached after the step. A waiting sequence that does
//!   not fit stops admission (later ones wait too, so order is kept).
//! - **Preemption by recompute.** A running sequence that needs a block when none is free
//!   takes one from the newest running sequence: that one loses all its blocks and its
//!   cached positions, and goes back to the front of the queue. When it is admitted again
//!   its prompt *and* the tokens it generated are prefilled anew, and it continues sampling
//!   where it stopped. Its sampler state (RNG, penalties, stop state) lives outside the
//!   cache, so it generates exactly what it would have without the preemption. As in vLLM,
//!   no new sequence is admitted in a step that preempted one.
//!
//! The scheduler counts positions only; the engine owns the sequences and tells it each
//! sequence's current length.

use std::collections::{HashMap, VecDeque};

use crate::engine::SeqId;
use crate::error::{Result, SampleError};
use crate::kv_blocks::BlockManager;

/// Step limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Most sequences in one step (vLLM's `max_num_seqs`).
    pub(crate) max_num_seqs: usize,
    /// Most tokens in one step, prefill chunks and decode tokens together
    /// (vLLM's `max_num_batched_tokens`).
    pub(crate) max_num_batched_tokens: usize,
}

/// One sequence's share of a step: positions `start .. start + len` are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scheduled {
    pub(crate) seq: SeqId,
    /// Positions already cached before this step.
    pub(crate) start: usize,
    /// New positions computed in this step (> 0).
    pub(crate) len: usize,
}

/// What one step runs, and who lost their cache to make room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub(crate) entries: Vec<Scheduled>,
    /// Sequences preempted in this step (their cached positions are gone).
    pub(crate) preempted: Vec<SeqId>,
}

#[derive(Debug, Clone)]
pub(crate) struct Scheduler {
    limits: Limits,
    blocks: BlockManager,
    waiting: VecDeque<SeqId>,
    /// In admission order: the last is preempted first.
    running: Vec<SeqId>,
    /// Positions of each known sequence whose keys and values are cached.
    computed: HashMap<SeqId, usize>,
}

impl Scheduler {
    pub(crate) fn new(limits: Limits, blocks: BlockManager) -> Self {
        Self {
            limits,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            computed: HashMap::new(),
        }
    }

    /// Queues a new sequence.
    pub(crate) fn add(&mut self, seq: SeqId) {
        self.waiting.push_back(seq);
        self.computed.insert(seq, 0);
    }

    /// Removes a finished sequence and frees its blocks.
    pub(crate) fn finish(&mut self, seq: SeqId) {
        self.running.retain(|&s| s != seq);
        self.waiting.retain(|&s| s != seq);
        self.blocks.free(seq);
        self.computed.remove(&seq);
    }

    pub(crate) fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub(crate) fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn num_running(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// Plans the next step. `num_tokens(seq)` is the sequence's length now (prompt plus the
    /// tokens it has generated). Positions are counted as computed as soon as they are
    /// scheduled: the step is expected to run.
    pub(crate) fn schedule(&mut self, num_tokens: impl Fn(SeqId) -> usize) -> Result<Schedule> {
        let mut budget = self.limits.max_num_batched_tokens;
        let mut out = Schedule::default();

        // Running sequences first, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = self.running[i];
            let start = self.computed[&seq];
            let len = num_tokens(seq).saturating_sub(start).min(budget);
            if len == 0 {
                // Nothing new to compute (cannot happen between engine steps).
                i += 1;
                continue;
            }
            let mut lost_itself = false;
            while !self.blocks.grow(seq, start + len) {
                let Some(victim) = self.running.pop() else {
                    break;
                };
                self.preempt(victim);
                out.preempted.push(victim);
                if victim == seq {
                    lost_itself = true;
                    break;
                }
            }
            if lost_itself {
                if self.running.is_empty() {
                    // Alone with the whole pool and still no room.
                    return Err(self.too_small(start + len));
                }
                break;
            }
            out.entries.push(Scheduled { seq, start, len });
            self.computed.insert(seq, start + len);
            budget -= len;
            i += 1;
        }

        // Then waiting sequences, in order, while everything they need fits.
        if out.preempted.is_empty() {
            while budget > 0 && self.running.len() < self.limits.max_num_seqs {
                let Some(&seq) = self.waiting.front() else {
                    break;
                };
                let start = self.computed[&seq];
                let len = num_tokens(seq).saturating_sub(start).min(budget);
                if len == 0 || !self.blocks.grow(seq, start + len) {
                    break;
                }
                self.waiting.pop_front();
                self.running.push(seq);
                out.entries.push(Scheduled { seq, start, len });
                self.computed.insert(seq, start + len);
                budget -= len;
            }
        }

        if out.entries.is_empty() && self.has_unfinished() {
            // Nothing runs and nothing will free blocks: the first waiting sequence cannot
            // start even with the whole pool to itself.
            let first = self.waiting.front().copied();
            let tokens = first.map_or(0, |s| num_tokens(s).min(self.limits.max_num_batched_tokens));
            return Err(self.too_small(tokens));
        }
        Ok(out)
    }

    /// Drops `seq`'s cache and puts it back at the front of the queue.
    fn preempt(&mut self, seq: SeqId) {
        self.blocks.free(seq);
        self.computed.insert(seq, 0);
        self.waiting.push_front(seq);
    }

    fn too_small(&self, tokens: usize) -> SampleError {
        SampleError::KvCacheTooSmall {
            tokens,
            needed: self.blocks.blocks_for(tokens),
            block_size: self.blocks.block_size(),
            total: self.blocks.num_blocks(),
        }
    }

    /// The block table of `seq`.
    pub(crate) fn table(&self, seq: SeqId) -> &[u32] {
        self.blocks.table(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(max_num_seqs: usize, max_tokens: usize, bs: usize, nb: usize) -> Scheduler {
        Scheduler::new(
            Limits {
                max_num_seqs,
                max_num_batched_tokens: max_tokens,
            },
            BlockManager::new(bs, nb),
        )
    }

    /// A stand-in for the engine: sequence lengths, grown by one for every step that
    /// computed a sequence's last position (that step samples a token).
    struct Lens(HashMap<SeqId, usize>);

    impl Lens {
        fn after(&mut self, s: &Schedule) {
            for e in &s.entries {
                if e.start + e.len == self.0[&e.seq] {
                    *self.0.get_mut(&e.seq).unwrap() += 1;
                }
            }
        }
    }

    fn entries(s: &Schedule) -> Vec<(SeqId, usize, usize)> {
        s.entries.iter().map(|e| (e.seq, e.start, e.len)).collect()
    }

    #[test]
    fn prefill_is_chunked_under_the_token_budget() {
        let mut sch = scheduler(8, 6, 4, 100);
        let mut lens = Lens(HashMap::from([(0, 10), (1, 3)]));
        sch.add(0);
        sch.add(1);
        let s = sch.schedule(|q| lens.0[&q]).unwrap();
        // Sequence 0 takes the whole budget; 1 waits.
        assert_eq!(entries(&s), vec![(0, 0, 6)]);
        lens.after(&s);
        let s = sch.schedule(|q| lens.0[&q]).unwrap();
        // 0 finishes its prompt (4 tokens), 1 starts with the 2 left.
        assert_eq!(entries(&s), vec![(0, 6, 4), (1, 0, 2)]);
        lens.after(&s);
        assert_eq!(lens.0[&0], 11);
        let s = sch.schedule(|q| lens.0[&q]).unwrap();
        assert_eq!(entries(&s), vec![(0, 10, 1), (1, 2, 1)]);
        assert_eq!(sch.table(0).len(), 3); // 11 positions in blocks of 4
    }

    #[test]
    fn waiting_sequences_join_when_others_finish() {
        let mut sch = scheduler(2, 100, 4, 100);
        let lens = Lens(HashMap::from([(0, 2), (1, 2), (2, 2)]));
        for q in 0..3 {
            sch.add(q);
        }
        let s = sch.schedule(|q| lens.0[&q]).unwrap();
        assert_eq!(entries(&s), vec![(0, 0, 2), (1, 0, 2)]);
        assert_eq!((sch.num_running(), sch.num_waiting()), (2, 1));
        sch.finish(0);
        let lens = Lens(HashMap::from([(1, 3), (2, 2)]));
        let s = sch.schedule(|q| lens.0[&q]).unwrap();
        assert_eq!(entries(&s), vec![(1, 2, 1), (2, 0, 2)]);
        assert_eq!(sch.blocks().num_free(), 98);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_recomputes_it() {
        // 3 blocks of 2: two sequences of 2 tokens each fit, then growth needs a third and
        // a fourth block.
        let mut sch = scheduler(4, 100, 2, 3);
        let mut lens = Lens(HashMap::from([(0, 2), (1, 2)]));
        sch.add(0);
        sch.add(1);
        let s = sch.schedule(|q| lens.0[&q]).unwrap();
        assert_eq!(entries(&s), vec![(0, 0, 2), (1, 0, 2)]);
        lens.after(&s); // both 3 long now
        let s = sch.schedule(|q| lens.0[&q]).unwrap();
        // 0 takes the last free block; 1 needs one too: 1 is the newest, so it preempts
        // itself and nothing new is admitted.
        assert_eq!(entries(&s), vec![(0, 2, 1)]);
        assert_eq!(s.preempted, vec![1]);
        lens.after(&s);
        assert_eq!(sch.num_waiting(), 1);
        let s = sch.schedule(|q| lens.0[&q]).unwrap();
        // 0 decodes in its second block; 1 would recompute its 3 positions, which need 2
        // blocks, and only 1 is free: it waits.
        assert_eq!(entries(&s), vec![(0, 3, 1)]);
        assert!(s.preempted.is_empty());
        sch.finish(0);
        let s = sch.schedule(|q| lens.0[&q]).unwrap();
        assert_eq!(entries(&s), vec![(1, 0, 3)]);
    }

    #[test]
    fn an_older_sequence_takes_blocks_from_a_newer_one() {
        let mut sch = scheduler(4, 100, 2, 2);
        sch.add(0);
        sch.add(1);
        // One block each: the pool is full.
        let s = sch.schedule(|_| 2).unwrap();
        assert_eq!(entries(&s), vec![(0, 0, 2), (1, 0, 2)]);
        assert_eq!(sch.blocks().num_free(), 0);
        // 0 grows to 3 positions and needs a second block: 1 (newer) is preempted.
        let s = sch.schedule(|_| 3).unwrap();
        assert_eq!(entries(&s), vec![(0, 2, 1)]);
        assert_eq!(s.preempted, vec![1]);
        assert_eq!(sch.table(1), &[] as &[u32]);
        assert_eq!(sch.table(0).len(), 2);
        assert_eq!((sch.num_running(), sch.num_waiting()), (1, 1));
    }

    #[test]
    fn a_sequence_that_cannot_fit_alone_is_an_error() {
        let mut sch = scheduler(4, 100, 2, 2);
        sch.add(0);
        let e = sch.schedule(|_| 5).unwrap_err().to_string();
        assert!(
            e.contains("needs 3 KV blocks") && e.contains("holds only 2"),
            "{e}"
        );

        // Growing past the pool while running alone.
        let mut sch = scheduler(4, 100, 2, 2);
        sch.add(0);
        sch.schedule(|_| 4).unwrap();
        let e = sch.schedule(|_| 5).unwrap_err().to_string();
        assert!(e.contains("needs 3 KV blocks"), "{e}");
    }
}
