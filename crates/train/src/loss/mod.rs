//! TRL 1.16's DPO losses on per-sequence numbers, with their gradients and TRL's metrics.
//!
//! `prefer train` replaces `DPOTrainer._compute_loss`. The model side measures, for every
//! sequence of a batch of N pairs, sums over its completion tokens — policy and reference
//! log-probs, token count, and the sums behind the logged statistics ([`SeqStats`]) — and
//! this module turns them into TRL's loss, `d loss / d log π(token)` for every completion
//! token ([`TokenGrads`]: one value per sequence, or two with `ld_alpha`), and TRL's metrics.
//! The model side then back-propagates each token's gradient through its log-softmax.
//!
//! - [`options`]: the options (`loss_type`, `loss_weights`, `beta`, `label_smoothing`,
//!   `f_divergence_type`, `f_alpha_divergence_coef`, `discopop_tau`, `use_weighting`,
//!   `ld_alpha`) with TRL's names, defaults, checks and messages;
//! - [`divergence`]: the f-DPO score of a log-ratio; [`terms`]: each loss type and its
//!   derivatives; [`compute`]: a batch through the weighted sum of types;
//! - [`metrics`]: per-batch metrics and the logging window (`eval_` names, `num_tokens`).
//!
//! All math is f64. Where TRL's semantics and a bare formula differ, TRL wins: IPO and
//! `sigmoid_norm` divide scores by token counts clamped to ≥ 1, `sft` averages over all
//! chosen tokens of the batch, `aot` sorts, WPO weights are constants to autograd, and LD-DPO
//! weights the tail of the longer sequence. Fixtures recorded from TRL itself
//! (tools/gen_dpo_loss_fixtures.py) check all of it (tests/dpo_losses.rs).
//!
//! ```
//! use train::loss::{DpoLoss, DpoLossConfig, PairBatch, SeqStats};
//!
//! let loss = DpoLoss::new(&DpoLossConfig::default()).unwrap(); // sigmoid, beta 0.1
//! let seq = |logps: f64, ref_logps: f64| SeqStats { logps, ref_logps, tokens: 4, ..SeqStats::default() };
//! let batch = PairBatch { chosen: vec![seq(-6.0, -8.0)], rejected: vec![seq(-9.0, -7.0)] };
//! let out = loss.compute(&batch).unwrap();
//! // −log σ(0.1·((−6 + 8) − (−9 + 7))) = −log σ(0.4)
//! assert!((out.loss - (1.0 + (-0.4f64).exp()).ln()).abs() < 1e-12);
//! assert!(out.grad.chosen[0] < 0.0 && out.grad.rejected[0] > 0.0);
//! assert_eq!(out.metrics.rewards_accuracies, 1.0);
//! ```

mod batch;
mod compute;
mod divergence;
mod logistic;
mod metrics;
mod options;
mod terms;

pub use batch::{PairBatch, SeqStats};
pub use compute::{DpoLoss, LossOutput, TokenGrads};
pub use metrics::{BatchMetrics, Logged, MetricsLog, Mode};
pub use options::{DpoLossConfig, FDivergence, LossType};
