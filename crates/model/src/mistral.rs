//! Mistral (`model_type: "mistral"`), matching transformers 5.17
//! `models/mistral/modeling_mistral.py` and `configuration_mistral.py`.
//!
//! Llama without biases, plus:
//! - **Sliding window on every layer**: `sliding_window` W (a query attends to keys fewer
//!   than W positions back); absent → MistralConfig's 4096, `null` → full attention.
//!   A `layer_types` field is ignored, as HF ignores it for this class (with a warning).
//! - `num_key_value_heads` absent → 8 (the class default), `null` → num_attention_heads.
//! - `max_position_embeddings` default 131072 (only used by llama3 RoPE scaling's fallback).

use crate::config::{Arch, ConfigFields, Family, FamilyDefaults, ModelConfig};
use crate::error::Result;

const DEFAULTS: FamilyDefaults = FamilyDefaults {
    head_dim: None,
    num_kv_heads: Some(8),
    tie_word_embeddings: false,
    max_position_embeddings: 4096 * 32,
    rms_norm_eps: 1e-6,
    bos_token_id: Some(1),
    eos_token_ids: &[2],
    pad_token_id: None,
};

pub(crate) fn config(f: &ConfigFields) -> Result<ModelConfig> {
    let common = f.common(Family::Mistral, &DEFAULTS)?;
    let window = f.nullable_size("sliding_window", Some(4096))?;
    if f.map.contains_key("layer_types") {
        tracing::warn!(
            "{}: mistral ignores `layer_types` (as transformers does); every layer uses \
             sliding_window",
            f.path.display()
        );
    }
    let arch = Arch {
        norm_offset: 0.0,
        embed_scale: 1.0,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sandwich_norms: false,
        attn_scale: common.default_attn_scale(),
        attn_softcap: None,
        final_softcap: None,
        activation: f.activation("hidden_act", "silu")?,
    };
    let windows = vec![window; common.num_layers];
    Ok(common.finish(windows, arch))
}
