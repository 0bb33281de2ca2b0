//! One generated sequence: its tokens, text, log-probs and stop state, advanced one token per
//! [`SequenceState::step`].
//!
//! A step does what vLLM's engine core and output processor do for one request, in their
//! order:
//! 1. sample a token from the logits row (min_tokens mask, penalties, filters, draw);
//! 2. check stop tokens, then max_tokens / the model's context (`check_stop`);
//! 3. detokenize the token (not a stop token's, unless include_stop_str_in_output);
//! 4. look for stop strings in the new text once min_tokens are out, and cut the text;
//! 5. hand out the text that is now final (never a partial character or stop string).
//!
//! One deliberate difference: reaching the model's context ends a sequence even before
//! min_tokens (vLLM's check_stop waits for min_tokens first, which would overrun the context).

use std::sync::Arc;

use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::detok::IncrementalDetokenizer;
use crate::error::{Result, SampleError};
use crate::params::ValidParams;
use crate::processors::TokenHistory;
use crate::sampler::{SampledToken, Sampler, SequenceRng};
use crate::stop::{FinishReason, StopReason, StopStrings, StopTokens, TokenStop};

/// How and why a sequence finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub reason: FinishReason,
    /// The stop token id or stop string; `None` for EOS and length.
    pub stop_reason: Option<StopReason>,
}

/// What one step produced.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    pub token: SampledToken,
    /// Text that became final with this step (for streaming; may be empty).
    pub text_delta: String,
    /// Set on the step that finished the sequence.
    pub finish: Option<Finish>,
}

/// Everything a new sequence needs.
pub struct NewSequence {
    pub params: Arc<ValidParams>,
    pub prompt_ids: Vec<u32>,
    pub tokenizer: Arc<Tokenizer>,
    /// From [`StopTokens::new`] with the tokenizer's and generation_config's EOS ids.
    pub stop_tokens: Arc<StopTokens>,
    /// From [`Sampler::rng_for`].
    pub rng: SequenceRng,
    /// The model's context length (prompt + output); `None` for no limit.
    pub max_model_len: Option<usize>,
}

pub struct SequenceState {
    params: Arc<ValidParams>,
    prompt_ids: Vec<u32>,
    output_ids: Vec<u32>,
    /// Detokenized output, cut at a stop string.
    text: String,
    /// Bytes of `text` already handed out through `text_delta`.
    streamed: usize,
    cumulative_logprob: f64,
    token_logprobs: Vec<f32>,
    /// Per token, the top raw log-probs when `logprobs` was asked for.
    top_logprobs: Vec<Vec<(u32, f32)>>,
    finish: Option<Finish>,
    history: TokenHistory,
    detok: IncrementalDetokenizer,
    stop_tokens: Arc<StopTokens>,
    stop_strings: StopStrings,
    rng: SequenceRng,
    max_model_len: Option<usize>,
}

impl SequenceState {
    pub fn new(new: NewSequence) -> Result<Self> {
        if new.prompt_ids.is_empty() {
            return Err(SampleError::EmptyPrompt);
        }
        let detok = IncrementalDetokenizer::new(
            new.tokenizer,
            &new.prompt_ids,
            new.params.skip_special_tokens,
        )?;
        Ok(Self {
            history: TokenHistory::new(&new.prompt_ids),
            stop_strings: StopStrings::new(&new.params),
            params: new.params,
            prompt_ids: new.prompt_ids,
            output_ids: Vec::new(),
            text: String::new(),
            streamed: 0,
            cumulative_logprob: 0.0,
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            finish: None,
            detok,
            stop_tokens: new.stop_tokens,
            rng: new.rng,
            max_model_len: new.max_model_len,
        })
    }

    /// Samples the next token from this sequence's logits row `[V]` and updates everything.
    pub fn step(&mut self, logits: &[f32]) -> Result<StepOutcome> {
        if let Some(f) = &self.finish {
            return Err(SampleError::Finished {
                reason: f.reason.as_str(),
            });
        }
        // Field by field (not `self.banned()`): the RNG is borrowed mutably beside it.
        let banned = if self.output_ids.len() < self.params.min_tokens as usize {
            self.stop_tokens.min_tokens_mask()
        } else {
            &[]
        };
        let token = Sampler::sample(logits, &self.params, &self.history, banned, &mut self.rng)?;
        self.accept(token)
    }

    /// How many device candidates the next step needs (`engine::ops::top_k_candidates`), or
    /// `None` when it needs the whole logits row.
    pub(crate) fn candidates_needed(&self, vocab: usize) -> Option<usize> {
        crate::candidates::candidates_needed(&self.params, self.banned(), vocab)
    }

    /// [`SequenceState::step`] from the row's device candidates: `Ok(None)`, with nothing
    /// changed, when they cannot decide the token (then step with the whole row).
    pub(crate) fn step_candidates(
        &mut self,
        row: crate::candidates::CandidateRow<'_>,
        vocab: usize,
    ) -> Result<Option<StepOutcome>> {
        if let Some(f) = &self.finish {
            return Err(SampleError::Finished {
                reason: f.reason.as_str(),
            });
        }
        if !self.banned().is_empty() {
            return Ok(None);
        }
        match crate::candidates::sample_from_candidates(row, &self.params, vocab, &mut self.rng) {
            Some(token) => self.accept(token).map(Some),
            None => Ok(None),
        }
    }

    /// The min_tokens mask of this step (empty once min_tokens are out).
    fn banned(&self) -> &[u32] {
        if self.output_ids.len() < self.params.min_tokens as usize {
            self.stop_tokens.min_tokens_mask()
        } else {
            &[]
        }
    }

    /// Appends the sampled `token` and does the rest of the step: stops, text, streaming.
    fn accept(&mut self, token: SampledToken) -> Result<StepOutcome> {
        let min_tokens = self.params.min_tokens as usize;
        let id = token.token_id;
        self.output_ids.push(id);
        self.history.push_output(id);
        self.cumulative_logprob += token.logprob as f64;
        self.token_logprobs.push(token.logprob);
        if self.params.logprobs.is_some() {
            self.top_logprobs.push(token.top_logprobs.clone());
        }

        let mut finish = self.check_token_stop(id);
        let stop_terminated = matches!(
            finish,
            Some(Finish {
                reason: FinishReason::Stop,
                ..
            })
        );
        let text_before = self.text.len();
        if !stop_terminated || self.params.include_stop_str_in_output {
            let piece = self.detok.push(id)?;
            self.text.push_str(&piece);
        }
        if !self.stop_strings.is_empty()
            && self.output_ids.len() > min_tokens
            && let Some(m) = self.stop_strings.find(&self.text, text_before)
        {
            self.text.truncate(m.truncate_to);
            finish = Some(Finish {
                reason: FinishReason::Stop,
                stop_reason: Some(StopReason::Text(self.stop_strings.get(m.index).to_string())),
            });
        }

        // Held-back text is never shorter than a stop match's overlap with earlier text, so
        // a cut never reaches into what was already streamed.
        debug_assert!(self.streamed <= self.text.len());
        let release_to = if finish.is_some() {
            self.text.len()
        } else {
            self.text.len() - self.stop_strings.held_back(&self.text)
        };
        let text_delta = if release_to > self.streamed {
            let d = self.text[self.streamed..release_to].to_string();
            self.streamed = release_to;
            d
        } else {
            String::new()
        };
        self.finish = finish.clone();
        Ok(StepOutcome {
            token,
            text_delta,
            finish,
        })
    }

    /// vLLM's `check_stop` for the token just appended.
    fn check_token_stop(&self, id: u32) -> Option<Finish> {
        let n_out = self.output_ids.len();
        let context_full = self
            .max_model_len
            .is_some_and(|m| self.prompt_ids.len() + n_out >= m);
        let length = Some(Finish {
            reason: FinishReason::Length,
            stop_reason: None,
        });
        if n_out < self.params.min_tokens as usize {
            return if context_full { length } else { None };
        }
        match self.stop_tokens.check(id) {
            Some(TokenStop::Eos) => {
                return Some(Finish {
                    reason: FinishReason::Stop,
                    stop_reason: None,
                });
            }
            Some(TokenStop::Id(t)) => {
                return Some(Finish {
                    reason: FinishReason::Stop,
                    stop_reason: Some(StopReason::Token(t)),
                });
            }
            None => {}
        }
        let max_reached = self.params.max_tokens.is_some_and(|m| n_out >= m as usize);
        if max_reached || context_full {
            length
        } else {
            None
        }
    }

    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt_ids
    }

    pub fn output_ids(&self) -> &[u32] {
        &self.output_ids
    }

    /// The output text (final once the sequence has finished).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Sum of the sampled tokens' raw log-probs.
    pub fn cumulative_logprob(&self) -> f64 {
        self.cumulative_logprob
    }

    /// Raw log-prob of each sampled token.
    pub fn token_logprobs(&self) -> &[f32] {
        &self.token_logprobs
    }

    /// Per sampled token, the top raw log-probs (empty unless `logprobs` was set).
    pub fn top_logprobs(&self) -> &[Vec<(u32, f32)>] {
        &self.top_logprobs
    }

    pub fn finish(&self) -> Option<&Finish> {
        self.finish.as_ref()
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Prompt plus output tokens: the sequence's length in the KV cache after this step's
    /// token is fed back.
    pub fn num_tokens(&self) -> usize {
        self.prompt_ids.len() + self.output_ids.len()
    }

    pub fn params(&self) -> &ValidParams {
        &self.params
    }
}

/// Steps a batch: row b of `logits` `[B, V]` goes to `seqs[b]`, in parallel. Each sequence
/// draws from its own RNG, so results do not depend on the batch or the thread schedule.
/// One result per sequence, so one bad row does not fail the others.
pub fn step_batch(
    seqs: &mut [&mut SequenceState],
    logits: &[f32], // [B, V]
    vocab: usize,
) -> Result<Vec<Result<StepOutcome>>> {
    if vocab == 0 || logits.len() != seqs.len() * vocab {
        return Err(SampleError::LogitsShape {
            got: logits.len(),
            rows: seqs.len(),
            vocab,
        });
    }
    Ok(seqs
        .par_iter_mut()
        .zip(logits.par_chunks(vocab))
        .map(|(seq, row)| seq.step(row))
        .collect())
}
