//! The KV cache seen by the decoder: a trait, so the sampler can bring its own (paged) cache,
//! and [`CpuKvCache`], a plain per-sequence, per-layer store that is the reference.
//!
//! A forward step with a cache passes a [`SeqLayout`] whose sequence `b` has `q_len` new tokens
//! and `kv_len` = (cached + new) positions; the new tokens are the last `q_len` of the
//! sequence (prefill of a prompt: nothing cached, q_len == kv_len; chunked prefill: part of
//! the prompt cached; decode: q_len == 1). Each layer appends its new keys/values (after
//! RoPE) and attends over everything the cache returns.

use engine::ops::{AttentionOut, AttentionParams, SeqLayout};
use engine::{EngineError, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Storage for the keys and values of the sequences of a batch.
pub trait KvCache {
    /// Appends layer `layer`'s new keys and values — `k`, `v`: [Tq, Hkv, D], sequence `b`'s
    /// rows at `layout.q_starts[b]..layout.q_starts[b + 1]` — and returns the keys and values
    /// of all positions of the batch's sequences, [Tkv, Hkv, D] each, packed as
    /// `layout.kv_starts` says. Sequence `b` of the layout is the cache's sequence `b`.
    fn append(
        &mut self,
        layer: usize,
        layout: &SeqLayout,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)>;

    /// Whether the layers should call [`KvCache::attend`] instead of `append` (a paged
    /// cache whose kernel reads the keys in place, without a packed copy).
    fn attends_in_place(&self) -> bool {
        false
    }

    /// Stores layer `layer`'s new keys and values, as `append` does, and returns the
    /// attention of q: [Tq, H, D] over every position of each sequence: what
    /// `ops::attention(q, k, v, layout, params)` gives over the keys `append` returns. Only
    /// called when [`KvCache::attends_in_place`].
    fn attend(
        &mut self,
        _layer: usize,
        _layout: &SeqLayout,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _params: &AttentionParams,
    ) -> std::result::Result<AttentionOut, EngineError> {
        Err(EngineError::Arg {
            op: "kv cache attend",
            msg: "this cache does not attend in place; call append".into(),
        })
    }
}

/// Keys and values of one sequence in one layer, row-major [positions, Hkv, D].
#[derive(Clone, Debug, Default)]
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// A CPU cache holding a fixed set of sequences: `seqs[b][layer]`.
#[derive(Clone, Debug)]
pub struct CpuKvCache {
    /// Hkv · D: the width of one cached position.
    row: usize,
    kv_heads: usize,
    head_dim: usize,
    seqs: Vec<Vec<LayerKv>>, // [B][L]
}

impl CpuKvCache {
    /// An empty cache for `num_seqs` sequences of a model with this config.
    pub fn new(config: &ModelConfig, num_seqs: usize) -> CpuKvCache {
        CpuKvCache {
            row: config.kv_dim(),
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            seqs: vec![vec![LayerKv::default(); config.num_layers]; num_seqs],
        }
    }

    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Positions cached for sequence `b` (by the last layer, i.e. after complete steps).
    pub fn seq_len(&self, b: usize) -> usize {
        self.seqs
            .get(b)
            .and_then(|layers| layers.last())
            .map_or(0, |l| l.k.len() / self.row.max(1))
    }
}

impl KvCache for CpuKvCache {
    fn append(
        &mut self,
        layer: usize,
        layout: &SeqLayout,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let bad = |msg: String| ModelError::Input {
            what: "kv cache",
            msg,
        };
        let batch = layout.q_starts.len().saturating_sub(1);
        if batch != self.seqs.len() || layout.kv_starts.len() != layout.q_starts.len() {
            return Err(bad(format!(
                "layout has {batch} sequences, the cache holds {}",
                self.seqs.len()
            )));
        }
        let tq = *layout.q_starts.last().unwrap_or(&0);
        let expected = [tq, self.kv_heads, self.head_dim];
        k.expect_shape("kv cache append (k)", &expected)?;
        v.expect_shape("kv cache append (v)", &expected)?;
        // A GPU model's keys come back to the host (bf16 → f32 is exact).
        let (k_new, v_new) = (k.to_vec()?, v.to_vec()?);
        let tkv = *layout.kv_starts.last().unwrap_or(&0);
        let mut k_all = Vec::with_capacity(tkv * self.row);
        let mut v_all = Vec::with_capacity(tkv * self.row);
        for b in 0..batch {
            let (q0, q1) = (layout.q_starts[b], layout.q_starts[b + 1]);
            let (k0, k1) = (layout.kv_starts[b], layout.kv_starts[b + 1]);
            let store = self.seqs[b]
                .get_mut(layer)
                .ok_or_else(|| bad(format!("layer {layer} out of range")))?;
            let cached = store.k.len() / self.row;
            if q1 < q0 || k1 < k0 || cached + (q1 - q0) != k1 - k0 {
                return Err(bad(format!(
                    "sequence {b}, layer {layer}: {cached} cached + {} new positions != kv_len {}",
                    q1.saturating_sub(q0),
                    k1.saturating_sub(k0)
                )));
            }
            store
                .k
                .extend_from_slice(&k_new[q0 * self.row..q1 * self.row]);
            store
                .v
                .extend_from_slice(&v_new[q0 * self.row..q1 * self.row]);
            k_all.extend_from_slice(&store.k);
            v_all.extend_from_slice(&store.v);
        }
        let shape = [tkv, self.kv_heads, self.head_dim];
        let device = k.device();
        Ok((
            Tensor::from_vec(k_all, &shape)?.to_device(device)?,
            Tensor::from_vec(v_all, &shape)?.to_device(device)?,
        ))
    }
}
