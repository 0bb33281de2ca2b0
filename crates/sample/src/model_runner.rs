//! [`ModelRunner`]: a loaded [`model::Model`] behind the engine's [`StepModel`] trait, with
//! its KV cache in a paged pool ([`crate::paged_kv`]).
//!
//! A step is one `forward_cached` over the packed batch (prefill chunks and decode tokens
//! together), then the LM head on each sequence's last hidden row only. The pool is sized
//! from a memory budget (`ModelRunner::blocks_for_memory`), as vLLM sizes its cache from
//! `gpu_memory_utilization`.

use engine::Tensor;
use engine::ops::SeqLayout;
use model::Model;

use crate::engine::{KvGeometry, StepBatch, StepModel};
use crate::error::{Result, SampleError};
use crate::paged_kv::KvPool;

pub struct ModelRunner {
    model: Model,
    pool: KvPool,
    max_model_len: usize,
}

impl ModelRunner {
    /// A runner with a pool of `num_blocks` blocks of `block_size` positions. The context
    /// is the config's `max_position_embeddings`, or `max_model_len` if given and smaller.
    pub fn new(
        model: Model,
        block_size: usize,
        num_blocks: usize,
        max_model_len: Option<usize>,
    ) -> Result<Self> {
        let max_model_len = pool_and_context(&model, block_size, num_blocks, max_model_len)?;
        let c = model.config();
        let pool = KvPool::new(
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            block_size,
            num_blocks,
        );
        Ok(Self {
            model,
            pool,
            max_model_len,
        })
    }

    /// Bytes one KV block of `block_size` positions takes for this model (f32 keys and
    /// values of every layer).
    pub fn bytes_per_block(model: &Model, block_size: usize) -> usize {
        let c = model.config();
        KvPool::bytes_per_block(c.num_layers, c.num_kv_heads, c.head_dim, block_size)
    }

    /// How many blocks fit in `bytes`.
    pub fn blocks_for_memory(model: &Model, block_size: usize, bytes: u64) -> usize {
        let per = Self::bytes_per_block(model, block_size).max(1) as u64;
        (bytes / per) as usize
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
}

impl StepModel for ModelRunner {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    fn kv_geometry(&self) -> KvGeometry {
        KvGeometry {
            block_size: self.pool.block_size(),
            num_blocks: self.pool.num_blocks(),
        }
    }

    fn step(&mut self, batch: &StepBatch) -> Result<Vec<f32>> {
        let _span = tracing::debug_span!(
            "model step",
            seqs = batch.seqs.len(),
            tokens = batch.ids.len()
        )
        .entered();
        let layout = SeqLayout {
            q_starts: batch.q_starts(),
            kv_starts: batch.kv_starts(),
        };
        let mut cache = self.pool.view(batch);
        let hidden = self
            .model
            .forward_cached(&batch.ids, &batch.positions, &layout, &mut cache)
            .map_err(SampleError::model)?; // [Tq, C]
        let last: Vec<usize> = layout.q_starts[1..].iter().map(|&end| end - 1).collect();
        let rows = last_rows(&hidden, &last)?; // [B, C]
        let logits = self.model.logits(&rows).map_err(SampleError::model)?; // [B, V]
        logits.to_vec().map_err(SampleError::model)
    }
}

/// Checks a runner's pool shape (at least one block of at least one position) and returns
/// its context: the config's `max_position_embeddings`, or `max_model_len` if given and not
/// longer. Shared by the CPU and the GPU runner.
pub(crate) fn pool_and_context(
    model: &Model,
    block_size: usize,
    num_blocks: usize,
    max_model_len: Option<usize>,
) -> Result<usize> {
    if block_size == 0 || num_blocks == 0 {
        return Err(SampleError::EngineConfig {
            name: if block_size == 0 {
                "block_size"
            } else {
                "num_blocks"
            },
            msg: "must be at least 1".into(),
        });
    }
    context_len(model, max_model_len)
}

/// A runner's context: the config's `max_position_embeddings`, or `max_model_len` if given
/// and not longer.
fn context_len(model: &Model, max_model_len: Option<usize>) -> Result<usize> {
    let context = model.config().max_position_embeddings;
    match max_model_len {
        Some(m) if m > context => Err(SampleError::EngineConfig {
            name: "max_model_len",
            msg: format!("{m} is longer than the model's max_position_embeddings ({context})"),
        }),
        Some(m) => Ok(m),
        None => Ok(context),
    }
}

/// Rows `rows` of hidden: [T, C] → [rows.len(), C].
fn last_rows(hidden: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let [t, c] = hidden
        .dims::<2>("last_rows", "hidden: [T, C]")
        .map_err(SampleError::model)?;
    let data = hidden.as_slice().map_err(SampleError::model)?;
    let mut out = Vec::with_capacity(rows.len() * c);
    for &r in rows {
        if r >= t {
            return Err(SampleError::EngineConfig {
                name: "batch",
                msg: format!("row {r} of a forward of {t} tokens"),
            });
        }
        out.extend_from_slice(&data[r * c..(r + 1) * c]);
    }
    Tensor::from_vec(out, &[rows.len(), c]).map_err(SampleError::model)
}
