//! One pre-norm decoder layer, shared by the five families and parameterised by their
//! [`Arch`] (each family file says which switches it sets and why).
//!
//! ```text
//! h = norm(x, input_layernorm)
//! q, k, v = h·Wqᵀ(+b), h·Wkᵀ(+b), h·Wvᵀ(+b)        RoPE on q and k
//! a = attention(q, k, v)  (window, soft-cap, scale from the config)
//! a = a·Woᵀ(+b)           [Gemma-2: a = norm(a, post_attention_layernorm)]
//! x = x + a
//! h = norm(x, post_attention_layernorm)          [Gemma-2: pre_feedforward_layernorm]
//! m = down(act(gate(h)) · up(h))                 [Gemma-2: m = norm(m, post_feedforward_layernorm)]
//! x = x + m
//! ```
//!
//! [`DecoderLayer::forward`] is a pure function of (layer weights, input, positions, layout),
//! plus the optional KV cache it appends to, so the trainer can recompute a layer in its
//! backward pass from the saved layer input alone.

use engine::Tensor;
use engine::ops::{self, AttentionParams, Rope, SeqLayout};

use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::weights::Checkpoint;

/// A linear layer in HF's layout: y = x·Wᵀ + b.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    pub weight: Tensor,       // [N, K]
    pub bias: Option<Tensor>, // [N]
}

impl Linear {
    fn load(
        ck: &mut Checkpoint,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear> {
        let weight = ck.tensor(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(ck.tensor(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// x: [T, K] → [T, N].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(x, &self.weight, self.bias.as_ref())?)
    }
}

/// The weights of one decoder layer, named as the checkpoint names them.
#[derive(Clone, Debug)]
pub(crate) struct DecoderLayer {
    pub index: usize,
    pub input_layernorm: Tensor, // [C]
    pub q_proj: Linear,          // [H·D, C]
    pub k_proj: Linear,          // [Hkv·D, C]
    pub v_proj: Linear,          // [Hkv·D, C]
    pub o_proj: Linear,          // [C, H·D]
    /// Pre-MLP norm (Llama naming), or Gemma-2's norm of the attention output.
    pub post_attention_layernorm: Tensor, // [C]
    /// Gemma-2 only.
    pub pre_feedforward_layernorm: Option<Tensor>, // [C]
    /// Gemma-2 only.
    pub post_feedforward_layernorm: Option<Tensor>, // [C]
    pub gate_proj: Linear,       // [I, C]
    pub up_proj: Linear,         // [I, C]
    pub down_proj: Linear,       // [C, I]
    /// This layer's sliding window W, if any.
    pub window: Option<usize>,
}

impl DecoderLayer {
    /// Reads layer `index` from the checkpoint, checking every shape against `cfg`.
    pub fn load(ck: &mut Checkpoint, cfg: &ModelConfig, index: usize) -> Result<DecoderLayer> {
        let p = format!("model.layers.{index}");
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
        let a = &cfg.arch;
        let norm = |ck: &mut Checkpoint, name: &str| ck.tensor(&format!("{p}.{name}.weight"), &[c]);
        let sandwich = |ck: &mut Checkpoint, name: &str| -> Result<Option<Tensor>> {
            if a.sandwich_norms {
                Ok(Some(norm(ck, name)?))
            } else {
                Ok(None)
            }
        };
        Ok(DecoderLayer {
            index,
            input_layernorm: norm(ck, "input_layernorm")?,
            q_proj: Linear::load(ck, &format!("{p}.self_attn.q_proj"), q, c, a.qkv_bias)?,
            k_proj: Linear::load(ck, &format!("{p}.self_attn.k_proj"), kv, c, a.qkv_bias)?,
            v_proj: Linear::load(ck, &format!("{p}.self_attn.v_proj"), kv, c, a.qkv_bias)?,
            o_proj: Linear::load(ck, &format!("{p}.self_attn.o_proj"), c, q, a.o_bias)?,
            post_attention_layernorm: norm(ck, "post_attention_layernorm")?,
            pre_feedforward_layernorm: sandwich(ck, "pre_feedforward_layernorm")?,
            post_feedforward_layernorm: sandwich(ck, "post_feedforward_layernorm")?,
            gate_proj: Linear::load(ck, &format!("{p}.mlp.gate_proj"), i, c, a.mlp_bias)?,
            up_proj: Linear::load(ck, &format!("{p}.mlp.up_proj"), i, c, a.mlp_bias)?,
            down_proj: Linear::load(ck, &format!("{p}.mlp.down_proj"), c, i, a.mlp_bias)?,
            window: cfg.layer_windows[index],
        })
    }

    /// x: [Tq, C] → [Tq, C]. `positions`: [Tq], the RoPE position of each query token.
    /// Without a cache, `layout` must be a prefill (queries == keys); with one, the new keys
    /// and values are appended to it and attention reads everything it holds.
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        rope: &Rope,
        x: &Tensor,
        positions: &[u32],
        layout: &SeqLayout,
        cache: Option<&mut dyn KvCache>,
    ) -> Result<Tensor> {
        let a = &cfg.arch;
        let t = x.shape()[0];
        let norm = |x: &Tensor, w: &Tensor| ops::rms_norm(x, w, cfg.rms_norm_eps, a.norm_offset);

        // Attention block.
        let h = norm(x, &self.input_layernorm)?;
        let mut q = self
            .q_proj
            .forward(&h)?
            .reshape(&[t, cfg.num_heads, cfg.head_dim])?; // [Tq, H, D]
        let mut k = self
            .k_proj
            .forward(&h)?
            .reshape(&[t, cfg.num_kv_heads, cfg.head_dim])?; // [Tq, Hkv, D]
        let v = self
            .v_proj
            .forward(&h)?
            .reshape(&[t, cfg.num_kv_heads, cfg.head_dim])?; // [Tq, Hkv, D]
        ops::rope(&mut q, positions, rope)?;
        ops::rope(&mut k, positions, rope)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(self.index, layout, &k, &v)?, // [Tkv, Hkv, D] each
            None => (k, v),
        };
        let params = attention_params(a, self.window);
        let attn = ops::attention(&q, &k, &v, layout, &params)?.out; // [Tq, H, D]
        let mut attn = self.o_proj.forward(&attn.reshape(&[t, cfg.q_dim()])?)?; // [Tq, C]
        if a.sandwich_norms {
            attn = norm(&attn, &self.post_attention_layernorm)?;
        }
        let mut x = ops::add(x, &attn)?;

        // MLP block.
        let pre_mlp = match &self.pre_feedforward_layernorm {
            Some(w) => w,
            None => &self.post_attention_layernorm,
        };
        let h = norm(&x, pre_mlp)?;
        let gated = ops::gated_activation(
            &self.gate_proj.forward(&h)?,
            &self.up_proj.forward(&h)?,
            a.activation,
        )?; // [Tq, I]
        let mut mlp = self.down_proj.forward(&gated)?; // [Tq, C]
        if let Some(w) = &self.post_feedforward_layernorm {
            mlp = norm(&mlp, w)?;
        }
        ops::add_inplace(&mut x, &mlp)?;
        Ok(x)
    }
}

pub(crate) fn attention_params(a: &Arch, window: Option<usize>) -> AttentionParams {
    AttentionParams {
        scale: a.attn_scale,
        window,
        softcap: a.attn_softcap,
    }
}
