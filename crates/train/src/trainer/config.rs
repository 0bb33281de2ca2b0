//! Every option of a training run, named and defaulted as TRL 1.16's `DPOConfig` (and the
//! transformers `TrainingArguments` and PEFT `LoraConfig` fields it inherits) name them, so a
//! TRL config translates key for key. Read from TOML (`prefer train --config`), overridden
//! by flags.

use std::path::PathBuf;

use model::{LoraSpec, LoraTarget};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::examples::{ExampleConfig, PromptWrapper, Truncation};
use crate::loss::DpoLossConfig;

/// The reference workflow's LoRA targets (GUIDE §1).
pub const DEFAULT_TARGETS: [&str; 8] = [
    "embed_tokens",
    "q_proj",
    "k_proj",
    "v_proj",
    "gate_proj",
    "down_proj",
    "up_proj",
    "lm_head",
];

/// A training run's options. Unknown keys in a file are errors (a typo must not silently train
/// with a default): see [`TrainConfig::from_toml`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Where checkpoints and the final adapter go.
    pub output_dir: PathBuf,
    // The loop (TrainingArguments).
    pub num_train_epochs: f64,
    /// Overrides `num_train_epochs` when set (TrainingArguments' −1 is "unset").
    pub max_steps: Option<usize>,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler_type: String,
    /// A count (≥ 1) or a ratio of the total steps (< 1), as transformers 5 reads it.
    pub warmup_steps: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    /// Recompute each layer in the backward from its saved input (less memory; TRL's
    /// DPOConfig default), or keep the forward's activations (faster, more memory).
    pub gradient_checkpointing: bool,
    pub logging_steps: usize,
    /// Evaluate every this many steps (and at the end) when evaluation data is given.
    pub eval_steps: Option<usize>,
    pub save_steps: usize,
    /// Keep at most this many checkpoints (the oldest are deleted).
    pub save_total_limit: Option<usize>,
    pub seed: u64,
    // The loss (DPOConfig).
    #[serde(flatten)]
    pub loss: DpoLossConfig,
    // The examples (DPOConfig).
    pub max_length: Option<usize>,
    /// "keep_start" or "keep_end".
    pub truncation_mode: String,
    pub max_prompt_length: Option<usize>,
    /// A template with `{question}`, applied to every prompt (GUIDE §1: the reference
    /// workflow's `###질문:\n{question}\n\n###답변:\n`); none by default.
    pub prompt_wrapper: Option<String>,
    // LoRA (PEFT LoraConfig, prefixed as TRL's ModelConfig names them).
    pub lora_r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub lora_target_modules: Vec<String>,
    pub use_rslora: bool,
    /// Start from this PEFT adapter folder instead of a fresh initialisation (its r, alpha
    /// and targets must equal the options above).
    pub init_adapter: Option<PathBuf>,
}

impl Default for TrainConfig {
    /// TRL 1.16's defaults (DPOConfig overrides TrainingArguments' learning rate 5e-5 with
    /// 1e-6 and logging_steps 500 with 10); LoRA as the reference workflow sets it.
    fn default() -> TrainConfig {
        TrainConfig {
            output_dir: PathBuf::from("trainer_output"),
            num_train_epochs: 3.0,
            max_steps: None,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-6,
            lr_scheduler_type: "linear".into(),
            warmup_steps: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            gradient_checkpointing: true,
            logging_steps: 10,
            eval_steps: None,
            save_steps: 500,
            save_total_limit: None,
            seed: 42,
            loss: DpoLossConfig::default(),
            max_length: Some(1024),
            truncation_mode: "keep_start".into(),
            max_prompt_length: None,
            prompt_wrapper: None,
            lora_r: 16,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            lora_target_modules: DEFAULT_TARGETS.map(String::from).to_vec(),
            use_rslora: false,
            init_adapter: None,
        }
    }
}

impl TrainConfig {
    /// Parses TOML; `what` names the source in errors.
    pub fn from_toml(text: &str, what: &str) -> Result<TrainConfig> {
        let bad = |msg: String| TrainError::Arg {
            what: "config",
            msg: format!("{what}: {msg}"),
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        // serde cannot refuse unknown keys of a struct with a flattened field, so the keys
        // are checked against the full list (every option, the flattened loss's included).
        let known = serde_json::to_value(TrainConfig::default()).map_err(|e| bad(e.to_string()))?;
        if let Some(known) = known.as_object()
            && let Some(key) = table.keys().find(|k| !known.contains_key(k.as_str()))
        {
            let mut names: Vec<&str> = known.keys().map(String::as_str).collect();
            names.sort_unstable();
            return Err(bad(format!(
                "unknown option `{key}`; the options are {}",
                names.join(", ")
            )));
        }
        table
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.to_string()))
    }

    /// The checks nothing downstream makes; the loss, example, schedule and optimizer options
    /// are checked where they are used, with TRL's messages.
    pub fn validate(&self) -> Result<()> {
        let arg = |what, msg: String| Err(TrainError::Arg { what, msg });
        if self.logging_steps == 0 {
            return arg("logging_steps", "must be at least 1".into());
        }
        if self.save_steps == 0 {
            return arg("save_steps", "must be at least 1".into());
        }
        if self.eval_steps == Some(0) {
            return arg("eval_steps", "must be at least 1".into());
        }
        if self.per_device_eval_batch_size == 0 {
            return arg("per_device_eval_batch_size", "must be at least 1".into());
        }
        if self.save_total_limit == Some(0) {
            return arg(
                "save_total_limit",
                "must be at least 1 (unset keeps all)".into(),
            );
        }
        if !(self.num_train_epochs > 0.0 && self.num_train_epochs.is_finite())
            && self.max_steps.is_none()
        {
            return arg(
                "num_train_epochs",
                format!("must be positive, got {}", self.num_train_epochs),
            );
        }
        if self.max_steps == Some(0) {
            return arg(
                "max_steps",
                "must be at least 1 (unset trains num_train_epochs)".into(),
            );
        }
        if self.loss.use_weighting {
            return arg(
                "use_weighting",
                "WPO weighting needs log Σ_v p² of every completion token, which prefer's \
                 log-prob op does not compute yet"
                    .into(),
            );
        }
        self.lora_spec()?;
        self.example_config()?;
        Ok(())
    }

    pub fn lora_spec(&self) -> Result<LoraSpec> {
        let targets = self
            .lora_target_modules
            .iter()
            .map(|t| {
                LoraTarget::parse(t).map_err(|e| TrainError::Arg {
                    what: "lora_target_modules",
                    msg: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // One order whatever the option's: specs compare equal across runs and checkpoints.
        let mut targets: Vec<LoraTarget> = targets;
        targets.sort();
        targets.dedup();
        let spec = LoraSpec {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            targets,
        };
        spec.validate().map_err(|e| TrainError::Arg {
            what: "lora",
            msg: e.to_string(),
        })?;
        Ok(spec)
    }

    pub fn example_config(&self) -> Result<ExampleConfig> {
        let truncation =
            Truncation::from_name(&self.truncation_mode).ok_or_else(|| TrainError::Arg {
                what: "truncation_mode",
                msg: format!(
                    "unknown mode {:?}; expected keep_start or keep_end",
                    self.truncation_mode
                ),
            })?;
        let wrapper = self
            .prompt_wrapper
            .as_deref()
            .map(PromptWrapper::new)
            .transpose()?;
        let config = ExampleConfig {
            max_length: self.max_length,
            truncation,
            max_prompt_length: self.max_prompt_length,
            wrapper,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_uses_trl_names_and_refuses_unknown_keys() {
        let c = TrainConfig::from_toml(
            "beta = 0.2\nloss_type = [\"sigmoid\", \"sft\"]\nloss_weights = [1.0, 0.5]\n\
             learning_rate = 1e-5\nwarmup_steps = 100\nlora_r = 8\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.loss.beta, 0.2);
        assert_eq!(c.loss.loss_type.len(), 2);
        assert_eq!(c.learning_rate, 1e-5);
        assert_eq!(c.lora_r, 8);
        assert_eq!(
            c.per_device_train_batch_size, 8,
            "untouched keys keep TRL's default"
        );
        let err = TrainConfig::from_toml("betta = 0.2\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("betta"), "{err}");
        let err = TrainConfig::from_toml("lora_rr = 2\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("lora_rr"), "{err}");
    }

    #[test]
    fn validation_names_the_option() {
        let mut c = TrainConfig {
            lora_target_modules: vec!["q_proj".into(), "qkv".into()],
            ..TrainConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("lora_target_modules") && e.contains("qkv"),
            "{e}"
        );
        c.lora_target_modules = vec!["q_proj".into()];
        c.truncation_mode = "keep_middle".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("truncation_mode"), "{e}");
        c.truncation_mode = "keep_end".into();
        c.loss.use_weighting = true;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("use_weighting")
        );
        c.loss.use_weighting = false;
        c.validate().unwrap();
    }
}
