//! Checkpoints: `output_dir/checkpoint-{step}/`, as transformers lays them out, holding what
//! an exact resume needs.
//!
//! - `adapter_config.json`, `adapter_model.safetensors`: the adapter (PEFT's format, so any
//!   checkpoint is also a usable adapter);
//! - `optimizer.safetensors`: AdamW's step count and moments;
//! - `trainer_state.json`: the global step, epoch, log history, the running `num_tokens`, and
//!   what the run's data order depends on (seed, example count);
//! - `training_args.json`: the run's options.
//!
//! The data order ([`crate::examples::epoch_order`]), the schedule and the dropout masks are
//! functions of (seed, step), so nothing else is needed to continue exactly. A checkpoint is
//! written into a `.partial` folder and renamed when complete: a folder named
//! `checkpoint-N` is always whole.

use std::path::{Path, PathBuf};

use model::{Lora, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use crate::peft::{load_adapter, save_adapter};
use crate::trainer::config::TrainConfig;

/// The file transformers keeps its state in.
pub const STATE_FILE: &str = "trainer_state.json";
pub const ARGS_FILE: &str = "training_args.json";
const PREFIX: &str = "checkpoint-";

/// transformers' `TrainerState` fields we use, plus our own for exact resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub epoch: f64,
    pub max_steps: usize,
    pub logging_steps: usize,
    pub eval_steps: Option<usize>,
    pub save_steps: usize,
    pub train_batch_size: usize,
    pub num_train_epochs: f64,
    /// Every logged entry so far (TRL's names, then `epoch` and `step`).
    pub log_history: Vec<serde_json::Map<String, serde_json::Value>>,
    /// TRL's `num_tokens` so far (TRL restarts it at 0 on resume; we continue it).
    pub total_train_tokens: u64,
    /// What the data order depends on: a resumed run must see the same.
    pub seed: u64,
    pub train_examples: usize,
}

/// Writes `output_dir/checkpoint-{step}` and returns its path.
pub fn save_checkpoint(
    output_dir: &Path,
    lora: &Lora,
    optimizer: &AdamW,
    state: &TrainerState,
    config: &TrainConfig,
    base_model: &Path,
) -> Result<PathBuf> {
    let dir = output_dir.join(format!("{PREFIX}{}", state.global_step));
    let partial = output_dir.join(format!(".{PREFIX}{}.partial", state.global_step));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| TrainError::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| TrainError::io(&partial, e))?;
    save_adapter(&partial, lora, Some(&base_model.to_string_lossy()))?;
    optimizer.save_state(&partial)?;
    write_json(&partial.join(STATE_FILE), state)?;
    write_json(&partial.join(ARGS_FILE), config)?;
    if dir.exists() {
        // A checkpoint of the same step from an earlier, interrupted run: replace it whole.
        std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    }
    std::fs::rename(&partial, &dir).map_err(|e| TrainError::io(&dir, e))?;
    Ok(dir)
}

/// What a checkpoint restores.
pub struct Restored {
    pub lora: Lora,
    pub state: TrainerState,
}

/// Reads a checkpoint's adapter and state, and loads its optimizer state into `optimizer`.
pub fn load_checkpoint(dir: &Path, model: &ModelConfig, optimizer: &mut AdamW) -> Result<Restored> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|source| TrainError::Json {
        path: path.clone(),
        source,
    })?;
    let lora = load_adapter(dir, model)?.lora;
    optimizer.load_state(dir)?;
    Ok(Restored { lora, state })
}

/// The checkpoint of `output_dir` with the highest step, if any.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(output_dir)?.pop().map(|(_, p)| p))
}

/// `output_dir`'s complete checkpoints, by step.
pub fn checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(TrainError::io(output_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(output_dir, e))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes the oldest checkpoints beyond `limit`.
pub fn prune_checkpoints(output_dir: &Path, limit: usize) -> Result<()> {
    let all = checkpoints(output_dir)?;
    let excess = all.len().saturating_sub(limit);
    for (_, path) in &all[..excess] {
        std::fs::remove_dir_all(path).map_err(|e| TrainError::io(path, e))?;
    }
    Ok(())
}

/// Pretty JSON through a temporary file and a rename.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| TrainError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n").map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}
