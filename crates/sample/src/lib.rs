//! # sample — generation: vLLM's sampling semantics and a batched engine
//!
//! Two layers. The sampling core turns one sequence's logits row into its next token and
//! keeps the sequence's state; the engine runs many sequences through a model at once.
//!
//! Sampling core:
//! - `params`: [`SamplingParams`] with vLLM's names, defaults and checks (including the
//!   low-temperature clamp: 0 < T < 0.01 becomes 0.01, with a warning), validated into
//!   [`ValidParams`].
//! - `processors`: the logits pipeline in vLLM V1's order — min_tokens masking,
//!   repetition/frequency/presence penalties, temperature, min_p, top_k, top_p.
//! - `candidates`: the sampler's fast path — the same draw from a row's top candidates when
//!   the parameters allow (top_k ≤ 64, no penalties / min_p / min_tokens mask).
//! - `sampler`: greedy argmax (ties → lowest id) or a draw from a per-sequence seeded RNG
//!   ([`Sampler`], [`SequenceRng`]), with the raw (unprocessed) log-probs vLLM reports by
//!   default.
//! - `detok`: [`IncrementalDetokenizer`], which never splits a UTF-8 character.
//! - `stop`: stop tokens ([`StopTokens`]: EOS, generation_config EOS ids, stop_token_ids)
//!   and stop strings matched on the text, with vLLM's [`FinishReason`] / [`StopReason`].
//! - `sequence`: [`SequenceState`], which ties them together behind one `step(logits)`;
//!   [`step_batch`] steps a whole batch in parallel.
//!
//! Engine:
//! - `engine`: [`Engine`] and the [`StepModel`] trait a model implements: each step is a
//!   [`StepBatch`] of prefill chunks and decode tokens of many sequences, packed, with
//!   their KV block tables; the model returns the logits of each sequence's last token.
//! - `scheduler`: continuous batching, chunked prefill under a token budget, admission by
//!   free KV blocks, preemption by recompute.
//! - `kv_blocks`: the paged KV cache's block tables and free list.
//! - `paged_kv` + `model_runner`: [`ModelRunner`], a [`model::Model`] on the CPU as a
//!   [`StepModel`], its KV cache in a paged pool read through the block tables.
//! - `paged_runner`: [`PagedRunner`], the device path (a GPU above all): per-layer K/V
//!   pools from `engine::ops::kv_pool`, written with `paged_kv_write` through one
//!   `PagedLayout` per step, LM head on each sequence's last row on the device, one logits
//!   copy per step; [`plan_gpu_memory`] sizes the pools from `gpu_memory_utilization`.
//! - `output`: the samples file — rows ([`sample_row`]), appended as sequences finish and
//!   resumed after a crash ([`SamplesFile`]).
//!
//! Tests of other crates can turn on the `testing` feature for `testing`: sequences forced
//! through chosen tokens.
//!
//! Reproducibility: each sequence owns its RNG (from its request's seed, or from a global
//! seed and a stable request key), so its draws do not depend on the rest of the batch.
//!
//! ## Example
//! ```
//! use std::sync::Arc;
//! use sample::{NewSequence, Sampler, SamplingParams, SequenceState, StopTokens};
//! use tokenizers::{Tokenizer, models::bpe::BPE};
//!
//! let params = Arc::new(SamplingParams { temperature: 0.0, max_tokens: Some(2), ..Default::default() }
//!     .validate().unwrap());
//! let tokenizer = Arc::new(Tokenizer::new(BPE::default()));
//! let mut seq = SequenceState::new(NewSequence {
//!     params: params.clone(),
//!     prompt_ids: vec![0],
//!     tokenizer,
//!     stop_tokens: Arc::new(StopTokens::new(&params, Some(3), &[])),
//!     rng: Sampler::new(0).rng_for(&params, 0, 0),
//!     max_model_len: None,
//! }).unwrap();
//! let out = seq.step(&[0.0, 2.0, 1.0, 0.5]).unwrap(); // greedy: token 1
//! assert_eq!(out.token.token_id, 1);
//! assert!(out.finish.is_none());
//! let out = seq.step(&[0.0, 0.0, 1.0, 0.5]).unwrap();
//! assert_eq!(seq.output_ids(), &[1, 2]);
//! assert_eq!(out.finish.unwrap().reason.as_str(), "length"); // max_tokens reached
//! ```

mod candidates;
mod decode_graph;
mod detok;
mod engine;
mod error;
mod kv_blocks;
mod model_runner;
mod output;
mod paged_kv;
mod paged_runner;
mod params;
mod processors;
mod sampler;
mod scheduler;
mod sequence;
mod stop;

#[cfg(test)]
mod test_util;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use detok::IncrementalDetokenizer;
pub use engine::{
    Engine, EngineConfig, EngineStats, Finished, KvGeometry, SeqId, SeqStep, StepBatch, StepLogits,
    StepModel,
};
pub use error::{Result, SampleError};
pub use model_runner::ModelRunner;
pub use output::Resume;
pub use output::{RowContext, SAMPLE_FIELDS, SampleKey, SamplesFile, sample_row};
pub use paged_runner::{
    GpuMemoryPlan, KV_READ_ENV, KvRead, PagedRunner, RunnerTimes, STEP_TRACE_ENV, plan_gpu_memory,
};
pub use params::{GREEDY_TEMPERATURE_EPS, MIN_SAMPLING_TEMPERATURE, SamplingParams, ValidParams};
pub use processors::TokenHistory;
pub use sampler::{SampledToken, Sampler, SequenceRng};
pub use sequence::{Finish, NewSequence, SequenceState, StepOutcome, step_batch};
pub use stop::{FinishReason, StopReason, StopTokens, TokenStop};
/// The `tokenizers` crate, whose `Tokenizer` [`NewSequence`] takes (re-exported so callers
/// need not depend on it themselves).
pub use tokenizers;
