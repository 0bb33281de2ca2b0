//! RMSNorm: y = x / sqrt(mean(x²) + eps) · (offset + w).
use crate::{Result, Tensor};

/// x: [T, C], w: [C] → [T, C]. `weight_offset` is 0 for llama/qwen2/mistral and 1 for
/// Gemma's `(1 + w)`. Computed in f32 as HF does (Gemma multiplies after the cast back,
/// which is the same in f32).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32, weight_offset: f32) -> Result<Tensor> {
    let _ = (x, w, eps, weight_offset);
    unimplemented!()
}
