//! The fixture models' HF greedy runs and the engine setups they are replayed under, shared
//! by the CPU parity test (`greedy.rs`, in the `sample` test binary) and the device runner's
//! (`gpu_generation.rs`, its own binary, which includes this file by `#[path]`).

// Each binary uses a subset (only the GPU test reads the margins).
#![allow(dead_code)]

use std::sync::Arc;

use sample::{EngineConfig, NewSequence, Sampler, SamplingParams, StopTokens, ValidParams};
use serde_json::Value;
use tokenizers::Tokenizer;

pub const MODELS: [&str; 9] = [
    "llama-tiny",
    "llama-ropeparams",
    "mistral-tiny",
    "qwen2-tiny",
    "qwen2-window",
    "gemma-tiny",
    "gemma-exactgelu",
    "gemma2-tiny",
    "gemma2-oldconfig",
];

/// One HF greedy run: prompt, the 40 ids HF generated, and HF f32's top-1/top-2 margin at
/// each generated position.
pub struct Case {
    pub prompt: Vec<u32>,
    pub output: Vec<u32>,
    pub margins: Vec<f64>,
}

/// fixtures/reference/<model>.json's `greedy` cases (40 new tokens, EOS disabled).
pub fn greedy_cases(name: &str) -> Vec<Case> {
    let path = testkit::fixture(format!("reference/{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    v["greedy"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `greedy` list", path.display()))
        .iter()
        .map(|g| {
            assert_eq!(g["max_new_tokens"], 40);
            Case {
                prompt: testkit::u32s(&g["prompt_ids"]),
                output: testkit::u32s(&g["output_ids"]),
                margins: testkit::f64s(&g["margins"]),
            }
        })
        .collect()
}

/// HF's greedy settings: temperature 0, EOS ignored, 40 new tokens.
pub fn greedy_params() -> Arc<ValidParams> {
    Arc::new(
        SamplingParams {
            temperature: 0.0,
            ignore_eos: true,
            max_tokens: Some(40),
            ..Default::default()
        }
        .validate()
        .unwrap(),
    )
}

/// Case `i` as the engine takes it (EOS id 1, as in the fixture tokenizer).
pub fn new_sequence(
    params: &Arc<ValidParams>,
    tokenizer: &Arc<Tokenizer>,
    case: &Case,
    i: usize,
) -> NewSequence {
    NewSequence {
        params: params.clone(),
        prompt_ids: case.prompt.clone(),
        tokenizer: tokenizer.clone(),
        stop_tokens: Arc::new(StopTokens::new(params, Some(1), &[1])),
        rng: Sampler::new(0).rng_for(params, i as u64, 0),
        max_model_len: None,
    }
}

pub struct Setup {
    pub what: &'static str,
    pub block_size: usize,
    pub num_blocks: usize,
    pub config: EngineConfig,
}

pub const SETUPS: [Setup; 3] = [
    Setup {
        what: "one batch, blocks of 4",
        block_size: 4,
        num_blocks: 64,
        config: EngineConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
        },
    },
    Setup {
        what: "chunked prefill of 5 tokens a step, blocks of 3",
        block_size: 3,
        num_blocks: 64,
        config: EngineConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 5,
        },
    },
    Setup {
        what: "30 blocks of 2: preemption",
        block_size: 2,
        num_blocks: 30,
        config: EngineConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
        },
    },
];
