//! Drawing the next token of one sequence: its own RNG, the raw log-probs, the draw.
//!
//! Each sequence owns a [`SequenceRng`] (ChaCha20), so what it draws depends only on its
//! seed and its own logits, never on which other sequences share the batch or in which
//! order the scheduler visits them.
//! - A request with `seed` s: sample i of its n uses seed s + i, as vLLM's parallel
//!   sampling does (`child_sampling_params.seed = seed + index`).
//! - A request without a seed: the [`Sampler`]'s global seed mixed with a stable key of the
//!   request (e.g. its row) and the sample index. So a run is reproducible from its global
//!   seed, and a resumed run draws what the first run would have drawn.
//!
//! The draw is an inverse-CDF pick with one uniform number per step: the first token (in id
//! order) whose running probability exceeds u · (total). It draws from exactly the processed
//! distribution, like vLLM's exponential race (`probs / Exp(1)`, argmax), though not the same
//! token for the same seed. Greedy steps consume no random number.
//!
//! Log-probs are vLLM's default `raw_logprobs`: log_softmax of the logits as the model gave
//! them, before min_tokens, penalties, temperature and filters.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Result, SampleError};
use crate::params::ValidParams;
use crate::processors::{TokenHistory, argmax, check_row, process_row, softmax};

/// One sequence's random source.
#[derive(Debug, Clone)]
pub struct SequenceRng(ChaCha20Rng);

impl SequenceRng {
    pub fn from_seed(seed: u64) -> Self {
        Self(ChaCha20Rng::seed_from_u64(seed))
    }

    /// A uniform number in [0, 1) with 53 random bits.
    pub fn next_uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }
}

/// The token drawn for one step, with its raw log-prob.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token_id: u32,
    /// log_softmax of the raw logits at `token_id`.
    pub logprob: f32,
    /// 1 + how many other tokens have a raw logit ≥ this one's (vLLM's rank: ties count
    /// against the token).
    pub rank: u32,
    /// The `logprobs` most likely tokens by raw log-prob, descending (ties: lower id first);
    /// empty when not asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Draws tokens, and hands out per-sequence RNGs from one global seed.
#[derive(Debug, Clone)]
pub struct Sampler {
    global_seed: u64,
}

impl Sampler {
    pub fn new(global_seed: u64) -> Self {
        Self { global_seed }
    }

    /// The RNG for sample `sample_index` (0..n) of a request. `request_key` identifies the
    /// request stably across runs (its row index, say); only used when the request has no
    /// seed of its own.
    pub fn rng_for(
        &self,
        params: &ValidParams,
        request_key: u64,
        sample_index: u32,
    ) -> SequenceRng {
        let seed = match params.seed {
            Some(s) => s.wrapping_add(sample_index as i64) as u64,
            None => {
                let h = splitmix64(self.global_seed);
                let h = splitmix64(h ^ request_key);
                splitmix64(h ^ sample_index as u64)
            }
        };
        SequenceRng::from_seed(seed)
    }

    /// Picks the next token from one raw logits row `[V]`: the pipeline of
    /// [`crate::processors`] (with `banned` masked for min_tokens), then argmax for greedy
    /// parameters or a draw with `rng`.
    pub fn sample(
        raw: &[f32], // [V]
        params: &ValidParams,
        history: &TokenHistory,
        banned: &[u32],
        rng: &mut SequenceRng,
    ) -> Result<SampledToken> {
        // The same token from the row's top candidates, when the parameters allow it.
        if let Some(token) = crate::candidates::sample_candidates(raw, params, banned, rng)? {
            return Ok(token);
        }
        Self::sample_reference(raw, params, history, banned, rng)
    }

    /// [`Sampler::sample`] through the whole pipeline on the whole row: the reference the
    /// fast path is tested against.
    pub(crate) fn sample_reference(
        raw: &[f32], // [V]
        params: &ValidParams,
        history: &TokenHistory,
        banned: &[u32],
        rng: &mut SequenceRng,
    ) -> Result<SampledToken> {
        check_row(raw)?;
        let mut work = raw.to_vec();
        process_row(&mut work, params, history, banned)?;
        let token_id = if params.is_greedy() {
            argmax(&work).ok_or(SampleError::NothingToSample {
                stage: "min_tokens masking and penalties",
            })?
        } else {
            draw(&softmax(&work), rng.next_uniform()).ok_or(SampleError::NothingToSample {
                stage: "min_tokens masking, penalties, min_p, top_k and top_p",
            })?
        };
        let raw_lp = RawLogprobs::new(raw);
        let n_top = params.num_top_logprobs(raw.len()).unwrap_or(0);
        Ok(SampledToken {
            token_id,
            logprob: raw_lp.at(raw, token_id),
            rank: rank_of(raw, token_id),
            top_logprobs: raw_lp.top(raw, n_top),
        })
    }
}

/// SplitMix64's finalizer: spreads a key over all 64 bits, so nearby keys (rows 1, 2, 3)
/// give unrelated seeds.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverse-CDF draw: the first id whose running sum exceeds `u` times the total mass.
/// `None` when every probability is 0.
pub(crate) fn draw(probs: &[f32], u: f64) -> Option<u32> {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    if total <= 0.0 {
        return None;
    }
    let target = u * total;
    let mut cum = 0.0f64;
    let mut last_nonzero = None;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p as f64;
            last_nonzero = Some(i as u32);
            if cum > target {
                return last_nonzero;
            }
        }
    }
    // Rounding left the running sum a hair under the target: the last possible token.
    last_nonzero
}

/// log_softmax of a raw row, kept as its max and log-sum so single entries are cheap.
struct RawLogprobs {
    max: f32,
    log_sum: f64,
}

impl RawLogprobs {
    fn new(raw: &[f32]) -> Self {
        let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = raw.iter().map(|&x| ((x - max) as f64).exp()).sum();
        Self {
            max,
            log_sum: sum.ln(),
        }
    }

    fn at(&self, raw: &[f32], id: u32) -> f32 {
        ((raw[id as usize] - self.max) as f64 - self.log_sum) as f32
    }

    fn top(&self, raw: &[f32], n: usize) -> Vec<(u32, f32)> {
        if n == 0 {
            return Vec::new();
        }
        let desc = |a: &u32, b: &u32| raw[*b as usize].total_cmp(&raw[*a as usize]).then(a.cmp(b));
        let mut ids: Vec<u32> = (0..raw.len() as u32).collect();
        if n < ids.len() {
            ids.select_nth_unstable_by(n - 1, desc);
            ids.truncate(n);
        }
        ids.sort_by(desc);
        ids.into_iter().map(|id| (id, self.at(raw, id))).collect()
    }
}

fn rank_of(raw: &[f32], id: u32) -> u32 {
    let x = raw[id as usize];
    raw.iter().filter(|&&y| y >= x).count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::SamplingParams;

    fn params(p: SamplingParams) -> ValidParams {
        p.validate().unwrap()
    }

    #[test]
    fn draw_follows_the_cumulative_distribution() {
        let probs = [0.0, 0.25, 0.0, 0.5, 0.25];
        assert_eq!(draw(&probs, 0.0), Some(1));
        assert_eq!(draw(&probs, 0.2499), Some(1));
        assert_eq!(draw(&probs, 0.25), Some(3));
        assert_eq!(draw(&probs, 0.7499), Some(3));
        assert_eq!(draw(&probs, 0.75), Some(4));
        assert_eq!(draw(&probs, 0.999_999), Some(4));
        assert_eq!(draw(&[0.0, 0.0], 0.5), None);
    }

    #[test]
    fn raw_logprobs_ignore_processing_and_match_f64_log_softmax() {
        let raw = vec![1.0f32, 2.5, -0.5, 2.5, 0.0];
        let p = params(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.7,
            logprobs: Some(3),
            ..Default::default()
        });
        let h = TokenHistory::from_ids(&[1], &[]);
        let mut rng = SequenceRng::from_seed(1);
        let t = Sampler::sample(&raw, &p, &h, &[], &mut rng).unwrap();
        // Penalty makes token 3 the argmax (token 1 is in the prompt).
        assert_eq!(t.token_id, 3);
        let lse = raw.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        let want = |i: usize| (raw[i] as f64 - lse) as f32;
        assert!((t.logprob - want(3)).abs() < 1e-6);
        // Ranks count ties against the token: 1 and 3 tie for the top.
        assert_eq!(t.rank, 2);
        assert_eq!(
            t.top_logprobs.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 3, 0]
        );
        for &(id, lp) in &t.top_logprobs {
            assert!((lp - want(id as usize)).abs() < 1e-6);
        }
    }

    #[test]
    fn whole_vocabulary_logprobs_with_minus_one() {
        let raw = vec![0.3f32, -1.0, 2.0];
        let p = params(SamplingParams {
            logprobs: Some(-1),
            ..Default::default()
        });
        let t = Sampler::sample(
            &raw,
            &p,
            &TokenHistory::default(),
            &[],
            &mut SequenceRng::from_seed(3),
        )
        .unwrap();
        assert_eq!(
            t.top_logprobs.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![2, 0, 1]
        );
        let total: f64 = t.top_logprobs.iter().map(|x| (x.1 as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn everything_masked_is_an_error() {
        let p = params(SamplingParams {
            min_tokens: 2,
            ..Default::default()
        });
        let raw = vec![0.0f32, f32::NEG_INFINITY];
        let e = Sampler::sample(
            &raw,
            &p,
            &TokenHistory::default(),
            &[0],
            &mut SequenceRng::from_seed(0),
        )
        .unwrap_err();
        assert!(matches!(e, SampleError::NothingToSample { .. }), "{e}");
    }

    #[test]
    fn seeds_for_samples_and_unseeded_requests() {
        let seeded = params(SamplingParams {
            seed: Some(10),
            n: 3,
            ..Default::default()
        });
        let s = Sampler::new(99);
        let mut a = s.rng_for(&seeded, 0, 2);
        let mut b = SequenceRng::from_seed(12);
        assert_eq!(a.next_uniform(), b.next_uniform());
        // A per-request seed ignores the global seed and the request key.
        let mut c = Sampler::new(5).rng_for(&seeded, 77, 2);
        assert_eq!(c.next_uniform(), s.rng_for(&seeded, 0, 2).next_uniform());

        let unseeded = params(SamplingParams::default());
        let u =
            |g: u64, key: u64, i: u32| Sampler::new(g).rng_for(&unseeded, key, i).next_uniform();
        assert_eq!(u(1, 4, 0), u(1, 4, 0));
        assert_ne!(u(1, 4, 0), u(1, 5, 0));
        assert_ne!(u(1, 4, 0), u(1, 4, 1));
        assert_ne!(u(1, 4, 0), u(2, 4, 0));
    }
}
