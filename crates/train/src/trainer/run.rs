//! The training loop: transformers' `Trainer` + TRL's `DPOTrainer`, on our engine.
//!
//! Per optimizer step: the step's micro-batches (in the epoch's seeded order) each add
//! 1/(micro-batches in the step) of their loss gradient; the gradients are clipped to
//! `max_grad_norm` (the pre-clip norm is logged as `grad_norm`); AdamW takes the schedule's
//! learning rate for that step. Every `logging_steps` the mean step loss and TRL's metrics
//! since the last log are logged; every `eval_steps` the evaluation set is scored;
//! every `save_steps` (and at the end) a checkpoint is written. The final adapter is also
//! written to `output_dir` itself.

use std::path::{Path, PathBuf};

use engine::Device;
use model::{Checkpointing, Dropout, Lora, LoraPair, Model};
use serde_json::{Map, Value};

use crate::error::{Result, TrainError};
use crate::examples::{DpoExample, StepPlan, epoch_order};
use crate::loss::{DpoLoss, MetricsLog, Mode};
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm};
use crate::peft::{SeededRng, init_lora, load_adapter, lora_parameters, save_adapter};
use crate::schedule::{Schedule, SchedulerKind, SchedulerKwargs, warmup_steps};
use crate::trainer::checkpoint::{
    TrainerState, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint,
};
use crate::trainer::config::TrainConfig;
use crate::trainer::micro_batch::{eval_batch, micro_batch};

/// Where a run starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Resume {
    /// A fresh adapter.
    No,
    /// The latest checkpoint in `output_dir`, or a fresh adapter when there is none.
    Latest,
    /// This checkpoint folder.
    From(PathBuf),
}

/// What the loop reports as it goes (the CLI turns these into a progress bar and lines).
pub enum Event<'a> {
    Started {
        start_step: usize,
        total_steps: usize,
    },
    Stepped {
        step: usize,
    },
    Logged(&'a Map<String, Value>),
    Saved(&'a Path),
}

/// The end of a run.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub global_step: usize,
    /// Mean loss over the steps this process ran.
    pub train_loss: f64,
    pub adapter_dir: PathBuf,
    pub last_checkpoint: PathBuf,
}

/// Trains a LoRA adapter on `train` (evaluating on `eval` when given and `eval_steps` is set).
pub fn train(
    model: &Model,
    config: &TrainConfig,
    train: &[DpoExample],
    eval: Option<&[DpoExample]>,
    resume: Resume,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<TrainSummary> {
    config.validate()?;
    let examples = config.example_config()?;
    let loss = DpoLoss::new(&config.loss)?;
    let ld_alpha = config.loss.ld_alpha;
    let plan = StepPlan::new(
        train.len(),
        config.per_device_train_batch_size,
        config.gradient_accumulation_steps,
        config.num_train_epochs,
        config.max_steps,
    )?;
    let total = plan.total_steps();
    let schedule = Schedule::new(
        SchedulerKind::from_name(&config.lr_scheduler_type, &SchedulerKwargs::default())?,
        config.learning_rate,
        warmup_steps(config.warmup_steps, total as u64)?,
        total as u64,
    )?;
    let mut lora = match &config.init_adapter {
        None => init_lora(
            config.lora_spec()?,
            model.config(),
            &mut SeededRng::new(config.seed),
        )?,
        Some(dir) => {
            let lora = load_adapter(dir, model.config())?.lora;
            let spec = config.lora_spec()?;
            if lora.spec.r != spec.r
                || lora.spec.alpha != spec.alpha
                || lora.spec.use_rslora != spec.use_rslora
                || sorted(&lora.spec.targets) != sorted(&spec.targets)
            {
                return Err(TrainError::Arg {
                    what: "init_adapter",
                    msg: format!(
                        "{}: the adapter is {:?}, the options ask for {spec:?}",
                        dir.display(),
                        lora.spec
                    ),
                });
            }
            // Dropout is a training option, not part of the adapter.
            Lora { spec, ..lora }
        }
    };
    let mut optimizer = AdamW::new(
        AdamWConfig {
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_epsilon,
            weight_decay: config.weight_decay,
        },
        lora_parameters(&lora),
    )?;
    let mut state = TrainerState {
        global_step: 0,
        epoch: 0.0,
        max_steps: total,
        logging_steps: config.logging_steps,
        eval_steps: config.eval_steps,
        save_steps: config.save_steps,
        train_batch_size: config.per_device_train_batch_size,
        num_train_epochs: config.num_train_epochs,
        log_history: Vec::new(),
        total_train_tokens: 0,
        seed: config.seed,
        train_examples: train.len(),
    };
    let from = match resume {
        Resume::No => None,
        Resume::Latest => latest_checkpoint(&config.output_dir)?,
        Resume::From(dir) => Some(dir),
    };
    if let Some(dir) = from {
        let restored = load_checkpoint(&dir, model.config(), &mut optimizer)?;
        check_resumable(&dir, &restored.state, &state, &restored.lora, &lora)?;
        lora = restored.lora;
        state = restored.state;
        tracing::info!(checkpoint = %dir.display(), step = state.global_step, "resuming");
    }
    std::fs::create_dir_all(&config.output_dir)
        .map_err(|e| TrainError::io(&config.output_dir, e))?;

    let device = model.device();
    let mut metrics = MetricsLog::new();
    metrics.set_total_train_tokens(state.total_train_tokens);
    let (mut window_loss, mut window_steps) = (0.0f64, 0usize);
    let (mut run_loss, mut run_steps) = (0.0f64, 0usize);
    let mut order: Option<(usize, Vec<usize>)> = None;
    let mut last_checkpoint = None;
    on_event(Event::Started {
        start_step: state.global_step,
        total_steps: total,
    });
    for step in state.global_step..total {
        let Some(plan_step) = plan.step(step) else {
            break;
        };
        if order.as_ref().is_none_or(|(e, _)| *e != plan_step.epoch) {
            order = Some((
                plan_step.epoch,
                epoch_order(train.len(), config.seed, plan_step.epoch),
            ));
        }
        let epoch_order = order.as_ref().map(|(_, o)| o.as_slice()).unwrap_or(&[]);
        let micro_batches = plan_step.batches.len();
        let scale = 1.0 / micro_batches as f64;
        // The f32 master adapter stays on the host with the optimizer; the model's device
        // gets a copy to compute with (bf16 on a GPU) and accumulates f32 gradients.
        let compute = lora.to_device(device)?;
        let mut grads = lora.zeros_on(device)?;
        let mut step_loss = 0.0;
        for (j, b) in plan_step.batches.clone().enumerate() {
            let batch: Vec<&DpoExample> = plan
                .batch_examples(epoch_order, b)
                .iter()
                .map(|&i| &train[i])
                .collect();
            let dropout = dropout(config, step, j);
            let out = micro_batch(
                model,
                &compute,
                &batch,
                &examples,
                &loss,
                ld_alpha,
                dropout,
                if config.gradient_checkpointing {
                    Checkpointing::Recompute
                } else {
                    Checkpointing::Keep
                },
                Some((&mut grads, scale)),
            )?;
            step_loss += out.loss * scale;
            metrics.record(Mode::Train, &out.metrics);
        }
        drop(compute);
        let mut grads = grads.to_device(Device::Cpu)?;
        let grad_norm = clip_grad_norm(&mut slices_mut(&mut grads)?, config.max_grad_norm);
        if !grad_norm.is_finite() {
            return Err(TrainError::Arg {
                what: "training",
                msg: format!(
                    "step {}: the gradient norm is {grad_norm}; the loss was {step_loss}",
                    step + 1
                ),
            });
        }
        let lr = schedule.lr(step as u64);
        let grad_slices = slices(&grads)?;
        optimizer.step(lr, &mut slices_mut(&mut lora)?, &grad_slices)?;
        state.global_step = step + 1;
        state.epoch = plan_step.epoch_after;
        state.total_train_tokens = metrics.total_train_tokens();
        window_loss += step_loss;
        window_steps += 1;
        run_loss += step_loss;
        run_steps += 1;
        on_event(Event::Stepped { step: step + 1 });

        let done = step + 1 == total;
        if (step + 1) % config.logging_steps == 0 {
            let mut entry = Map::new();
            put(&mut entry, "loss", window_loss / window_steps as f64);
            put(&mut entry, "grad_norm", grad_norm as f64);
            put(&mut entry, "learning_rate", lr);
            for (name, v) in metrics.take(Mode::Train).iter() {
                put(&mut entry, name, v);
            }
            finish_entry(&mut entry, &state);
            on_event(Event::Logged(&entry));
            state.log_history.push(entry);
            (window_loss, window_steps) = (0.0, 0);
        }
        if let (Some(every), Some(eval)) = (config.eval_steps, eval)
            && ((step + 1) % every == 0 || done)
        {
            let compute = lora.to_device(device)?;
            let mut entry = evaluate(model, &compute, eval, config, &loss, &mut metrics)?;
            finish_entry(&mut entry, &state);
            on_event(Event::Logged(&entry));
            state.log_history.push(entry);
        }
        if (step + 1) % config.save_steps == 0 || done {
            let dir = save_checkpoint(
                &config.output_dir,
                &lora,
                &optimizer,
                &state,
                config,
                model.dir(),
            )?;
            on_event(Event::Saved(&dir));
            if let Some(limit) = config.save_total_limit {
                prune_checkpoints(&config.output_dir, limit)?;
            }
            last_checkpoint = Some(dir);
        }
    }
    let last_checkpoint = match last_checkpoint {
        Some(dir) => dir,
        // Resumed at the end: nothing left to run.
        None => latest_checkpoint(&config.output_dir)?.ok_or_else(|| TrainError::Arg {
            what: "resume",
            msg: "no step to run and no checkpoint to report".into(),
        })?,
    };
    save_adapter(
        &config.output_dir,
        &lora,
        Some(&model.dir().to_string_lossy()),
    )?;
    Ok(TrainSummary {
        global_step: state.global_step,
        train_loss: if run_steps > 0 {
            run_loss / run_steps as f64
        } else {
            f64::NAN
        },
        adapter_dir: config.output_dir.clone(),
        last_checkpoint,
    })
}

/// The evaluation set's loss (weighted by batch size, as the Trainer averages per example)
/// and TRL's metrics, `eval_`-prefixed.
fn evaluate(
    model: &Model,
    lora: &Lora,
    eval: &[DpoExample],
    config: &TrainConfig,
    loss: &DpoLoss,
    metrics: &mut MetricsLog,
) -> Result<Map<String, Value>> {
    let examples = config.example_config()?;
    let (mut sum, mut pairs) = (0.0f64, 0usize);
    for chunk in eval.chunks(config.per_device_eval_batch_size) {
        let batch: Vec<&DpoExample> = chunk.iter().collect();
        let out = eval_batch(model, lora, &batch, &examples, loss, config.loss.ld_alpha)?;
        sum += out.loss * out.pairs as f64;
        pairs += out.pairs;
        metrics.record(Mode::Eval, &out.metrics);
    }
    let mut entry = Map::new();
    put(&mut entry, "eval_loss", sum / pairs.max(1) as f64);
    for (name, v) in metrics.take(Mode::Eval).iter() {
        put(&mut entry, name, v);
    }
    Ok(entry)
}

/// Micro-batch j of step `step`'s masks: a function of (seed, step, j) so a resumed run
/// draws what an uninterrupted one would.
fn dropout(config: &TrainConfig, step: usize, j: usize) -> Dropout {
    if config.lora_dropout <= 0.0 {
        return Dropout::Off;
    }
    Dropout::On {
        p: config.lora_dropout,
        seed: config.seed,
        step: (step * config.gradient_accumulation_steps + j) as u64,
    }
}

fn put(entry: &mut Map<String, Value>, name: &str, v: f64) {
    // JSON has no NaN or infinity; transformers writes them as such, we write null.
    entry.insert(
        name.to_string(),
        serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
    );
}

fn finish_entry(entry: &mut Map<String, Value>, state: &TrainerState) {
    put(entry, "epoch", state.epoch);
    entry.insert("step".into(), Value::from(state.global_step));
}

/// A checkpoint continues this run only with the same data, seed and adapter shape.
fn check_resumable(
    dir: &Path,
    saved: &TrainerState,
    fresh: &TrainerState,
    saved_lora: &Lora,
    fresh_lora: &Lora,
) -> Result<()> {
    let bad = |msg: String| {
        Err(TrainError::Format {
            path: dir.to_path_buf(),
            where_: "trainer_state.json".into(),
            msg,
        })
    };
    if saved.seed != fresh.seed {
        return bad(format!(
            "saved with seed {}, this run has {}: the data order would differ",
            saved.seed, fresh.seed
        ));
    }
    if saved.train_examples != fresh.train_examples {
        return bad(format!(
            "saved with {} training examples, this run has {}: the data order would differ",
            saved.train_examples, fresh.train_examples
        ));
    }
    if saved.max_steps != fresh.max_steps {
        return bad(format!(
            "saved for {} steps, this run plans {}: the schedule would differ",
            saved.max_steps, fresh.max_steps
        ));
    }
    if saved_lora.spec != fresh_lora.spec {
        return bad(format!(
            "the checkpoint's adapter is {:?}, this run's is {:?}",
            saved_lora.spec, fresh_lora.spec
        ));
    }
    Ok(())
}

fn sorted(targets: &[model::LoraTarget]) -> Vec<model::LoraTarget> {
    let mut t = targets.to_vec();
    t.sort();
    t
}

/// Every LoRA tensor as a flat slice, in [`lora_parameters`] order (A before B).
fn slices(lora: &Lora) -> Result<Vec<&[f32]>> {
    let mut out = Vec::new();
    for (_, _, pair) in lora.pairs() {
        out.push(pair.a.as_slice()?);
        out.push(pair.b.as_slice()?);
    }
    Ok(out)
}

fn slices_mut(lora: &mut Lora) -> Result<Vec<&mut [f32]>> {
    let mut out = Vec::new();
    for (_, _, pair) in lora.pairs_mut() {
        let LoraPair { a, b } = pair;
        out.push(a.as_mut_slice()?);
        out.push(b.as_mut_slice()?);
    }
    Ok(out)
}
