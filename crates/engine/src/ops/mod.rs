//! The ops, one file each: forward, CPU reference, CUDA launcher, backward, tests.
//!
//! Conventions: activations are packed `[T, ...]` over all sequences of a batch; a
//! [`SeqLayout`] says where each sequence starts. Weights use HF's layouts (a linear weight is
//! `[out, in]`).
//!
//! Backwards take the forward's arguments (or what the forward saved) followed by the output
//! gradient `dy`, and return freshly assigned gradients named `d…` (nothing is accumulated
//! into a caller's buffer). Each runs on the device of its inputs (inputs split across
//! devices are an error naming them, never a silent copy); on a GPU, activation gradients
//! are bf16 and parameter gradients f32, as each op's doc says.

mod activation;
mod attention;
mod elementwise;
mod embedding;
mod linear;
mod logits_at_least;
mod logprobs;
pub(crate) mod lora_fused;
mod lora_ops;
pub(crate) mod paged_attention;
mod rms_norm;
mod rope;
mod top_k;

pub use activation::{
    Activation, gated_activation, gated_activation_backward, gated_activation_packed,
    gated_activation_packed_backward,
};
pub use attention::{
    AttentionGrads, AttentionOut, AttentionParams, SeqLayout, attention, attention_backward,
};
pub use elementwise::{add, add_inplace, cast, scale};
pub use embedding::{embedding, embedding_backward, embedding_indices};
pub use linear::{bias_backward, linear, linear_backward_input, linear_backward_weight};
pub use logits_at_least::{RowTokens, logits_at_least};
pub use logprobs::{
    LogProbChunks, LogProbGrads, LowRank, LowRankGrads, TokenStats, logits, token_logprobs,
    token_logprobs_backward, token_logprobs_low_rank,
};
pub use lora_fused::{lora_project, lora_project_backward};
pub use lora_ops::{
    DropoutKey, add_into_columns, apply_dropout, apply_dropout_backward, columns, dropout_hash,
    dropout_mask, transpose,
};
pub use paged_attention::{
    PagedKernel, PagedLayout, SlotMapping, kv_pool, paged_attention, paged_attention_with,
    paged_kv_write,
};
pub use rms_norm::{add_rms_norm, rms_norm, rms_norm_backward};
pub use rope::{Rope, RopeScaling, rope, rope_backward, rope_qkv_split, rope_qkv_split_backward};
pub use top_k::{MAX_TOP_K, TopK, top_k_candidates};
pub use top_k::{PendingTopK, top_k_candidates_queued};

// Argument rules (and the id bucketing of the embedding backward) the CUDA launchers share,
// so both devices refuse the same inputs.
pub(crate) use attention::check_params as check_attention_params;
pub(crate) use embedding::IdBuckets;
pub(crate) use logprobs::check_head as check_lm_head;

/// Gradient checks for the backwards' tests: central finite differences of a scalar f64
/// function, which each test writes as a naive loop independent of the crate's forward.
#[cfg(test)]
pub(crate) mod grad_check {
    /// ∂loss/∂x_i ≈ (loss(x + h·e_i) − loss(x − h·e_i)) / 2h for every i. Its error is
    /// O(h²·f‴) from truncation plus O(ε_f64·|loss|/h) from rounding: with h = 1e-5 and O(1)
    /// values both stay near 1e-10, far below the rounding of an f32 backward.
    pub(crate) fn numeric_grad(x: &[f64], h: f64, loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let mut probe = x.to_vec();
        (0..x.len())
            .map(|i| {
                probe[i] = x[i] + h;
                let up = loss(&probe);
                probe[i] = x[i] - h;
                let down = loss(&probe);
                probe[i] = x[i];
                (up - down) / (2.0 * h)
            })
            .collect()
    }

    /// Σ dy·y: the scalar whose gradient w.r.t. a forward's inputs is what that op's backward
    /// returns when given `dy`.
    pub(crate) fn dot(dy: &[f32], y: &[f64]) -> f64 {
        assert_eq!(dy.len(), y.len(), "dot: lengths");
        dy.iter().zip(y).map(|(&a, &b)| a as f64 * b).sum()
    }

    /// f32 values widened to f64, to feed the naive forwards.
    pub(crate) fn widen(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }
}
