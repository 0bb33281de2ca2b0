//! Qwen2 (`model_type: "qwen2"`), matching transformers 5.17 `models/qwen2/modeling_qwen2.py`
//! and `configuration_qwen2.py`.
//!
//! Llama plus:
//! - **q/k/v biases always** (o_proj has none, the MLP has none).
//! - **Sliding window only when `use_sliding_window: true`** (default false; HF then sets
//!   `sliding_window` to None). With it on, the layers `layer_types` marks
//!   `"sliding_attention"` slide; without `layer_types`, HF's default marks layers
//!   `i >= max_window_layers` (default 28). A sliding layer with no window is an error (HF's
//!   mask builder raises there too).
//! - `num_key_value_heads` absent → 32 (Qwen2Config's default), `null` → num_attention_heads.
//! - No bos/eos defaults in the class; `head_dim` absent → hidden / heads.

use crate::config::{Arch, ConfigFields, Family, FamilyDefaults, LayerType, ModelConfig};
use crate::error::Result;

const DEFAULTS: FamilyDefaults = FamilyDefaults {
    head_dim: None,
    num_kv_heads: Some(32),
    tie_word_embeddings: false,
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    bos_token_id: None,
    eos_token_ids: &[],
    pad_token_id: None,
};

pub(crate) fn config(f: &ConfigFields) -> Result<ModelConfig> {
    let common = f.common(Family::Qwen2, &DEFAULTS)?;
    let use_sliding_window = f.bool_or("use_sliding_window", false)?;
    let window = if use_sliding_window {
        f.nullable_size("sliding_window", Some(4096))?
    } else {
        None
    };
    let max_window_layers = f.usize_or("max_window_layers", 28)?;
    let types = match f.layer_types(common.num_layers)? {
        Some(types) => types,
        None => (0..common.num_layers)
            .map(|i| {
                if window.is_some() && i >= max_window_layers {
                    LayerType::Sliding
                } else {
                    LayerType::Full
                }
            })
            .collect(),
    };
    let windows = f.windows_from_types(&types, window, "sliding_window")?;
    let arch = Arch {
        norm_offset: 0.0,
        embed_scale: 1.0,
        qkv_bias: true,
        o_bias: false,
        mlp_bias: false,
        sandwich_norms: false,
        attn_scale: common.default_attn_scale(),
        attn_softcap: None,
        final_softcap: None,
        activation: f.activation("hidden_act", "silu")?,
    };
    Ok(common.finish(windows, arch))
}
