//! Which parameters get weight decay: transformers 5.17's `Trainer.get_decay_parameter_names`.
//!
//! transformers excludes a parameter when its lower-cased full name matches any of the
//! patterns `bias`, `layernorm`, `rmsnorm`, `(?:^|\.)norm(?:$|\.)`, `_norm(?:$|\.)`, or when
//! it sits inside an `nn.LayerNorm` module. The patterns are searched at every level of the
//! module tree on the suffix of the name below that level; a match on a suffix is also a
//! match on the full name (its start follows a dot there), so searching the full name is the
//! same rule. The `nn.LayerNorm` type test has no name to go by: the decoders we load (Llama,
//! Mistral, Qwen2, Gemma, Gemma-2) use RMSNorm classes, which are not `nn.LayerNorm`, and
//! LoRA parameters are plain weights — all of them decay.

/// Whether transformers' Trainer puts the parameter `name` in the weight-decay group.
pub fn decays(name: &str) -> bool {
    let name = name.to_lowercase();
    let substring = ["bias", "layernorm", "rmsnorm"]
        .iter()
        .any(|p| name.contains(p));
    // `(?:^|\.)norm(?:$|\.)`: a dot-separated component that is exactly "norm";
    // `_norm(?:$|\.)`: a component ending in "_norm".
    let component = name.split('.').any(|c| c == "norm" || c.ends_with("_norm"));
    !(substring || component)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_weights_decay_norms_and_biases_do_not() {
        for name in [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.embed_tokens.lora_embedding_B.default",
            "lm_head.weight",
            "model.layers.0.mlp.normalizer.weight",
            "enormous.weight",
        ] {
            assert!(decays(name), "{name}");
        }
        for name in [
            "model.norm.weight",
            "model.layers.3.input_layernorm.weight",
            "model.layers.3.post_feedforward_layernorm.weight",
            "model.layers.0.self_attn.k_norm.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.RMSNorm.weight",
            "norm",
            "x._norm",
        ] {
            assert!(!decays(name), "{name}");
        }
    }
}
