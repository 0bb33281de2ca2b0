//! The paged KV cache's bookkeeping: fixed-size blocks handed out to sequences.
//!
//! The KV pool is `num_blocks` blocks of `block_size` token positions each. A sequence owns
//! a block table: the ids of its blocks in position order, so position `p` lives in slot
//! `p % block_size` of block `table[p / block_size]`. Blocks are taken from a free list as a
//! sequence grows and returned when it finishes or is preempted, so memory is never
//! fragmented and a sequence's blocks need not be contiguous (vLLM's PagedAttention).
//!
//! Only the bookkeeping lives here; the model owns the pool's memory and reads the tables
//! the engine passes it each step. No sharing between sequences (no prefix caching): each
//! block has exactly one owner.

use std::collections::HashMap;

use crate::engine::SeqId;

/// Block tables of the sequences that hold KV blocks, and the free list.
#[derive(Debug, Clone)]
pub(crate) struct BlockManager {
    block_size: usize,
    num_blocks: usize,
    /// Free block ids; the next allocation pops from the end.
    free: Vec<u32>,
    tables: HashMap<SeqId, Vec<u32>>,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` positions, all free. Both must be > 0.
    pub(crate) fn new(block_size: usize, num_blocks: usize) -> Self {
        debug_assert!(block_size > 0 && num_blocks > 0);
        // Reversed so that a fresh pool hands out 0, 1, 2, …: easier to read in tests.
        let free = (0..num_blocks as u32).rev().collect();
        Self {
            block_size,
            num_blocks,
            free,
            tables: HashMap::new(),
        }
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub(crate) fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks that hold `tokens` positions.
    pub(crate) fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Blocks `seq` still needs to hold `tokens` positions (0 when it has them).
    pub(crate) fn missing(&self, seq: SeqId, tokens: usize) -> usize {
        let held = self.tables.get(&seq).map_or(0, Vec::len);
        self.blocks_for(tokens).saturating_sub(held)
    }

    /// Grows `seq`'s table to hold `tokens` positions. Returns false, changing nothing, when
    /// there are not enough free blocks.
    pub(crate) fn grow(&mut self, seq: SeqId, tokens: usize) -> bool {
        let missing = self.missing(seq, tokens);
        if missing > self.free.len() {
            return false;
        }
        let at = self.free.len() - missing;
        let table = self.tables.entry(seq).or_default();
        table.extend(self.free.drain(at..).rev());
        true
    }

    /// Returns every block of `seq` to the free list.
    pub(crate) fn free(&mut self, seq: SeqId) {
        if let Some(table) = self.tables.remove(&seq) {
            self.free.extend(table.into_iter().rev());
        }
    }

    /// `seq`'s block table (empty when it holds none).
    pub(crate) fn table(&self, seq: SeqId) -> &[u32] {
        self.tables.get(&seq).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block is either free or in exactly one table.
    fn check_invariant(m: &BlockManager) {
        let mut seen = vec![0u32; m.num_blocks()];
        for &b in &m.free {
            seen[b as usize] += 1;
        }
        for table in m.tables.values() {
            for &b in table {
                seen[b as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "block ownership: {seen:?}");
    }

    #[test]
    fn grows_by_whole_blocks_and_frees_everything() {
        let mut m = BlockManager::new(4, 6);
        assert_eq!(m.blocks_for(0), 0);
        assert_eq!(m.blocks_for(4), 1);
        assert_eq!(m.blocks_for(5), 2);
        assert!(m.grow(1, 5));
        assert_eq!(m.table(1), &[0, 1]);
        // Still within the second block: nothing new.
        assert!(m.grow(1, 8));
        assert_eq!(m.table(1).len(), 2);
        assert!(m.grow(2, 1));
        assert!(m.grow(1, 9));
        assert_eq!(m.table(1), &[0, 1, 3]);
        assert_eq!(m.table(2), &[2]);
        assert_eq!(m.num_free(), 2);
        check_invariant(&m);

        // Not enough: nothing changes.
        assert_eq!(m.missing(2, 13), 3);
        assert!(!m.grow(2, 13));
        assert_eq!(m.table(2), &[2]);
        assert_eq!(m.num_free(), 2);

        m.free(1);
        assert_eq!(m.num_free(), 5);
        assert!(m.table(1).is_empty());
        check_invariant(&m);
        // Freed blocks are reused.
        assert!(m.grow(2, 24));
        assert_eq!(m.num_free(), 0);
        check_invariant(&m);
        m.free(2);
        m.free(99); // unknown: no-op
        assert_eq!(m.num_free(), 6);
        check_invariant(&m);
    }

    #[test]
    fn random_grow_and_free_keeps_ownership_exclusive() {
        let mut m = BlockManager::new(3, 17);
        let mut lens = [0usize; 5];
        let mut x = 12345u64;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let seq = ((x >> 33) % 5) as usize;
            if (x >> 20).is_multiple_of(7) {
                m.free(seq as SeqId);
                lens[seq] = 0;
            } else {
                let want = lens[seq] + 1 + ((x >> 40) % 4) as usize;
                let before = m.table(seq as SeqId).to_vec();
                if m.grow(seq as SeqId, want) {
                    lens[seq] = want;
                    // Growing never moves existing blocks.
                    assert!(m.table(seq as SeqId).starts_with(&before));
                    assert_eq!(m.table(seq as SeqId).len(), m.blocks_for(want));
                } else {
                    assert_eq!(m.table(seq as SeqId), before.as_slice());
                }
            }
            check_invariant(&m);
        }
    }
}
