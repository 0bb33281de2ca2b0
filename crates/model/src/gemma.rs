//! Gemma (`model_type: "gemma"`), matching transformers 5.17 `models/gemma/modeling_gemma.py`
//! and `configuration_gemma.py`.
//!
//! Llama plus:
//! - **Embeddings × sqrt(hidden_size)**: HF keeps the normaliser as a tensor cast to the
//!   weights' dtype (`GemmaTextScaledWordEmbedding`), so it is sqrt(C) rounded to f32 here.
//! - **RMSNorm with `(1 + w)`**, computed in f32 (the checkpoint stores w centred on 0).
//! - **Activation from `hidden_act`** (default `gelu_pytorch_tanh`): transformers 5.17's
//!   GemmaMLP reads `hidden_act` and ignores `hidden_activation`, so an old config with
//!   `"hidden_act": "gelu"` gets the exact erf GELU.
//! - `head_dim` absent → 256 (the class default, *not* hidden / heads);
//!   `num_key_value_heads` absent → 16; tied embeddings by default.
//! - q/k/v/o biases with `attention_bias`. `use_bidirectional_attention: true` (non-causal)
//!   is refused.

use crate::config::{Arch, ConfigFields, Family, FamilyDefaults, ModelConfig};
use crate::error::Result;

const DEFAULTS: FamilyDefaults = FamilyDefaults {
    head_dim: Some(256),
    num_kv_heads: Some(16),
    tie_word_embeddings: true,
    max_position_embeddings: 8192,
    rms_norm_eps: 1e-6,
    bos_token_id: Some(2),
    eos_token_ids: &[1],
    pad_token_id: Some(0),
};

pub(crate) fn config(f: &ConfigFields) -> Result<ModelConfig> {
    let common = f.common(Family::Gemma, &DEFAULTS)?;
    refuse_bidirectional(f)?;
    let attention_bias = f.bool_or("attention_bias", false)?;
    let arch = Arch {
        norm_offset: 1.0,
        embed_scale: embed_scale(common.hidden_size),
        qkv_bias: attention_bias,
        o_bias: attention_bias,
        mlp_bias: false,
        sandwich_norms: false,
        attn_scale: common.default_attn_scale(),
        attn_softcap: None,
        final_softcap: None,
        activation: f.activation("hidden_act", "gelu_pytorch_tanh")?,
    };
    let windows = vec![None; common.num_layers];
    Ok(common.finish(windows, arch))
}

/// sqrt(C) as HF computes it: a Python float, stored in a tensor of the model dtype (f32).
pub(crate) fn embed_scale(hidden_size: usize) -> f32 {
    (hidden_size as f64).sqrt() as f32
}

/// Gemma's bidirectional mode makes attention non-causal; we only implement causal decoders.
pub(crate) fn refuse_bidirectional(f: &ConfigFields) -> Result<()> {
    if f.bool_or("use_bidirectional_attention", false)? {
        return Err(f.err(
            "use_bidirectional_attention",
            "bidirectional (non-causal) attention is not supported",
        ));
    }
    Ok(())
}
