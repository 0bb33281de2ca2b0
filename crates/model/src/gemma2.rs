//! Gemma-2 (`model_type: "gemma2"`), matching transformers 5.17
//! `models/gemma2/modeling_gemma2.py` and `configuration_gemma2.py`.
//!
//! Everything of [Gemma](crate::gemma) (embedding × sqrt(C), `(1 + w)` RMSNorm, head_dim
//! default 256, tied by default) plus:
//! - **Activation from `hidden_activation`** (default `gelu_pytorch_tanh`); Gemma2MLP ignores
//!   `hidden_act`.
//! - **Attention logit soft-cap** `tanh(s / c) · c` on the scaled scores, before the mask:
//!   `attn_logit_softcapping` (absent → 50, `null` → off).
//! - **Final logit soft-cap** on the LM head's logits: `final_logit_softcapping` (absent → 30,
//!   `null` → off).
//! - **Scale `query_pre_attn_scalar^-1/2`** (default 256) instead of head_dim^-1/2.
//! - **Sliding window** `sliding_window` (absent → 4096) on the layers `layer_types` marks
//!   `"sliding_attention"`; without `layer_types`, HF's default pattern marks the even-indexed
//!   layers (0, 2, 4, ...) sliding.
//! - **Sandwich norms**: `post_attention_layernorm` normalises the attention output before the
//!   residual add, and `pre_feedforward_layernorm` / `post_feedforward_layernorm` wrap the MLP.
//! - `num_key_value_heads` absent → 4.

use crate::config::{Arch, ConfigFields, Family, FamilyDefaults, LayerType, ModelConfig};
use crate::error::Result;
use crate::gemma;

const DEFAULTS: FamilyDefaults = FamilyDefaults {
    head_dim: Some(256),
    num_kv_heads: Some(4),
    tie_word_embeddings: true,
    max_position_embeddings: 8192,
    rms_norm_eps: 1e-6,
    bos_token_id: Some(2),
    eos_token_ids: &[1],
    pad_token_id: Some(0),
};

pub(crate) fn config(f: &ConfigFields) -> Result<ModelConfig> {
    let common = f.common(Family::Gemma2, &DEFAULTS)?;
    gemma::refuse_bidirectional(f)?;
    let window = f.nullable_size("sliding_window", Some(4096))?;
    let types = match f.layer_types(common.num_layers)? {
        Some(types) => types,
        // Gemma2Config: "sliding_attention" if (i + 1) % 2 else "full_attention".
        None => (0..common.num_layers)
            .map(|i| {
                if (i + 1) % 2 == 1 {
                    LayerType::Sliding
                } else {
                    LayerType::Full
                }
            })
            .collect(),
    };
    let windows = f.windows_from_types(&types, window, "sliding_window")?;
    let query_pre_attn_scalar = f.f64_or("query_pre_attn_scalar", 256.0)?;
    if !(query_pre_attn_scalar > 0.0 && query_pre_attn_scalar.is_finite()) {
        return Err(f.err(
            "query_pre_attn_scalar",
            format!("must be > 0, got {query_pre_attn_scalar}"),
        ));
    }
    let attention_bias = f.bool_or("attention_bias", false)?;
    let arch = Arch {
        norm_offset: 1.0,
        embed_scale: gemma::embed_scale(common.hidden_size),
        qkv_bias: attention_bias,
        o_bias: attention_bias,
        mlp_bias: false,
        sandwich_norms: true,
        attn_scale: query_pre_attn_scalar.powf(-0.5) as f32,
        attn_softcap: f
            .nullable_positive_f64("attn_logit_softcapping", Some(50.0))?
            .map(|c| c as f32),
        final_softcap: f
            .nullable_positive_f64("final_logit_softcapping", Some(30.0))?
            .map(|c| c as f32),
        activation: f.activation("hidden_activation", "gelu_pytorch_tanh")?,
    };
    Ok(common.finish(windows, arch))
}
