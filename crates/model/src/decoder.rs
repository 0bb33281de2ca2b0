//! One pre-norm decoder layer, shared by the five families and parameterised by their
//! [`Arch`] (each family file says which switches it sets and why).
//!
//! ```text
//! h = norm(x, input_layernorm)
//! q, k, v = split(h·Wqkvᵀ(+b)), RoPE on q and k      (q/k/v stacked: one GEMM)
//! a = attention(q, k, v)  (window, soft-cap, scale from the config)
//! a = a·Woᵀ(+b)           [Gemma-2: a = norm(a, post_attention_layernorm)]
//! x = x + a;  h = norm(x, post_attention_layernorm)   [Gemma-2: pre_feedforward_layernorm]
//! m = down(act(gate(h)) · up(h))                  (gate/up stacked: one GEMM)
//!                                                 [Gemma-2: m = norm(m, post_feedforward_layernorm)]
//! x = x + m               (fused with the next layer's input norm inside a whole forward)
//! ```
//!
//! The same ops run on the CPU (f32) and on a GPU (bf16): the residual adds go through the
//! engine's fused add + RMSNorm, RoPE is fused with the split of the stacked q/k/v
//! projection, and the activation reads the stacked gate/up output.
//!
//! [`DecoderLayer::forward`] is a pure function of (layer weights, input, positions, layout),
//! plus the optional KV cache it appends to, so the trainer can recompute a layer in its
//! backward pass from the saved layer input alone.

use engine::ops::{self, AttentionParams, Rope, SeqLayout};
use engine::{Device, Indices, Tensor};

use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::layer_backward::{LayerTape, LoraCtx};
use crate::lora::LoraTarget;
use crate::profile::{OpKind, Profiler};
use crate::weights::Checkpoint;

/// A linear layer in HF's layout: y = x·Wᵀ + b.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    pub weight: Tensor,       // [N, K]
    pub bias: Option<Tensor>, // [N]
}

impl Linear {
    /// The HF modules `prefixes` (each `[out_i, inp]`) stacked into one [Σ out_i, inp] layer.
    fn load_stacked(
        ck: &mut Checkpoint,
        prefixes: &[(&str, usize)],
        inp: usize,
        bias: bool,
        device: Device,
    ) -> Result<Linear> {
        let names: Vec<(String, [usize; 2])> = prefixes
            .iter()
            .map(|&(p, out)| (format!("{p}.weight"), [out, inp]))
            .collect();
        let parts: Vec<(&str, &[usize])> = names
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        let weight = ck.concat_on(&parts, device)?;
        let bias = if bias {
            let names: Vec<(String, [usize; 1])> = prefixes
                .iter()
                .map(|&(p, out)| (format!("{p}.bias"), [out]))
                .collect();
            let parts: Vec<(&str, &[usize])> = names
                .iter()
                .map(|(n, s)| (n.as_str(), s.as_slice()))
                .collect();
            Some(ck.concat_on(&parts, device)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    fn load(
        ck: &mut Checkpoint,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        device: Device,
    ) -> Result<Linear> {
        Self::load_stacked(ck, &[(prefix, out)], inp, bias, device)
    }

    /// x: [T, K] → [T, N].
    pub fn forward(&self, x: &Tensor, prof: &Profiler) -> Result<Tensor> {
        prof.run(OpKind::Gemm, x.device(), || {
            ops::linear(x, &self.weight, self.bias.as_ref())
        })
    }
}

/// The weights of one decoder layer. Names follow the checkpoint's, except for the two
/// stacked projections.
#[derive(Clone, Debug)]
pub(crate) struct DecoderLayer {
    pub index: usize,
    pub input_layernorm: Tensor, // [C]
    /// q_proj, k_proj and v_proj stacked (that order): the rows [0, H·D) are q's, then
    /// Hkv·D rows of k and Hkv·D of v — the layout `ops::rope_qkv_split` reads.
    pub qkv_proj: Linear, // [(H + 2·Hkv)·D, C]
    pub o_proj: Linear,          // [C, H·D]
    /// Pre-MLP norm (Llama naming), or Gemma-2's norm of the attention output.
    pub post_attention_layernorm: Tensor, // [C]
    /// Gemma-2 only.
    pub pre_feedforward_layernorm: Option<Tensor>, // [C]
    /// Gemma-2 only.
    pub post_feedforward_layernorm: Option<Tensor>, // [C]
    /// gate_proj and up_proj stacked (gate first), as `ops::gated_activation_packed` reads.
    pub gate_up_proj: Linear, // [2·I, C]
    pub down_proj: Linear,       // [C, I]
    /// This layer's sliding window W, if any.
    pub window: Option<usize>,
}

/// What every layer of one forward shares.
pub(crate) struct LayerCtx<'a> {
    pub cfg: &'a ModelConfig,
    pub rope: &'a Rope,
    pub positions: &'a Indices, // [Tq]
    pub layout: &'a SeqLayout,
    pub prof: &'a Profiler,
}

impl LayerCtx<'_> {
    pub fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (eps, offset) = (self.cfg.rms_norm_eps, self.cfg.arch.norm_offset);
        self.prof.run(OpKind::Norm, x.device(), || {
            ops::rms_norm(x, w, eps, offset)
        })
    }

    /// (x + residual, norm(x + residual, w)) in one op.
    fn add_norm(&self, x: &Tensor, residual: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
        let (eps, offset) = (self.cfg.rms_norm_eps, self.cfg.arch.norm_offset);
        self.prof.run(OpKind::Norm, x.device(), || {
            ops::add_rms_norm(x, residual, w, eps, offset)
        })
    }
}

impl DecoderLayer {
    /// Reads layer `index` onto `device`, checking every shape against `cfg`.
    pub fn load(
        ck: &mut Checkpoint,
        cfg: &ModelConfig,
        index: usize,
        device: Device,
    ) -> Result<DecoderLayer> {
        let p = format!("model.layers.{index}");
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
        let a = &cfg.arch;
        let norm = |ck: &mut Checkpoint, name: &str| {
            ck.tensor_on(&format!("{p}.{name}.weight"), &[c], device)
        };
        let sandwich = |ck: &mut Checkpoint, name: &str| -> Result<Option<Tensor>> {
            if a.sandwich_norms {
                Ok(Some(norm(ck, name)?))
            } else {
                Ok(None)
            }
        };
        let attn = |name: &str| format!("{p}.self_attn.{name}");
        let mlp = |name: &str| format!("{p}.mlp.{name}");
        Ok(DecoderLayer {
            index,
            input_layernorm: norm(ck, "input_layernorm")?,
            qkv_proj: Linear::load_stacked(
                ck,
                &[
                    (&attn("q_proj"), q),
                    (&attn("k_proj"), kv),
                    (&attn("v_proj"), kv),
                ],
                c,
                a.qkv_bias,
                device,
            )?,
            o_proj: Linear::load(ck, &attn("o_proj"), c, q, a.o_bias, device)?,
            post_attention_layernorm: norm(ck, "post_attention_layernorm")?,
            pre_feedforward_layernorm: sandwich(ck, "pre_feedforward_layernorm")?,
            post_feedforward_layernorm: sandwich(ck, "post_feedforward_layernorm")?,
            gate_up_proj: Linear::load_stacked(
                ck,
                &[(&mlp("gate_proj"), i), (&mlp("up_proj"), i)],
                c,
                a.mlp_bias,
                device,
            )?,
            down_proj: Linear::load(ck, &mlp("down_proj"), c, i, a.mlp_bias, device)?,
            window: cfg.layer_windows[index],
        })
    }

    /// x: [Tq, C] → [Tq, C]. `ctx.positions`: [Tq], the RoPE position of each query token.
    /// Without a cache, `ctx.layout` must be a prefill (queries == keys); with one, the new
    /// keys and values are appended to it and attention reads everything it holds.
    pub fn forward(
        &self,
        ctx: &LayerCtx<'_>,
        x: &Tensor,
        cache: Option<&mut dyn KvCache>,
    ) -> Result<Tensor> {
        let h = ctx.norm(x, &self.input_layernorm)?;
        let (x, _) = self.forward_normed(ctx, x, h, cache, None, None, None)?;
        Ok(x)
    }

    /// The layer given its input x: [Tq, C] and h = norm(x, input_layernorm). Returns the
    /// output x and, when `next_norm` is given, norm(output, next_norm) — computed in the same
    /// op as the last residual add (a whole forward passes the next layer's input norm, or the
    /// final norm).
    ///
    /// With `lora`, each targeted projection adds its low-rank delta (see `lora.rs`). With
    /// `tape`, the intermediates the backward pass needs are kept in it (training recomputes
    /// a layer this way from its saved input; a plain forward keeps nothing).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_normed(
        &self,
        ctx: &LayerCtx<'_>,
        x: &Tensor,
        h: Tensor,
        cache: Option<&mut dyn KvCache>,
        next_norm: Option<&Tensor>,
        lora: Option<&LoraCtx<'_>>,
        mut tape: Option<&mut LayerTape>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let cfg = ctx.cfg;
        let a = &cfg.arch;
        let (t, dev, prof) = (x.shape()[0], x.device(), ctx.prof);
        let (qd, kvd, i) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        // Each block's intermediates are dropped as soon as they are used, so the peak
        // memory of a long batch is a block's widest activations, not the sum of them.

        // Attention block.
        let mut qkv = self.qkv_proj.forward(&h, prof)?; // [Tq, (H + 2·Hkv)·D]
        if let Some(lora) = lora {
            let parts = [
                (LoraTarget::QProj, 0),
                (LoraTarget::KProj, qd),
                (LoraTarget::VProj, qd + kvd),
            ];
            prof.run(OpKind::Lora, dev, || {
                lora.add(self.index, &h, &mut qkv, &parts, tape.as_deref_mut())
            })?;
        }
        drop(h);
        let (q, k, v) = prof.run(OpKind::Rope, dev, || {
            ops::rope_qkv_split(
                &qkv,
                cfg.num_heads,
                cfg.num_kv_heads,
                ctx.positions,
                ctx.rope,
            )
        })?; // [Tq, H, D], [Tq, Hkv, D], [Tq, Hkv, D]
        drop(qkv);
        let params = attention_params(a, self.window);
        let attn = match cache {
            // A paged cache writes the new keys and values and attends through its block
            // tables, reading the cached keys in place.
            Some(cache) if cache.attends_in_place() => prof.run(OpKind::Attention, dev, || {
                cache.attend(self.index, ctx.layout, &q, &k, &v, &params)
            })?,
            cache => {
                let (k_all, v_all) = match cache {
                    Some(cache) => cache.append(self.index, ctx.layout, &k, &v)?, // [Tkv, Hkv, D] each
                    // Shared storage, not a copy.
                    None => (k.clone(), v.clone()),
                };
                prof.run(OpKind::Attention, dev, || {
                    ops::attention(&q, &k_all, &v_all, ctx.layout, &params)
                })?
            }
        };
        let attn_flat = attn.out.reshape(&[t, qd])?; // [Tq, H·D]
        if let Some(tape) = tape.as_deref_mut() {
            tape.q = Some(q);
            tape.k = Some(k);
            tape.v = Some(v);
            tape.attn_lse = Some(attn.lse);
            tape.attn_out = Some(attn.out);
        }
        let mut attn = self.o_proj.forward(&attn_flat, prof)?; // [Tq, C]
        if let Some(lora) = lora {
            let parts = [(LoraTarget::OProj, 0)];
            prof.run(OpKind::Lora, dev, || {
                lora.add(
                    self.index,
                    &attn_flat,
                    &mut attn,
                    &parts,
                    tape.as_deref_mut(),
                )
            })?;
        }
        drop(attn_flat);
        if a.sandwich_norms {
            if let Some(tape) = tape.as_deref_mut() {
                tape.o_out = Some(attn.clone());
            }
            attn = ctx.norm(&attn, &self.post_attention_layernorm)?;
        }
        let (x, h) = ctx.add_norm(&attn, x, self.pre_mlp_norm())?;
        drop(attn);
        if let Some(tape) = tape.as_deref_mut() {
            tape.x_mid = Some(x.clone());
        }

        // MLP block.
        let mut gate_up = self.gate_up_proj.forward(&h, prof)?; // [Tq, 2·I]
        if let Some(lora) = lora {
            let parts = [(LoraTarget::GateProj, 0), (LoraTarget::UpProj, i)];
            prof.run(OpKind::Lora, dev, || {
                lora.add(self.index, &h, &mut gate_up, &parts, tape.as_deref_mut())
            })?;
        }
        drop(h);
        let gated = prof.run(OpKind::Activation, dev, || {
            ops::gated_activation_packed(&gate_up, a.activation)
        })?; // [Tq, I]
        match tape.as_deref_mut() {
            Some(tape) => tape.gate_up = Some(gate_up),
            None => drop(gate_up),
        }
        let mut mlp = self.down_proj.forward(&gated, prof)?; // [Tq, C]
        if let Some(lora) = lora {
            let parts = [(LoraTarget::DownProj, 0)];
            prof.run(OpKind::Lora, dev, || {
                lora.add(self.index, &gated, &mut mlp, &parts, tape.as_deref_mut())
            })?;
        }
        drop(gated);
        if let Some(w) = &self.post_feedforward_layernorm {
            if let Some(tape) = tape {
                tape.mlp_out = Some(mlp.clone());
            }
            mlp = ctx.norm(&mlp, w)?;
        }
        match next_norm {
            Some(w) => {
                let (x, h) = ctx.add_norm(&mlp, &x, w)?;
                Ok((x, Some(h)))
            }
            None => {
                let mut x = x;
                prof.run(OpKind::Add, dev, || ops::add_inplace(&mut x, &mlp))?;
                Ok((x, None))
            }
        }
    }

    /// The norm in front of the MLP: Llama's post_attention_layernorm, Gemma-2's
    /// pre_feedforward_layernorm.
    pub fn pre_mlp_norm(&self) -> &Tensor {
        match &self.pre_feedforward_layernorm {
            Some(w) => w,
            None => &self.post_attention_layernorm,
        }
    }
}

pub(crate) fn attention_params(a: &Arch, window: Option<usize>) -> AttentionParams {
    AttentionParams {
        scale: a.attn_scale,
        window,
        softcap: a.attn_softcap,
    }
}
