//! `prefer train`: DPO with LoRA end to end — options ([`TrainConfig`]), the loop
//! ([`train`]), checkpoints that resume exactly.
//!
//! The pieces: [`crate::examples`] turns rows into packed batches as TRL does, the model
//! crate runs the LoRA forward and the hand-written backward, [`crate::loss`] is TRL's loss
//! and metrics, [`crate::optim`] and [`crate::schedule`] are torch's AdamW and transformers'
//! schedules, [`crate::peft`] writes the adapter.

mod checkpoint;
mod config;
mod micro_batch;
mod run;

pub use checkpoint::{
    ARGS_FILE, STATE_FILE, TrainerState, checkpoints, latest_checkpoint, prune_checkpoints,
};
pub use config::{DEFAULT_TARGETS, TrainConfig};
pub use run::{Event, Resume, TrainSummary, train};
