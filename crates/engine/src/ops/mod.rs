//! The ops, one file each: forward, CPU reference, (later) CUDA launcher and backward, tests.
//!
//! Conventions: activations are packed `[T, ...]` over all sequences of a batch; a
//! [`SeqLayout`] says where each sequence starts. Weights use HF's layouts (a linear weight is
//! `[out, in]`).

mod activation;
mod attention;
mod elementwise;
mod embedding;
mod linear;
mod logits_at_least;
mod logprobs;
pub(crate) mod paged_attention;
mod rms_norm;
mod rope;
mod top_k;

pub use activation::{Activation, gated_activation, gated_activation_packed};
pub use attention::{AttentionOut, AttentionParams, SeqLayout, attention};
pub use elementwise::{add, add_inplace, scale};
pub use embedding::{embedding, embedding_indices};
pub use linear::linear;
pub use logits_at_least::{RowTokens, logits_at_least};
pub use logprobs::{LogProbChunks, TokenStats, logits, token_logprobs};
pub use paged_attention::{
    PagedKernel, PagedLayout, SlotMapping, kv_pool, paged_attention, paged_attention_with,
    paged_kv_write,
};
pub use rms_norm::{add_rms_norm, rms_norm};
pub use rope::{Rope, RopeScaling, rope, rope_qkv_split};
pub use top_k::{MAX_TOP_K, TopK, top_k_candidates};
pub use top_k::{PendingTopK, top_k_candidates_queued};

// Argument rules the CUDA launchers apply too, so both devices refuse the same inputs.
pub(crate) use attention::check_params as check_attention_params;
pub(crate) use logprobs::check_head as check_lm_head;
