//! DPO with LoRA: what `prefer train` is built from.
//!
//! - [`examples`]: preference rows to token ids and packed batches, as TRL builds them;
//! - [`loss`]: TRL's DPO loss types on per-sequence log-probs, with their gradients;
//! - [`optim`]: AdamW as torch computes it; [`schedule`]: learning-rate schedules as
//!   transformers computes them;
//! - [`peft`]: LoRA adapter files PEFT and vLLM load, and LoRA initialisation.
//!
//! The model side (LoRA in the decoder layers, hand-written forward and backward) lives in
//! crates/model; this crate turns its per-sequence log-probs into losses and updates.

mod error;
pub mod examples;
pub mod loss;
pub mod optim;
pub mod peft;
pub mod schedule;
pub mod trainer;

pub use error::{Result, TrainError};
