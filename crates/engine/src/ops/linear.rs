//! Linear layer (HF layout): y = x · Wᵀ + b.
use crate::{Result, Tensor};

/// x: [T, K], w: [N, K], bias: [N] → [T, N].
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let _ = (x, w, bias);
    unimplemented!()
}
