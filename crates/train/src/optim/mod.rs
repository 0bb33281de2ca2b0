//! The optimizer side of a training step, as transformers' Trainer (inside TRL's DPOTrainer)
//! takes it, on f32 parameters with f32 state:
//!
//! 1. [`clip_grad_norm`]: `torch.nn.utils.clip_grad_norm_` — one L2 norm over all gradients,
//!    every gradient scaled by `min(1, max_norm / (norm + 1e-6))`; the pre-clip norm is what
//!    TRL logs as `grad_norm` (Trainer's `max_grad_norm` defaults to 1.0; with 0 it only
//!    measures, [`grad_norm`]).
//! 2. [`AdamW::step`]: `torch.optim.AdamW` with the learning rate the schedule gives this
//!    step (crate::schedule). bitsandbytes' paged 32-bit AdamW (the reference workflow's) does
//!    the same math with f32 state; only its memory paging differs.
//! 3. Weight decay per parameter group: [`decays`] is Trainer's `get_decay_parameter_names`
//!    rule on parameter names (bias and norm weights are not decayed). LoRA parameters are all
//!    decayed.
//!
//! Parameters are named flat f32 buffers: the optimizer registers `(name, len)` pairs once
//! and each step takes the buffers in that order. Its state (step count, `exp_avg`,
//! `exp_avg_sq`) saves to and loads from one safetensors file for an exact resume
//! ([`AdamW::save_state`], [`AdamW::load_state`]).
//!
//! ```
//! use train::optim::{AdamW, AdamWConfig, clip_grad_norm};
//! let config = AdamWConfig { weight_decay: 0.05, ..AdamWConfig::default() };
//! let mut opt = AdamW::new(config, [("q_proj.lora_A.weight", 3), ("norm.weight", 2)]).unwrap();
//! let (mut a, mut n) = (vec![0.5f32, -0.5, 1.0], vec![1.0f32, 1.0]);
//! let (mut ga, mut gn) = (vec![3.0f32, 0.0, 4.0], vec![0.0f32, 0.0]);
//! let norm = clip_grad_norm(&mut [&mut ga[..], &mut gn[..]], 1.0);
//! assert_eq!(norm, 5.0);
//! opt.step(1e-3, &mut [&mut a[..], &mut n[..]], &[&ga[..], &gn[..]]).unwrap();
//! assert_eq!(opt.steps_taken(), 1);
//! assert_eq!(n, vec![1.0, 1.0]); // no gradient, no decay (a norm weight)
//! ```

mod adamw;
mod clip;
mod decay;
mod state_file;

pub use adamw::{AdamW, AdamWConfig, ParamInfo};
pub use clip::{clip_grad_norm, grad_norm};
pub use decay::decays;
pub use state_file::STATE_FILE;
