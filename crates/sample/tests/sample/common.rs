//! Shared helpers: the fixture tokenizer and scripted logits.

use std::sync::{Arc, OnceLock};

use sample::{NewSequence, Sampler, SamplingParams, SequenceState, StopTokens};
use tokenizers::Tokenizer;

/// The model vocabulary used with the fixture tokenizer: larger than the tokenizer's 1003
/// entries, as a padded embedding is.
pub const VOCAB: usize = 1008;
pub const EOS: u32 = 1;

/// fixtures/tokenizer/tokenizer.json (found at run time), loaded once.
pub fn tokenizer() -> Arc<Tokenizer> {
    static TOK: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = testkit::fixture("tokenizer/tokenizer.json");
        Arc::new(Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    })
    .clone()
}

pub fn encode(text: &str) -> Vec<u32> {
    tokenizer().encode(text, false).unwrap().get_ids().to_vec()
}

/// A logits row whose greedy choice (and, at any sane temperature, nearly every draw) is `id`.
pub fn forcing(id: u32) -> Vec<f32> {
    let mut row = vec![0.0f32; VOCAB];
    row[id as usize] = 30.0;
    row
}

/// A sequence over the fixture tokenizer, with EOS = <eos> and extra generation_config EOS ids.
pub fn sequence(params: SamplingParams, prompt: &str, generation_eos: &[u32]) -> SequenceState {
    keyed_sequence(params, prompt, generation_eos, 0, 0)
}

/// [`sequence`] for sample `index` of request `key` (what picks its RNG).
pub fn keyed_sequence(
    params: SamplingParams,
    prompt: &str,
    generation_eos: &[u32],
    key: u64,
    index: u32,
) -> SequenceState {
    let params = Arc::new(params.validate().unwrap());
    let mut prompt_ids = vec![2]; // <bos>
    prompt_ids.extend(encode(prompt));
    SequenceState::new(NewSequence {
        stop_tokens: Arc::new(StopTokens::new(&params, Some(EOS), generation_eos)),
        rng: Sampler::new(7).rng_for(&params, key, index),
        params,
        prompt_ids,
        tokenizer: tokenizer(),
        max_model_len: None,
    })
    .unwrap()
}
