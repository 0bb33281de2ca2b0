//! The model with a LoRA adapter, for training: a forward that keeps only each layer's input,
//! and the backward that turns d loss / d log p(token) into the adapter's gradients.
//!
//! ```text
//! x₀ = embed(ids)·scale [+ scale·s·Aᵀ[ids]·Bᵀ]          (LoRA on embed_tokens)
//! x_{l+1} = layer_l(x_l)                             (x_l kept; the layer is recomputed in backward)
//! h = norm(x_L)[rows]                                (only rows whose next token counts)
//! log p = log_softmax(h·Wᵀ [+ s·drop(h)·Aᵀ·Bᵀ])[targets]   (LoRA on lm_head; chunked, no [T × V])
//! ```
//!
//! The backward runs that in reverse: the chunked log-prob backward gives d h, the final
//! norm's backward d x_L, each layer's [`DecoderLayer::backward`] d x_l and its pairs'
//! gradients, and the embedding's pair gets its gradient from d x₀.

use engine::ops::{self, LowRank, SeqLayout, TokenStats};
use engine::{Indices, Tensor};

use crate::error::{ModelError, Result};
use crate::layer_backward::{LayerTape, LoraCtx};
use crate::lora::{Dropout, Lora, LoraTarget, MaskSite, dropped, dropped_backward};
use crate::model::Model;
use crate::profile::OpKind;
use engine::ops::DropoutKey;

/// Whether the backward recomputes each layer from its saved input (gradient checkpointing,
/// the default) or reads what the forward kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpointing {
    Recompute,
    Keep,
}

/// A packed training batch: whole sequences (prefill layout) and the hidden rows whose next
/// token's log-prob counts.
#[derive(Clone, Debug)]
pub struct TrainBatch {
    pub ids: Vec<u32>,     // [T]
    pub lens: Vec<usize>,  // [S] sequence lengths, summing to T
    pub rows: Vec<usize>,  // [N] positions in 0..T whose next token is scored
    pub targets: Vec<u32>, // [N] that next token
}

/// What [`Model::lora_backward`] needs from [`Model::lora_forward`].
pub struct LoraTape {
    positions: Vec<u32>, // [T]
    layout: SeqLayout,
    layer_inputs: Vec<Tensor>, // [L] × [T, C]
    /// Every layer's intermediates, when the forward kept them (else empty: recompute).
    layer_tapes: Vec<LayerTape>, // [L] or []
    x_final: Tensor,           // [T, C], before the final norm
    /// The final-normed hidden rows that were scored (the LM head's input).
    selected: Tensor, // [N, C]
    head: Option<HeadTape>,
    embed_u: Option<Tensor>, // [T, R]: Aᵀ[ids] of the embedding's pair
    dropout: Dropout,
}

/// The LM head's LoRA activations.
struct HeadTape {
    hd: Tensor, // [N, C]: the selected rows after dropout
    u: Tensor,  // [N, R]: s·hd·Aᵀ
    key: Option<DropoutKey>,
}

impl Model {
    /// Forward of `batch` with `lora` applied (dropout as given: [`Dropout::Off`] for
    /// evaluation); the stats of each scored row, and what the backward needs. Without an
    /// adapter (`None`) this is the reference pass of DPO ("the base with the adapter
    /// disabled") and the tape is not needed.
    pub fn lora_forward(
        &self,
        batch: &TrainBatch,
        lora: Option<&Lora>,
        dropout: Dropout,
    ) -> Result<(TokenStats, LoraTape)> {
        self.lora_forward_with(batch, lora, dropout, Checkpointing::Recompute)
    }

    /// [`Model::lora_forward`], choosing what the backward will have: with
    /// [`Checkpointing::Keep`] every layer's intermediates stay in the tape (more memory, no
    /// recomputation: TRL's `gradient_checkpointing=False`).
    pub fn lora_forward_with(
        &self,
        batch: &TrainBatch,
        lora: Option<&Lora>,
        dropout: Dropout,
        checkpointing: Checkpointing,
    ) -> Result<(TokenStats, LoraTape)> {
        let (positions, layout) = self.check_batch(batch)?;
        let cfg = self.config();
        if let Some(lora) = lora {
            check_adapter(lora, cfg.num_layers)?;
        }
        let ids = Indices::from(batch.ids.as_slice());
        let pos = Indices::from(positions.as_slice());
        let ctx = self.ctx(&pos, &layout);
        let mut x = self.embed(&batch.ids)?; // [T, C]
        let mut embed_u = None;
        if let Some((pair, s)) = lora.and_then(|l| l.embed.as_ref().map(|p| (p, l.spec.scaling())))
        {
            let u = ops::embedding_indices(&ops::transpose(&pair.a)?, &ids, 1.0)?; // [T, R]
            let delta = ops::linear(&u, &pair.b, None)?; // [T, C]
            ops::add_inplace(&mut x, &ops::scale(&delta, s * self.embed_scale())?)?;
            embed_u = Some(u);
        }
        let lora_ctx = lora.map(|l| LoraCtx {
            layers: &l.layers,
            scaling: l.spec.scaling(),
            dropout,
        });
        let keep = checkpointing == Checkpointing::Keep && lora.is_some();
        let mut layer_inputs = Vec::with_capacity(self.layers.len());
        let mut layer_tapes = Vec::new();
        for layer in &self.layers {
            let h = ctx.norm(&x, &layer.input_layernorm)?;
            let mut tape = keep.then(LayerTape::default);
            let (out, _) =
                layer.forward_normed(&ctx, &x, h, None, None, lora_ctx.as_ref(), tape.as_mut())?;
            layer_tapes.extend(tape);
            let input = std::mem::replace(&mut x, out);
            // Without an adapter (the reference pass) nothing will be back-propagated: the
            // layer inputs are dropped as the forward goes.
            if lora.is_some() {
                layer_inputs.push(input);
            }
        }
        let hidden = ctx.norm(&x, &self.norm)?;
        let selected = self.select_rows(&hidden, &batch.rows)?; // [N, C]
        drop(hidden);
        let (stats, head) = match lora.and_then(|l| l.lm_head.as_ref().map(|p| (l, p))) {
            Some((lora, pair)) => {
                let site = MaskSite {
                    layer: None,
                    target: LoraTarget::LmHead,
                };
                let key = dropout.key(site);
                let hd = dropped(&selected, key.as_ref())?;
                let u = ops::scale(&ops::linear(&hd, &pair.a, None)?, lora.spec.scaling())?;
                let stats = self.head_stats(&selected, Some(&u), Some(&pair.b), &batch.targets)?;
                (stats, Some(HeadTape { hd, u, key }))
            }
            None => (
                self.head_stats(&selected, None, None, &batch.targets)?,
                None,
            ),
        };
        Ok((
            stats,
            LoraTape {
                positions,
                layout,
                layer_inputs,
                layer_tapes,
                x_final: x,
                selected,
                head,
                embed_u,
                dropout,
            },
        ))
    }

    /// Adds into `grads` the gradient of Σ d_logp[i] · log p(row i) with respect to every
    /// pair of `lora`, given the tape of the forward that computed those log-probs.
    pub fn lora_backward(
        &self,
        batch: &TrainBatch,
        lora: &Lora,
        tape: LoraTape,
        d_logp: &[f32],
        grads: &mut Lora,
    ) -> Result<()> {
        if d_logp.len() != batch.rows.len() {
            return Err(ModelError::Input {
                what: "lora_backward",
                msg: format!(
                    "{} gradients for {} scored rows",
                    d_logp.len(),
                    batch.rows.len()
                ),
            });
        }
        check_adapter(grads, self.layers.len())?;
        let cfg = self.config();
        let (eps, offset) = (cfg.rms_norm_eps, cfg.arch.norm_offset);
        let s = lora.spec.scaling();
        let t = batch.ids.len();
        let LoraTape {
            positions,
            layout,
            layer_inputs,
            layer_tapes,
            x_final,
            selected,
            head,
            embed_u,
            dropout,
        } = tape;
        if layer_inputs.len() != self.layers.len() {
            return Err(ModelError::Input {
                what: "lora_backward",
                msg: "the tape is from a forward without an adapter (the reference pass), \
                      which keeps nothing to back-propagate through"
                    .into(),
            });
        }
        let mut kept: Vec<Option<LayerTape>> = layer_tapes.into_iter().map(Some).collect();
        kept.resize_with(self.layers.len(), || None);

        // LM head and final norm.
        let low_rank = match (&head, &lora.lm_head) {
            (Some(h), Some(pair)) => Some(LowRank {
                u: &h.u,
                b: &pair.b,
            }),
            _ => None,
        };
        let back = self
            .profiler
            .run(OpKind::LmHeadBackward, selected.device(), || {
                ops::token_logprobs_backward(
                    d_logp,
                    &selected,
                    &self.lm_head,
                    low_rank,
                    &batch.targets,
                    cfg.arch.final_softcap,
                    self.chunks,
                )
            })?;
        let mut d_sel = back.d_hidden; // [N, C]
        if let (Some(h), Some(pair), Some(lr)) = (&head, &lora.lm_head, &back.d_low_rank) {
            let grad = grads
                .lm_head
                .as_mut()
                .ok_or_else(|| missing("lm_head gradient"))?;
            ops::add_inplace(&mut grad.b, &lr.d_b)?;
            // d(hd·Aᵀ), in the activations' dtype (the GPU's GEMMs take bf16).
            let d_raw = ops::cast(&ops::scale(&lr.d_u, s)?, h.hd.dtype())?;
            ops::add_inplace(&mut grad.a, &ops::linear_backward_weight(&d_raw, &h.hd)?)?;
            let d_hd = ops::linear_backward_input(&d_raw, &pair.a)?;
            let d_hd = dropped_backward(d_hd, h.key.as_ref())?;
            ops::add_inplace(&mut d_sel, &d_hd)?;
        }
        let rows: Vec<u32> = batch.rows.iter().map(|&r| r as u32).collect();
        // The scattered rows come back in f32: the norm's backward takes the activations' dtype.
        let d_hidden = ops::embedding_backward(&rows, &d_sel, t, 1.0)?; // [T, C]
        let d_hidden = ops::cast(&d_hidden, x_final.dtype())?;
        drop(d_sel);
        let (mut dx, _) = ops::rms_norm_backward(&x_final, &self.norm, eps, offset, &d_hidden)?;
        drop(d_hidden);

        // Layers, last first, each recomputed from its saved input.
        let pos = Indices::from(positions.as_slice());
        let ctx = self.ctx(&pos, &layout);
        let lora_ctx = LoraCtx {
            layers: &lora.layers,
            scaling: s,
            dropout,
        };
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let _span = tracing::trace_span!("layer backward", index = l).entered();
            dx = layer.backward(
                &ctx,
                &layer_inputs[l],
                &dx,
                Some(&lora_ctx),
                grads.layers.get_mut(l),
                kept[l].take(),
            )?;
        }

        // The embedding's pair.
        if let (Some(u), Some(pair)) = (&embed_u, &lora.embed) {
            let grad = grads
                .embed
                .as_mut()
                .ok_or_else(|| missing("embedding gradient"))?;
            let d_delta = ops::scale(&dx, s * self.embed_scale())?; // [T, C]
            ops::add_inplace(&mut grad.b, &ops::linear_backward_weight(&d_delta, u)?)?;
            let du = ops::linear_backward_input(&d_delta, &pair.b)?; // [T, R]
            let vocab = cfg.vocab_size;
            let d_at = ops::embedding_backward(&batch.ids, &du, vocab, 1.0)?; // [V, R]
            ops::add_inplace(&mut grad.a, &ops::transpose(&d_at)?)?;
        }
        Ok(())
    }

    /// Log-prob stats of `targets` under hidden rows [N, C], with the head's low-rank term.
    fn head_stats(
        &self,
        hidden: &Tensor,
        u: Option<&Tensor>,
        b: Option<&Tensor>,
        targets: &[u32],
    ) -> Result<TokenStats> {
        let low_rank = match (u, b) {
            (Some(u), Some(b)) => Some(LowRank { u, b }),
            _ => None,
        };
        self.profiler.run(OpKind::LmHead, hidden.device(), || {
            ops::token_logprobs_low_rank(
                hidden,
                &self.lm_head,
                low_rank,
                targets,
                self.config().arch.final_softcap,
                self.chunks,
            )
        })
    }

    /// Positions and layout of a batch, after checking it.
    fn check_batch(&self, batch: &TrainBatch) -> Result<(Vec<u32>, SeqLayout)> {
        let bad = |msg: String| ModelError::Input {
            what: "training batch",
            msg,
        };
        let t: usize = batch.lens.iter().sum();
        if t != batch.ids.len() {
            return Err(bad(format!(
                "sequence lengths sum to {t} but there are {} ids",
                batch.ids.len()
            )));
        }
        if batch.rows.len() != batch.targets.len() {
            return Err(bad(format!(
                "{} scored rows but {} targets",
                batch.rows.len(),
                batch.targets.len()
            )));
        }
        if let Some(&r) = batch.rows.iter().find(|&&r| r >= t) {
            return Err(bad(format!(
                "scored row {r} is outside the batch's {t} tokens"
            )));
        }
        let positions = batch
            .lens
            .iter()
            .flat_map(|&l| 0..l as u32)
            .collect::<Vec<u32>>();
        Ok((positions, SeqLayout::prefill(&batch.lens)))
    }
}

fn check_adapter(lora: &Lora, layers: usize) -> Result<()> {
    if lora.layers.len() != layers {
        return Err(ModelError::Input {
            what: "lora",
            msg: format!(
                "the adapter has {} layers, the model {layers}",
                lora.layers.len()
            ),
        });
    }
    Ok(())
}

fn missing(what: &str) -> ModelError {
    ModelError::Input {
        what: "lora_backward",
        msg: format!("no {what}: the gradient accumulator does not match the adapter"),
    }
}
