//! Log-probs of target tokens under `softcap(hidden · headᵀ)`, computed in chunks so a
//! [T × V] logits tensor never exists: an online logsumexp over vocabulary chunks.
use crate::{Result, Tensor};

/// Chunk sizes over tokens and vocabulary; their product bounds the scratch memory.
#[derive(Clone, Copy, Debug)]
pub struct LogProbChunks {
    pub tokens: usize,
    pub vocab: usize,
}

impl Default for LogProbChunks {
    fn default() -> Self {
        LogProbChunks {
            tokens: 64,
            vocab: 8192,
        }
    }
}

/// Per-token statistics of the next-token distribution. All [T].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenStats {
    /// log p(target).
    pub logp: Vec<f32>,
    /// Entropy of the distribution (nats).
    pub entropy: Vec<f32>,
    /// Mean of the (capped) logits over the vocabulary.
    pub mean_logit: Vec<f32>,
    /// Most likely token; ties go to the lowest id.
    pub argmax: Vec<u32>,
}

/// hidden: [T, C] (after the final norm), head: [V, C], targets: [T] (each < V).
/// Logits are `softcap(hidden · headᵀ)` with soft-cap tanh(x/c)·c when `final_softcap` is set.
pub fn token_logprobs(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[u32],
    final_softcap: Option<f32>,
    chunks: LogProbChunks,
) -> Result<TokenStats> {
    let _ = (hidden, head, targets, final_softcap, chunks);
    unimplemented!()
}

/// Full logits for a few rows (sampling): hidden [B, C], head [V, C] → [B, V], soft-capped.
pub fn logits(hidden: &Tensor, head: &Tensor, final_softcap: Option<f32>) -> Result<Tensor> {
    let _ = (hidden, head, final_softcap);
    unimplemented!()
}
