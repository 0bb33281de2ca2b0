//! The backward pass of one decoder layer, by recomputation (gradient checkpointing by
//! design: training keeps only each layer's input).
//!
//! [`DecoderLayer::backward`] reruns the layer's forward from its saved input with a
//! [`LayerTape`], then walks the forward of `decoder.rs` in reverse:
//!
//! ```text
//! d_mlp = d_out                    [Gemma-2: through post_feedforward_layernorm]
//! d_gated = d_mlp·W_down (+ LoRA down)
//! d_gate_up = act'(gate, up)
//! d_h2 = d_gate_up·W_gate_up (+ LoRA gate, up)
//! d_xmid = d_out + norm'(x_mid, pre-MLP norm, d_h2)
//! d_attn = d_xmid                  [Gemma-2: through post_attention_layernorm]
//! d_a = d_attn·W_o (+ LoRA o);  dq, dk, dv = attention'(…);  d_qkv = RoPE⁻¹ + unsplit
//! d_h1 = d_qkv·W_qkv (+ LoRA q, k, v)
//! dx = d_xmid + norm'(x, input_layernorm, d_h1)
//! ```
//!
//! Base weights are frozen: only the input gradient and the LoRA pairs' gradients are
//! computed (biases and norm weights get none).

use engine::Tensor;
use engine::ops;

use crate::decoder::{DecoderLayer, LayerCtx, attention_params};
use crate::error::{ModelError, Result};
use crate::lora::{Dropout, LayerLora, LoraPair, LoraTarget, MaskSite};
use crate::profile::OpKind;
use engine::ops::DropoutKey;

/// What a layer's forward keeps for its backward (filled by `forward_normed` when given one).
#[derive(Default)]
pub(crate) struct LayerTape {
    pub q: Option<Tensor>,        // [T, H, D], after RoPE
    pub k: Option<Tensor>,        // [T, Hkv, D], after RoPE
    pub v: Option<Tensor>,        // [T, Hkv, D]
    pub attn_out: Option<Tensor>, // [T, H, D]
    pub attn_lse: Option<Tensor>, // [H, T]
    /// o_proj's output before Gemma-2's post-attention norm.
    pub o_out: Option<Tensor>, // [T, C]
    /// The residual stream after the attention block.
    pub x_mid: Option<Tensor>, // [T, C]
    pub gate_up: Option<Tensor>,  // [T, 2·I]
    /// down_proj's output before Gemma-2's post-feedforward norm.
    pub mlp_out: Option<Tensor>, // [T, C]
    /// Each LoRA'd module's activations, in forward order.
    pub lora: Vec<TapedLora>,
}

pub(crate) struct TapedLora {
    pub target: LoraTarget,
    /// The module's first column in its (stacked) projection's output.
    pub col0: usize,
    /// The module's input (before dropout), [T, in].
    pub x: Tensor,
    /// drop(x)·Aᵀ, [T, R].
    pub u: Tensor,
    /// The dropout mask's key (the mask is recomputed, never stored).
    pub key: Option<DropoutKey>,
}

impl LayerTape {
    fn get<'a>(slot: &'a Option<Tensor>, what: &str) -> Result<&'a Tensor> {
        slot.as_ref().ok_or_else(|| ModelError::Input {
            what: "layer backward",
            msg: format!("the recomputed forward kept no {what}"),
        })
    }

    fn lora(&self, t: LoraTarget) -> Option<&TapedLora> {
        self.lora.iter().find(|l| l.target == t)
    }
}

/// The adapter a forward applies: every layer's pairs, the scaling, and the dropout.
pub(crate) struct LoraCtx<'a> {
    pub layers: &'a [LayerLora],
    pub scaling: f32,
    pub dropout: Dropout,
}

impl LoraCtx<'_> {
    /// Adds each targeted module's delta into its columns of `y`, the stacked projection of
    /// `x`: `parts` lists (module, first column).
    pub fn add(
        &self,
        layer: usize,
        x: &Tensor,
        y: &mut Tensor,
        parts: &[(LoraTarget, usize)],
        mut tape: Option<&mut LayerTape>,
    ) -> Result<()> {
        let Some(lora) = self.layers.get(layer) else {
            return Err(ModelError::Input {
                what: "lora",
                msg: format!(
                    "the adapter has {} layers, the model more",
                    self.layers.len()
                ),
            });
        };
        x.dims::<2>("lora", "x: [T, in]")?;
        for &(target, col0) in parts {
            let Some(pair) = lora.get(target) else {
                continue;
            };
            let site = MaskSite {
                layer: Some(layer),
                target,
            };
            let key = self.dropout.key(site);
            // y[:, col0..] += s · drop(x)·Aᵀ·Bᵀ, written into the projection's columns.
            let u = ops::lora_project(x, &pair.a, &pair.b, self.scaling, key.as_ref(), y, col0)?;
            if let Some(tape) = tape.as_deref_mut() {
                tape.lora.push(TapedLora {
                    target,
                    col0,
                    // Shared storage (the projection's input), not a copy: the backward
                    // recomputes the dropped input from it and the key.
                    x: x.clone(),
                    u,
                    key,
                });
            }
        }
        Ok(())
    }
}

/// Backward of one LoRA'd module given the gradient of its stacked projection's output `dy`
/// [T, N] (the module's columns read in place): accumulates the pair's gradients into `grad`
/// (scratch zeros when the caller keeps none) and adds the input gradient into `dx`.
pub(crate) fn lora_backward(
    dy: &Tensor,
    pair: &LoraPair,
    taped: &TapedLora,
    scaling: f32,
    dx: &mut Tensor,
    grad: Option<&mut LoraPair>,
) -> Result<()> {
    let mut scratch;
    let grad = match grad {
        Some(grad) => grad,
        None => {
            let zeros = |t: &Tensor| Tensor::zeros(t.shape()).to_device_f32(t.device());
            scratch = LoraPair {
                a: zeros(&pair.a)?,
                b: zeros(&pair.b)?,
            };
            &mut scratch
        }
    };
    let LoraPair { a: ga, b: gb } = grad;
    ops::lora_project_backward(
        dy,
        taped.col0,
        &taped.x,
        &pair.a,
        &pair.b,
        &taped.u,
        scaling,
        taped.key.as_ref(),
        dx,
        ga,
        gb,
    )?;
    Ok(())
}

impl DecoderLayer {
    /// The gradient of the layer's input x: [T, C] given the gradient of its output
    /// `d_out`: [T, C]. `kept` is the forward's tape when the forward kept one (no gradient
    /// checkpointing); otherwise the forward is recomputed here (prefill layout, no cache).
    /// With `lora`, its pairs' gradients are added into `grads` (same shapes).
    pub(crate) fn backward(
        &self,
        ctx: &LayerCtx<'_>,
        x: &Tensor,
        d_out: &Tensor,
        lora: Option<&LoraCtx<'_>>,
        mut grads: Option<&mut LayerLora>,
        kept: Option<LayerTape>,
    ) -> Result<Tensor> {
        let cfg = ctx.cfg;
        let a = &cfg.arch;
        let (eps, offset) = (cfg.rms_norm_eps, a.norm_offset);
        let (t, dev, prof) = (x.shape()[0], x.device(), ctx.prof);
        let norm_back = |x: &Tensor, w: &Tensor, dy: &Tensor| {
            prof.run(OpKind::ElementwiseBackward, dev, || {
                ops::rms_norm_backward(x, w, eps, offset, dy)
            })
        };
        let gemm_back = |dy: &Tensor, w: &Tensor| {
            prof.run(OpKind::GemmBackward, dev, || {
                ops::linear_backward_input(dy, w)
            })
        };
        let tape = match kept {
            Some(tape) => tape,
            None => {
                let mut tape = LayerTape::default();
                let h = ctx.norm(x, &self.input_layernorm)?;
                self.forward_normed(ctx, x, h, None, None, lora, Some(&mut tape))?;
                tape
            }
        };

        // Gradients of the LoRA'd modules of one projection: `dy` is the stacked output's
        // gradient, `dx` the projection input's.
        let mut lora_back = |dy: &Tensor, dx: &mut Tensor, targets: &[LoraTarget]| -> Result<()> {
            let Some(lora) = lora else { return Ok(()) };
            for &target in targets {
                let (Some(taped), Some(pair)) = (
                    tape.lora(target),
                    lora.layers.get(self.index).and_then(|l| l.get(target)),
                ) else {
                    continue;
                };
                let grad = grads.as_deref_mut().and_then(|g| g.get_mut(target));
                prof.run(OpKind::Lora, dev, || {
                    lora_backward(dy, pair, taped, lora.scaling, dx, grad)
                })?;
            }
            Ok(())
        };

        // MLP block.
        let d_mlp = match &self.post_feedforward_layernorm {
            Some(w) => {
                let pre = LayerTape::get(&tape.mlp_out, "mlp output")?;
                norm_back(pre, w, d_out)?.0
            }
            None => d_out.clone(),
        };
        let mut d_gated = gemm_back(&d_mlp, &self.down_proj.weight)?; // [T, I]
        lora_back(&d_mlp, &mut d_gated, &[LoraTarget::DownProj])?;
        drop(d_mlp);
        let gate_up = LayerTape::get(&tape.gate_up, "gate/up output")?;
        let d_gate_up = prof.run(OpKind::ElementwiseBackward, dev, || {
            ops::gated_activation_packed_backward(gate_up, a.activation, &d_gated)
        })?;
        drop(d_gated);
        let mut d_h2 = gemm_back(&d_gate_up, &self.gate_up_proj.weight)?; // [T, C]
        lora_back(
            &d_gate_up,
            &mut d_h2,
            &[LoraTarget::GateProj, LoraTarget::UpProj],
        )?;
        drop(d_gate_up);
        let x_mid = LayerTape::get(&tape.x_mid, "mid-layer residual")?;
        let (mut d_mid, _) =
            ops::rms_norm_backward(x_mid, self.pre_mlp_norm(), eps, offset, &d_h2)?;
        drop(d_h2);
        ops::add_inplace(&mut d_mid, d_out)?;

        // Attention block.
        let d_attn = if a.sandwich_norms {
            let pre = LayerTape::get(&tape.o_out, "o_proj output")?;
            norm_back(pre, &self.post_attention_layernorm, &d_mid)?.0
        } else {
            d_mid.clone()
        };
        let mut d_a = gemm_back(&d_attn, &self.o_proj.weight)?; // [T, H·D]
        lora_back(&d_attn, &mut d_a, &[LoraTarget::OProj])?;
        drop(d_attn);
        let d_a = d_a.reshape(&[t, cfg.num_heads, cfg.head_dim])?;
        let (q, k, v) = (
            LayerTape::get(&tape.q, "q")?,
            LayerTape::get(&tape.k, "k")?,
            LayerTape::get(&tape.v, "v")?,
        );
        let out = LayerTape::get(&tape.attn_out, "attention output")?;
        let lse = LayerTape::get(&tape.attn_lse, "attention logsumexp")?;
        let params = attention_params(a, self.window);
        let grads_qkv = prof.run(OpKind::AttentionBackward, dev, || {
            ops::attention_backward(q, k, v, out, lse, &d_a, ctx.layout, &params)
        })?;
        drop(d_a);
        let d_qkv = prof.run(OpKind::ElementwiseBackward, dev, || {
            ops::rope_qkv_split_backward(
                &grads_qkv.dq,
                &grads_qkv.dk,
                &grads_qkv.dv,
                ctx.positions,
                ctx.rope,
            )
        })?; // [T, (H + 2·Hkv)·D]
        drop(grads_qkv);
        let mut d_h1 = gemm_back(&d_qkv, &self.qkv_proj.weight)?; // [T, C]
        lora_back(
            &d_qkv,
            &mut d_h1,
            &[LoraTarget::QProj, LoraTarget::KProj, LoraTarget::VProj],
        )?;
        drop(d_qkv);
        let (mut dx, _) = norm_back(x, &self.input_layernorm, &d_h1)?;
        ops::add_inplace(&mut dx, &d_mid)?;
        Ok(dx)
    }
}
