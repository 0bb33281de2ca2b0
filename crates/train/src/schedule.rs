//! Learning-rate schedules as transformers 5.17's `get_scheduler` builds them.
//!
//! Each schedule is a `LambdaLR`: the learning rate of optimizer step k (0-based) is
//! `base_lr · λ(k)`. The Trainer steps the LambdaLR after every optimizer step, so step 0 uses
//! λ(0) — zero for every warmup schedule — and transformers 5.17 logs `learning_rate` as the
//! rate the step just used (read before `lr_scheduler.step()`). The λ below are transformers'
//! lambdas, computed in f64 in the same order of operations, so they agree to the last bit on
//! the same libm.
//!
//! | name | λ(k) for k < warmup | λ(k) after warmup |
//! |---|---|---|
//! | `linear` | k / max(1, W) | max(0, (N − k) / max(1, N − W)) |
//! | `cosine` | k / max(1, W) | max(0, ½(1 + cos(π · cycles · 2 · p))), p = (k − W) / max(1, N − W) |
//! | `constant` | 1 | 1 |
//! | `constant_with_warmup` | k / max(1, W) | 1 |
//! | `cosine_with_min_lr` | k / max(1, W) | max(0, cosine · (1 − ρ) + ρ), ρ = min_lr / base_lr |
//!
//! W = warmup steps ([`warmup_steps`] turns `warmup_steps`/`warmup_ratio` into a count as
//! `TrainingArguments.get_warmup_steps` does), N = total optimizer steps, cycles = 0.5 unless
//! set. Note that `cosine` climbs again past N (transformers does not clamp it).
//!
//! A schedule has no state beyond the step number, so resuming needs only the step.

use crate::error::{Result, TrainError};

/// The schedule types we support, with their `lr_scheduler_kwargs`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SchedulerKind {
    Linear,
    Cosine { num_cycles: f64 },
    Constant,
    ConstantWithWarmup,
    CosineWithMinLr { num_cycles: f64, min_lr: MinLr },
}

/// `cosine_with_min_lr`'s floor: transformers takes either `min_lr` or `min_lr_rate`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinLr {
    /// An absolute learning rate; the rate is `min_lr / base_lr` (f64, as transformers does).
    Lr(f64),
    /// A fraction of the base learning rate.
    Rate(f64),
}

/// transformers' `lr_scheduler_kwargs` for the types above (each type accepts only its own).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SchedulerKwargs {
    pub num_cycles: Option<f64>,
    pub min_lr: Option<f64>,
    pub min_lr_rate: Option<f64>,
}

/// The names [`SchedulerKind::from_name`] accepts.
pub const SCHEDULER_NAMES: [&str; 5] = [
    "linear",
    "cosine",
    "constant",
    "constant_with_warmup",
    "cosine_with_min_lr",
];

impl SchedulerKind {
    /// transformers' `lr_scheduler_type` name and `lr_scheduler_kwargs`: an unknown name, a
    /// keyword the type does not take, or `cosine_with_min_lr` without exactly one of
    /// `min_lr` / `min_lr_rate` is an error (transformers raises for each).
    pub fn from_name(name: &str, kwargs: &SchedulerKwargs) -> Result<SchedulerKind> {
        let refuse = |key: &str| {
            Err(TrainError::Arg {
                what: "lr_scheduler_kwargs",
                msg: format!("{key} does not apply to the {name} schedule"),
            })
        };
        let cycles = kwargs.num_cycles.unwrap_or(0.5);
        if !cycles.is_finite() {
            return Err(TrainError::Arg {
                what: "lr_scheduler_kwargs",
                msg: format!("num_cycles must be finite, got {cycles}"),
            });
        }
        let takes_cycles = matches!(name, "cosine" | "cosine_with_min_lr");
        let takes_min = name == "cosine_with_min_lr";
        if kwargs.num_cycles.is_some() && !takes_cycles {
            return refuse("num_cycles");
        }
        if !takes_min {
            if kwargs.min_lr.is_some() {
                return refuse("min_lr");
            }
            if kwargs.min_lr_rate.is_some() {
                return refuse("min_lr_rate");
            }
        }
        Ok(match name {
            "linear" => SchedulerKind::Linear,
            "cosine" => SchedulerKind::Cosine { num_cycles: cycles },
            "constant" => SchedulerKind::Constant,
            "constant_with_warmup" => SchedulerKind::ConstantWithWarmup,
            "cosine_with_min_lr" => {
                let min_lr = match (kwargs.min_lr, kwargs.min_lr_rate) {
                    (Some(lr), None) => MinLr::Lr(lr),
                    (None, Some(rate)) => MinLr::Rate(rate),
                    _ => {
                        return Err(TrainError::Arg {
                            what: "lr_scheduler_kwargs",
                            msg: "cosine_with_min_lr needs exactly one of min_lr and min_lr_rate"
                                .into(),
                        });
                    }
                };
                SchedulerKind::CosineWithMinLr {
                    num_cycles: cycles,
                    min_lr,
                }
            }
            other => {
                return Err(TrainError::Arg {
                    what: "lr_scheduler_type",
                    msg: format!(
                        "unknown schedule {other:?}; expected one of {}",
                        SCHEDULER_NAMES.join(", ")
                    ),
                });
            }
        })
    }
}

/// A learning-rate schedule over a run of `total_steps` optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: SchedulerKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn new(
        kind: SchedulerKind,
        base_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
    ) -> Result<Schedule> {
        if !(base_lr >= 0.0 && base_lr.is_finite()) {
            return Err(TrainError::Arg {
                what: "learning_rate",
                msg: format!("must be finite and >= 0, got {base_lr}"),
            });
        }
        let absolute_floor = matches!(
            kind,
            SchedulerKind::CosineWithMinLr {
                min_lr: MinLr::Lr(_),
                ..
            }
        );
        if absolute_floor && base_lr == 0.0 {
            return Err(TrainError::Arg {
                what: "lr_scheduler_kwargs",
                msg: "min_lr needs a non-zero learning_rate (its rate is min_lr / learning_rate)"
                    .into(),
            });
        }
        Ok(Schedule {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
        })
    }

    /// The learning rate optimizer step `step` (0-based) uses: `base_lr · λ(step)`.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    /// λ(step), transformers' lambda.
    pub fn factor(&self, step: u64) -> f64 {
        let (k, w, n) = (
            step as i64,
            self.warmup_steps as i64,
            self.total_steps as i64,
        );
        let warmup = || k as f64 / (w.max(1)) as f64;
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::ConstantWithWarmup => {
                // transformers: float(k) / float(max(1.0, W)) — the same value.
                if k < w { warmup() } else { 1.0 }
            }
            SchedulerKind::Linear => {
                if k < w {
                    warmup()
                } else {
                    0f64.max((n - k) as f64 / (n - w).max(1) as f64)
                }
            }
            SchedulerKind::Cosine { num_cycles } => {
                if k < w {
                    warmup()
                } else {
                    cosine_after_warmup(k, w, n, num_cycles, 0.0)
                }
            }
            SchedulerKind::CosineWithMinLr { num_cycles, min_lr } => {
                if k < w {
                    warmup()
                } else {
                    let rate = match min_lr {
                        MinLr::Rate(rate) => rate,
                        MinLr::Lr(lr) => lr / self.base_lr,
                    };
                    cosine_after_warmup(k, w, n, num_cycles, rate)
                }
            }
        }
    }
}

/// transformers' `_get_cosine_schedule_with_warmup_lr_lambda` past warmup (the definition
/// with `min_lr_rate`, which `cosine` also uses with rate 0).
fn cosine_after_warmup(k: i64, w: i64, n: i64, num_cycles: f64, min_lr_rate: f64) -> f64 {
    let progress = (k - w) as f64 / (n - w).max(1) as f64;
    let factor = 0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos());
    let factor = factor * (1.0 - min_lr_rate) + min_lr_rate;
    // Python's max(0, factor) returns the int 0 when factor <= 0: the lr is 0 either way.
    if factor > 0.0 { factor } else { 0.0 }
}

/// transformers 5.17's `TrainingArguments.get_warmup_steps`: `warmup_steps` ≥ 1 is a count
/// (truncated to an integer, as Python's `int()`), a value in [0, 1) a ratio of
/// `total_steps`, rounded up (`ceil(total · ratio)` in f64).
pub fn warmup_steps(warmup_steps: f64, total_steps: u64) -> Result<u64> {
    if !(warmup_steps >= 0.0 && warmup_steps.is_finite()) {
        return Err(TrainError::Arg {
            what: "warmup_steps",
            msg: format!("must be a count >= 1 or a ratio in [0, 1), got {warmup_steps}"),
        });
    }
    Ok(if warmup_steps >= 1.0 {
        warmup_steps.trunc() as u64
    } else {
        (total_steps as f64 * warmup_steps).ceil() as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: SchedulerKind, w: u64, n: u64) -> Schedule {
        Schedule::new(kind, 1.0, w, n).unwrap()
    }

    #[test]
    fn linear_warms_up_from_zero_then_decays_to_zero() {
        let s = schedule(SchedulerKind::Linear, 4, 12);
        let got: Vec<f64> = (0..14).map(|k| s.factor(k)).collect();
        let want = [
            0.0, 0.25, 0.5, 0.75, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn cosine_reaches_zero_at_the_end_and_min_lr_lifts_the_floor() {
        let s = schedule(SchedulerKind::Cosine { num_cycles: 0.5 }, 2, 10);
        assert_eq!(s.factor(2), 1.0);
        assert!((s.factor(6) - 0.5).abs() < 1e-15);
        assert!(s.factor(10) < 1e-15);
        let m = schedule(
            SchedulerKind::CosineWithMinLr {
                num_cycles: 0.5,
                min_lr: MinLr::Rate(0.1),
            },
            2,
            10,
        );
        assert!((m.factor(10) - 0.1).abs() < 1e-15);
        assert!((m.factor(6) - 0.55).abs() < 1e-15);
    }

    #[test]
    fn constant_schedules() {
        let c = schedule(SchedulerKind::Constant, 5, 10);
        assert_eq!(c.factor(0), 1.0);
        let w = schedule(SchedulerKind::ConstantWithWarmup, 4, 10);
        assert_eq!(
            (0..6).map(|k| w.factor(k)).collect::<Vec<_>>(),
            [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
        );
    }

    #[test]
    fn warmup_counts_and_ratios() {
        assert_eq!(warmup_steps(100.0, 1000).unwrap(), 100);
        assert_eq!(warmup_steps(5.9, 1000).unwrap(), 5);
        assert_eq!(warmup_steps(0.1, 1000).unwrap(), 100);
        assert_eq!(warmup_steps(0.0, 1000).unwrap(), 0);
        assert_eq!(warmup_steps(0.15, 7).unwrap(), 2);
        assert!(warmup_steps(-1.0, 10).is_err());
    }

    #[test]
    fn names_and_kwargs_are_checked_as_transformers_does() {
        let none = SchedulerKwargs::default();
        assert_eq!(
            SchedulerKind::from_name("linear", &none).unwrap(),
            SchedulerKind::Linear
        );
        assert_eq!(
            SchedulerKind::from_name("cosine", &none).unwrap(),
            SchedulerKind::Cosine { num_cycles: 0.5 }
        );
        let err = SchedulerKind::from_name("polynomial", &none)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lr_scheduler_type") && err.contains("cosine_with_min_lr"),
            "{err}"
        );
        let err = SchedulerKind::from_name("cosine_with_min_lr", &none)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one of min_lr"), "{err}");
        let cycles = SchedulerKwargs {
            num_cycles: Some(1.0),
            ..none
        };
        assert!(SchedulerKind::from_name("linear", &cycles).is_err());
        let both = SchedulerKwargs {
            min_lr: Some(1e-6),
            min_lr_rate: Some(0.1),
            ..none
        };
        assert!(SchedulerKind::from_name("cosine_with_min_lr", &both).is_err());
        let min_lr = SchedulerKwargs {
            min_lr: Some(1e-6),
            ..none
        };
        let kind = SchedulerKind::from_name("cosine_with_min_lr", &min_lr).unwrap();
        assert!(Schedule::new(kind, 0.0, 0, 10).is_err());
        assert!(Schedule::new(kind, 1e-5, 0, 10).is_ok());
    }
}
