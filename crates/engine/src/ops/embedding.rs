//! Token embedding lookup.
use crate::{Result, Tensor};

/// table: [V, C], ids: [T] → [T, C], each row multiplied by `scale` (Gemma: sqrt(C); else 1).
/// An id ≥ V is an [`crate::EngineError::Index`] error.
pub fn embedding(table: &Tensor, ids: &[u32], scale: f32) -> Result<Tensor> {
    let _ = (table, ids, scale);
    unimplemented!()
}
