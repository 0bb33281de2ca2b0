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
//! CPU only for now: the column-range adds below read host memory.

use std::fmt;

use engine::{Device, Tensor, ops};

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

impl LoraPair {
    /// Zero tensors of the same shapes (gradient accumulators).
    pub fn zeros_like(&self) -> LoraPair {
        LoraPair {
            a: Tensor::zeros(self.a.shape()),
            b: Tensor::zeros(self.b.shape()),
        }
    }
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

    /// Zero tensors of the same shapes: a gradient accumulator for this adapter.
    pub fn zeros_like(&self) -> Lora {
        let z = |p: &Option<LoraPair>| p.as_ref().map(LoraPair::zeros_like);
        Lora {
            spec: self.spec.clone(),
            embed: z(&self.embed),
            lm_head: z(&self.lm_head),
            layers: self
                .layers
                .iter()
                .map(|l| LayerLora {
                    q: z(&l.q),
                    k: z(&l.k),
                    v: z(&l.v),
                    o: z(&l.o),
                    gate: z(&l.gate),
                    up: z(&l.up),
                    down: z(&l.down),
                })
                .collect(),
        }
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
    /// The multiplier of each element of a [rows, cols] input of `site`: 0 or 1 / (1 − p).
    /// None when dropout is off.
    pub(crate) fn mask(&self, site: MaskSite, rows: usize, cols: usize) -> Option<Vec<f32>> {
        let Dropout::On { p, seed, step } = *self else {
            return None;
        };
        if p <= 0.0 {
            return None;
        }
        let keep = 1.0 / (1.0 - p);
        // Keep when a uniform u64 is at or above p · 2⁶⁴.
        let cut = (p as f64 * 18_446_744_073_709_551_616.0) as u64;
        let layer = site.layer.map_or(0xFFFF, |l| l as u64);
        let module = mix(mix(mix(mix(seed) ^ step) ^ layer) ^ site.target as u64);
        Some(
            (0..rows * cols)
                .map(|i| {
                    if mix(module ^ i as u64) >= cut {
                        keep
                    } else {
                        0.0
                    }
                })
                .collect(),
        )
    }
}

/// SplitMix64's finaliser: a bijective mix with good avalanche, used as a counter-based RNG.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The input a LoRA pair sees: x itself, or x with a dropout mask applied.
pub(crate) fn dropped(x: &Tensor, mask: Option<&[f32]>) -> Result<Tensor> {
    let Some(mask) = mask else {
        return Ok(x.clone());
    };
    let mut out = x.to_vec()?;
    for (o, m) in out.iter_mut().zip(mask) {
        *o *= m;
    }
    Ok(Tensor::from_vec(out, x.shape())?)
}

/// What one LoRA'd module's forward keeps for its backward.
pub(crate) struct LoraActs {
    /// The pair's input after dropout, [T, in].
    pub xd: Tensor,
    /// xd·Aᵀ, [T, R].
    pub u: Tensor,
}

/// `s · (xd·Aᵀ)·Bᵀ` → ([T, out], what backward needs).
pub(crate) fn lora_delta(xd: Tensor, pair: &LoraPair, scaling: f32) -> Result<(Tensor, LoraActs)> {
    let u = ops::linear(&xd, &pair.a, None)?; // [T, R]
    let delta = ops::linear(&u, &pair.b, None)?; // [T, out]
    let delta = ops::scale(&delta, scaling)?;
    Ok((delta, LoraActs { xd, u }))
}

/// y[:, col0..col0 + delta.cols] += delta. y: [T, N], delta: [T, n].
pub(crate) fn add_columns(y: &mut Tensor, col0: usize, delta: &Tensor) -> Result<()> {
    let [t, n] = y.dims::<2>("lora add_columns", "y: [T, N]")?;
    let [td, nd] = delta.dims::<2>("lora add_columns", "delta: [T, n]")?;
    if td != t || col0 + nd > n {
        return Err(ModelError::Input {
            what: "lora add_columns",
            msg: format!("delta [{td}, {nd}] at column {col0} does not fit y [{t}, {n}]"),
        });
    }
    cpu_only(y)?;
    let d = delta.to_vec()?;
    let y = y.as_mut_slice()?;
    for r in 0..t {
        for (yv, dv) in y[r * n + col0..r * n + col0 + nd]
            .iter_mut()
            .zip(&d[r * nd..(r + 1) * nd])
        {
            *yv += dv;
        }
    }
    Ok(())
}

/// Columns col0..col0 + n of x: [T, N] → [T, n].
pub(crate) fn columns(x: &Tensor, col0: usize, n: usize) -> Result<Tensor> {
    let [t, width] = x.dims::<2>("lora columns", "x: [T, N]")?;
    if col0 + n > width {
        return Err(ModelError::Input {
            what: "lora columns",
            msg: format!("columns {col0}..{} of a [{t}, {width}] tensor", col0 + n),
        });
    }
    cpu_only(x)?;
    let x = x.as_slice()?;
    let out: Vec<f32> = (0..t)
        .flat_map(|r| x[r * width + col0..r * width + col0 + n].iter().copied())
        .collect();
    Ok(Tensor::from_vec(out, &[t, n])?)
}

fn cpu_only(x: &Tensor) -> Result<()> {
    match x.device() {
        Device::Cpu => Ok(()),
        device => Err(ModelError::Input {
            what: "lora",
            msg: format!("LoRA runs on the CPU only for now; a tensor is on {device}"),
        }),
    }
}
