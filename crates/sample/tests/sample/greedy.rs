//! Greedy parity with HF transformers: the engine on the real model (CPU, f32) generates
//! token for token what `generate(do_sample=False)` generated for every fixture model
//! (fixtures/reference/<model>.json `greedy`: 3 prompts of 3, 10 and 20 ids, 40 new tokens,
//! EOS disabled). Small KV blocks make every sequence span many pages, and the 43–60 token
//! sequences cross the fixtures' sliding windows (6, 8, 12, 16). Each model runs three ways:
//! plain, with prefill cut into chunks, and with a pool so small that sequences are
//! preempted and recomputed.

use std::sync::Arc;

use model::Model;
use sample::{Engine, EngineConfig, ModelRunner, NewSequence, Sampler, SamplingParams, StopTokens};
use serde_json::Value;
use tokenizers::Tokenizer;

const MODELS: [&str; 9] = [
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

struct Case {
    prompt: Vec<u32>,
    output: Vec<u32>,
}

fn greedy_cases(name: &str) -> Vec<Case> {
    let path = testkit::fixture("reference").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            assert_eq!(g["max_new_tokens"], 40);
            Case {
                prompt: testkit::u32s(&g["prompt_ids"]),
                output: testkit::u32s(&g["output_ids"]),
            }
        })
        .collect()
}

struct Setup {
    what: &'static str,
    block_size: usize,
    num_blocks: usize,
    config: EngineConfig,
}

const SETUPS: [Setup; 3] = [
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

#[test]
fn greedy_generation_matches_hf_on_every_fixture_model() {
    let mut failures = Vec::new();
    for name in MODELS {
        let dir = testkit::fixture("models").join(name);
        let tokenizer = Arc::new(Tokenizer::from_file(dir.join("tokenizer.json")).unwrap());
        let cases = greedy_cases(name);
        let params = Arc::new(
            SamplingParams {
                temperature: 0.0,
                ignore_eos: true,
                max_tokens: Some(40),
                ..Default::default()
            }
            .validate()
            .unwrap(),
        );
        for setup in &SETUPS {
            let model = Model::load(&dir, engine::Device::Cpu).unwrap();
            let runner = ModelRunner::new(model, setup.block_size, setup.num_blocks, None).unwrap();
            let mut engine = Engine::new(runner, setup.config).unwrap();
            for (i, case) in cases.iter().enumerate() {
                let new = NewSequence {
                    params: params.clone(),
                    prompt_ids: case.prompt.clone(),
                    tokenizer: tokenizer.clone(),
                    stop_tokens: Arc::new(StopTokens::new(&params, Some(1), &[1])),
                    rng: Sampler::new(0).rng_for(&params, i as u64, 0),
                    max_model_len: None,
                };
                engine.add(i, new).unwrap();
            }
            let done = engine.run_to_completion().unwrap();
            assert_eq!(done.len(), cases.len());
            for f in &done {
                let want = &cases[f.tag].output;
                if f.seq.output_ids() != want.as_slice() {
                    failures.push(format!(
                        "{name}, {}: prompt {}: got {:?}, HF {:?}",
                        setup.what,
                        f.tag,
                        f.seq.output_ids(),
                        want
                    ));
                }
                assert_eq!(f.seq.finish().unwrap().reason.as_str(), "length");
            }
            let stats = engine.stats();
            if setup.num_blocks == 30 {
                assert!(stats.preemptions > 0, "{name}: {stats:?}");
            }
            assert_eq!(engine.num_free_blocks(), setup.num_blocks);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
