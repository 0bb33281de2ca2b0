//! # model — HF checkpoints and the five decoder families
//!
//! Loads a Hugging Face model directory — `config.json` (either config shape),
//! `model.safetensors` or its sharded index (bf16/f16/f32, memory-mapped), `tokenizer.json`
//! with `tokenizer_config.json`, `generation_config.json` — and runs the decoder on the
//! engine's ops with the exact semantics of transformers 5.17 for Llama, Mistral, Qwen2,
//! Gemma and Gemma-2.
//!
//! ## Design
//! - [`ModelConfig`] is the one checked description of a decoder. Each family file
//!   (`llama.rs`, `mistral.rs`, `qwen2.rs`, `gemma.rs`, `gemma2.rs`) parses its config with
//!   its HF class defaults and fills in an [`Arch`]: the switches that make it differ from
//!   Llama (norm offset, embedding scale, biases, windows, soft-caps, extra norms,
//!   activation). Its doc lists its quirks and the HF source it matches.
//! - One shared decoder layer (`decoder.rs`) reads those switches; its forward is a function
//!   of (layer weights, input, positions, layout), so the trainer can recompute a layer in
//!   backward ([`Model::layer_forward`]).
//! - Packed batches: activations are `[T, ...]` over all sequences, and an
//!   [`engine::ops::SeqLayout`] says where each sequence starts. With a [`KvCache`] the
//!   queries of a sequence are the last `q_len` of its `kv_len` positions (prefill, chunked
//!   prefill and decode are one code path); [`CpuKvCache`] is the reference cache.
//! - Log-probs go through the engine's chunked log-softmax ([`Model::token_stats`]): a
//!   `[T × V]` logits tensor never exists. [`Model::completion_stats`] is DPO's reference
//!   pass: log p(completion tokens | prompt) for many rows in one forward.
//! - Devices: `Model::load(dir, Device::Cpu)` keeps f32 weights; `Device::Cuda(n)` uploads
//!   them as bf16 (bf16 checkpoints bit for bit, f16/f32 rounded to nearest-even on the host,
//!   one tensor at a time) and runs the same ops on the GPU. q/k/v and gate/up are stacked
//!   at load time so each is one GEMM, and residual adds are fused with the next RMSNorm.
//! - [`Model::start_profile`] / [`Model::stop_profile`] time each op kind ([`OpTimes`]),
//!   for benchmarks.
//! - Errors are a typed [`ModelError`] naming the file, field or tensor.
//!
//! ## Example
//! ```no_run
//! use model::{Model, Tokenizer};
//! let dir = std::path::Path::new("fixtures/models/llama");
//! let model = Model::load(dir, engine::Device::Cpu)?;
//! let tok = Tokenizer::load(dir)?;
//! let pc = tok.encode_prompt_completion("Question: 2+2?\nAnswer:", " 4", true)?;
//! let stats = model.completion_stats(&[(&pc.prompt_ids, &pc.completion_ids)])?;
//! let logp: f32 = stats[0].logp.iter().sum();
//! println!("log p(completion) = {logp}");
//! # Ok::<(), model::ModelError>(())
//! ```

mod config;
mod decoder;
mod error;
mod gemma;
mod gemma2;
mod generation;
mod kv_cache;
mod layer_backward;
mod llama;
mod lora;
mod merge;
mod mistral;
mod model;
mod profile;
mod qwen2;
mod tokenizer;
mod training;
mod weights;

#[cfg(test)]
mod reference;
#[cfg(test)]
mod testutil;

pub use config::{Arch, Family, ModelConfig};
pub use error::{ModelError, Result};
pub use generation::GenerationConfig;
pub use kv_cache::{CpuKvCache, KvCache};
pub use lora::{Dropout, LayerLora, Lora, LoraPair, LoraSpec, LoraTarget, module_shape};
pub use merge::{DEFAULT_MAX_SHARD_BYTES, MergeOptions, MergeReport, merge_adapter};
pub use model::Model;
pub use profile::{OpKind, OpTimes, env_switch};
pub use tokenizer::{PromptCompletion, Tokenizer, common_prefix_len};
pub use training::{Checkpointing, LoraTape, TrainBatch};
