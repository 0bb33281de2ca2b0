//! AdamW exactly as `torch.optim.AdamW` (torch 2.11, `_single_tensor_adam`) computes it on
//! f32 parameters, one step at a time.
//!
//! Per element, with step count t (1 after the first step) and this step's learning rate lr:
//!
//! ```text
//! p ← p · (1 − lr·wd)                       decoupled decay first (skipped when wd = 0)
//! m ← lerp(m, g, 1 − β1)                    torch's lerp: m + w·(g − m) as one fused multiply-add
//! v ← v·β2 + (1 − β2)·g·g                   the last multiply-add fused, as torch's CPU addcmul
//! p ← p + (−lr / (1 − β1ᵗ))·m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//!
//! The scalars (bias corrections, step size, 1 − lr·wd) are computed in f64 as Python does
//! and rounded to f32 where they meet a tensor, as torch's CPU kernels do. What cannot match
//! bit for bit: torch's vectorised CPU `sqrt` is not always correctly rounded (ours is), so
//! parameters agree with torch to a few f32 ulps, not exactly; the replay test bounds this.

use rayon::prelude::*;

use crate::error::{Result, TrainError};
use crate::optim::decay::decays;

/// Elements per parallel task: large enough that scheduling costs nothing next to ~10 ns of
/// work per element.
const CHUNK: usize = 1 << 16;

/// AdamW's hyper-parameters other than the learning rate (which the schedule gives each
/// step). `Default` is torch's: betas (0.9, 0.999), eps 1e-8, weight decay 0.01 — note that
/// transformers' `TrainingArguments.weight_decay` defaults to 0.0 instead.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied to the parameters [`decays`] selects (or the caller marks); 0 for the rest.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> AdamWConfig {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// torch's constructor checks.
    fn validate(&self) -> Result<()> {
        let bad = |what, msg: String| Err(TrainError::Arg { what, msg });
        for (what, beta) in [("adam_beta1", self.beta1), ("adam_beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(what, format!("must be in [0, 1), got {beta}"));
            }
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return bad("adam_epsilon", format!("must be >= 0, got {}", self.eps));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(
                "weight_decay",
                format!("must be >= 0, got {}", self.weight_decay),
            );
        }
        Ok(())
    }
}

/// One registered parameter, as [`AdamW::params`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamInfo<'a> {
    pub name: &'a str,
    pub len: usize,
    /// In the weight-decay group.
    pub decay: bool,
}

/// A parameter's optimizer state.
#[derive(Clone, Debug)]
pub(crate) struct ParamState {
    pub name: String,
    pub decay: bool,
    pub exp_avg: Vec<f32>,    // [len]
    pub exp_avg_sq: Vec<f32>, // [len]
}

/// AdamW over a fixed list of named flat f32 parameters.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub(crate) config: AdamWConfig,
    pub(crate) params: Vec<ParamState>,
    /// Optimizer steps taken (torch keeps one per parameter; ours always move together).
    pub(crate) step: u64,
}

impl AdamW {
    /// Registers `(name, len)` parameters; each is decayed or not by transformers' name rule
    /// ([`decays`]).
    pub fn new<S: Into<String>>(
        config: AdamWConfig,
        params: impl IntoIterator<Item = (S, usize)>,
    ) -> Result<AdamW> {
        AdamW::with_groups(
            config,
            params.into_iter().map(|(name, len)| {
                let name = name.into();
                let decay = decays(&name);
                (name, len, decay)
            }),
        )
    }

    /// Registers `(name, len, decay)` parameters with explicit weight-decay groups.
    pub fn with_groups<S: Into<String>>(
        config: AdamWConfig,
        params: impl IntoIterator<Item = (S, usize, bool)>,
    ) -> Result<AdamW> {
        config.validate()?;
        let mut states: Vec<ParamState> = Vec::new();
        for (name, len, decay) in params {
            let name = name.into();
            if states.iter().any(|s| s.name == name) {
                return Err(TrainError::Arg {
                    what: "optimizer parameters",
                    msg: format!("parameter {name} is registered twice"),
                });
            }
            states.push(ParamState {
                name,
                decay,
                exp_avg: vec![0.0; len],
                exp_avg_sq: vec![0.0; len],
            });
        }
        Ok(AdamW {
            config,
            params: states,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Optimizer steps taken so far (torch's `state[p]["step"]`).
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The registered parameters, in registration (= step argument) order.
    pub fn params(&self) -> impl Iterator<Item = ParamInfo<'_>> {
        self.params.iter().map(|p| ParamInfo {
            name: &p.name,
            len: p.exp_avg.len(),
            decay: p.decay,
        })
    }

    /// Parameter `index`'s first moment (torch's `exp_avg`). [len]
    pub fn exp_avg(&self, index: usize) -> Option<&[f32]> {
        self.params.get(index).map(|p| &p.exp_avg[..])
    }

    /// Parameter `index`'s second moment (torch's `exp_avg_sq`). [len]
    pub fn exp_avg_sq(&self, index: usize) -> Option<&[f32]> {
        self.params.get(index).map(|p| &p.exp_avg_sq[..])
    }

    /// One AdamW step with learning rate `lr`: `params[i]` and `grads[i]` are the i-th
    /// registered parameter and its (already clipped) gradient.
    pub fn step(&mut self, lr: f64, params: &mut [&mut [f32]], grads: &[&[f32]]) -> Result<()> {
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(TrainError::Arg {
                what: "learning_rate",
                msg: format!("must be finite and >= 0, got {lr}"),
            });
        }
        self.check_buffers(params.len(), grads.len(), |i| {
            (params[i].len(), grads[i].len())
        })?;
        self.step += 1;
        let decayed = StepScalars::new(&self.config, lr, self.config.weight_decay, self.step);
        let undecayed = StepScalars::new(&self.config, lr, 0.0, self.step);
        for ((state, p), g) in self.params.iter_mut().zip(params.iter_mut()).zip(grads) {
            let s = if state.decay { &decayed } else { &undecayed };
            // Elements are independent: chunks run on rayon's pool, same result as a loop.
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(state.exp_avg.par_chunks_mut(CHUNK))
                .zip(state.exp_avg_sq.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                        s.update(p, g, m, v);
                    }
                });
        }
        Ok(())
    }

    /// Checks `n_params` parameter and `n_grads` gradient buffers against the registration;
    /// `lens(i)` gives the i-th pair's lengths.
    fn check_buffers(
        &self,
        n_params: usize,
        n_grads: usize,
        lens: impl Fn(usize) -> (usize, usize),
    ) -> Result<()> {
        let n = self.params.len();
        if n_params != n || n_grads != n {
            return Err(TrainError::Arg {
                what: "AdamW::step",
                msg: format!(
                    "{n} parameters registered, got {n_params} parameter and {n_grads} gradient buffers"
                ),
            });
        }
        for (i, state) in self.params.iter().enumerate() {
            let (p, g) = lens(i);
            let want = state.exp_avg.len();
            if p != want || g != want {
                return Err(TrainError::Arg {
                    what: "AdamW::step",
                    msg: format!(
                        "parameter {}: registered with {want} values, got a parameter of {p} and a gradient of {g}",
                        state.name
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The scalars of one step, shared by every element of a parameter group: computed in f64
/// as torch's Python code does, rounded to f32 where torch hands them to an f32 kernel.
struct StepScalars {
    /// `1 − lr·wd`; `None` when wd = 0 (torch skips the multiply).
    decay: Option<f32>,
    /// lerp weight `1 − β1`.
    lerp_weight: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `√(1 − β2ᵗ)`, as Python's `** 0.5`.
    bias_correction2_sqrt: f32,
    eps: f32,
    /// `−lr / (1 − β1ᵗ)`.
    neg_step_size: f32,
}

impl StepScalars {
    fn new(config: &AdamWConfig, lr: f64, weight_decay: f64, step: u64) -> StepScalars {
        // Python: `beta ** step` with step a float (torch keeps it in a tensor).
        let t = step as f64;
        let bias_correction1 = 1.0 - config.beta1.powf(t);
        let bias_correction2 = 1.0 - config.beta2.powf(t);
        StepScalars {
            decay: (weight_decay != 0.0).then_some((1.0 - lr * weight_decay) as f32),
            lerp_weight: (1.0 - config.beta1) as f32,
            beta2: config.beta2 as f32,
            one_minus_beta2: (1.0 - config.beta2) as f32,
            bias_correction2_sqrt: bias_correction2.powf(0.5) as f32,
            eps: config.eps as f32,
            neg_step_size: (-(lr / bias_correction1)) as f32,
        }
    }

    /// One element's update: parameter `p`, gradient `g`, moments `m` and `v`.
    #[inline]
    fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        if let Some(decay) = self.decay {
            *p *= decay;
        }
        *m = lerp(*m, g, self.lerp_weight);
        // torch: exp_avg_sq.mul_(β2).addcmul_(g, g, value=1 − β2); addcmul computes
        // `self + (value·g)·g` with the last step fused.
        *v = (self.one_minus_beta2 * g).mul_add(g, *v * self.beta2);
        let denom = v.sqrt() / self.bias_correction2_sqrt + self.eps;
        // torch: param.addcdiv_(exp_avg, denom, value=−step_size) = p + (value·m) / denom.
        *p += (self.neg_step_size * *m) / denom;
    }
}

/// torch's lerp(start, end, weight): two formulas so that both ends are exact; the small-weight
/// one is a fused multiply-add in its vectorised CPU kernel.
#[inline]
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    let diff = end - start;
    if weight.abs() < 0.5 {
        weight.mul_add(diff, start)
    } else {
        (-diff).mul_add(1.0 - weight, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook AdamW in f64, written from the paper's formulas (no fused operations).
    fn adamw_f64(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], lr: f64, wd: f64, t: u64) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let m_hat = m[i] / (1.0 - b1.powi(t as i32));
            let v_hat = v[i] / (1.0 - b2.powi(t as i32));
            p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }

    #[test]
    fn matches_the_textbook_formulas_in_f64() {
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::with_groups(config, [("w", 4, true), ("b", 2, false)]).unwrap();
        let mut w = [0.3f32, -1.2, 2.0, 0.0];
        let mut b = [0.5f32, -0.25];
        let (mut w64, mut b64): (Vec<f64>, Vec<f64>) = (
            w.iter().map(|&x| x as f64).collect(),
            b.iter().map(|&x| x as f64).collect(),
        );
        let (mut mw, mut vw, mut mb, mut vb) =
            (vec![0.0; 4], vec![0.0; 4], vec![0.0; 2], vec![0.0; 2]);
        for t in 1..=20u64 {
            // Deterministic, sign-changing gradients of different sizes.
            let gw: Vec<f32> = (0..4)
                .map(|i| ((t as f32 * 0.7 + i as f32).sin()) * (1.0 + i as f32))
                .collect();
            let gb: Vec<f32> = (0..2).map(|i| (t as f32 * 1.3 - i as f32).cos()).collect();
            let lr = 0.01 * (t as f64 / 20.0);
            opt.step(lr, &mut [&mut w[..], &mut b[..]], &[&gw[..], &gb[..]])
                .unwrap();
            let g64 = |g: &[f32]| g.iter().map(|&x| x as f64).collect::<Vec<_>>();
            adamw_f64(&mut w64, &mut mw, &mut vw, &g64(&gw), lr, 0.1, t);
            adamw_f64(&mut b64, &mut mb, &mut vb, &g64(&gb), lr, 0.0, t);
        }
        for (ours, reference) in w.iter().zip(&w64).chain(b.iter().zip(&b64)) {
            assert!(
                (*ours as f64 - reference).abs() <= 1e-6 * reference.abs().max(1.0),
                "{ours} vs {reference}"
            );
        }
        // The moments too.
        for (ours, reference) in opt.exp_avg(0).unwrap().iter().zip(&mw) {
            assert!(
                (*ours as f64 - reference).abs() <= 1e-6,
                "{ours} vs {reference}"
            );
        }
        assert_eq!(opt.steps_taken(), 20);
    }

    #[test]
    fn first_step_moves_each_element_by_about_lr() {
        // Adam's first step is lr·sign(g) (m̂ = g, v̂ = g²) whatever the gradient's size.
        let mut opt = AdamW::with_groups(AdamWConfig::default(), [("x", 3, false)]).unwrap();
        let mut x = vec![1.0f32, 1.0, 1.0];
        opt.step(0.5, &mut [&mut x[..]], &[&[1e-3, -20.0, 3.0][..]])
            .unwrap();
        for (got, want) in x.iter().zip([0.5f32, 1.5, 0.5]) {
            assert!((got - want).abs() < 1e-4, "{x:?}");
        }
    }

    #[test]
    fn decay_applies_only_to_the_decay_group_and_before_the_update() {
        let config = AdamWConfig {
            weight_decay: 0.5,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(config, [("lora_A.weight", 1), ("model.norm.weight", 1)]).unwrap();
        let flags: Vec<bool> = opt.params().map(|p| p.decay).collect();
        assert_eq!(flags, [true, false]);
        let (mut a, mut n) = (vec![2.0f32], vec![2.0f32]);
        // Zero gradients: only the decay moves anything (m = v = 0 → update 0).
        opt.step(
            0.1,
            &mut [&mut a[..], &mut n[..]],
            &[&[0.0][..], &[0.0][..]],
        )
        .unwrap();
        assert_eq!(a, [2.0 * (1.0 - 0.1 * 0.5) as f32]);
        assert_eq!(n, [2.0]);
    }

    #[test]
    fn zero_learning_rate_still_counts_the_step_and_updates_moments() {
        // Warmup starts at lr 0: torch still advances step and moments.
        let mut opt = AdamW::with_groups(AdamWConfig::default(), [("x", 2, true)]).unwrap();
        let mut x = vec![1.0f32, -1.0];
        opt.step(0.0, &mut [&mut x[..]], &[&[2.0, 4.0][..]])
            .unwrap();
        assert_eq!(x, [1.0, -1.0]);
        assert_eq!(opt.steps_taken(), 1);
        let m = opt.exp_avg(0).unwrap();
        assert!(
            (m[0] - 0.2).abs() < 1e-7 && (m[1] - 0.4).abs() < 1e-7,
            "{m:?}"
        );
        let v = opt.exp_avg_sq(0).unwrap();
        assert!(
            (v[0] - 0.004).abs() < 1e-9 && (v[1] - 0.016).abs() < 1e-9,
            "{v:?}"
        );
    }

    #[test]
    fn eps_is_added_outside_the_square_root() {
        // g = 1e-8: m̂/(√v̂ + ε) = 1e-8 / 2e-8 = 0.5, where ε inside the root would give ~1e-4.
        let mut opt = AdamW::with_groups(AdamWConfig::default(), [("x", 1, false)]).unwrap();
        let mut x = vec![0.0f32];
        opt.step(1.0, &mut [&mut x[..]], &[&[1e-8][..]]).unwrap();
        assert!((x[0] + 0.5).abs() < 1e-6, "{x:?}");
    }

    #[test]
    fn decay_multiplies_the_parameter_before_the_adam_update() {
        // lr 0.5, wd 1: p = 1·(1 − 0.5) − 0.5·1 = 0 (decay after the update would give 0.25).
        let config = AdamWConfig {
            weight_decay: 1.0,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::with_groups(config, [("x", 1, true)]).unwrap();
        let mut x = vec![1.0f32];
        opt.step(0.5, &mut [&mut x[..]], &[&[1.0][..]]).unwrap();
        assert!(x[0].abs() < 1e-6, "{x:?}");
    }

    #[test]
    fn lerp_is_exact_at_both_ends() {
        assert_eq!(lerp(3.0, 7.0, 0.0), 3.0);
        assert_eq!(lerp(3.0, 7.0, 1.0), 7.0);
        assert_eq!(lerp(3.0, 7.0, 0.25), 4.0);
        assert_eq!(lerp(3.0, 7.0, 0.75), 6.0);
    }

    #[test]
    fn bad_buffers_and_settings_are_errors_naming_the_parameter() {
        let mut opt = AdamW::new(AdamWConfig::default(), [("a", 2), ("b", 3)]).unwrap();
        let (mut a, mut b) = (vec![0.0f32; 2], vec![0.0f32; 2]);
        let err = opt
            .step(
                1e-3,
                &mut [&mut a[..], &mut b[..]],
                &[&[0.0; 2][..], &[0.0; 2][..]],
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("parameter b") && err.contains("3"), "{err}");
        let err = opt
            .step(1e-3, &mut [&mut a[..]], &[&[0.0; 2][..]])
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 parameters registered"), "{err}");
        assert_eq!(opt.steps_taken(), 0, "a refused step changes nothing");
        let err = opt
            .step(
                f64::NAN,
                &mut [&mut a[..], &mut b[..]],
                &[&[0.0; 2][..], &[0.0; 2][..]],
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("learning_rate"), "{err}");
        let err = AdamW::new(AdamWConfig::default(), [("a", 1), ("a", 1)]).unwrap_err();
        assert!(err.to_string().contains("registered twice"), "{err}");
        let bad = AdamWConfig {
            beta2: 1.0,
            ..AdamWConfig::default()
        };
        let err = AdamW::new(bad, [("a", 1)]).unwrap_err();
        assert!(err.to_string().contains("adam_beta2"), "{err}");
    }
}
