//! Preference rows → DPO training batches, exactly as TRL 1.16 and transformers 5.17 build
//! them (fixtures/train/dpo_examples.json, made by tools/gen_dpo_examples_fixtures.py from
//! TRL's own `DPOTrainer`, collator and `Trainer` loop, proves it).
//!
//! The stages, one module each:
//! - [`PreferenceColumns`]: a table's `prompt/chosen/rejected` or
//!   `question/response_j/response_k` columns → [`PreferenceRow`]s, each checked (a null
//!   cell, an empty completion: an error naming the row and column);
//! - [`build_examples`]: rows → [`DpoExample`]s (`prompt_ids`, `chosen_ids`,
//!   `rejected_ids`) as `DPOTrainer._prepare_dataset` makes them — optional DPO-time
//!   [`PromptWrapper`], EOS appended, prompt/completion split at the common prefix, our
//!   `max_prompt_length`, and TRL's drop of rows whose prompt alone reaches `max_length`;
//! - [`pack`]: a batch of examples → one [`PackedBatch`] of 2N unpadded sequences
//!   [chosen…, rejected…] cut to `max_length` as TRL's collator cuts them, with next-token
//!   targets, the weights saying which log-probs count, and TRL's token counts;
//! - [`StepPlan`] / [`epoch_order`]: which examples each optimizer step sees, with
//!   transformers' step arithmetic (steps per epoch, total steps, the short last
//!   accumulation window, the logged epoch) and our seeded, resumable shuffle.
//!
//! What differs from TRL, on purpose: `max_prompt_length` (ours; see
//! [`ExampleConfig::max_prompt_length`]), empty completions refused, our own shuffle
//! (torch's RNG is not reproduced). Conversational (message-list) rows are not handled.
//!
//! ## Example
//! ```
//! use train::examples::{DpoExample, ExampleConfig, StepPlan, Truncation, epoch_order, pack};
//! let ex = DpoExample {
//!     row: 0,
//!     prompt_ids: vec![2, 10, 11],
//!     chosen_ids: vec![20, 1],
//!     rejected_ids: vec![30, 31, 1],
//! };
//! let cfg = ExampleConfig {
//!     max_length: Some(5),
//!     truncation: Truncation::KeepStart,
//!     ..ExampleConfig::default()
//! };
//! let batch = pack(&[&ex], &cfg).unwrap();
//! // Chosen, then rejected (cut to 5: its EOS is lost).
//! assert_eq!(batch.input_ids, vec![2, 10, 11, 20, 1, 2, 10, 11, 30, 31]);
//! assert_eq!(batch.weights, vec![0., 0., 1., 1., 0., 0., 0., 1., 1., 0.]);
//! assert_eq!(batch.scored_tokens, vec![2, 2]);
//!
//! // 10 pairs in micro-batches of 3 (4 of them), 3 per step: windows of 3 and 1.
//! let plan = StepPlan::new(10, 3, 3, 1.5, None).unwrap();
//! assert_eq!(plan.total_steps(), 3); // ceil(1.5 epochs × 2 steps)
//! let step = plan.step(1).unwrap(); // the epoch's short last window: micro-batch 3 alone
//! assert_eq!((step.epoch, step.batches.clone()), (0, 3..4));
//! let order = epoch_order(10, 42, step.epoch);
//! assert_eq!(plan.batch_examples(&order, 3).len(), 1);
//! ```

mod build;
mod order;
mod pack;
mod rows;

pub use build::{DpoExample, ExampleConfig, ExampleSet, PromptWrapper, Truncation, build_examples};
pub use order::{OptimizerStep, StepPlan, epoch_order, total_optimizer_steps};
pub use pack::{PackedBatch, pack};
pub use rows::{PreferenceColumns, PreferenceRow};
