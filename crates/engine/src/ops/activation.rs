//! Gated MLP activation: `act(gate) * up`.
use crate::{Result, Tensor};

/// The activation a config names (`hidden_act` / `hidden_activation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// x·σ(x) — HF "silu" / "swish".
    Silu,
    /// tanh-approximated GELU — HF "gelu_pytorch_tanh" / "gelu_new" / "gelu_fast".
    GeluTanh,
    /// exact erf GELU — HF "gelu".
    Gelu,
}

/// `act(gate) * up`. gate, up: [T, I] → [T, I].
pub fn gated_activation(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    let _ = (gate, up, act);
    unimplemented!()
}
