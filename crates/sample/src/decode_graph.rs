//! CUDA graphs for decode steps: a step of B one-token sequences is recorded once — every
//! layer's kernels and GEMMs, the LM head and the top-k ranking — and then replayed with a
//! single launch, so the host no longer spends more time queuing a small model's ~200
//! kernels than the GPU spends running them (vLLM's answer to the same problem).
//!
//! A graph freezes its kernels' arguments: grid sizes, row counts, pointers. So a graph is
//! captured per [`GraphKey`] — the batch padded up to a bucket, the block-table width padded
//! to a power of two, and the candidates per row — with a layout of padding rows at the
//! longest context the key serves (which sizes the split-K decode grid), and replayed with
//! each real step's arrays staged at the same device addresses (`engine::Staging`): token
//! ids, positions, context lengths, block tables and KV slots are all read by the kernels
//! from device memory. Padding rows attend to block 0 and write nothing (slot −1); their
//! rows of the output are dropped.
//!
//! Memory: graphs allocate from one shared `GraphPool` (they never run at the same time);
//! each keeps its own logits [B, V] f32 and candidates, the outputs it rewrites. The least
//! recently used graphs are dropped when those outputs pass [`OUTPUT_BUDGET`]. A capture that
//! fails (a kernel that reads host memory, an allocation that does not fit) turns graphs off
//! for the run with a warning; the steps then run eagerly as before.

use std::collections::HashMap;
use std::sync::Arc;

use engine::cuda::{CudaBackend, CudaError, Graph, GraphPool};
use engine::ops::{self, PagedLayout, PendingTopK, TopK};
use engine::{Device, Indices, Staging, Tensor};
use model::Model;

use crate::engine::StepBatch;
use crate::error::{Result, SampleError};
use crate::paged_runner::{KvRead, LayerPool, StepInputs, forward_logits};

/// Bytes of graph outputs (mostly logits) kept at once before the least recently used graphs
/// are dropped.
pub(crate) const OUTPUT_BUDGET: usize = 1 << 30;

/// What one captured graph serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct GraphKey {
    /// Rows, the real batch padded up ([`batch_bucket`]).
    pub batch: usize,
    /// Block-table columns: every sequence's context fits in `max_blocks · block_size`.
    pub max_blocks: usize,
    /// Candidates per row (top-k size).
    pub k: usize,
}

/// The padded batch of `b` rows: exact up to 8, then rounded up to an eighth of the next
/// power of two (at most 1/8 … 1/4 padding), so a run touches a few dozen sizes at most.
pub(crate) fn batch_bucket(b: usize) -> usize {
    if b <= 8 {
        return b.next_power_of_two();
    }
    let step = b.next_power_of_two() / 8;
    b.div_ceil(step) * step
}

struct Captured {
    graph: Graph,
    logits: Tensor, // [batch, V] f32, rewritten by each launch
    top: PendingTopK,
    last_used: u64,
}

/// One runner's decode graphs.
pub(crate) struct DecodeGraphs {
    backend: Arc<CudaBackend>,
    pool: Arc<GraphPool>,
    /// Where every graph reads its step's arrays; graphs are stale once it moves.
    staging: Staging,
    graphs: HashMap<GraphKey, Captured>,
    clock: u64,
    pub captures: u64,
    pub replays: u64,
}

/// An error inside a capture: the driver's, or the step's own.
enum CaptureError {
    Cuda(CudaError),
    Step(SampleError),
}

impl From<CudaError> for CaptureError {
    fn from(e: CudaError) -> Self {
        CaptureError::Cuda(e)
    }
}

impl DecodeGraphs {
    pub fn new(ordinal: usize) -> Result<DecodeGraphs> {
        let backend = CudaBackend::get(ordinal)
            .map_err(|e| SampleError::model(engine::EngineError::from(e)))?;
        Ok(DecodeGraphs {
            pool: backend.graph_pool(),
            backend,
            staging: Staging::new(Device::Cuda(ordinal)),
            graphs: HashMap::new(),
            clock: 0,
            captures: 0,
            replays: 0,
        })
    }

    /// The graph that would run `batch` with `k` candidates per row: only for steps where
    /// every sequence decodes one token.
    pub fn key(batch: &StepBatch, k: usize, max_model_len: usize) -> Option<GraphKey> {
        if batch.seqs.is_empty() || !batch.is_decode() {
            return None;
        }
        let bs = batch.block_size.max(1);
        let needed = batch
            .seqs
            .iter()
            .map(|s| (s.start + s.len).div_ceil(bs))
            .max()?;
        let max_blocks = needed
            .next_power_of_two()
            .min(max_model_len.div_ceil(bs))
            .max(needed);
        Some(GraphKey {
            batch: batch_bucket(batch.seqs.len()),
            max_blocks,
            k,
        })
    }

    /// Queues the decode step `batch` as one launch of the graph of `key` (capturing it
    /// first if needed); [`DecodeGraphs::fetch`] then reads its result.
    pub fn launch(
        &mut self,
        key: GraphKey,
        batch: &StepBatch,
        model: &Model,
        pools: &mut [LayerPool],
    ) -> Result<()> {
        if !self.graphs.contains_key(&key) {
            self.capture(key, batch.block_size, model, pools)?;
        }
        let pad = key.batch - batch.seqs.len();
        let kv_lens: Vec<usize> = batch.seqs.iter().map(|s| s.start + s.len).collect();
        let tables: Vec<&[u32]> = batch
            .seqs
            .iter()
            .map(|s| {
                let used = (s.start + s.len).div_ceil(batch.block_size);
                &s.block_table[..used.min(s.block_table.len())]
            })
            .collect();
        let inputs = StepInputs {
            ids: Indices::new(pad_with(&batch.ids, pad)),
            positions: Indices::new(pad_with(&batch.positions, pad)),
            layout: PagedLayout::decode_padded(
                batch.block_size,
                &kv_lens,
                &tables,
                key.batch,
                key.max_blocks,
                1,
            )
            .map_err(SampleError::model)?,
        };
        let moved = inputs.stage(&mut self.staging)?;
        if moved {
            // Same key, same sizes as at its capture, so this cannot happen; if it did,
            // every graph would read the old address.
            self.graphs.clear();
            return Err(graph_error("the staging buffer moved after a capture"));
        }
        self.clock += 1;
        let g = self
            .graphs
            .get_mut(&key)
            .ok_or_else(|| graph_error("the captured graph is missing"))?;
        g.last_used = self.clock;
        g.graph
            .launch()
            .map_err(|e| SampleError::model(engine::EngineError::from(e)))?;
        self.replays += 1;
        Ok(())
    }

    /// The candidates of the first `rows` rows of the last launch of `key`'s graph (waiting
    /// for it), and its device logits [key.batch, V] (the batch's rows first).
    pub fn fetch(&self, key: GraphKey, rows: usize) -> Result<(TopK, Tensor)> {
        let g = self
            .graphs
            .get(&key)
            .ok_or_else(|| graph_error("the captured graph is missing"))?;
        let mut top = g.top.fetch().map_err(SampleError::model)?;
        top.values.truncate(rows * top.k);
        top.ids.truncate(rows * top.k);
        top.lse.truncate(rows);
        Ok((top, g.logits.clone()))
    }

    /// Records the graph of `key`, from a layout of padding rows at the key's longest
    /// context.
    fn capture(
        &mut self,
        key: GraphKey,
        block_size: usize,
        model: &Model,
        pools: &mut [LayerPool],
    ) -> Result<()> {
        let _span = tracing::debug_span!("capture decode graph", ?key).entered();
        let none: &[&[u32]] = &[];
        let inputs = StepInputs {
            ids: Indices::new(vec![0; key.batch]),
            positions: Indices::new(vec![0; key.batch]),
            layout: PagedLayout::decode_padded(
                block_size,
                &[],
                none,
                key.batch,
                key.max_blocks,
                key.max_blocks * block_size,
            )
            .map_err(SampleError::model)?,
        };
        if inputs.stage(&mut self.staging)? {
            // The buffer grew: graphs captured so far read the old one.
            self.graphs.clear();
        }
        let bytes = key.batch * model.config().vocab_size * 4;
        self.evict_for(bytes);
        let captured = self.backend.capture(&self.pool, || {
            let logits = forward_logits(model, pools, KvRead::InPlace, &inputs, None)
                .map_err(CaptureError::Step)?;
            let top = ops::top_k_candidates_queued(&logits, key.k)
                .map_err(|e| CaptureError::Step(SampleError::model(e)))?;
            Ok::<_, CaptureError>((logits, top))
        });
        let (graph, (logits, top)) = captured.map_err(|e| match e {
            CaptureError::Cuda(e) => SampleError::model(engine::EngineError::from(e)),
            CaptureError::Step(e) => e,
        })?;
        self.captures += 1;
        self.graphs.insert(
            key,
            Captured {
                graph,
                logits,
                top,
                last_used: self.clock,
            },
        );
        Ok(())
    }

    /// Drops the least recently used graphs until `incoming` more bytes of outputs fit the
    /// budget (the newest graph is always kept).
    fn evict_for(&mut self, incoming: usize) {
        loop {
            let held: usize = self.graphs.values().map(|g| g.logits.len() * 4).sum();
            if held + incoming <= OUTPUT_BUDGET || self.graphs.is_empty() {
                return;
            }
            let oldest = self
                .graphs
                .iter()
                .min_by_key(|(_, g)| g.last_used)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.graphs.remove(&k);
            }
        }
    }
}

fn graph_error(msg: &str) -> SampleError {
    SampleError::EngineConfig {
        name: "cuda graphs",
        msg: msg.into(),
    }
}

/// `v` followed by `pad` zeros.
fn pad_with(v: &[u32], pad: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(v.len() + pad);
    out.extend_from_slice(v);
    out.resize(v.len() + pad, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SeqStep;

    #[test]
    fn buckets_pad_by_at_most_a_quarter() {
        assert_eq!(
            (1..=9).map(batch_bucket).collect::<Vec<_>>(),
            [1, 2, 4, 4, 8, 8, 8, 8, 10]
        );
        assert_eq!(batch_bucket(17), 20);
        assert_eq!(batch_bucket(200), 224);
        assert_eq!(batch_bucket(256), 256);
        assert_eq!(batch_bucket(257), 320);
        for b in 9..2000 {
            let p = batch_bucket(b);
            assert!(p >= b && (p - b) * 4 <= b, "{b} → {p}");
        }
        // A run over every batch size touches few buckets.
        let distinct: std::collections::BTreeSet<usize> = (1..=512).map(batch_bucket).collect();
        assert!(distinct.len() <= 32, "{}", distinct.len());
    }

    fn batch(lens: &[(usize, usize)], block_size: usize) -> StepBatch {
        StepBatch {
            ids: vec![1; lens.iter().map(|l| l.1).sum()],
            positions: vec![0; lens.iter().map(|l| l.1).sum()],
            seqs: lens
                .iter()
                .enumerate()
                .map(|(i, &(start, len))| SeqStep {
                    seq: i as u64,
                    start,
                    len,
                    block_table: (0..(start + len).div_ceil(block_size) as u32).collect(),
                })
                .collect(),
            block_size,
        }
    }

    #[test]
    fn keys_only_for_decode_steps() {
        // A prefill chunk in the batch: no graph.
        assert_eq!(DecodeGraphs::key(&batch(&[(3, 1), (0, 5)], 4), 6, 64), None);
        assert_eq!(DecodeGraphs::key(&batch(&[], 4), 6, 64), None);
        // Contexts 4 and 13 positions in blocks of 4: 4 blocks needed, a power of two.
        let key = DecodeGraphs::key(&batch(&[(3, 1), (12, 1), (0, 1)], 4), 6, 64).unwrap();
        assert_eq!(
            key,
            GraphKey {
                batch: 4,
                max_blocks: 4,
                k: 6
            }
        );
        // 5 blocks round up to 8, but never past the model's context (6 blocks of 4 = 24).
        let key = DecodeGraphs::key(&batch(&[(17, 1)], 4), 2, 24).unwrap();
        assert_eq!(key.max_blocks, 6);
        let key = DecodeGraphs::key(&batch(&[(17, 1)], 4), 2, 4096).unwrap();
        assert_eq!(key.max_blocks, 8);
    }

    #[test]
    fn padding_appends_zeros() {
        assert_eq!(pad_with(&[5, 6], 2), [5, 6, 0, 0]);
        assert_eq!(pad_with(&[], 0), Vec::<u32>::new());
    }
}
