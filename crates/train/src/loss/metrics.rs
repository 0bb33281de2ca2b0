//! The metrics TRL 1.16's DPO trainer logs, per batch and per logging window.
//!
//! Per batch ([`BatchMetrics`], what `_compute_loss` appends to `_metrics`):
//! - `entropy`: token-weighted mean entropy over chosen and rejected completion tokens;
//! - `logits/chosen`, `logits/rejected`: token-weighted means of each position's mean logit;
//! - `mean_token_accuracy`: the share of chosen completion tokens whose label is the argmax;
//! - `rewards/chosen`, `rewards/rejected`: means of β·(log π − log π_ref);
//!   `rewards/accuracies`: the share of pairs whose chosen reward is strictly larger;
//!   `rewards/margins`: the mean chosen − rejected reward;
//! - `logps/chosen`, `logps/rejected`: means of the summed (LD-weighted) log-probs.
//!
//! A count of zero tokens gives 0.0, as in TRL. Per window ([`MetricsLog`], TRL's `log`):
//! each metric is the plain mean of its per-batch values since the last log (every
//! micro-batch counts once, whatever its size); `num_tokens` is the running total of
//! attention-mask tokens of all training batches so far, reported in both modes; eval
//! names get the `eval_` prefix.

use super::batch::PairBatch;

/// The metrics of one batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchMetrics {
    pub entropy: f64,
    pub logits_chosen: f64,
    pub logits_rejected: f64,
    pub mean_token_accuracy: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    /// Attention-mask tokens of the batch (prompts and completions, both sides): what a
    /// training batch adds to `num_tokens`.
    pub attention_tokens: u64,
}

/// TRL's names of the per-batch averages, in the order it first records them (`num_tokens`
/// comes second, see [`MetricsLog::take`]).
const AVERAGED: [&str; 10] = [
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

impl BatchMetrics {
    /// From the batch and the quantities the loss computed: `x_*` the (LD-weighted) policy
    /// sums and `lr_*` the log-ratios, [N] each.
    pub(crate) fn of(
        batch: &PairBatch,
        x_c: &[f64],
        x_r: &[f64],
        lr_c: &[f64],
        lr_r: &[f64],
        beta: f64,
    ) -> BatchMetrics {
        let seqs = || batch.chosen.iter().chain(&batch.rejected);
        let ratio = |num: f64, den: u64| if den > 0 { num / den as f64 } else { 0.0 };
        let mean = |v: &mut dyn Iterator<Item = f64>| {
            let (sum, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
            sum / n as f64
        };
        let chosen_tokens: u64 = batch.chosen.iter().map(|s| s.tokens).sum();
        let rejected_tokens: u64 = batch.rejected.iter().map(|s| s.tokens).sum();
        let rewards_c: Vec<f64> = lr_c.iter().map(|lr| beta * lr).collect();
        let rewards_r: Vec<f64> = lr_r.iter().map(|lr| beta * lr).collect();
        let wins = rewards_c
            .iter()
            .zip(&rewards_r)
            .filter(|(c, r)| c > r)
            .count();
        BatchMetrics {
            entropy: ratio(
                seqs().map(|s| s.entropy).sum(),
                chosen_tokens + rejected_tokens,
            ),
            logits_chosen: ratio(
                batch.chosen.iter().map(|s| s.mean_logits).sum(),
                chosen_tokens,
            ),
            logits_rejected: ratio(
                batch.rejected.iter().map(|s| s.mean_logits).sum(),
                rejected_tokens,
            ),
            mean_token_accuracy: ratio(
                batch.chosen.iter().map(|s| s.top1).sum::<u64>() as f64,
                chosen_tokens,
            ),
            rewards_chosen: mean(&mut rewards_c.iter().copied()),
            rewards_rejected: mean(&mut rewards_r.iter().copied()),
            // TRL turns the comparisons into float32 before averaging (`.float()`), so its
            // logged share is the float32 quotient.
            rewards_accuracies: f64::from(wins as f32 / rewards_c.len() as f32),
            rewards_margins: mean(&mut rewards_c.iter().zip(&rewards_r).map(|(c, r)| c - r)),
            logps_chosen: mean(&mut x_c.iter().copied()),
            logps_rejected: mean(&mut x_r.iter().copied()),
            attention_tokens: seqs().map(|s| s.attention_tokens).sum(),
        }
    }

    /// The ten averaged values, in [`AVERAGED`]'s order.
    fn values(&self) -> [f64; 10] {
        [
            self.entropy,
            self.logits_chosen,
            self.logits_rejected,
            self.mean_token_accuracy,
            self.rewards_chosen,
            self.rewards_rejected,
            self.rewards_accuracies,
            self.rewards_margins,
            self.logps_chosen,
            self.logps_rejected,
        ]
    }
}

/// Training or evaluation: each keeps its own window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// Sums of the batches recorded since the window was last taken.
#[derive(Clone, Debug, Default)]
struct Window {
    sums: [f64; 10],
    batches: usize,
}

/// TRL's `_metrics` and `log`: collects batch metrics per mode and yields their averages.
#[derive(Clone, Debug, Default)]
pub struct MetricsLog {
    train: Window,
    eval: Window,
    total_train_tokens: u64,
}

impl MetricsLog {
    pub fn new() -> MetricsLog {
        MetricsLog::default()
    }

    /// Records one batch (every micro-batch, as TRL calls its loss once per micro-batch). A
    /// training batch adds its attention tokens to `num_tokens`.
    pub fn record(&mut self, mode: Mode, m: &BatchMetrics) {
        let w = match mode {
            Mode::Train => {
                self.total_train_tokens += m.attention_tokens;
                &mut self.train
            }
            Mode::Eval => &mut self.eval,
        };
        for (s, v) in w.sums.iter_mut().zip(m.values()) {
            *s += v;
        }
        w.batches += 1;
    }

    /// The window's averages under TRL's names (`eval_`-prefixed for [`Mode::Eval`]), and
    /// a fresh window. Empty when nothing was recorded since the last take.
    pub fn take(&mut self, mode: Mode) -> Logged {
        let (w, prefix) = match mode {
            Mode::Train => (std::mem::take(&mut self.train), ""),
            Mode::Eval => (std::mem::take(&mut self.eval), "eval_"),
        };
        if w.batches == 0 {
            return Logged(Vec::new());
        }
        let n = w.batches as f64;
        let mut out: Vec<(String, f64)> = AVERAGED
            .iter()
            .zip(w.sums)
            .map(|(name, sum)| (format!("{prefix}{name}"), sum / n))
            .collect();
        out.insert(
            1,
            (
                format!("{prefix}num_tokens"),
                self.total_train_tokens as f64,
            ),
        );
        Logged(out)
    }

    /// Attention-mask tokens of all training batches recorded so far.
    pub fn total_train_tokens(&self) -> u64 {
        self.total_train_tokens
    }

    /// Restores the running total (resuming from a checkpoint). TRL itself restarts it at 0.
    pub fn set_total_train_tokens(&mut self, n: u64) {
        self.total_train_tokens = n;
    }
}

/// Logged metrics: names and values in TRL's order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Logged(Vec<(String, f64)>);

impl Logged {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(n, v)| (n.as_str(), *v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<(String, f64)> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::super::SeqStats;
    use super::*;

    fn seq(tokens: u64, entropy: f64, mean_logits: f64, top1: u64, attention: u64) -> SeqStats {
        SeqStats {
            tokens,
            entropy,
            mean_logits,
            top1,
            attention_tokens: attention,
            ..SeqStats::default()
        }
    }

    #[test]
    fn batch_metrics_weight_by_tokens_and_average_over_pairs() {
        let b = PairBatch {
            chosen: vec![seq(2, 3.0, 1.0, 1, 5), seq(6, 6.0, -2.0, 3, 9)],
            rejected: vec![seq(4, 1.0, 0.5, 4, 7), seq(0, 0.0, 0.0, 0, 3)],
        };
        let m = BatchMetrics::of(
            &b,
            &[-3.0, -5.0],
            &[-4.0, -1.0],
            &[0.5, -1.0],
            &[0.25, 2.0],
            0.1,
        );
        assert_eq!(m.entropy, 10.0 / 12.0);
        assert_eq!(m.logits_chosen, -1.0 / 8.0);
        assert_eq!(m.logits_rejected, 0.5 / 4.0);
        assert_eq!(m.mean_token_accuracy, 4.0 / 8.0);
        assert!((m.rewards_chosen - 0.1 * (0.5 - 1.0) / 2.0).abs() < 1e-16);
        assert!((m.rewards_rejected - 0.1 * 2.25 / 2.0).abs() < 1e-16);
        assert_eq!(m.rewards_accuracies, 0.5);
        assert!((m.rewards_margins - (m.rewards_chosen - m.rewards_rejected)).abs() < 1e-16);
        assert_eq!((m.logps_chosen, m.logps_rejected), (-4.0, -2.5));
        assert_eq!(m.attention_tokens, 24);
    }

    #[test]
    fn no_tokens_give_zero_not_nan() {
        let b = PairBatch {
            chosen: vec![seq(0, 0.0, 0.0, 0, 1)],
            rejected: vec![seq(0, 0.0, 0.0, 0, 1)],
        };
        let m = BatchMetrics::of(&b, &[0.0], &[0.0], &[0.0], &[0.0], 0.1);
        assert_eq!(
            (m.entropy, m.logits_chosen, m.mean_token_accuracy),
            (0.0, 0.0, 0.0)
        );
        assert_eq!(m.rewards_accuracies, 0.0, "ties are not wins");
    }

    #[test]
    fn accuracies_are_float32_quotients() {
        let b = PairBatch {
            chosen: vec![SeqStats::default(); 3],
            rejected: vec![SeqStats::default(); 3],
        };
        let m = BatchMetrics::of(&b, &[0.0; 3], &[0.0; 3], &[1.0, 1.0, -1.0], &[0.0; 3], 0.1);
        assert_eq!(m.rewards_accuracies, f64::from(2.0f32 / 3.0f32));
        assert_ne!(m.rewards_accuracies, 2.0 / 3.0);
    }

    #[test]
    fn windows_average_per_mode_and_count_train_tokens() {
        let batch = |v: f64, tokens: u64| BatchMetrics {
            entropy: v,
            logps_rejected: -v,
            attention_tokens: tokens,
            ..BatchMetrics::default()
        };
        let mut log = MetricsLog::new();
        log.record(Mode::Train, &batch(1.0, 10));
        log.record(Mode::Train, &batch(2.0, 20));
        log.record(Mode::Eval, &batch(7.0, 1000));
        let t = log.take(Mode::Train);
        let names: Vec<&str> = t.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "entropy",
                "num_tokens",
                "logits/chosen",
                "logits/rejected",
                "mean_token_accuracy",
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "rewards/margins",
                "logps/chosen",
                "logps/rejected"
            ]
        );
        assert_eq!(t.get("entropy"), Some(1.5));
        assert_eq!(t.get("logps/rejected"), Some(-1.5));
        assert_eq!(t.get("num_tokens"), Some(30.0));
        assert!(log.take(Mode::Train).is_empty());
        // Eval: its own window, prefixed names, num_tokens still the train total.
        let e = log.take(Mode::Eval);
        assert_eq!(e.get("eval_entropy"), Some(7.0));
        assert_eq!(e.get("eval_num_tokens"), Some(30.0));
        assert_eq!(e.len(), 11);
        log.record(Mode::Train, &batch(4.0, 5));
        assert_eq!(log.take(Mode::Train).get("num_tokens"), Some(35.0));
        log.set_total_train_tokens(100);
        assert_eq!(log.total_train_tokens(), 100);
    }
}
