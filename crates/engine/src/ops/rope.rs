//! Rotary position embedding, HF's rotate_half convention (the two halves of each head are
//! the pair), with the inverse frequencies of the scaling kinds HF supports here.
use crate::{Result, Tensor};

/// `rope_scaling` / `rope_parameters` kinds.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain θ^(-2i/D).
    Default,
    /// Positions divided by `factor` (frequencies divided by factor).
    Linear { factor: f32 },
    /// Llama-3.1's frequency-band scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// Precomputed inverse frequencies for one head dim.
#[derive(Clone, Debug)]
pub struct Rope {
    pub inv_freq: Vec<f32>, // [D / 2]
    /// Multiplies cos and sin (HF's `attention_scaling`; 1 for the kinds above).
    pub attention_scaling: f32,
}

impl Rope {
    /// Inverse frequencies as HF computes them (in f32 from an int64 arange, like torch).
    pub fn new(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Rope {
        let _ = (head_dim, theta, scaling);
        unimplemented!()
    }
}

/// Rotates x: [T, heads, D] in place; `positions`: [T].
pub fn rope(x: &mut Tensor, positions: &[u32], rope: &Rope) -> Result<()> {
    let _ = (x, positions, rope);
    unimplemented!()
}
