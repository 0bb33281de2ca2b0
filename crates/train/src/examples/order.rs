//! Which examples each optimizer step sees: transformers 5.17's `Trainer` step arithmetic,
//! and our own seeded shuffle.
//!
//! transformers (`set_initial_training_values`, `_run_epoch`), for the single-device case:
//! - an epoch is `ceil(rows / batch)` micro-batches (`dataloader_drop_last` is false: the
//!   last one is short);
//! - an epoch has `max(ceil(batches / accum), 1)` optimizer steps: windows of `accum`
//!   micro-batches, the last window holding the remainder;
//! - the run has `max_steps` steps when given, else `ceil(num_train_epochs ×
//!   steps_per_epoch)` computed in f64 (so 0.28 × 25 = 7.000000000000001 → 8 steps), and
//!   training stops at that step even mid-epoch;
//! - after each step `state.epoch = epoch + micro_batches_done / batches` (the logged
//!   `epoch`);
//! - each micro-batch's loss is divided by the number of micro-batches in its window (DPO's
//!   `compute_loss` does not scale for accumulation, so `training_step` does, by
//!   `len(batch_samples)`): [`OptimizerStep::batches`]`.len()`.
//!
//! The order within an epoch: transformers draws a fresh `RandomSampler` permutation each
//! epoch from torch's generator, which we cannot reproduce bit for bit. [`epoch_order`] is
//! our own: a Fisher–Yates shuffle driven by SplitMix64 keyed by (seed, epoch), so any epoch's
//! order is computed directly and a run resumes exactly from its global step (epoch = step /
//! steps_per_epoch, position = the step's first micro-batch) without replaying earlier epochs.

use std::ops::Range;

use crate::error::{Result, TrainError};

/// The step layout of one training run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    rows: usize,
    batch_size: usize,
    grad_accum: usize,
    batches_per_epoch: usize,
    steps_per_epoch: usize,
    total_steps: usize,
}

/// One optimizer step: its epoch, the micro-batches it accumulates (indices of batches within
/// the epoch, see [`StepPlan::batch_examples`]) and the `epoch` value logged after it.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerStep {
    pub epoch: usize,
    pub batches: Range<usize>,
    pub epoch_after: f64,
}

impl StepPlan {
    /// `rows` examples, `batch_size` (per_device_train_batch_size) pairs per micro-batch,
    /// `grad_accum` micro-batches per step; `max_steps` (when `Some`) overrides `epochs`.
    pub fn new(
        rows: usize,
        batch_size: usize,
        grad_accum: usize,
        epochs: f64,
        max_steps: Option<usize>,
    ) -> Result<StepPlan> {
        let arg = |what, msg: String| Err(TrainError::Arg { what, msg });
        if rows == 0 {
            return arg("dataset", "no examples to train on".into());
        }
        if batch_size == 0 {
            return arg("per_device_train_batch_size", "must be at least 1".into());
        }
        if grad_accum == 0 {
            return arg("gradient_accumulation_steps", "must be at least 1".into());
        }
        let batches_per_epoch = rows.div_ceil(batch_size);
        let steps_per_epoch = batches_per_epoch.div_ceil(grad_accum).max(1);
        let total_steps = match max_steps {
            Some(0) => return arg("max_steps", "must be at least 1 (or unset)".into()),
            Some(n) => n,
            None => {
                if !(epochs.is_finite() && epochs > 0.0) {
                    return arg(
                        "num_train_epochs",
                        format!("must be a positive number, got {epochs}"),
                    );
                }
                // transformers: math.ceil(args.num_train_epochs * num_update_steps_per_epoch)
                let steps = (epochs * steps_per_epoch as f64).ceil();
                if steps > u32::MAX as f64 {
                    return arg(
                        "num_train_epochs",
                        format!("{epochs} epochs make {steps} steps, too many"),
                    );
                }
                steps as usize
            }
        };
        Ok(StepPlan {
            rows,
            batch_size,
            grad_accum,
            batches_per_epoch,
            steps_per_epoch,
            total_steps,
        })
    }

    /// Optimizer steps in the whole run (transformers' `max_steps`).
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// transformers' `num_update_steps_per_epoch`.
    pub fn steps_per_epoch(&self) -> usize {
        self.steps_per_epoch
    }

    /// Micro-batches per epoch (transformers' `len(train_dataloader)`).
    pub fn batches_per_epoch(&self) -> usize {
        self.batches_per_epoch
    }

    /// Epochs that hold at least one step (the last may be partial).
    pub fn epochs(&self) -> usize {
        self.total_steps.div_ceil(self.steps_per_epoch)
    }

    /// Optimizer step `step` (0-based); `None` past the end of the run.
    pub fn step(&self, step: usize) -> Option<OptimizerStep> {
        if step >= self.total_steps {
            return None;
        }
        let epoch = step / self.steps_per_epoch;
        let k = step % self.steps_per_epoch;
        let start = k * self.grad_accum;
        let end = (start + self.grad_accum).min(self.batches_per_epoch);
        Some(OptimizerStep {
            epoch,
            batches: start..end,
            // transformers: epoch + (step + 1) / steps_in_epoch, an int over an int in f64
            epoch_after: epoch as f64 + end as f64 / self.batches_per_epoch as f64,
        })
    }

    /// The examples of micro-batch `batch` of an epoch whose order is `order`
    /// ([`epoch_order`]): a slice of at most `batch_size` example indices.
    pub fn batch_examples<'a>(&self, order: &'a [usize], batch: usize) -> &'a [usize] {
        let start = (batch * self.batch_size).min(order.len());
        let end = (start + self.batch_size).min(order.len());
        &order[start..end]
    }

    /// The examples the plan was made for.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// transformers' total optimizer steps for (rows, batch, accumulation, epochs, max_steps).
pub fn total_optimizer_steps(
    rows: usize,
    batch_size: usize,
    grad_accum: usize,
    epochs: f64,
    max_steps: Option<usize>,
) -> Result<usize> {
    StepPlan::new(rows, batch_size, grad_accum, epochs, max_steps).map(|p| p.total_steps())
}

/// The order of `rows` examples in `epoch`: a permutation of 0..rows that depends only on
/// (seed, epoch).
pub fn epoch_order(rows: usize, seed: u64, epoch: usize) -> Vec<usize> {
    // One stream per epoch: the epoch is mixed into the key, not drawn after earlier epochs.
    let mut rng = SplitMix64(mix(seed ^ mix(epoch as u64 ^ 0x6570_6f63_6873_6866)));
    let mut order: Vec<usize> = (0..rows).collect();
    for i in (1..rows).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit counter through a bijective mixer.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in [0, n), unbiased (Lemire's multiply-and-reject).
    fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n; // 2^64 mod n
        loop {
            let m = u128::from(self.next()) * u128::from(n);
            if m as u64 >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' `_run_epoch` loop written out: epochs, windows of micro-batches,
    /// the remainder window, and the stop at max_steps.
    fn simulate(rows: usize, b: usize, ga: usize, total: usize) -> Vec<(usize, Vec<usize>, f64)> {
        let batches: Vec<usize> = (0..rows)
            .collect::<Vec<_>>()
            .chunks(b)
            .map(|c| c.len())
            .collect();
        let steps_in_epoch = batches.len();
        let nupe = steps_in_epoch.div_ceil(ga).max(1);
        let mut out = Vec::new();
        let mut epoch = 0;
        while out.len() < total {
            let mut step: i64 = -1;
            let mut window = Vec::new();
            for &size in &batches {
                step += 1;
                window.push(size);
                let done = (step + 1) as usize;
                let sync = done.is_multiple_of(ga) || done == steps_in_epoch;
                if sync {
                    let e = epoch as f64 + (step + 1) as f64 / steps_in_epoch as f64;
                    out.push((epoch, std::mem::take(&mut window), e));
                    if out.len() == total {
                        break;
                    }
                }
            }
            assert!(out.len() % nupe == 0 || out.len() == total);
            epoch += 1;
        }
        out
    }

    #[test]
    fn plan_matches_the_written_out_loop() {
        for rows in 1..=13 {
            for b in 1..=5 {
                for ga in 1..=5 {
                    for (epochs, max_steps) in
                        [(1.0, None), (2.5, None), (0.3, None), (3.0, Some(7))]
                    {
                        let plan = StepPlan::new(rows, b, ga, epochs, max_steps).unwrap();
                        let sim = simulate(rows, b, ga, plan.total_steps());
                        assert_eq!(sim.len(), plan.total_steps());
                        let order: Vec<usize> = (0..rows).collect();
                        for (s, (epoch, sizes, e)) in sim.iter().enumerate() {
                            let step = plan.step(s).unwrap();
                            assert_eq!(step.epoch, *epoch);
                            let got: Vec<usize> = step
                                .batches
                                .clone()
                                .map(|k| plan.batch_examples(&order, k).len())
                                .collect();
                            assert_eq!(&got, sizes, "rows {rows} b {b} ga {ga} step {s}");
                            assert_eq!(step.epoch_after, *e);
                        }
                        assert!(plan.step(plan.total_steps()).is_none());
                        assert_eq!(plan.epochs(), sim.last().unwrap().0 + 1);
                    }
                }
            }
        }
    }

    #[test]
    fn epoch_steps_use_f64_ceil() {
        // 0.28 × 25 = 7.000000000000001 in f64.
        assert_eq!(total_optimizer_steps(25, 1, 1, 0.28, None).unwrap(), 8);
        assert_eq!(total_optimizer_steps(10, 2, 2, 0.3, None).unwrap(), 1);
        assert_eq!(total_optimizer_steps(10, 3, 2, 3.0, Some(4)).unwrap(), 4);
    }

    #[test]
    fn bad_arguments_are_named() {
        type Case = (usize, usize, usize, f64, Option<usize>);
        let cases: [(Case, &str); 6] = [
            ((0, 1, 1, 1.0, None), "dataset"),
            ((5, 0, 1, 1.0, None), "per_device_train_batch_size"),
            ((5, 1, 0, 1.0, None), "gradient_accumulation_steps"),
            ((5, 1, 1, 0.0, None), "num_train_epochs"),
            ((5, 1, 1, f64::NAN, None), "num_train_epochs"),
            ((5, 1, 1, 1.0, Some(0)), "max_steps"),
        ];
        for ((rows, b, ga, e, m), what) in cases {
            let err = StepPlan::new(rows, b, ga, e, m).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{what}: ")), "{err}");
        }
        // max_steps makes epochs irrelevant, as in transformers.
        assert!(StepPlan::new(5, 1, 1, 0.0, Some(3)).is_ok());
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        for rows in [0, 1, 2, 7, 100] {
            let mut o = epoch_order(rows, 42, 3);
            o.sort_unstable();
            assert_eq!(o, (0..rows).collect::<Vec<_>>());
        }
        assert_eq!(epoch_order(50, 1, 0), epoch_order(50, 1, 0));
        assert_ne!(epoch_order(50, 1, 0), epoch_order(50, 1, 1));
        assert_ne!(epoch_order(50, 1, 0), epoch_order(50, 2, 0));
    }

    #[test]
    fn epoch_order_is_uniform_over_small_permutations() {
        // 3! = 6 orders over 12,000 epochs: each ~2,000; a biased shuffle (e.g. swapping with
        // any index, or modulo bias at this size) lands far outside ±200 (≈ 4.9 σ).
        let mut counts = std::collections::HashMap::new();
        for epoch in 0..12_000 {
            *counts.entry(epoch_order(3, 7, epoch)).or_insert(0usize) += 1;
        }
        assert_eq!(counts.len(), 6);
        for (order, n) in counts {
            assert!((1800..=2200).contains(&n), "{order:?}: {n}");
        }
    }

    #[test]
    fn splitmix_matches_reference_values() {
        // Vigna's splitmix64.c seeded with 0.
        let mut r = SplitMix64(0);
        assert_eq!(r.next(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn below_is_in_range() {
        let mut r = SplitMix64(0);
        for n in [1u64, 2, 3, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(r.below(n) < n);
            }
        }
    }
}
