//! Greedy parity with HF transformers: the engine on the real model (CPU, f32) generates
//! token for token what `generate(do_sample=False)` generated for every fixture model
//! (fixtures/reference/<model>.json `greedy`: 3 prompts of 3, 10 and 20 ids, 40 new tokens,
//! EOS disabled). Small KV blocks make every sequence span many pages, and the 43–60 token
//! sequences cross the fixtures' sliding windows (6, 8, 12, 16). Each model runs three ways:
//! plain, with prefill cut into chunks, and with a pool so small that sequences are
//! preempted and recomputed.

use std::sync::Arc;

use model::Model;
use sample::{Engine, ModelRunner};
use tokenizers::Tokenizer;

use crate::fixture_greedy::{MODELS, SETUPS, greedy_cases, greedy_params, new_sequence};

#[test]
fn greedy_generation_matches_hf_on_every_fixture_model() {
    let mut failures = Vec::new();
    for name in MODELS {
        let dir = testkit::fixture("models").join(name);
        let tokenizer = Arc::new(Tokenizer::from_file(dir.join("tokenizer.json")).unwrap());
        let cases = greedy_cases(name);
        let params = greedy_params();
        for setup in &SETUPS {
            let model = Model::load(&dir, engine::Device::Cpu).unwrap();
            let runner = ModelRunner::new(model, setup.block_size, setup.num_blocks, None).unwrap();
            let mut engine = Engine::new(runner, setup.config).unwrap();
            for (i, case) in cases.iter().enumerate() {
                let new = new_sequence(&params, &tokenizer, case, i);
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
