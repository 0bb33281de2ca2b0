//! The CPU paged KV pool: keys and values stored in fixed-size blocks, addressed through the
//! block tables of a [`StepBatch`].
//!
//! Per layer, one allocation of `num_blocks × block_size` slots of `Hkv × D` floats each for
//! keys and one for values. A step writes each new token's key and value into the slot its
//! block table names, then gathers every position of each sequence into the packed
//! `[Tkv, Hkv, D]` tensors the model crate's attention takes. The gather is a copy, which a
//! paged attention kernel avoids by reading the blocks in place; on the CPU it keeps the
//! attention code shared with training, and it checks the block tables for real: a wrong
//! table gives wrong tokens in the parity tests.

use engine::Tensor;
use engine::ops::SeqLayout;
use model::{KvCache, ModelError};

use crate::engine::StepBatch;

/// Keys and values of every layer, in blocks.
pub(crate) struct KvPool {
    block_size: usize,
    num_blocks: usize,
    kv_heads: usize,
    head_dim: usize,
    k: Vec<Vec<f32>>, // [L][num_blocks · block_size · Hkv · D]
    v: Vec<Vec<f32>>, // [L][num_blocks · block_size · Hkv · D]
}

impl KvPool {
    pub(crate) fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Self {
        let len = num_blocks * block_size * kv_heads * head_dim;
        Self {
            block_size,
            num_blocks,
            kv_heads,
            head_dim,
            // One `vec!` per layer: zeroed allocations, whose pages are only touched when
            // used (cloning a template vector would write every byte of the pool).
            k: (0..layers).map(|_| vec![0.0; len]).collect(),
            v: (0..layers).map(|_| vec![0.0; len]).collect(),
        }
    }

    /// Bytes of one block over all layers, keys and values (f32).
    pub(crate) fn bytes_per_block(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
    ) -> usize {
        2 * layers * block_size * kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The pool seen through one step's block tables.
    pub(crate) fn view<'a>(&'a mut self, batch: &'a StepBatch) -> PagedView<'a> {
        PagedView { pool: self, batch }
    }
}

/// [`KvCache`] for one step: sequence `b` of the layout is `batch.seqs[b]`.
pub(crate) struct PagedView<'a> {
    pool: &'a mut KvPool,
    batch: &'a StepBatch,
}

impl PagedView<'_> {
    /// The pool slot of position `pos` of sequence `b`.
    fn slot(&self, b: usize, pos: usize) -> Result<usize, ModelError> {
        let bs = self.pool.block_size;
        let seq = &self.batch.seqs[b];
        match seq.block_table.get(pos / bs) {
            Some(&block) if (block as usize) < self.pool.num_blocks => {
                Ok(block as usize * bs + pos % bs)
            }
            other => Err(ModelError::Input {
                what: "paged kv cache",
                msg: format!(
                    "sequence {} position {pos}: block table {:?} has {} at index {} \
                     (pool of {} blocks)",
                    seq.seq,
                    seq.block_table,
                    other.map_or("nothing".to_string(), |b| b.to_string()),
                    pos / bs,
                    self.pool.num_blocks
                ),
            }),
        }
    }
}

impl KvCache for PagedView<'_> {
    fn append(
        &mut self,
        layer: usize,
        layout: &SeqLayout,
        k: &Tensor, // [Tq, Hkv, D]
        v: &Tensor, // [Tq, Hkv, D]
    ) -> Result<(Tensor, Tensor), ModelError> {
        let row = self.pool.kv_heads * self.pool.head_dim;
        let tq = self.batch.ids.len();
        let shape = [tq, self.pool.kv_heads, self.pool.head_dim];
        k.expect_shape("paged kv cache append (k)", &shape)?;
        v.expect_shape("paged kv cache append (v)", &shape)?;
        if layout.q_starts != self.batch.q_starts() || layout.kv_starts != self.batch.kv_starts() {
            return Err(ModelError::Input {
                what: "paged kv cache",
                msg: "the layout does not describe the step's batch".into(),
            });
        }
        if layer >= self.pool.k.len() {
            return Err(ModelError::Input {
                what: "paged kv cache",
                msg: format!("layer {layer} out of range ({} layers)", self.pool.k.len()),
            });
        }
        let (k_new, v_new) = (k.as_slice()?, v.as_slice()?);
        // Write the new positions first: a sequence's own new keys are part of what it
        // attends over.
        let mut q = 0;
        for b in 0..self.batch.seqs.len() {
            let s = &self.batch.seqs[b];
            for pos in s.start..s.start + s.len {
                let slot = self.slot(b, pos)?;
                let dst = slot * row..(slot + 1) * row;
                self.pool.k[layer][dst.clone()].copy_from_slice(&k_new[q * row..(q + 1) * row]);
                self.pool.v[layer][dst].copy_from_slice(&v_new[q * row..(q + 1) * row]);
                q += 1;
            }
        }
        let tkv = *layout.kv_starts.last().unwrap_or(&0);
        let mut k_all = Vec::with_capacity(tkv * row);
        let mut v_all = Vec::with_capacity(tkv * row);
        for b in 0..self.batch.seqs.len() {
            let s = &self.batch.seqs[b];
            for pos in 0..s.start + s.len {
                let slot = self.slot(b, pos)?;
                k_all.extend_from_slice(&self.pool.k[layer][slot * row..(slot + 1) * row]);
                v_all.extend_from_slice(&self.pool.v[layer][slot * row..(slot + 1) * row]);
            }
        }
        let shape = [tkv, self.pool.kv_heads, self.pool.head_dim];
        Ok((
            Tensor::from_vec(k_all, &shape)?,
            Tensor::from_vec(v_all, &shape)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SeqStep;

    fn rows(t: usize, width: usize, base: f32) -> Tensor {
        let data = (0..t * width).map(|i| base + i as f32).collect();
        Tensor::from_vec(data, &[t, 1, width]).unwrap()
    }

    /// Two sequences whose blocks interleave in the pool: each gets back exactly its own
    /// positions, in order, across steps.
    #[test]
    fn positions_round_trip_through_interleaved_blocks() {
        let mut pool = KvPool::new(2, 1, 2, 2, 6);
        // Step 1: seq 7 prefills 3 tokens (blocks 4, 1), seq 9 prefills 2 (block 0).
        let batch = StepBatch {
            ids: vec![0; 5],
            positions: vec![0, 1, 2, 0, 1],
            seqs: vec![
                SeqStep {
                    seq: 7,
                    start: 0,
                    len: 3,
                    block_table: vec![4, 1],
                },
                SeqStep {
                    seq: 9,
                    start: 0,
                    len: 2,
                    block_table: vec![0],
                },
            ],
            block_size: 2,
        };
        let layout = SeqLayout {
            q_starts: batch.q_starts(),
            kv_starts: batch.kv_starts(),
        };
        let (k, v) = pool
            .view(&batch)
            .append(1, &layout, &rows(5, 2, 0.0), &rows(5, 2, 100.0))
            .unwrap();
        assert_eq!(
            k.to_vec().unwrap(),
            (0..10).map(|i| i as f32).collect::<Vec<_>>()
        );
        assert_eq!(v.as_slice().unwrap()[0], 100.0);
        // Step 2: one decode token each; seq 9 grows into block 3.
        let batch = StepBatch {
            ids: vec![0; 2],
            positions: vec![3, 2],
            seqs: vec![
                SeqStep {
                    seq: 9,
                    start: 2,
                    len: 1,
                    block_table: vec![0, 3],
                },
                SeqStep {
                    seq: 7,
                    start: 3,
                    len: 1,
                    block_table: vec![4, 1],
                },
            ],
            block_size: 2,
        };
        let layout = SeqLayout {
            q_starts: batch.q_starts(),
            kv_starts: batch.kv_starts(),
        };
        let (k, _) = pool
            .view(&batch)
            .append(1, &layout, &rows(2, 2, 50.0), &rows(2, 2, 150.0))
            .unwrap();
        let k = k.to_vec().unwrap();
        // seq 9: its two old positions (rows 3, 4 of step 1) then the new one.
        assert_eq!(&k[..6], &[6.0, 7.0, 8.0, 9.0, 50.0, 51.0]);
        // seq 7: rows 0..3 of step 1, then the new one.
        assert_eq!(&k[6..], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 52.0, 53.0]);
        // Layer 0 was never written.
        assert!(pool.k[0].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn a_short_block_table_is_an_error_not_a_panic() {
        let mut pool = KvPool::new(1, 1, 1, 2, 2);
        let batch = StepBatch {
            ids: vec![0; 3],
            positions: vec![0, 1, 2],
            seqs: vec![SeqStep {
                seq: 1,
                start: 0,
                len: 3,
                block_table: vec![1],
            }],
            block_size: 2,
        };
        let layout = SeqLayout {
            q_starts: batch.q_starts(),
            kv_starts: batch.kv_starts(),
        };
        let e = pool
            .view(&batch)
            .append(0, &layout, &rows(3, 1, 0.0), &rows(3, 1, 0.0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("position 2") && e.contains("block table"), "{e}");
    }
}
