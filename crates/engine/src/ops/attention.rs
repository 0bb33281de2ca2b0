//! Causal multi-head attention with GQA, sliding window and logit soft-cap.
use crate::{Result, Tensor};

/// Where each sequence's queries and keys sit in the packed tensors.
///
/// Sequence `b` has queries `q_starts[b]..q_starts[b+1]` and keys/values
/// `kv_starts[b]..kv_starts[b+1]`; its queries are the *last* `q_len` positions of its
/// `kv_len` keys (prefill: q_len == kv_len; decode with a cache: q_len == 1). So query `i`
/// of sequence `b` sits at position `kv_len - q_len + i` and attends to keys `0..=` that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    pub q_starts: Vec<usize>,  // [B + 1]
    pub kv_starts: Vec<usize>, // [B + 1]
}

impl SeqLayout {
    /// Prefill of whole sequences with the given lengths (queries == keys).
    pub fn prefill(lens: &[usize]) -> SeqLayout {
        let mut starts = Vec::with_capacity(lens.len() + 1);
        starts.push(0);
        for l in lens {
            starts.push(starts.last().unwrap() + l);
        }
        SeqLayout {
            q_starts: starts.clone(),
            kv_starts: starts,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    /// Multiplies q·k (HF: head_dim^-1/2, or query_pre_attn_scalar^-1/2 for Gemma-2).
    pub scale: f32,
    /// Sliding window W: a query at position p attends to keys k with p - k < W.
    pub window: Option<usize>,
    /// Logit soft-cap c: scores become tanh(s / c) · c before the mask.
    pub softcap: Option<f32>,
}

pub struct AttentionOut {
    pub out: Tensor, // [Tq, H, D]
    /// Natural-log logsumexp of each query row's scaled, capped, masked scores; backward needs it.
    pub lse: Tensor, // [H, Tq]
}

/// q: [Tq, H, D], k, v: [Tkv, Hkv, D] with H % Hkv == 0 (query head h reads kv head h / (H/Hkv)).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    params: &AttentionParams,
) -> Result<AttentionOut> {
    let _ = (q, k, v, layout, params);
    unimplemented!()
}
