//! One batch through the configured losses: TRL's total loss, its gradient with respect to
//! every completion token's log-prob (one value per sequence, two with `ld_alpha`), and the
//! batch's metrics.
//!
//! TRL's total is Σ_types weight · mean_i(ℓ_i · w_i) where w_i is the detached WPO weight
//! (1 without `use_weighting`); `sft` is −(Σ chosen log-probs) / (Σ chosen tokens).

use super::batch::{PairBatch, SeqStats};
use super::divergence::Divergence;
use super::metrics::BatchMetrics;
use super::options::{DpoLossConfig, LossType};
use super::terms::{self, PairView, Params};
use crate::error::{Result, TrainError};

/// The configured DPO loss (a validated [`DpoLossConfig`]).
#[derive(Clone, Debug)]
pub struct DpoLoss {
    terms: Vec<(LossType, f64)>,
    params: Params,
    divergence: Divergence,
    use_weighting: bool,
    ld_alpha: Option<f64>,
}

/// d loss / d log π(label) for each completion token: pair i's chosen sequence's tokens get
/// `chosen[i]` within the pair's shared length ([`PairBatch::shared_len`]) and
/// `chosen_tail[i]` past it; the same for rejected. Without `ld_alpha` the tail values equal
/// the others, so every token of a sequence gets the same gradient.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenGrads {
    pub chosen: Vec<f64>,        // [N]
    pub rejected: Vec<f64>,      // [N]
    pub chosen_tail: Vec<f64>,   // [N]
    pub rejected_tail: Vec<f64>, // [N]
}

impl TokenGrads {
    /// The gradient of completion token `k` (0-based) of pair `pair`'s chosen (or rejected)
    /// sequence. Panics if `pair` is not below N.
    pub fn token(&self, batch: &PairBatch, pair: usize, chosen: bool, k: u64) -> f64 {
        let tail = k >= batch.shared_len(pair);
        match (chosen, tail) {
            (true, false) => self.chosen[pair],
            (true, true) => self.chosen_tail[pair],
            (false, false) => self.rejected[pair],
            (false, true) => self.rejected_tail[pair],
        }
    }
}

/// What [`DpoLoss::compute`] returns for one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct LossOutput {
    /// TRL's loss for the batch (before any division by gradient-accumulation steps).
    pub loss: f64,
    pub grad: TokenGrads,
    pub metrics: BatchMetrics,
}

impl DpoLoss {
    /// Checks `config` as TRL does (see [`DpoLossConfig`]).
    pub fn new(config: &DpoLossConfig) -> Result<DpoLoss> {
        let terms = config.validate()?;
        Ok(DpoLoss {
            terms,
            params: Params {
                beta: config.beta,
                label_smoothing: config.label_smoothing,
                discopop_tau: config.discopop_tau,
            },
            divergence: Divergence {
                kind: config.f_divergence_type,
                alpha: config.f_alpha_divergence_coef,
            },
            use_weighting: config.use_weighting,
            ld_alpha: config.ld_alpha,
        })
    }

    pub fn beta(&self) -> f64 {
        self.params.beta
    }

    /// Loss, token gradients and metrics of one batch.
    pub fn compute(&self, batch: &PairBatch) -> Result<LossOutput> {
        batch.check(self.ld_alpha.is_some(), self.use_weighting)?;
        let n = batch.len();
        let nf = n as f64;

        // The sums the losses see: LD-DPO keeps the shared part and scales the tail.
        let weighted = |s: &SeqStats| match self.ld_alpha {
            None => s.logps,
            Some(a) => {
                let tail = s.tail_logps.unwrap_or(0.0);
                (s.logps - tail) + a * tail
            }
        };
        let x_c: Vec<f64> = batch.chosen.iter().map(weighted).collect(); // [N]
        let x_r: Vec<f64> = batch.rejected.iter().map(weighted).collect(); // [N]
        let ref_c: Vec<f64> = batch.chosen.iter().map(|s| s.ref_logps).collect(); // [N]
        let ref_r: Vec<f64> = batch.rejected.iter().map(|s| s.ref_logps).collect(); // [N]
        let lr_c: Vec<f64> = x_c.iter().zip(&ref_c).map(|(x, r)| x - r).collect(); // [N]
        let lr_r: Vec<f64> = x_r.iter().zip(&ref_r).map(|(x, r)| x - r).collect(); // [N]

        let views: Vec<PairView> = (0..n)
            .map(|i| {
                let (s_c, ds_c) = self.divergence.score(lr_c[i]);
                let (s_r, ds_r) = self.divergence.score(lr_r[i]);
                PairView {
                    lr_c: lr_c[i],
                    lr_r: lr_r[i],
                    s_c,
                    s_r,
                    ds_c,
                    ds_r,
                    n_c: norm_tokens(&batch.chosen[i]),
                    n_r: norm_tokens(&batch.rejected[i]),
                }
            })
            .collect();
        let wpo: Vec<f64> = (0..n) // [N]
            .map(|i| {
                if self.use_weighting {
                    wpo_weight(&batch.chosen[i]) * wpo_weight(&batch.rejected[i])
                } else {
                    1.0
                }
            })
            .collect();

        let mut loss = 0.0;
        let mut d_c = vec![0.0; n]; // [N] d loss / d x_c
        let mut d_r = vec![0.0; n]; // [N] d loss / d x_r
        // d loss / d each chosen token's raw log-prob, from `sft` (not LD-weighted).
        let mut d_sft = 0.0;
        for &(t, weight) in &self.terms {
            match t {
                LossType::Sft => {
                    let tokens: u64 = batch.chosen.iter().map(|s| s.tokens).sum();
                    if tokens == 0 {
                        return Err(TrainError::Arg {
                            what: "batch",
                            msg: "the 'sft' loss averages over chosen completion tokens, and no \
                                  chosen sequence has any"
                                .to_string(),
                        });
                    }
                    let sum: f64 = batch.chosen.iter().map(|s| s.logps).sum();
                    loss += (-sum / tokens as f64) * weight;
                    d_sft += -weight / tokens as f64;
                }
                LossType::Aot | LossType::AotUnpaired => {
                    let term = if t == LossType::Aot {
                        terms::aot(&x_c, &x_r, &ref_c, &ref_r, &self.params)
                    } else {
                        terms::aot_unpaired(&lr_c, &lr_r, &self.params)
                    };
                    // `use_weighting` is refused with these (TRL: weights would misalign).
                    loss += term.mean * weight;
                    for i in 0..n {
                        d_c[i] += weight * term.d_c[i];
                        d_r[i] += weight * term.d_r[i];
                    }
                }
                _ => {
                    let mut sum = 0.0;
                    for (i, v) in views.iter().enumerate() {
                        let Some(term) = terms::pair_term(t, v, &self.params) else {
                            continue;
                        };
                        sum += term.loss * wpo[i];
                        d_c[i] += weight * wpo[i] * term.d_c / nf;
                        d_r[i] += weight * wpo[i] * term.d_r / nf;
                    }
                    loss += (sum / nf) * weight;
                }
            }
        }

        let tail_scale = self.ld_alpha.unwrap_or(1.0);
        let grad = TokenGrads {
            chosen: d_c.iter().map(|g| g + d_sft).collect(),
            rejected: d_r.clone(),
            chosen_tail: d_c.iter().map(|g| tail_scale * g + d_sft).collect(),
            rejected_tail: d_r.iter().map(|g| tail_scale * g).collect(),
        };
        let metrics = BatchMetrics::of(batch, &x_c, &x_r, &lr_c, &lr_r, self.params.beta);
        Ok(LossOutput {
            loss,
            grad,
            metrics,
        })
    }
}

/// The token count `ipo` and `sigmoid_norm` divide a score by: TRL's unshifted completion
/// mask, clamped to at least 1.
fn norm_tokens(s: &SeqStats) -> f64 {
    s.mask_tokens.unwrap_or(s.tokens).max(1) as f64
}

/// WPO's per-sequence weight, exp of the mean over completion tokens of
/// log π(label) − log Σ_v π(v)² (raw log-probs, not LD-weighted); a constant for autograd.
fn wpo_weight(s: &SeqStats) -> f64 {
    let lssp = s.log_sum_sq_probs.unwrap_or(0.0);
    ((s.logps - lssp) / s.tokens.max(1) as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::super::SeqStats;
    use super::super::options::FDivergence;
    use super::*;

    /// A deterministic, tie-free batch: 4 pairs of varied lengths and log-probs.
    fn batch() -> PairBatch {
        let seq = |i: usize, chosen: bool| {
            let f = i as f64 + if chosen { 0.0 } else { 0.37 };
            let tokens = 3 + (i as u64 * 5 + u64::from(chosen) * 2) % 9;
            let logps = -(1.3 * f + 2.1) - 0.2 * (f * 1.7).sin();
            SeqStats {
                logps,
                ref_logps: logps + 0.9 * (f * 2.3 + 0.4).cos(),
                tokens,
                // One completion starts at position 0 (see SeqStats::mask_tokens).
                mask_tokens: (i == 2).then_some(tokens + 1),
                tail_logps: Some(-0.4 * (1.0 + f)),
                log_sum_sq_probs: Some(-0.8 * tokens as f64 - 0.1 * f),
                mean_logits: 0.3 * f,
                entropy: 1.5 * tokens as f64,
                top1: tokens / 2,
                attention_tokens: tokens + 4,
            }
        };
        PairBatch {
            chosen: (0..4).map(|i| seq(i, true)).collect(),
            rejected: (0..4).map(|i| seq(i, false)).collect(),
        }
    }

    /// The loss of `types` (with [`config`]'s settings) on `b`.
    fn loss_of(types: &[LossType], b: &PairBatch) -> Result<LossOutput> {
        DpoLoss::new(&config(types)).unwrap().compute(b)
    }

    fn config(types: &[LossType]) -> DpoLossConfig {
        DpoLossConfig {
            loss_type: types.to_vec(),
            beta: 0.4,
            label_smoothing: if types.contains(&LossType::ExoPair) {
                0.05
            } else {
                0.1
            },
            ..DpoLossConfig::default()
        }
    }

    /// Central differences of the total loss against the token gradients. A shared token's
    /// log-prob moves `logps`; a tail token's moves `logps` and `tail_logps` together.
    fn check_gradients(cfg: &DpoLossConfig, b: &PairBatch) {
        let loss = DpoLoss::new(cfg).unwrap();
        let out = loss.compute(b).unwrap();
        let h = 1e-6;
        let total = |b: &PairBatch| loss.compute(b).unwrap().loss;
        for i in 0..b.len() {
            for chosen in [true, false] {
                for tail in [false, true] {
                    let bump = |d: f64| {
                        let mut b = b.clone();
                        let s = if chosen {
                            &mut b.chosen[i]
                        } else {
                            &mut b.rejected[i]
                        };
                        s.logps += d;
                        // WPO's weight is a constant to autograd: hold it still.
                        s.log_sum_sq_probs = s.log_sum_sq_probs.map(|v| v + d);
                        if tail {
                            s.tail_logps = s.tail_logps.map(|t| t + d);
                        }
                        b
                    };
                    let fd = (total(&bump(h)) - total(&bump(-h))) / (2.0 * h);
                    let g = match (chosen, tail) {
                        (true, false) => out.grad.chosen[i],
                        (true, true) => out.grad.chosen_tail[i],
                        (false, false) => out.grad.rejected[i],
                        (false, true) => out.grad.rejected_tail[i],
                    };
                    assert!(
                        (fd - g).abs() < 1e-6 * (1.0 + g.abs()),
                        "{:?} pair {i} chosen={chosen} tail={tail}: analytic {g}, numeric {fd}",
                        cfg.loss_type
                    );
                }
            }
        }
    }

    #[test]
    fn every_type_matches_finite_differences() {
        let b = batch();
        for t in LossType::ALL {
            check_gradients(&config(&[t]), &b);
        }
    }

    #[test]
    fn every_divergence_matches_finite_differences() {
        let b = batch();
        for t in LossType::ALL
            .into_iter()
            .filter(|t| t.allows_f_divergence())
        {
            for (div, alpha) in [
                (FDivergence::ForwardKl, 0.5),
                (FDivergence::JsDivergence, 0.5),
                (FDivergence::AlphaDivergence, 0.5),
                (FDivergence::AlphaDivergence, 1.7),
            ] {
                let cfg = DpoLossConfig {
                    f_divergence_type: div,
                    f_alpha_divergence_coef: alpha,
                    ..config(&[t])
                };
                check_gradients(&cfg, &b);
            }
        }
    }

    #[test]
    fn weighting_ld_and_combinations_match_finite_differences() {
        let b = batch();
        let all_but_hinge_sft: Vec<LossType> = LossType::ALL
            .into_iter()
            .filter(|t| {
                !matches!(
                    t,
                    LossType::Hinge | LossType::Sft | LossType::Aot | LossType::AotUnpaired
                )
            })
            .collect();
        for &t in &all_but_hinge_sft {
            let cfg = DpoLossConfig {
                use_weighting: true,
                ..config(&[t])
            };
            check_gradients(&cfg, &b);
        }
        for a in [0.0, 0.3, 1.0] {
            for t in LossType::ALL {
                let cfg = DpoLossConfig {
                    ld_alpha: Some(a),
                    ..config(&[t])
                };
                check_gradients(&cfg, &b);
            }
        }
        let cfg = DpoLossConfig {
            loss_weights: Some((0..15).map(|i| 0.1 + 0.05 * i as f64).collect()),
            ld_alpha: Some(0.6),
            ..config(&LossType::ALL)
        };
        check_gradients(&cfg, &b);
    }

    #[test]
    fn weights_scale_and_types_add() {
        let b = batch();
        let one = |t: LossType| loss_of(&[t], &b).unwrap();
        let (a, s) = (one(LossType::Sigmoid), one(LossType::Sft));
        let both = DpoLoss::new(&DpoLossConfig {
            loss_weights: Some(vec![0.8, 0.25]),
            ..config(&[LossType::Sigmoid, LossType::Sft])
        })
        .unwrap()
        .compute(&b)
        .unwrap();
        assert!((both.loss - (0.8 * a.loss + 0.25 * s.loss)).abs() < 1e-15);
        for i in 0..4 {
            let want = 0.8 * a.grad.chosen[i] + 0.25 * s.grad.chosen[i];
            assert!((both.grad.chosen[i] - want).abs() < 1e-15);
        }
    }

    #[test]
    fn sft_is_the_chosen_token_mean_and_spreads_evenly() {
        let b = batch();
        let out = loss_of(&[LossType::Sft], &b).unwrap();
        let tokens: u64 = b.chosen.iter().map(|s| s.tokens).sum();
        let sum: f64 = b.chosen.iter().map(|s| s.logps).sum();
        assert!((out.loss + sum / tokens as f64).abs() < 1e-15);
        for i in 0..4 {
            assert_eq!(out.grad.chosen[i], -1.0 / tokens as f64);
            assert_eq!(out.grad.chosen_tail[i], out.grad.chosen[i]);
            assert_eq!(out.grad.rejected[i], 0.0);
        }
        let mut empty = b.clone();
        for s in &mut empty.chosen {
            s.tokens = 0;
            s.top1 = 0;
        }
        let e = loss_of(&[LossType::Sft], &empty);
        assert!(
            matches!(e, Err(TrainError::Arg { what: "batch", .. })),
            "{e:?}"
        );
    }

    #[test]
    fn without_ld_every_token_of_a_sequence_gets_one_gradient() {
        let b = batch();
        let out = loss_of(&[LossType::Sigmoid], &b).unwrap();
        assert_eq!(out.grad.chosen, out.grad.chosen_tail);
        assert_eq!(out.grad.rejected, out.grad.rejected_tail);
        let k_last = b.chosen[1].tokens - 1;
        assert_eq!(out.grad.token(&b, 1, true, k_last), out.grad.chosen[1]);
    }

    #[test]
    fn ld_alpha_one_is_plain_dpo() {
        let b = batch();
        let plain = loss_of(&[LossType::Sigmoid], &b).unwrap();
        let ld = DpoLoss::new(&DpoLossConfig {
            ld_alpha: Some(1.0),
            ..config(&[LossType::Sigmoid])
        })
        .unwrap()
        .compute(&b)
        .unwrap();
        assert!((plain.loss - ld.loss).abs() < 1e-14);
    }

    #[test]
    fn missing_inputs_for_ld_and_wpo_are_errors() {
        let mut b = batch();
        b.rejected[2].tail_logps = None;
        b.chosen[1].log_sum_sq_probs = None;
        let ld = DpoLoss::new(&DpoLossConfig {
            ld_alpha: Some(0.5),
            ..config(&[LossType::Sigmoid])
        })
        .unwrap();
        let e = ld.compute(&b).unwrap_err().to_string();
        assert!(e.contains("rejected[2].tail_logps is missing"), "{e}");
        let wpo = DpoLoss::new(&DpoLossConfig {
            use_weighting: true,
            ..config(&[LossType::Sigmoid])
        })
        .unwrap();
        let e = wpo.compute(&b).unwrap_err().to_string();
        assert!(e.contains("chosen[1].log_sum_sq_probs is missing"), "{e}");
        // Neither is needed without its option.
        loss_of(&[LossType::Sigmoid], &b).unwrap();
    }
}
