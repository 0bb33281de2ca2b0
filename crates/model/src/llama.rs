//! Llama (`model_type: "llama"`), matching transformers 5.17 `models/llama/modeling_llama.py`
//! and `configuration_llama.py`.
//!
//! The baseline every other family is described against:
//! - RMSNorm `x / rms(x) · w` (offset 0), computed in f32.
//! - Embeddings unscaled; untied LM head by default (`tie_word_embeddings` absent → false).
//! - q/k/v/o biases only with `attention_bias: true`; gate/up/down biases only with
//!   `mlp_bias: true`.
//! - RoPE kinds default, `linear` and `llama3` (factor, low/high_freq_factor,
//!   original_max_position_embeddings), from either config shape.
//! - Full causal attention on every layer, scale head_dim^-1/2; `head_dim` absent →
//!   hidden_size / num_attention_heads; `num_key_value_heads` absent → num_attention_heads.
//! - Activation from `hidden_act` (default silu).

use crate::config::{Arch, ConfigFields, Family, FamilyDefaults, ModelConfig};
use crate::error::Result;

/// LlamaConfig's class defaults for fields config.json may leave out.
const DEFAULTS: FamilyDefaults = FamilyDefaults {
    head_dim: None,
    num_kv_heads: None,
    tie_word_embeddings: false,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-6,
    bos_token_id: Some(1),
    eos_token_ids: &[2],
    pad_token_id: None,
};

pub(crate) fn config(f: &ConfigFields) -> Result<ModelConfig> {
    let common = f.common(Family::Llama, &DEFAULTS)?;
    let attention_bias = f.bool_or("attention_bias", false)?;
    let arch = Arch {
        norm_offset: 0.0,
        embed_scale: 1.0,
        qkv_bias: attention_bias,
        o_bias: attention_bias,
        mlp_bias: f.bool_or("mlp_bias", false)?,
        sandwich_norms: false,
        attn_scale: common.default_attn_scale(),
        attn_softcap: None,
        final_softcap: None,
        activation: f.activation("hidden_act", "silu")?,
    };
    let windows = vec![None; common.num_layers];
    Ok(common.finish(windows, arch))
}
