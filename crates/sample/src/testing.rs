//! Test helpers for this crate's tests and for the tests of crates that use it (the
//! `testing` feature; never part of a release build): sequences driven through chosen
//! tokens, as a model certain of each token would drive them.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::params::SamplingParams;
use crate::sampler::Sampler;
use crate::sequence::{NewSequence, SequenceState};
use crate::stop::StopTokens;

/// The logit a [`forcing_row`] gives its token; every other logit is 0.
pub const FORCING_LOGIT: f32 = 30.0;

/// A logits row of `vocab` entries whose greedy choice (and, at any sane temperature, nearly
/// every draw) is `id`.
pub fn forcing_row(vocab: usize, id: u32) -> Vec<f32> {
    let mut row = vec![0.0f32; vocab];
    row[id as usize] = FORCING_LOGIT;
    row
}

/// A sequence of `params` (stop token `eos`, no context limit, seed 0) stepped through
/// exactly `ids`, each forced by a [`forcing_row`] of `vocab` logits. Panics on anything
/// the sequence refuses: a test helper.
pub fn forced_sequence(
    params: SamplingParams,
    prompt_ids: Vec<u32>,
    tokenizer: Arc<Tokenizer>,
    eos: u32,
    vocab: usize,
    ids: &[u32],
) -> SequenceState {
    let params = Arc::new(params.validate().expect("valid sampling params"));
    let mut seq = SequenceState::new(NewSequence {
        stop_tokens: Arc::new(StopTokens::new(&params, Some(eos), &[])),
        rng: Sampler::new(0).rng_for(&params, 0, 0),
        params,
        prompt_ids,
        tokenizer,
        max_model_len: None,
    })
    .expect("a new sequence");
    for &id in ids {
        seq.step(&forcing_row(vocab, id)).expect("a step");
    }
    seq
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::fixture_tokenizer;

    #[test]
    fn forced_sequences_take_exactly_the_forced_tokens() {
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: Some(3),
            ..Default::default()
        };
        let seq = forced_sequence(
            params,
            vec![2, 40],
            fixture_tokenizer(),
            1,
            1003,
            &[7, 9, 8],
        );
        assert_eq!(seq.output_ids(), &[7, 9, 8]);
        assert!(seq.is_finished());
        // One logit of 30 against 1002 zeros, computed independently in f64.
        let want = 30.0 - (30f64.exp() + 1002.0).ln();
        for &lp in seq.token_logprobs() {
            assert!((lp as f64 - want).abs() < 1e-6, "{lp} vs {want}");
        }
    }
}
