//! LoRA initialisation as PEFT 0.21 does it (`LoraLayer.reset_lora_parameters` with
//! `init_lora_weights=True`), from a [`SeededRng`]:
//!
//! - linear modules: A [R, in] ~ U(−b, b) with torch's `kaiming_uniform_(a=√5)` bound
//!   b = √3 · gain / √in, gain = √(2 / (1 + a²)) — i.e. b = 1/√in, nn.Linear's own default;
//!   B [out, R] = 0;
//! - the embedding: A [R, V] = 0, B [C, R] ~ N(0, 1).
//!
//! Either way the product B·A starts at zero, so the adapted model starts as the base model.
//! Modules are filled in [`Lora::pairs_mut`] order (embedding, layers in order with their
//! modules in `LoraTarget::ALL` order, head), A before B, so one seed gives one adapter.

use model::{Lora, LoraSpec, LoraTarget, ModelConfig};

use crate::error::Result;
use crate::peft::rng::SeededRng;

/// A freshly initialised adapter for `model`.
pub fn init_lora(spec: LoraSpec, model: &ModelConfig, rng: &mut SeededRng) -> Result<Lora> {
    let mut lora = Lora::zeros(spec, model)?;
    for (_, target, pair) in lora.pairs_mut() {
        if target == LoraTarget::EmbedTokens {
            // A stays zero.
            rng.fill_normal(pair.b.as_mut_slice()?, 0.0, 1.0);
        } else {
            let fan_in = pair.a.shape()[1];
            let bound = kaiming_uniform_bound(fan_in);
            rng.fill_uniform(pair.a.as_mut_slice()?, -bound, bound);
            // B stays zero.
        }
    }
    Ok(lora)
}

/// torch.nn.init.kaiming_uniform_(a=√5)'s bound for `fan_in` inputs, computed as torch does
/// (in f64): gain = √(2 / (1 + a²)), std = gain / √fan_in, bound = √3 · std.
pub(crate) fn kaiming_uniform_bound(fan_in: usize) -> f64 {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let std = gain / (fan_in as f64).sqrt();
    3f64.sqrt() * std
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kaiming_bound_is_one_over_root_fan_in() {
        for fan_in in [1usize, 80, 4096] {
            let b = kaiming_uniform_bound(fan_in);
            assert!(
                (b - 1.0 / (fan_in as f64).sqrt()).abs() < 1e-15,
                "{fan_in}: {b}"
            );
        }
    }
}
