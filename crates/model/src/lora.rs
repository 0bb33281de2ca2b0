//! LoRA on the decoder's projections, the embedding and the LM head, as PEFT 0.21 computes it.
//!
//! A LoRA'd linear `W [out, in]` computes `y = x·Wᵀ (+ b) + s · (drop(x)·Aᵀ)·Bᵀ` with
//! `A [R, in]`, `B [out, R]` and `s = alpha / R` (rsLoRA: `alpha / √R`); the base weights stay
//! frozen. The embedding's LoRA is `s · Aᵀ[ids]·Bᵀ` with `A [R, V]`, `B [C, R]` (PEFT's
//! `lora_embedding_A/B`, no dropout), multiplied by the model's embedding scale as PEFT does
//! for Gemma.
//!
//! Our decoder stacks q/k/v and gate/up into one GEMM each; LoRA stays per HF module: each
//! targeted module adds its own low-rank delta into its column range of the stacked output,
//! with its own dropout mask (PEFT gives every module its own `lora_dropout`).
//!
//! Dropout masks are a pure function of (seed, step, layer, module, element): recomputing a
//! layer in backward (gradient checkpointing) sees the same mask without storing it, and a
//! resumed run draws the same masks as an uninterrupted one. They cannot match torch's
//! generator bit for bit; the distribution is the same (keep with 1 − p, scale 1 / (1 − p)).
//!
//! The same code runs on the CPU (f32) and a GPU (bf16 activations and pairs; gradients in
//! f32), through the engine's ops.

use std::fmt;

use engine::ops::{self, DropoutKey};
use engine::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// The HF modules LoRA can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    EmbedTokens,
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
    LmHead,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 9] = [
        LoraTarget::EmbedTokens,
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
        LoraTarget::LmHead,
    ];

    /// The module's name in HF checkpoints and PEFT's `target_modules`.
    pub fn hf_name(self) -> &'static str {
        match self {
            LoraTarget::EmbedTokens => "embed_tokens",
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
            LoraTarget::LmHead => "lm_head",
        }
    }

    pub fn parse(name: &str) -> Result<LoraTarget> {
        LoraTarget::ALL
            .into_iter()
            .find(|t| t.hf_name() == name)
            .ok_or_else(|| ModelError::Input {
                what: "lora target_modules",
                msg: format!(
                    "unknown module {name:?}; expected one of {}",
                    LoraTarget::ALL.map(|t| t.hf_name()).join(", ")
                ),
            })
    }

    /// A per-layer module (not the embedding or the head).
    pub fn in_layer(self) -> bool {
        !matches!(self, LoraTarget::EmbedTokens | LoraTarget::LmHead)
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hf_name())
    }
}

/// LoRA's hyper-parameters (PEFT's LoraConfig fields of the same names).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub use_rslora: bool,
    pub targets: Vec<LoraTarget>,
}

impl LoraSpec {
    /// The multiplier of the low-rank product: alpha / r, or alpha / √r with rsLoRA.
    pub fn scaling(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }

    pub fn targets(&self, t: LoraTarget) -> bool {
        self.targets.contains(&t)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(ModelError::Input {
                what: "lora config",
                msg,
            })
        };
        if self.r == 0 {
            return bad("r must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("lora_alpha must be positive, got {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.dropout
            ));
        }
        if self.targets.is_empty() {
            return bad("target_modules is empty".into());
        }
        Ok(())
    }
}

/// One module's low-rank pair. Linear: A [R, in], B [out, R]. Embedding (PEFT's
/// `lora_embedding_A/B`): A [R, V], B [C, R].
#[derive(Clone, Debug)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// The LoRA pairs of one decoder layer, by module.
#[derive(Clone, Debug, Default)]
pub struct LayerLora {
    pub q: Option<LoraPair>,
    pub k: Option<LoraPair>,
    pub v: Option<LoraPair>,
    pub o: Option<LoraPair>,
    pub gate: Option<LoraPair>,
    pub up: Option<LoraPair>,
    pub down: Option<LoraPair>,
}

impl LayerLora {
    pub fn get(&self, t: LoraTarget) -> Option<&LoraPair> {
        self.slot(t).and_then(|s| s.as_ref())
    }

    pub fn get_mut(&mut self, t: LoraTarget) -> Option<&mut LoraPair> {
        self.slot_mut(t).and_then(|s| s.as_mut())
    }

    fn slot(&self, t: LoraTarget) -> Option<&Option<LoraPair>> {
        Some(match t {
            LoraTarget::QProj => &self.q,
            LoraTarget::KProj => &self.k,
            LoraTarget::VProj => &self.v,
            LoraTarget::OProj => &self.o,
            LoraTarget::GateProj => &self.gate,
            LoraTarget::UpProj => &self.up,
            LoraTarget::DownProj => &self.down,
            LoraTarget::EmbedTokens | LoraTarget::LmHead => return None,
        })
    }

    fn slot_mut(&mut self, t: LoraTarget) -> Option<&mut Option<LoraPair>> {
        Some(match t {
            LoraTarget::QProj => &mut self.q,
            LoraTarget::KProj => &mut self.k,
            LoraTarget::VProj => &mut self.v,
            LoraTarget::OProj => &mut self.o,
            LoraTarget::GateProj => &mut self.gate,
            LoraTarget::UpProj => &mut self.up,
            LoraTarget::DownProj => &mut self.down,
            LoraTarget::EmbedTokens | LoraTarget::LmHead => return None,
        })
    }
}

/// A model's LoRA adapter (or, with the same shapes, its gradient).
#[derive(Clone, Debug)]
pub struct Lora {
    pub spec: LoraSpec,
    pub embed: Option<LoraPair>,   // A [R, V], B [C, R]
    pub layers: Vec<LayerLora>,    // [L]
    pub lm_head: Option<LoraPair>, // A [R, C], B [V, R]
}

/// (out, in) of a module in this model, as HF's nn.Linear / nn.Embedding shapes it.
pub fn module_shape(cfg: &ModelConfig, t: LoraTarget) -> (usize, usize) {
    let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    match t {
        // Embedding: PEFT's A is [R, V] and B [C, R]: "in" is the vocabulary.
        LoraTarget::EmbedTokens => (c, v),
        LoraTarget::QProj => (cfg.q_dim(), c),
        LoraTarget::KProj | LoraTarget::VProj => (cfg.kv_dim(), c),
        LoraTarget::OProj => (c, cfg.q_dim()),
        LoraTarget::GateProj | LoraTarget::UpProj => (i, c),
        LoraTarget::DownProj => (c, i),
        LoraTarget::LmHead => (v, c),
    }
}

impl Lora {
    /// An adapter of all-zero pairs for `cfg` (the caller initialises them).
    pub fn zeros(spec: LoraSpec, cfg: &ModelConfig) -> Result<Lora> {
        spec.validate()?;
        let r = spec.r;
        let pair = |t: LoraTarget| {
            spec.targets(t).then(|| {
                let (out, inp) = module_shape(cfg, t);
                LoraPair {
                    a: Tensor::zeros(&[r, inp]),
                    b: Tensor::zeros(&[out, r]),
                }
            })
        };
        let layers = (0..cfg.num_layers)
            .map(|_| LayerLora {
                q: pair(LoraTarget::QProj),
                k: pair(LoraTarget::KProj),
                v: pair(LoraTarget::VProj),
                o: pair(LoraTarget::OProj),
                gate: pair(LoraTarget::GateProj),
                up: pair(LoraTarget::UpProj),
                down: pair(LoraTarget::DownProj),
            })
            .collect();
        Ok(Lora {
            embed: pair(LoraTarget::EmbedTokens),
            lm_head: pair(LoraTarget::LmHead),
            layers,
            spec,
        })
    }

    /// Zero tensors of the same shapes: a gradient accumulator for this adapter (CPU).
    pub fn zeros_like(&self) -> Lora {
        self.map(|t| Ok(Tensor::zeros(t.shape())))
            .expect("creating CPU zeros cannot fail")
    }

    /// Zero f32 tensors of the same shapes on `device`: a gradient accumulator there.
    pub fn zeros_on(&self, device: Device) -> Result<Lora> {
        self.map(|t| Tensor::zeros(t.shape()).to_device_f32(device))
    }

    /// A copy to compute with on `device`: f32 on the CPU, bf16 on a GPU (the dtype of the
    /// activations its GEMMs meet there).
    pub fn to_device(&self, device: Device) -> Result<Lora> {
        self.map(|t| t.to_device(device))
    }

    /// Every tensor through `f`, the structure kept.
    fn map(&self, f: impl Fn(&Tensor) -> engine::Result<Tensor>) -> Result<Lora> {
        let pair = |p: &Option<LoraPair>| -> Result<Option<LoraPair>> {
            p.as_ref()
                .map(|p| {
                    Ok(LoraPair {
                        a: f(&p.a)?,
                        b: f(&p.b)?,
                    })
                })
                .transpose()
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerLora {
                    q: pair(&l.q)?,
                    k: pair(&l.k)?,
                    v: pair(&l.v)?,
                    o: pair(&l.o)?,
                    gate: pair(&l.gate)?,
                    up: pair(&l.up)?,
                    down: pair(&l.down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Lora {
            spec: self.spec.clone(),
            embed: pair(&self.embed)?,
            lm_head: pair(&self.lm_head)?,
            layers,
        })
    }

    /// Every pair with its module and layer (None for the embedding and the head), in PEFT's
    /// order: embedding, layers in order (modules in [`LoraTarget::ALL`] order), head.
    pub fn pairs(&self) -> Vec<(Option<usize>, LoraTarget, &LoraPair)> {
        let mut out = Vec::new();
        if let Some(p) = &self.embed {
            out.push((None, LoraTarget::EmbedTokens, p));
        }
        for (i, l) in self.layers.iter().enumerate() {
            for t in LoraTarget::ALL.into_iter().filter(|t| t.in_layer()) {
                if let Some(p) = l.get(t) {
                    out.push((Some(i), t, p));
                }
            }
        }
        if let Some(p) = &self.lm_head {
            out.push((None, LoraTarget::LmHead, p));
        }
        out
    }

    /// [`Lora::pairs`], mutable.
    pub fn pairs_mut(&mut self) -> Vec<(Option<usize>, LoraTarget, &mut LoraPair)> {
        let mut out = Vec::new();
        if let Some(p) = &mut self.embed {
            out.push((None, LoraTarget::EmbedTokens, p));
        }
        for (i, l) in self.layers.iter_mut().enumerate() {
            let LayerLora {
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            } = l;
            for (t, p) in [
                (LoraTarget::QProj, q),
                (LoraTarget::KProj, k),
                (LoraTarget::VProj, v),
                (LoraTarget::OProj, o),
                (LoraTarget::GateProj, gate),
                (LoraTarget::UpProj, up),
                (LoraTarget::DownProj, down),
            ] {
                if let Some(p) = p {
                    out.push((Some(i), t, p));
                }
            }
        }
        if let Some(p) = &mut self.lm_head {
            out.push((None, LoraTarget::LmHead, p));
        }
        out
    }
}

/// Where dropout masks come from: off (evaluation, the reference pass, p = 0) or a pure
/// function of (seed, step, module, element).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dropout {
    Off,
    On { p: f32, seed: u64, step: u64 },
}

/// Which module of the model a mask is for: its layer (or none) and target.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskSite {
    pub layer: Option<usize>,
    pub target: LoraTarget,
}

impl Dropout {
    /// The engine's mask key for a [rows, cols] input of `site` (the masks are the engine's
    /// counter-based function, the same bits on the CPU and a GPU); None when dropout is off.
    pub(crate) fn key(&self, site: MaskSite) -> Option<DropoutKey> {
        match *self {
            Dropout::On { p, seed, step } if p > 0.0 => Some(DropoutKey {
                p,
                seed,
                step,
                layer: site.layer,
                module: site.target as u64,
            }),
            _ => None,
        }
    }
}

/// The input a LoRA pair sees: x itself, or x with its dropout mask applied.
pub(crate) fn dropped(x: &Tensor, key: Option<&DropoutKey>) -> Result<Tensor> {
    Ok(match key {
        Some(key) => ops::apply_dropout(x, key)?,
        None => x.clone(),
    })
}

/// The gradient through [`dropped`]: the same mask.
pub(crate) fn dropped_backward(dy: Tensor, key: Option<&DropoutKey>) -> Result<Tensor> {
    Ok(match key {
        Some(key) => ops::apply_dropout_backward(&dy, key)?,
        None => dy,
    })
}
